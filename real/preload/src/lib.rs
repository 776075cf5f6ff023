//! `ftvm-preload`: loaded into QEMU with `LD_PRELOAD`, it shadows `mmap` and `mmap64`. When QEMU
//! maps the guest RAM file (`FTVM_RAM_FILE`) shared, the library registers that range with a
//! userfaultfd in write-protect mode:
//!
//! - default (`FTVM_UFFD_MODE` unset or `async`): a `UFFD_FEATURE_WP_ASYNC` uffd kept open for
//!   QEMU's lifetime. The kernel then marks every page written since the last write-protect, and
//!   the agent reads and re-arms those marks with PAGEMAP_SCAN on `/proc/<pid>/pagemap`.
//! - `handoff` (copy-on-write capture): a blocking write-protect uffd sent to the agent at
//!   `FTVM_UFFD_SOCK` (see [`handoff`]); QEMU closes its own copy.
//!
//! It also shadows `setuid` to keep QEMU tied to its agent after `-runas` (see [`pdeath`]; the
//! one place where it ends QEMU on purpose: when the agent died during the drop).
//!
//! Otherwise the library never makes QEMU fail: every error is logged to stderr (prefix `ftvm-preload: `)
//! and the mapping is left untracked, which the agent sees as EPERM from PAGEMAP_SCAN with
//! `PM_SCAN_CHECK_WPASYNC` — never as "nothing changed".

use std::ffi::{c_int, c_void};
use std::os::fd::{AsRawFd, IntoRawFd};
use std::sync::Mutex;

mod handoff;
mod log;
mod next_mmap;
mod pdeath;
mod ram_file;
mod uffd;

use next_mmap::NextSymbol;

static NEXT_MMAP: NextSymbol = NextSymbol::new(c"mmap");
static NEXT_MMAP64: NextSymbol = NextSymbol::new(c"mmap64");

/// The async tracking uffd, shared by every RAM mapping; never closed (the registration lives
/// only while the fd is open). -1 until the first RAM mapping.
static TRACKING_UFFD: Mutex<c_int> = Mutex::new(-1);

/// Interposed `mmap`: forwards, then tracks the mapping if it is the guest RAM.
///
/// # Safety
/// The mmap(2) contract, unchanged.
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    // SAFETY: forwarded verbatim under the caller's contract.
    let p = unsafe { NEXT_MMAP.call(addr, len, prot, flags, fd, off) };
    after_map(p, len, flags, fd);
    p
}

/// Interposed `mmap64` (what QEMU, built with 64-bit file offsets, actually calls).
///
/// # Safety
/// The mmap(2) contract, unchanged.
#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off64_t,
) -> *mut c_void {
    // SAFETY: forwarded verbatim under the caller's contract.
    let p = unsafe { NEXT_MMAP64.call(addr, len, prot, flags, fd, off) };
    after_map(p, len, flags, fd);
    p
}

/// Cheap filters first (most mmaps are anonymous or private); errno is preserved and a panic
/// can never cross into QEMU.
fn after_map(p: *mut c_void, len: usize, flags: c_int, fd: c_int) {
    if p == libc::MAP_FAILED || fd < 0 || len == 0 {
        return;
    }
    let kind = flags & 0x0f; // MAP_TYPE
    if kind != libc::MAP_SHARED && kind != libc::MAP_SHARED_VALIDATE {
        return;
    }
    // SAFETY: __errno_location returns this thread's errno slot, always valid.
    let errno = unsafe { *libc::__errno_location() };
    let _ = std::panic::catch_unwind(|| track_if_ram(p as u64, len as u64, fd));
    // SAFETY: as above; the caller sees the errno the real mmap left.
    unsafe { *libc::__errno_location() = errno };
}

fn page_round_up(len: u64) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    len.div_ceil(ps) * ps
}

fn track_if_ram(start: u64, len: u64, fd: c_int) {
    let Some(want) = ram_file::env(ram_file::RAM_FILE_ENV) else {
        return;
    };
    if !ram_file::is_ram_file(fd, &want) {
        return;
    }
    let len = page_round_up(len);
    let name = want.to_string_lossy();
    let mode = ram_file::env(c"FTVM_UFFD_MODE");
    let mode = mode.as_ref().map(|m| m.to_string_lossy());
    let result = match mode.as_deref() {
        None | Some("async") => {
            track_async(start, len).map(|fd| format!("WP_ASYNC userfaultfd {fd}"))
        }
        Some("handoff") => {
            hand_off(start, len).map(|sock| format!("blocking userfaultfd handed to {sock}"))
        }
        Some(other) => Err(format!(
            "unknown FTVM_UFFD_MODE {other:?} (expected async or handoff)"
        )),
    };
    match result {
        Ok(how) => log::line(&format!(
            "tracking RAM file {name} mapped at {start:#x} (+{len:#x} bytes) with {how}"
        )),
        Err(e) => log::line(&format!(
            "FAILED to track RAM file {name} mapped at {start:#x} (+{len:#x} bytes): {e}; \
             its dirty pages are NOT tracked (PAGEMAP_SCAN with PM_SCAN_CHECK_WPASYNC fails \
             with EPERM)"
        )),
    }
}

/// Registers the range on the process-wide async uffd (created on first use).
fn track_async(start: u64, len: u64) -> Result<c_int, String> {
    let mut guard = TRACKING_UFFD.lock().unwrap_or_else(|p| p.into_inner());
    if *guard < 0 {
        // Leaked on purpose: the registration must outlive every mapping of the RAM.
        *guard = uffd::open(uffd::ASYNC_TRACKING)?.into_raw_fd();
    }
    uffd::register_wp(*guard, start, len)?;
    Ok(*guard)
}

/// Creates a blocking write-protect uffd for the range, sends it to the agent, closes ours.
fn hand_off(start: u64, len: u64) -> Result<String, String> {
    let sock = ram_file::env(handoff::SOCK_ENV)
        .ok_or("FTVM_UFFD_MODE=handoff needs FTVM_UFFD_SOCK")?
        .to_string_lossy()
        .into_owned();
    let fd = uffd::open(uffd::BLOCKING_WP)?;
    uffd::register_wp(fd.as_raw_fd(), start, len)?;
    handoff::send(&sock, fd.as_raw_fd(), start, len)?;
    drop(fd); // QEMU must not keep a copy (see the module docs of `handoff`)
    Ok(sock)
}
