//! QEMU's `-runas USER` drops to USER once the machine is set up, and the kernel clears the
//! parent-death signal on that change of credentials: a QEMU whose agent dies would run on, a VM
//! nobody gates. When `FTVM_PDEATHSIG` holds the agent's pid, this library shadows `setuid` (QEMU's
//! last step of dropping privileges) and arms the signal (SIGKILL) again right after a successful
//! call; if the agent already died in between (QEMU was re-parented), QEMU exits at once.

use std::ffi::{c_int, CStr};

use crate::ram_file::env;

/// The environment variable naming the agent's pid.
pub const PDEATHSIG_ENV: &CStr = c"FTVM_PDEATHSIG";

type SetuidFn = unsafe extern "C" fn(libc::uid_t) -> c_int;

/// Interposed `setuid`: forwards, then re-arms the parent-death signal (see the module docs).
///
/// # Safety
/// The setuid(2) contract, unchanged.
#[no_mangle]
pub unsafe extern "C" fn setuid(uid: libc::uid_t) -> c_int {
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name has no preconditions.
    let next = unsafe { libc::dlsym(libc::RTLD_NEXT, c"setuid".as_ptr()) };
    let r = if next.is_null() {
        // SAFETY: the raw system call has setuid(2)'s contract (for this thread only, which is
        // what QEMU's single-threaded start-up needs when glibc's wrapper cannot be found).
        unsafe { libc::syscall(libc::SYS_setuid, uid) as c_int }
    } else {
        // SAFETY: dlsym found the next `setuid`, which has exactly this C signature.
        let f = unsafe { std::mem::transmute::<*mut libc::c_void, SetuidFn>(next) };
        // SAFETY: forwarded verbatim under the caller's contract.
        unsafe { f(uid) }
    };
    if r == 0 {
        // SAFETY: __errno_location returns this thread's errno slot, always valid.
        let errno = unsafe { *libc::__errno_location() };
        let _ = std::panic::catch_unwind(rearm);
        // SAFETY: as above; the caller sees the errno setuid left.
        unsafe { *libc::__errno_location() = errno };
    }
    r
}

fn rearm() {
    let Some(agent) = env(PDEATHSIG_ENV).and_then(|v| v.to_str().ok()?.parse::<i32>().ok()) else {
        return;
    };
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and has no memory arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        crate::log::line("could not re-arm the parent-death signal after setuid; exiting");
        // SAFETY: _exit ends the process without running handlers; always allowed.
        unsafe { libc::_exit(1) };
    }
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != agent {
        crate::log::line("the agent died while QEMU dropped its privileges; exiting");
        // SAFETY: as above.
        unsafe { libc::_exit(1) };
    }
}
