//! The agent's end of the copy-on-write handover (`FTVM_UFFD_MODE=handoff`): the preload library
//! in QEMU registers a *blocking* write-protect userfaultfd on the guest RAM mapping and sends it
//! over the unix socket `FTVM_UFFD_SOCK` (16 bytes: start address and length in QEMU's address
//! space, little-endian, plus the fd as SCM_RIGHTS), then closes its own copy and waits for a
//! one-byte ack. uffd ioctls act on QEMU's memory whichever process calls them.
//!
//! With a blocking uffd, PAGEMAP_SCAN cannot re-arm tracking (it skips VMAs without WP_ASYNC),
//! so in this mode the fault stream itself is the dirty log: every first write to a protected
//! page arrives here as a [`WpFault`].

use std::io::Write;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use super::DirtyError;

/// `FTVM_UFFD_MODE=handoff` selects this mode in the preload library.
pub const UFFD_MODE_ENV: &str = "FTVM_UFFD_MODE";
/// Unix socket the preload library connects to.
pub const UFFD_SOCK_ENV: &str = "FTVM_UFFD_SOCK";

#[repr(C)]
struct UffdioWriteprotect {
    start: u64,
    len: u64,
    mode: u64,
}

/// `_IOWR(0xAA, 0x06, struct uffdio_writeprotect)`.
const UFFDIO_WRITEPROTECT: libc::c_ulong = ((3u64 << 30)
    | ((std::mem::size_of::<UffdioWriteprotect>() as u64) << 16)
    | (0xAA << 8)
    | 0x06) as libc::c_ulong;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
/// `sizeof(struct uffd_msg)`.
const UFFD_MSG_LEN: usize = 32;

/// One fault read from the uffd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WpFault {
    /// Faulting address in QEMU's address space (page-aligned by the kernel).
    pub address: u64,
    /// A write fault.
    pub write: bool,
    /// Caused by write protection (vs a missing page).
    pub wp: bool,
}

/// A blocking write-protect uffd received from QEMU.
#[derive(Debug)]
pub struct HandedUffd {
    fd: OwnedFd,
    start: u64,
    len: u64,
}

impl HandedUffd {
    /// Reads one handover message from `stream` (blocking) and acknowledges it.
    pub fn receive(stream: &UnixStream) -> Result<HandedUffd, DirtyError> {
        let mut payload = [0u8; 16];
        let mut iov = libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: payload.len(),
        };
        let mut cbuf = [0u64; 8];
        // SAFETY: msghdr is plain data; zeroed is valid before the fields are set.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf);
        // SAFETY: `msg` points at live buffers for the call; MSG_CMSG_CLOEXEC so the fd is not
        // inherited by processes the agent spawns.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(DirtyError::Uffd {
                what: "recvmsg",
                source: std::io::Error::last_os_error(),
            });
        }
        let mut fd = None;
        // SAFETY: the CMSG_* walk stays inside `msg_controllen` bytes of `cbuf` as filled by the
        // kernel; the data of an SCM_RIGHTS header is an array of ints.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let raw = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                    // Owned from here on, so it is closed on every error path below.
                    fd = Some(OwnedFd::from_raw_fd(raw));
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        let fd = fd.ok_or_else(|| DirtyError::Handoff("message carried no fd".into()))?;
        if n as usize != payload.len() || msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(DirtyError::Handoff(format!(
                "message of {n} bytes (flags {:#x}), expected 16",
                msg.msg_flags
            )));
        }
        let start = u64::from_le_bytes(payload[..8].try_into().unwrap_or_default());
        let len = u64::from_le_bytes(payload[8..].try_into().unwrap_or_default());
        (&*stream).write_all(&[1]).map_err(|e| DirtyError::Uffd {
            what: "acknowledge handover",
            source: e,
        })?;
        Ok(HandedUffd { fd, start, len })
    }

    /// The uffd (for polling it, e.g. with tokio's `AsyncFd`; it is non-blocking).
    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// The registered range, in QEMU's address space.
    pub fn range(&self) -> Range<u64> {
        self.start..self.start + self.len
    }

    /// Write-protects (`protect`) or unprotects `[addr, addr+len)`; unprotecting wakes the
    /// threads blocked on faults there.
    pub fn write_protect(&self, addr: u64, len: u64, protect: bool) -> Result<(), DirtyError> {
        let mut wp = UffdioWriteprotect {
            start: addr,
            len,
            mode: if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads one `struct uffdio_writeprotect`; it acts on the
        // registered mm (QEMU's), not on this process's memory.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp) } != 0 {
            return Err(DirtyError::Uffd {
                what: "UFFDIO_WRITEPROTECT",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The next fault, or `None` when none is pending (the fd is non-blocking).
    pub fn read_fault(&self) -> Result<Option<WpFault>, DirtyError> {
        let mut m = [0u8; UFFD_MSG_LEN];
        // SAFETY: reads at most `m.len()` bytes into `m`.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), m.as_mut_ptr().cast(), m.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(DirtyError::Uffd {
                what: "read",
                source: e,
            });
        }
        if n as usize != UFFD_MSG_LEN || m[0] != UFFD_EVENT_PAGEFAULT {
            return Err(DirtyError::Handoff(format!(
                "unexpected uffd message: {n} bytes, event {:#x}",
                m[0]
            )));
        }
        // struct uffd_msg { u8 event; u8 r1; u16 r2; u32 r3; { u64 flags; u64 address; ... } }
        let flags = u64::from_ne_bytes(m[8..16].try_into().unwrap_or_default());
        let address = u64::from_ne_bytes(m[16..24].try_into().unwrap_or_default());
        Ok(Some(WpFault {
            address,
            write: flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
            wp: flags & UFFD_PAGEFAULT_FLAG_WP != 0,
        }))
    }
}
