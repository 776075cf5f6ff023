//! The page-state table of one copy-on-write checkpoint, shared by the fault handler and the
//! sender (see the parent module for who calls what, under which lock).
//!
//! Every page of the checkpoint is in one of four states:
//!
//! ```text
//!   Unsent ──claim (sender)──▶ InFlight ──release (sender, transport released it)──▶ Sent
//!     │
//!     └──guest write (handler copies the page to its side slot)──▶ Copied
//! ```
//!
//! `Copied` and `Sent` are final. A page leaves `Unsent` exactly once, by a compare-and-swap, so
//! exactly one of the handler (copy) and the sender (claim) wins it; its side slot is written only
//! by the handler that won it, before `Copied` is published (release store), and read only after
//! `Copied` was observed (acquire load). That makes the side buffer free of data races whatever the
//! callers do; the parent module's engine lock adds the ordering against uffd ioctls.

use std::ops::Range;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// State of one page of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PageState {
    /// Still write-protected in guest RAM, not yet handed to the transport.
    Unsent = 0,
    /// The guest wrote it before it was sent: its checkpoint contents are in the side buffer.
    Copied = 1,
    /// Handed to the transport, which may still read it from guest RAM.
    InFlight = 2,
    /// Released by the transport.
    Sent = 3,
}

impl PageState {
    fn from_u8(v: u8) -> PageState {
        match v {
            0 => PageState::Unsent,
            1 => PageState::Copied,
            2 => PageState::InFlight,
            _ => PageState::Sent,
        }
    }
}

/// Raw state of a page whose side slot the handler is filling: it won the page from `Unsent`
/// and publishes `Copied` about a microsecond later. Never seen outside this file.
const COPYING: u8 = 0xff;

/// What a guest write to a page means for one checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnWrite {
    /// Not a page of this checkpoint.
    Outside,
    /// Unsent: copy it (to position `.0`'s slot) before letting the write through.
    Copy(usize),
    /// Being sent from guest RAM: the write must wait for its release.
    Wait,
    /// Already copied or sent: the write may go ahead.
    Free,
}

/// Errors of the sender's side of the table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// A position past the checkpoint's pages.
    #[error("page position {pos} is outside a checkpoint of {len} pages")]
    OutOfRange {
        /// The position.
        pos: usize,
        /// Pages in the checkpoint.
        len: usize,
    },
    /// A page claimed twice (a sender bug).
    #[error("page {page} of the checkpoint was claimed twice")]
    Reclaimed {
        /// The page index.
        page: u64,
    },
    /// The side buffer could not be mapped.
    #[error("mapping a side buffer of {bytes} bytes: {detail}")]
    NoMemory {
        /// Size asked for.
        bytes: usize,
        /// The error of mmap.
        detail: String,
    },
}

/// Zero-initialised memory with one page-sized slot per page of the checkpoint, written at most
/// once per slot (by whoever won that page's `Unsent → Copied` transition).
struct SideBuffer {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is a private mapping owned by this value; slot access is synchronised by the
// page-state protocol of `Table` (one writer per slot before a release store, readers after an
// acquire load).
unsafe impl Send for SideBuffer {}
// SAFETY: as above.
unsafe impl Sync for SideBuffer {}

impl SideBuffer {
    /// A fresh anonymous mapping: its pages are zero until written and cost nothing until then,
    /// so a capture (VM paused) pays neither a memset nor memory for slots never copied. (A heap
    /// allocation would not do: once the allocator recycles a freed buffer of that size, calloc
    /// zeroes it, and at 20 MB that memset alone was milliseconds of pause.)
    fn new(len: usize) -> Result<SideBuffer, TableError> {
        if len == 0 {
            return Ok(SideBuffer {
                ptr: NonNull::dangling(),
                len,
            });
        }
        // SAFETY: a new private anonymous mapping at an address of the kernel's choosing; no
        // existing memory is affected. The result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(TableError::NoMemory {
                bytes: len,
                detail: std::io::Error::last_os_error().to_string(),
            });
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or(TableError::NoMemory {
            bytes: len,
            detail: "mmap returned null".into(),
        })?;
        Ok(SideBuffer { ptr, len })
    }

    /// # Safety
    /// `range` lies inside the buffer and no other thread accesses it during the call.
    unsafe fn write(&self, at: usize, data: &[u8]) {
        debug_assert!(at + data.len() <= self.len);
        // SAFETY: in bounds and exclusive per the caller's contract; `data` cannot overlap the
        // buffer (the buffer is private to this table).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(at), data.len())
        };
    }

    /// # Safety
    /// `at..at+len` lies inside the buffer and is never written again while the slice lives.
    unsafe fn read(&self, at: usize, len: usize) -> &[u8] {
        debug_assert!(at + len <= self.len);
        // SAFETY: per the caller's contract.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(at), len) }
    }
}

impl Drop for SideBuffer {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: `ptr`/`len` are the mapping made in `new`, unmapped only here; no slice
            // into it outlives the buffer (`read` borrows `self`).
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

/// The pages of one checkpoint with their states and side copies.
pub struct Table {
    /// Page indices, ascending and distinct; position `i` is the checkpoint's `i`-th page.
    indices: Vec<u64>,
    states: Vec<AtomicU8>,
    page_size: usize,
    side: SideBuffer,
    copies: AtomicU64,
    waits: AtomicU64,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("pages", &self.indices.len())
            .field("copies", &self.copies())
            .field("waits", &self.waits())
            .finish()
    }
}

impl Table {
    /// A table of `indices` (must be ascending and distinct), every page `Unsent`.
    pub fn new(indices: Vec<u64>, page_size: usize) -> Result<Table, TableError> {
        debug_assert!(indices.windows(2).all(|w| w[0] < w[1]));
        let n = indices.len();
        Ok(Table {
            states: (0..n)
                .map(|_| AtomicU8::new(PageState::Unsent as u8))
                .collect(),
            side: SideBuffer::new(n * page_size)?,
            indices,
            page_size,
            copies: AtomicU64::new(0),
            waits: AtomicU64::new(0),
        })
    }

    /// Pages in the checkpoint.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether the checkpoint has no pages.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// The page indices, ascending.
    pub fn indices(&self) -> &[u64] {
        &self.indices
    }

    /// Position of `page` in the checkpoint.
    pub fn position(&self, page: u64) -> Option<usize> {
        self.indices.binary_search(&page).ok()
    }

    /// State of the page at `pos`.
    pub fn state(&self, pos: usize) -> PageState {
        PageState::from_u8(self.states[pos].load(Ordering::Acquire))
    }

    /// Handler: what a guest write to `page` requires for this checkpoint.
    pub fn on_write(&self, page: u64) -> OnWrite {
        match self.position(page) {
            None => OnWrite::Outside,
            Some(pos) => match self.state(pos) {
                PageState::Unsent => OnWrite::Copy(pos),
                PageState::InFlight => OnWrite::Wait,
                PageState::Copied | PageState::Sent => OnWrite::Free,
            },
        }
    }

    /// Handler: saves `contents` (the page at `pos` as it still is in guest RAM, write-protected)
    /// as its checkpoint contents. Returns false, copying nothing, if the page is no longer
    /// `Unsent` (the sender claimed it first).
    pub fn copy_in(&self, pos: usize, contents: &[u8]) -> bool {
        if contents.len() != self.page_size || pos >= self.len() {
            return false;
        }
        // Unsent → Copied, won by CAS; the slot is written before the state is published.
        // Nobody reads the slot before seeing Copied, and nobody else can win this page.
        if self.states[pos]
            .compare_exchange(
                PageState::Unsent as u8,
                COPYING,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return false;
        }
        // SAFETY: the slot `pos` is inside the buffer (`pos < len`); this thread won the page's
        // only transition out of Unsent, so it is the slot's only writer, and readers wait for
        // the Copied store below.
        unsafe { self.side.write(pos * self.page_size, contents) };
        self.states[pos].store(PageState::Copied as u8, Ordering::Release);
        self.copies.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Sender: hands the pages at `range` to the transport: `Unsent` ones become `InFlight`
    /// (sent from guest RAM), `Copied` ones are sent from their side slot.
    pub fn claim(&self, range: Range<usize>) -> Result<(), TableError> {
        if range.end > self.len() {
            return Err(TableError::OutOfRange {
                pos: range.end.saturating_sub(1),
                len: self.len(),
            });
        }
        for pos in range {
            loop {
                let r = self.states[pos].compare_exchange(
                    PageState::Unsent as u8,
                    PageState::InFlight as u8,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                match r {
                    Ok(_) => break,
                    // The handler is copying the page: it is sent from its slot once that is
                    // full, which takes one page copy. Wait it out rather than call the page
                    // claimed twice.
                    Err(COPYING) => std::hint::spin_loop(),
                    Err(s) if s == PageState::Copied as u8 => break,
                    Err(_) => {
                        return Err(TableError::Reclaimed {
                            page: self.indices[pos],
                        })
                    }
                }
            }
        }
        Ok(())
    }

    /// Sender: the transport released the pages at `range`: `InFlight` ones become `Sent`.
    pub fn release(&self, range: Range<usize>) {
        for pos in range.start..range.end.min(self.len()) {
            let _ = self.states[pos].compare_exchange(
                PageState::InFlight as u8,
                PageState::Sent as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    /// The checkpoint contents of the claimed page at `pos`: its side slot if it was copied,
    /// else `ram_page` (guest RAM, held still by write protection while in flight). `None` for
    /// a page not claimed yet.
    pub fn contents<'a>(&'a self, pos: usize, ram_page: &'a [u8]) -> Option<&'a [u8]> {
        match self.states.get(pos).map(|s| s.load(Ordering::Acquire)) {
            Some(s) if s == PageState::Copied as u8 => {
                // SAFETY: the slot is in bounds, and Copied is final: its only write happened
                // before the release store this acquire load observed.
                Some(unsafe { self.side.read(pos * self.page_size, self.page_size) })
            }
            Some(s) if s == PageState::InFlight as u8 || s == PageState::Sent as u8 => {
                Some(ram_page)
            }
            _ => None,
        }
    }

    /// Handler: counts a write that had to wait for an in-flight page.
    pub fn note_wait(&self) {
        self.waits.fetch_add(1, Ordering::Relaxed);
    }

    /// Pages copied on a guest write.
    pub fn copies(&self) -> u64 {
        self.copies.load(Ordering::Relaxed)
    }

    /// Guest writes that waited for a page in flight.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: usize = 64;

    #[test]
    fn pages_move_through_their_states_once() {
        let t = Table::new(vec![2, 5, 9], PS).unwrap();
        assert_eq!(t.on_write(3), OnWrite::Outside);
        assert_eq!(t.on_write(5), OnWrite::Copy(1));
        // The guest writes page 5 first: it is copied and then free to change.
        assert!(t.copy_in(1, &[7; PS]));
        assert!(!t.copy_in(1, &[8; PS]), "a page is copied once");
        assert_eq!(t.on_write(5), OnWrite::Free);
        assert_eq!(t.state(1), PageState::Copied);
        // The sender takes all three: 2 and 9 go out of RAM, 5 out of its copy.
        assert_eq!(t.contents(0, &[1; PS]), None, "unclaimed");
        t.claim(0..3).unwrap();
        assert_eq!(t.state(0), PageState::InFlight);
        assert_eq!(t.state(1), PageState::Copied);
        assert_eq!(t.on_write(2), OnWrite::Wait);
        assert_eq!(t.on_write(9), OnWrite::Wait);
        assert!(!t.copy_in(0, &[9; PS]), "in flight: no copy");
        assert_eq!(t.contents(0, &[1; PS]).unwrap(), &[1; PS]);
        assert_eq!(t.contents(1, &[1; PS]).unwrap(), &[7; PS]);
        assert_eq!(
            t.claim(0..1),
            Err(TableError::Reclaimed { page: 2 }),
            "a page is claimed once"
        );
        assert!(matches!(t.claim(2..4), Err(TableError::OutOfRange { .. })));
        t.release(0..1);
        assert_eq!(t.on_write(2), OnWrite::Free);
        assert_eq!(t.on_write(9), OnWrite::Wait);
        t.release(0..3);
        assert_eq!(t.state(2), PageState::Sent);
        assert_eq!(t.state(1), PageState::Copied, "release leaves copies alone");
        t.note_wait();
        assert_eq!((t.copies(), t.waits()), (1, 1));
    }

    #[test]
    fn copy_and_claim_race_has_one_winner() {
        // The claim must also get through pages the copier is half-way through (the window in
        // which a copy is running is short: many rounds, both sides released at once).
        for _ in 0..2000 {
            let t = std::sync::Arc::new(Table::new((0..64).collect(), PS).unwrap());
            let t2 = t.clone();
            let start = std::sync::Arc::new(std::sync::Barrier::new(2));
            let start2 = start.clone();
            let copier = std::thread::spawn(move || {
                start2.wait();
                (0..64).filter(|&p| t2.copy_in(p, &[p as u8; PS])).count()
            });
            start.wait();
            t.claim(0..64).unwrap();
            let copied = copier.join().unwrap();
            let states: Vec<_> = (0..64).map(|p| t.state(p)).collect();
            assert_eq!(
                states.iter().filter(|&&s| s == PageState::Copied).count(),
                copied
            );
            for (p, s) in states.iter().enumerate() {
                match s {
                    PageState::Copied => {
                        assert_eq!(t.contents(p, &[0; PS]).unwrap(), &[p as u8; PS])
                    }
                    PageState::InFlight => {
                        assert_eq!(t.contents(p, &[0xEE; PS]).unwrap(), &[0xEE; PS])
                    }
                    other => panic!("page {p} ended {other:?}"),
                }
            }
        }
    }

    #[test]
    fn an_empty_checkpoint_is_fine() {
        let t = Table::new(Vec::new(), PS).unwrap();
        assert!(t.is_empty());
        t.claim(0..0).unwrap();
        assert_eq!(t.on_write(0), OnWrite::Outside);
    }
}
