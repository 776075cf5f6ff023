//! Guest RAM as the agent sees it: the RAM file mapped `MAP_SHARED` — read-only on the primary
//! (pages are sent straight from it), writable on the backup (the replica QEMU maps at failover).
//!
//! The mapping is shared with QEMU, whose guest may write any page at any moment while it runs:
//! a page slice is a stable snapshot only while the VM is paused (or the page is write-protected).
//! Reading a hole of a sparse /dev/shm file through the mapping allocates it; use
//! [`GuestRam::data_pages`] to skip holes (they read as zeros).

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use super::{DirtyError, DirtyPages};

/// The host page size (the unit of dirty tracking).
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if ps > 0 {
        ps as usize
    } else {
        4096
    }
}

/// An `mmap` of the whole RAM file, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; moving it between threads is
// fine, and shared access only hands out `&[u8]` (writes need `&mut` on `GuestRamMut`).
unsafe impl Send for Mapping {}
// SAFETY: see above; `&Mapping` only allows reads.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(file: &File, path: &Path, len: usize, writable: bool) -> Result<Mapping, DirtyError> {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh mapping at a kernel-chosen address of `len` bytes of an open file whose
        // size was checked to be `len` (so no access past EOF, which would SIGBUS).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(DirtyError::io("mmap", path)(std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(p.cast()).ok_or_else(|| {
            DirtyError::io("mmap", path)(std::io::Error::other("mapped at address 0"))
        })?;
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping created in `new`, unmapped only here;
        // no slices outlive `self` (they borrow it).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Guest RAM mapped read-only (the primary's sender and the trackers).
pub struct GuestRam {
    map: Mapping,
    file: File,
    path: PathBuf,
    page_size: usize,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("path", &self.path)
            .field("bytes", &self.map.len)
            .finish()
    }
}

fn open_checked(path: &Path, bytes: u64, writable: bool) -> Result<(File, usize), DirtyError> {
    // Never through a symbolic link, and only a file of ours nobody else may write.
    let file = crate::secure_fs::open_existing(path, writable)?;
    let len = checked_len(&file, path, bytes)?;
    Ok((file, len))
}

/// The mapping length of `file`, which must be exactly `bytes` long (a page multiple).
fn checked_len(file: &File, path: &Path, bytes: u64) -> Result<usize, DirtyError> {
    let found = file
        .metadata()
        .map_err(DirtyError::io("stat RAM file", path))?
        .len();
    if found != bytes || bytes == 0 || !bytes.is_multiple_of(page_size() as u64) {
        return Err(DirtyError::SizeMismatch {
            path: path.to_path_buf(),
            found,
            expected: bytes,
        });
    }
    let len = usize::try_from(bytes).map_err(|_| DirtyError::SizeMismatch {
        path: path.to_path_buf(),
        found,
        expected: bytes,
    })?;
    Ok(len)
}

impl GuestRam {
    /// Maps the RAM file read-only; it must be exactly `bytes` long (a page multiple).
    pub fn open(path: &Path, bytes: u64) -> Result<GuestRam, DirtyError> {
        let (file, len) = open_checked(path, bytes, false)?;
        GuestRam::map(file, path, len, false)
    }

    /// Maps an already open RAM file (a memfd) read-only; `label` names it in errors.
    pub fn from_file(file: File, label: &Path, bytes: u64) -> Result<GuestRam, DirtyError> {
        let len = checked_len(&file, label, bytes)?;
        GuestRam::map(file, label, len, false)
    }

    fn map(file: File, path: &Path, len: usize, writable: bool) -> Result<GuestRam, DirtyError> {
        let map = Mapping::new(&file, path, len, writable)?;
        Ok(GuestRam {
            map,
            file,
            path: path.to_path_buf(),
            page_size: page_size(),
        })
    }

    /// The RAM file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Address of the mapping in this process (for registering it with a userfaultfd).
    pub fn base_addr(&self) -> u64 {
        self.map.ptr.as_ptr() as u64
    }

    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        self.map.len as u64
    }

    /// Size in pages.
    pub fn pages(&self) -> u64 {
        (self.map.len / self.page_size) as u64
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// All of guest RAM.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes alive as long as `self`; the kernel keeps
        // it valid (the file length was checked and is never shrunk by ftvm). Its contents may
        // change while the VM runs (module docs), which a `&[u8]` of plain bytes tolerates in
        // practice: readers copy or send it, never rely on it staying equal.
        unsafe { std::slice::from_raw_parts(self.map.ptr.as_ptr(), self.map.len) }
    }

    /// Page `index`, or `None` past the end of RAM.
    pub fn page(&self, index: u64) -> Option<&[u8]> {
        self.run(index..index + 1)
    }

    /// The contiguous pages `range` as one slice (one iovec for a transport), or `None` if the
    /// range is empty or leaves RAM.
    pub fn run(&self, range: Range<u64>) -> Option<&[u8]> {
        if range.start >= range.end || range.end > self.pages() {
            return None;
        }
        let ps = self.page_size;
        let (a, b) = (range.start as usize * ps, range.end as usize * ps);
        Some(&self.as_slice()[a..b])
    }

    /// Maps every page of the file into this process now (`MADV_POPULATE_READ`), so the first
    /// full copy of RAM runs at memory speed instead of taking one page fault per page while
    /// the VM is paused (0.45 s per GiB measured here). A kernel without it (before 5.14) says
    /// `EINVAL`: then the pages fault in on first use, as before, and this is not an error.
    pub fn populate(&self) -> Result<(), DirtyError> {
        // SAFETY: the range is exactly this value's live mapping; the advice only faults pages
        // in, it neither changes their contents nor the mapping.
        let rc = unsafe {
            libc::madvise(
                self.map.ptr.as_ptr().cast(),
                self.map.len,
                libc::MADV_POPULATE_READ,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        match std::io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            e => Err(DirtyError::io("populate the mapping of", &self.path)(e)),
        }
    }

    /// The pages that hold data in the file (`SEEK_DATA`/`SEEK_HOLE`); the others are holes that
    /// read as zeros. Lets a full copy skip holes without allocating them.
    pub fn data_pages(&self) -> Result<DirtyPages, DirtyError> {
        data_pages(&self.file, &self.path, self.pages(), self.page_size)
    }
}

/// Walks the file's data extents with `lseek(SEEK_DATA)` / `lseek(SEEK_HOLE)`.
fn data_pages(
    file: &File,
    path: &Path,
    pages: u64,
    page_size: usize,
) -> Result<DirtyPages, DirtyError> {
    let end = pages as i64 * page_size as i64;
    let fd = file.as_raw_fd();
    let mut out = DirtyPages::new();
    let mut pos: i64 = 0;
    while pos < end {
        // SAFETY: lseek on an fd this function borrows; it only moves the file offset, which
        // nobody else relies on (all other access goes through the mapping or pread).
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `pos`
            }
            return Err(DirtyError::io("lseek(SEEK_DATA)", path)(e));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(DirtyError::io("lseek(SEEK_HOLE)", path)(
                std::io::Error::last_os_error(),
            ));
        }
        let hole = hole.min(end);
        if hole <= data {
            break;
        }
        let ps = page_size as i64;
        out.push((data / ps) as u64..((hole + ps - 1) / ps) as u64);
        pos = hole;
    }
    Ok(out)
}

/// Guest RAM mapped writable: the backup's replica, which QEMU maps at failover.
#[derive(Debug)]
pub struct GuestRamMut {
    ram: GuestRam,
}

impl GuestRamMut {
    /// Maps the RAM file read-write; it must be exactly `bytes` long (a page multiple).
    pub fn open(path: &Path, bytes: u64) -> Result<GuestRamMut, DirtyError> {
        let (file, len) = open_checked(path, bytes, true)?;
        Ok(GuestRamMut {
            ram: GuestRam::map(file, path, len, true)?,
        })
    }

    /// Maps an already open RAM file (a memfd, opened for writing) read-write.
    pub fn from_file(file: File, label: &Path, bytes: u64) -> Result<GuestRamMut, DirtyError> {
        let len = checked_len(&file, label, bytes)?;
        Ok(GuestRamMut {
            ram: GuestRam::map(file, label, len, true)?,
        })
    }

    /// Page `index` for writing, or `None` past the end of RAM.
    pub fn page_mut(&mut self, index: u64) -> Option<&mut [u8]> {
        if index >= self.ram.pages() {
            return None;
        }
        let ps = self.ram.page_size;
        // SAFETY: the mapping is writable and `len` bytes long; `index` is in range so the page
        // lies inside it; `&mut self` makes this the only slice into the mapping from this
        // process for its lifetime.
        Some(unsafe {
            std::slice::from_raw_parts_mut(self.ram.map.ptr.as_ptr().add(index as usize * ps), ps)
        })
    }

    /// Copies one page's contents in.
    pub fn write_page(&mut self, index: u64, data: &[u8]) -> Result<(), DirtyError> {
        let (pages, ps) = (self.ram.pages(), self.ram.page_size);
        if data.len() != ps {
            return Err(DirtyError::BadLength {
                len: data.len(),
                page_size: ps,
            });
        }
        let page = self
            .page_mut(index)
            .ok_or(DirtyError::OutOfRange { index, pages })?;
        page.copy_from_slice(data);
        Ok(())
    }

    /// Flushes written pages to the file (`msync`; a no-op for /dev/shm, needed on disk files).
    pub fn flush(&self) -> Result<(), DirtyError> {
        // SAFETY: msync over exactly the live mapping.
        let r = unsafe {
            libc::msync(
                self.ram.map.ptr.as_ptr().cast(),
                self.ram.map.len,
                libc::MS_SYNC,
            )
        };
        if r != 0 {
            return Err(DirtyError::io("msync", &self.ram.path)(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

impl std::ops::Deref for GuestRamMut {
    type Target = GuestRam;
    fn deref(&self) -> &GuestRam {
        &self.ram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(pages: u64) -> (tempfile::NamedTempFile, u64) {
        let f = tempfile::NamedTempFile::new_in("/dev/shm").unwrap();
        let bytes = pages * page_size() as u64;
        f.as_file().set_len(bytes).unwrap();
        (f, bytes)
    }

    #[test]
    fn writes_through_the_writable_map_show_in_the_read_only_one() {
        let (f, bytes) = file(8);
        let mut w = GuestRamMut::open(f.path(), bytes).unwrap();
        let r = GuestRam::open(f.path(), bytes).unwrap();
        assert_eq!(r.pages(), 8);
        let ps = r.page_size();
        w.write_page(3, &vec![0xAB; ps]).unwrap();
        w.page_mut(5).unwrap()[7] = 9;
        assert!(r.page(3).unwrap().iter().all(|&b| b == 0xAB));
        assert_eq!(r.page(5).unwrap()[7], 9);
        assert_eq!(r.run(2..4).unwrap().len(), 2 * ps);
        assert!(r.page(8).is_none() && r.run(7..9).is_none() && r.run(3..3).is_none());
        assert!(matches!(
            w.write_page(8, &vec![0; ps]),
            Err(DirtyError::OutOfRange { index: 8, pages: 8 })
        ));
        assert!(matches!(
            w.write_page(0, &[0; 3]),
            Err(DirtyError::BadLength { len: 3, .. })
        ));
        w.flush().unwrap();
        // Only the pages written hold data; the rest of the sparse file is holes.
        assert_eq!(r.data_pages().unwrap().ranges(), &[3..4, 5..6]);
    }

    /// Populating faults pages in without writing them: contents stay as they were. (On tmpfs it
    /// allocates the holes, as any first read of them would.)
    #[test]
    fn populate_changes_nothing_a_reader_sees() {
        let (f, bytes) = file(8);
        let mut w = GuestRamMut::open(f.path(), bytes).unwrap();
        let ps = w.ram.page_size();
        w.write_page(3, &vec![0x5A; ps]).unwrap();
        w.flush().unwrap();
        let r = GuestRam::open(f.path(), bytes).unwrap();
        r.populate().unwrap();
        assert!(r.page(3).unwrap().iter().all(|&b| b == 0x5A));
        assert!(r.page(4).unwrap().iter().all(|&b| b == 0));
    }

    #[test]
    fn a_size_mismatch_is_refused() {
        let (f, bytes) = file(4);
        let e = GuestRam::open(f.path(), bytes * 2).unwrap_err();
        assert!(matches!(e, DirtyError::SizeMismatch { found, .. } if found == bytes));
        assert!(GuestRam::open(Path::new("/nonexistent/ram"), bytes).is_err());
    }
}
