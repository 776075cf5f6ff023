//! Copy-on-write capture support (`FTVM_UFFD_MODE=handoff`): the blocking write-protect uffd is
//! sent to the agent over the unix socket `FTVM_UFFD_SOCK` with SCM_RIGHTS, together with the
//! range it covers in QEMU's address space, and QEMU's own copy is closed afterwards — if QEMU
//! kept it and the agent died, a vCPU faulting on a protected page would hang forever.
//!
//! Message (one `sendmsg`): 8-byte little-endian start address, 8-byte little-endian length,
//! the fd as ancillary data. The agent answers one byte once it holds the fd.

use std::ffi::c_int;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Socket path variable.
pub const SOCK_ENV: &std::ffi::CStr = c"FTVM_UFFD_SOCK";

/// How long QEMU waits for the agent's acknowledgement before going on without protection.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `uffd` (covering `[start, start+len)`) to the agent at `sock` and waits for its ack.
pub fn send(sock: &str, uffd: c_int, start: u64, len: u64) -> Result<(), String> {
    let stream = UnixStream::connect(sock).map_err(|e| format!("connect {sock}: {e}"))?;
    let mut payload = [0u8; 16];
    payload[..8].copy_from_slice(&start.to_le_bytes());
    payload[8..].copy_from_slice(&len.to_le_bytes());
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // Room for one cmsghdr carrying one int, 8-byte aligned as the kernel expects.
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr is plain data; zeroed is valid before the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<c_int>() as u32) } as usize;
    // SAFETY: msg_control points at `cbuf`, large enough for CMSG_SPACE(sizeof(int)) (≤ 24
    // bytes), so the first header and its data lie inside it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<c_int>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<c_int>(), uffd);
    }
    // SAFETY: `msg` points at live buffers (`payload`, `cbuf`) for the duration of the call.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n != payload.len() as isize {
        return Err(format!(
            "sendmsg to {sock}: {}",
            std::io::Error::last_os_error()
        ));
    }
    stream
        .set_read_timeout(Some(ACK_TIMEOUT))
        .map_err(|e| format!("set ack timeout: {e}"))?;
    let mut ack = [0u8; 1];
    (&stream)
        .read_exact(&mut ack)
        .map_err(|e| format!("no acknowledgement from the agent at {sock}: {e}"))?;
    Ok(())
}
