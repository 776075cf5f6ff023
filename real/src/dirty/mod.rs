//! Dirty-page tracking of the guest RAM file (docs/ARCHITECTURE.md, Dirty pages).
//!
//! - [`PagemapScanner`]: the real thing — QEMU runs with the ftvm preload library
//!   ([`preload_library_path`]), which registers a write-protect-async userfaultfd on the RAM
//!   mapping; each [`DirtyTracker::scan`] (VM paused) returns the pages written since the
//!   previous one and re-arms tracking.
//! - [`HashTracker`]: compares page hashes; slow, needs nothing from QEMU, a cross-check.
//! - [`GuestRam`] / [`GuestRamMut`]: the RAM file mapped into the agent.
//! - [`HandedUffd`]: the blocking write-protect uffd QEMU hands over for copy-on-write capture.
//!
//! Page indices are relative to the start of the RAM file. The first scan reports all RAM
//! (pages never touched count as written): treat it as the full copy. Pages are reported when
//! written, not when changed: a page rewritten with the same bytes is reported too.

mod error;
mod hash;
mod maps;
mod pagemap_scan;
mod pages;
mod preload_path;
mod ram;
mod uffd_handoff;

pub use error::DirtyError;
pub use hash::HashTracker;
pub use maps::{ram_vmas, RamVma};
pub use pagemap_scan::{PagemapScanner, ScanStats};
pub use pages::DirtyPages;
pub use preload_path::{preload_library_path, PRELOAD_ENV, PRELOAD_FILE_NAME};
pub use ram::{page_size, GuestRam, GuestRamMut};
pub use uffd_handoff::{
    peer_pid, HandedUffd, HandoffListener, WpFault, UFFD_MODE_ENV, UFFD_SOCK_ENV,
};

/// A source of "pages written since the last scan".
pub trait DirtyTracker {
    /// Pages written since the previous scan (all pages on the first), re-arming tracking.
    /// Call with the VM paused for an exact epoch boundary.
    fn scan(&mut self) -> Result<DirtyPages, DirtyError>;

    /// [`DirtyTracker::scan`] as a sorted list of page indices.
    fn collect(&mut self) -> Result<Vec<u64>, DirtyError> {
        Ok(self.scan()?.to_indices())
    }

    /// Size of the tracked RAM in pages.
    fn pages(&self) -> u64;

    /// One line saying what is tracked and how, for logs.
    fn describe(&self) -> String;

    /// Whether a scan taken while the VM runs still misses no write: every write after it is
    /// in the next scan, even one that puts back a page's earlier contents. Write-protection
    /// logs do; content hashes do not (a page written and written back looks clean). Only then
    /// can a full capture copy RAM ahead of its pause (`QemuVm::start_pre_copy`).
    fn logs_every_write(&self) -> bool {
        false
    }
}
