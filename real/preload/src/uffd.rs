//! The few userfaultfd calls this library needs, made directly (Debian 12's headers and the libc
//! crate lack the write-protect-async bits): create, `UFFDIO_API` handshake, `UFFDIO_REGISTER`.

use std::ffi::{c_int, c_ulong};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

const UFFD_API: u64 = 0xAA;

const fn iowr(ty: u64, nr: u64, size: usize) -> c_ulong {
    ((3u64 << 30) | ((size as u64) << 16) | (ty << 8) | nr) as c_ulong
}

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

const UFFDIO_API: c_ulong = iowr(0xAA, 0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: c_ulong = iowr(0xAA, 0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;

/// Write-protect faults on shmem (/dev/shm) and hugetlbfs mappings; required for our RAM file.
pub const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// Pages never touched start out write-protected too (else their first write is invisible).
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// The kernel resolves write-protect faults itself and only marks the page written; nobody has
/// to read the uffd. This is what PAGEMAP_SCAN's PAGE_IS_WRITTEN reports.
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;

/// Features of the tracking uffd (docs/ARCHITECTURE.md, Dirty pages).
pub const ASYNC_TRACKING: u64 =
    FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED | FEATURE_WP_HUGETLBFS_SHMEM;
/// Features of the blocking uffd handed to the agent for copy-on-write capture: faults wait for
/// the agent's handler instead of resolving themselves.
pub const BLOCKING_WP: u64 = FEATURE_WP_UNPOPULATED | FEATURE_WP_HUGETLBFS_SHMEM;

fn os_err(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

/// 1. userfaultfd(2) (close-on-exec so QEMU's helpers do not inherit it; non-blocking so a
///    reader never hangs), 2. the UFFDIO_API handshake asking for `features` (fails with EINVAL
///    when the kernel lacks one). Returns the open fd.
pub fn open(features: u64) -> Result<OwnedFd, String> {
    // SAFETY: userfaultfd takes only flags and returns a new fd or -1.
    let r = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if r < 0 {
        return Err(os_err("userfaultfd"));
    }
    // SAFETY: `r` is a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(r as c_int) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes exactly one `struct uffdio_api`, which `api` is.
    if unsafe { libc::ioctl(r as c_int, UFFDIO_API, &mut api) } != 0 {
        return Err(os_err(&format!("UFFDIO_API (features {features:#x})")));
    }
    Ok(fd)
}

/// UFFDIO_REGISTER in write-protect mode on `[start, start+len)` (page-aligned).
pub fn register_wp(fd: c_int, start: u64, len: u64) -> Result<(), String> {
    let mut reg = UffdioRegister {
        range: UffdioRange { start, len },
        mode: UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes exactly one `struct uffdio_register`; the range
    // is a mapping this process just created.
    if unsafe { libc::ioctl(fd, UFFDIO_REGISTER, &mut reg) } != 0 {
        return Err(os_err("UFFDIO_REGISTER (mode WP)"));
    }
    Ok(())
}
