//! A Linux tap device: the wire side of the agent's network backend. Frames the VM is allowed to
//! send leave through it; frames arriving on it go to the VM.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use tokio::io::unix::AsyncFd;

/// Errors opening or using a tap device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name does not fit IFNAMSIZ.
    #[error("tap name {0:?} is empty or longer than 15 bytes")]
    BadName(String),
    /// /dev/net/tun could not be opened or configured.
    #[error("tap {name}: {what}: {source}")]
    Setup {
        /// Interface name.
        name: String,
        /// Step that failed.
        what: &'static str,
        /// OS error.
        source: std::io::Error,
    },
    /// Reading or writing a frame failed.
    #[error("tap i/o: {0}")]
    Io(#[from] std::io::Error),
}

// From <linux/if_tun.h>.
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
nix::ioctl_write_int!(tun_set_iff, b'T', 202);

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap interface, non-blocking, registered with tokio.
pub struct Tap {
    fd: AsyncFd<File>,
    name: String,
}

impl Tap {
    /// Creates (or attaches to) tap interface `name` in the current network namespace.
    /// The interface still has to be brought up and bridged by the caller (`ip link`).
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(TapError::BadName(name.to_string()));
        }
        let setup = |what, source| TapError::Setup {
            name: name.to_string(),
            what,
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| setup("open /dev/net/tun", e))?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads a `struct ifreq` (name + flags) that outlives the call; `req`
        // is a properly sized and initialised stand-in, and the fd is an open tun device.
        unsafe { tun_set_iff(file.as_raw_fd(), &mut req as *mut IfReq as u64) }
            .map_err(|e| setup("TUNSETIFF", std::io::Error::from(e)))?;
        // SAFETY: `file` is an open fd owned by the AsyncFd from here on; File::as_raw_fd always
        // returns that same fd, and it stays open until the AsyncFd (and so the File) drops.
        let fd = unsafe { AsyncFd::register(file) }
            .map_err(|e| setup("register with tokio", e.into()))?;
        Ok(Tap {
            fd,
            name: name.to_string(),
        })
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Receives one frame from the wire.
    pub async fn recv(&self) -> Result<Vec<u8>, TapError> {
        let mut buf = vec![0u8; 65_536];
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|f| f.get_ref().read(&mut buf)) {
                Ok(Ok(n)) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends one frame to the wire.
    pub async fn send(&self, frame: &[u8]) -> Result<(), TapError> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|f| f.get_ref().write(frame)) {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => return Err(e.into()),
                Err(_would_block) => continue,
            }
        }
    }
}
