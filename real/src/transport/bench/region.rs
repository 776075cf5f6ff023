//! A large shared memory region standing in for guest RAM: a memfd mapped `MAP_SHARED`, like the
//! `/dev/shm` file QEMU's RAM lives in (docs/ARCHITECTURE.md, Dirty pages), filled so no page
//! is the shared zero page.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::ptr::NonNull;

/// Bytes per guest page.
pub const PAGE: usize = 4096;

/// A mapped, page-aligned region of `len` bytes, unmapped on drop.
#[derive(Debug)]
pub struct MappedRegion {
    ptr: NonNull<u8>,
    len: usize,
    _fd: OwnedFd,
}

// SAFETY: the mapping is plain memory owned by this value; access goes through `&`/`&mut self`.
unsafe impl Send for MappedRegion {}
// SAFETY: as above; shared access is read-only.
unsafe impl Sync for MappedRegion {}

impl MappedRegion {
    /// Maps `pages` pages and fills page `i` with [`page_byte`]`(seed, i, offset)`.
    pub fn new(pages: usize, seed: u64) -> io::Result<Self> {
        let len = pages.checked_mul(PAGE).filter(|&l| l > 0).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "region size out of range")
        })?;
        // memfd_create: anonymous shared memory, like guest RAM in /dev/shm.
        // SAFETY: the name is a NUL-terminated literal.
        let raw =
            unsafe { libc::memfd_create(c"ftvm-transport-bench".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: memfd_create returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // ftruncate: give the file its size before mapping it.
        // SAFETY: plain syscall on our descriptor.
        if unsafe { libc::ftruncate(raw, len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // mmap MAP_SHARED: writes land in the file's pages, which the sends read.
        // SAFETY: a fresh mapping chosen by the kernel; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                raw,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        let mut region = MappedRegion { ptr, len, _fd: fd };
        for (i, page) in region.as_mut_slice().chunks_mut(PAGE).enumerate() {
            fill_page(page, seed, i);
        }
        Ok(region)
    }

    /// The whole region.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` is our live mapping; `&self` excludes writers.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The whole region, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr..ptr+len` is our live mapping; `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Page `i`.
    pub fn page(&self, i: usize) -> &[u8] {
        &self.as_slice()[i * PAGE..(i + 1) * PAGE]
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.len / PAGE
    }
}

impl Drop for MappedRegion {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; no borrow of it outlives `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Fills one page with a pattern unique to (`seed`, page index), so misplaced or torn pages show.
pub fn fill_page(page: &mut [u8], seed: u64, index: usize) {
    let mut x = seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    for w in page.chunks_mut(8) {
        // splitmix64 step
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        w.copy_from_slice(&z.to_le_bytes()[..w.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_differ_and_are_reproducible() {
        let r = MappedRegion::new(4, 7).unwrap();
        assert_eq!(r.pages(), 4);
        assert_ne!(r.page(0), r.page(1));
        let mut p = vec![0u8; PAGE];
        fill_page(&mut p, 7, 2);
        assert_eq!(r.page(2), &p[..]);
        assert!(MappedRegion::new(0, 1).is_err());
    }
}
