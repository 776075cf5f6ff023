//! The few socket syscalls the transports make, with the constants Debian's headers and the
//! `libc` crate lack (docs/ARCHITECTURE.md, Zero-copy sends).

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

use super::iov::IovBuf;

/// `SO_ZEROCOPY` (asm-generic/socket.h).
const SO_ZEROCOPY: libc::c_int = 60;
/// `sock_extended_err.ee_origin` of a zero-copy completion (linux/errqueue.h).
pub(crate) const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
/// `ee_code` bit: the kernel copied the data after all (linux/errqueue.h).
pub(crate) const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;

/// One `MSG_ZEROCOPY` completion: calls `first..=last` (kernel call ids, wrapping) are done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ZcCompletion {
    pub(crate) first: u32,
    pub(crate) last: u32,
    pub(crate) copied: bool,
}

impl ZcCompletion {
    /// Number of calls covered.
    pub(crate) fn calls(&self) -> u64 {
        u64::from(self.last.wrapping_sub(self.first)) + 1
    }
}

/// Turns on `SO_ZEROCOPY`; without it `MSG_ZEROCOPY` is silently ignored.
pub(crate) fn enable_zerocopy(fd: RawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live local.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_ZEROCOPY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One non-blocking `sendmsg` of the iovecs in `iov`; returns the bytes the kernel took.
/// `MSG_DONTWAIT` (not `O_NONBLOCK`) so a clone of the socket used for reading acks keeps
/// blocking reads; `MSG_NOSIGNAL` so a dead peer is an EPIPE error, not a SIGPIPE; `more` adds
/// `MSG_MORE` (more of the same send follows: do not push a short tail segment yet).
pub(crate) fn sendmsg(fd: RawFd, iov: &IovBuf, zerocopy: bool, more: bool) -> io::Result<usize> {
    // SAFETY: msghdr is plain data; zeroed means no address and no control messages.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.0.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.0.len();
    let mut flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    if zerocopy {
        flags |= libc::MSG_ZEROCOPY;
    }
    if more {
        flags |= libc::MSG_MORE;
    }
    // SAFETY: `msg` points at `iov`, alive for the call; the iovecs point at memory the caller of
    // `Transport::send` keeps mapped (the kernel fails with EFAULT rather than touching anything
    // else if it is not).
    let n = unsafe { libc::sendmsg(fd, &msg, flags) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// What `poll` saw.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Ready {
    pub(crate) writable: bool,
    /// The error queue has completions, or the socket has an error.
    pub(crate) error: bool,
    pub(crate) hangup: bool,
}

/// Waits up to `timeout` until the socket is writable (if asked) or its error queue is not empty
/// (POLLERR is always reported).
pub(crate) fn wait(fd: RawFd, writable: bool, timeout: Duration) -> io::Result<Ready> {
    let mut pfd = libc::pollfd {
        fd,
        events: if writable { libc::POLLOUT } else { 0 },
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd on the stack.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(Ready::default());
        }
        return Err(e);
    }
    Ok(Ready {
        writable: pfd.revents & libc::POLLOUT != 0,
        error: pfd.revents & libc::POLLERR != 0,
        hangup: pfd.revents & (libc::POLLHUP | libc::POLLNVAL) != 0,
    })
}

/// The socket's pending error (`SO_ERROR`, cleared by reading it), if any.
pub(crate) fn take_error(fd: RawFd) -> io::Result<Option<io::Error>> {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into a live local and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((err != 0).then(|| io::Error::from_raw_os_error(err)))
}

/// Reads one notification from the socket's error queue without blocking: `Ok(None)` when the
/// queue is empty. A queued error that is not a zero-copy completion is returned as an error.
pub(crate) fn read_zc_completion(fd: RawFd) -> io::Result<Option<ZcCompletion>> {
    // Room for one sock_extended_err plus the offender address that may follow it.
    let mut cmsg = nix::cmsg_space!(libc::sock_extended_err, libc::sockaddr_in6);
    let msg = match recvmsg::<()>(
        fd,
        &mut [],
        Some(&mut cmsg),
        MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(m) => m,
        Err(nix::errno::Errno::EAGAIN) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    for c in msg.cmsgs().map_err(io::Error::from)? {
        let ee = match c {
            ControlMessageOwned::Ipv4RecvErr(ee, _) | ControlMessageOwned::Ipv6RecvErr(ee, _) => ee,
            _ => continue,
        };
        if ee.ee_errno != 0 || ee.ee_origin != SO_EE_ORIGIN_ZEROCOPY {
            return Err(io::Error::other(format!(
                "unexpected error-queue entry: errno {} origin {}",
                ee.ee_errno, ee.ee_origin
            )));
        }
        return Ok(Some(ZcCompletion {
            first: ee.ee_info,
            last: ee.ee_data,
            copied: ee.ee_code & SO_EE_CODE_ZEROCOPY_COPIED != 0,
        }));
    }
    Err(io::Error::other(
        "error-queue message without an extended error",
    ))
}
