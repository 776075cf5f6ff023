//! Errors of dirty-page tracking and guest RAM mapping.

use std::path::PathBuf;

/// What went wrong while mapping guest RAM or finding its written pages.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// A file or system call failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// The step that failed.
        what: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The RAM file is a symbolic link, not ours, or writable by others.
    #[error(transparent)]
    File(#[from] crate::secure_fs::SecureFsError),
    /// The RAM file does not have the size the VM was configured with.
    #[error("RAM file {path} is {found} bytes, expected {expected}")]
    SizeMismatch {
        /// The RAM file.
        path: PathBuf,
        /// Its size.
        found: u64,
        /// The configured guest RAM size.
        expected: u64,
    },
    /// QEMU has no shared mapping of the RAM file (not started with `share=on`, or not yet).
    #[error("process {pid} has no shared mapping of RAM file {path}")]
    NoRamMapping {
        /// QEMU's pid.
        pid: u32,
        /// The RAM file.
        path: PathBuf,
    },
    /// PAGEMAP_SCAN refused with EPERM under `PM_SCAN_CHECK_WPASYNC`: the mapping has no
    /// write-protect-async userfaultfd, so its writes are not tracked.
    #[error(
        "guest RAM of process {pid} is not write-tracked (was QEMU started with LD_PRELOAD of \
         the ftvm preload library and FTVM_RAM_FILE? see its 'ftvm-preload:' stderr line)"
    )]
    NotTracked {
        /// QEMU's pid.
        pid: u32,
    },
    /// The kernel does not know PAGEMAP_SCAN (needs Linux 6.7 or later).
    #[error("PAGEMAP_SCAN is not supported by this kernel (needs Linux 6.7+): {0}")]
    Unsupported(std::io::Error),
    /// The ftvm preload library was not found.
    #[error("dirty-tracking library {name} not found (looked in {searched}); run `cargo build -p ftvm-preload` (or the workspace) or set FTVM_PRELOAD")]
    PreloadNotFound {
        /// File name looked for.
        name: &'static str,
        /// Places looked at.
        searched: String,
    },
    /// A page index or range lies outside guest RAM.
    #[error("page {index} is outside guest RAM of {pages} pages")]
    OutOfRange {
        /// Offending page index.
        index: u64,
        /// Pages in guest RAM.
        pages: u64,
    },
    /// Data of the wrong length for a page write.
    #[error("page write of {len} bytes, page size is {page_size}")]
    BadLength {
        /// Bytes given.
        len: usize,
        /// The page size.
        page_size: usize,
    },
    /// A userfaultfd call on a handed-over uffd failed.
    #[error("userfaultfd {what}: {source}")]
    Uffd {
        /// The call.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// This kernel (or process) cannot create a write-protect userfaultfd on shared memory.
    #[error("copy-on-write capture is not possible here: {0}")]
    UffdUnsupported(String),
    /// The preload library's uffd handover message was malformed or missing its fd.
    #[error("uffd handover: {0}")]
    Handoff(String),
}

impl DirtyError {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> DirtyError {
        let path = path.into();
        move |source| DirtyError::Io { what, path, source }
    }
}
