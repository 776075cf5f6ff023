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
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

const UFFD_API: u64 = 0xAA;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong =
    ((3u64 << 30) | ((std::mem::size_of::<UffdioApi>() as u64) << 16) | (0xAA << 8) | 0x3F)
        as libc::c_ulong;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::c_ulong = ((3u64 << 30)
    | ((std::mem::size_of::<UffdioRegister>() as u64) << 16)
    | (0xAA << 8)) as libc::c_ulong;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// Write-protect faults on shmem/hugetlbfs mappings (a memfd, a /dev/shm file).
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// Unpopulated pages (file holes) are write-protected too, so their first write faults.
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// The features of a blocking write-protect uffd on guest RAM (the preload library's
/// `BLOCKING_WP`): faults wait for a handler.
const BLOCKING_WP_FEATURES: u64 = UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_WP_UNPOPULATED;

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

    /// A blocking write-protect uffd registered on `[start, start+len)` of **this** process
    /// (page-aligned; a shared memfd or /dev/shm mapping, like guest RAM), for an in-process VM.
    /// Nothing is protected yet: see [`HandedUffd::write_protect`].
    ///
    /// Fails with [`DirtyError::UffdUnsupported`] when the kernel lacks write-protect faults on
    /// shared memory.
    pub fn register_local(start: u64, len: u64) -> Result<HandedUffd, DirtyError> {
        // 1. userfaultfd(2): close-on-exec (spawned processes must not hold it: a copy keeps the
        //    registration alive) and non-blocking (the handler polls it, and a read never hangs).
        // SAFETY: userfaultfd takes only flags and returns a new fd or -1.
        let r = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return Err(DirtyError::UffdUnsupported(format!(
                "userfaultfd(2) failed: {e}"
            )));
        }
        // SAFETY: `r` is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(r as libc::c_int) };
        // 2. UFFDIO_API handshake, once per uffd and before any other ioctl, asking for
        //    write-protect faults on shmem; EINVAL means the kernel lacks a feature.
        let mut api = UffdioApi {
            api: UFFD_API,
            features: BLOCKING_WP_FEATURES,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly one `struct uffdio_api`, which `api` is.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(DirtyError::UffdUnsupported(format!(
                "the kernel lacks userfaultfd write-protect on shared memory \
                 (UFFDIO_API with WP_HUGETLBFS_SHMEM|WP_UNPOPULATED: {e})"
            )));
        }
        // 3. UFFDIO_REGISTER in write-protect mode: from now on a write to a page of the range
        //    that gets write-protected blocks its thread until the page is unprotected.
        let mut reg = UffdioRegister {
            start,
            len,
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes exactly one `struct uffdio_register`; the
        // kernel checks that the range is mapped in this process and refuses it otherwise.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(DirtyError::UffdUnsupported(format!(
                "UFFDIO_REGISTER (mode WP) of {len} bytes at {start:#x}: {e}"
            )));
        }
        Ok(HandedUffd { fd, start, len })
    }

    /// Waits up to `timeout` for the uffd or `also` to become readable; returns
    /// `(uffd readable, also readable)`. An interrupted wait returns `(false, false)`.
    pub fn poll_with(
        &self,
        also: BorrowedFd<'_>,
        timeout: Option<std::time::Duration>,
    ) -> Result<(bool, bool), DirtyError> {
        let mut fds = [
            libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: also.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as libc::c_int);
        // SAFETY: `fds` is an array of two pollfd structs that lives across the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok((false, false));
            }
            return Err(DirtyError::Uffd {
                what: "poll",
                source: e,
            });
        }
        let ready =
            |p: &libc::pollfd| p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0;
        Ok((ready(&fds[0]), ready(&fds[1])))
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

/// The process id at the other end of a unix stream (`SO_PEERCRED`).
pub fn peer_pid(stream: &UnixStream) -> Result<u32, DirtyError> {
    // SAFETY: ucred is plain data; zeroed is valid before getsockopt fills it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes (one `struct ucred`) into `cred`.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(DirtyError::Uffd {
            what: "getsockopt(SO_PEERCRED)",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(cred.pid as u32)
}

/// Receives the uffds that QEMU processes started with `FTVM_UFFD_MODE=handoff` send to a unix
/// socket, on a background thread, each tagged with the sender's pid (a boot may be retried, so
/// several QEMUs may connect; only the one that booted counts). The socket file is removed on
/// drop.
pub struct HandoffListener {
    path: PathBuf,
    received: Arc<Mutex<Vec<(u32, HandedUffd)>>>,
    errors: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for HandoffListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandoffListener")
            .field("path", &self.path)
            .finish()
    }
}

/// How often the accept loop checks whether it should stop.
const ACCEPT_POLL: Duration = Duration::from_millis(10);

impl HandoffListener {
    /// Listens at `path` (replacing a stale socket file there).
    pub fn bind(path: &Path) -> Result<HandoffListener, DirtyError> {
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).map_err(DirtyError::io("bind uffd socket", path))?;
        // Non-blocking accept, so the thread notices `stop`.
        listener
            .set_nonblocking(true)
            .map_err(DirtyError::io("bind uffd socket", path))?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, e, st) = (received.clone(), errors.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("uffd-handoff".into())
            .spawn(move || {
                while !st.load(Ordering::Acquire) {
                    let stream = match listener.accept() {
                        Ok((stream, _)) => stream,
                        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(ACCEPT_POLL);
                            continue;
                        }
                        Err(err) => {
                            if let Ok(mut e) = e.lock() {
                                e.push(format!("accept: {err}"));
                            }
                            std::thread::sleep(ACCEPT_POLL);
                            continue;
                        }
                    };
                    // The preload library sends at once after connecting and then waits for
                    // the ack; a blocking read with a bound keeps a broken peer from stalling.
                    let got = stream
                        .set_nonblocking(false)
                        .and_then(|()| stream.set_read_timeout(Some(Duration::from_secs(5))))
                        .map_err(|err| DirtyError::Handoff(err.to_string()))
                        .and_then(|()| {
                            let pid = peer_pid(&stream)?;
                            Ok((pid, HandedUffd::receive(&stream)?))
                        });
                    match got {
                        Ok(x) => {
                            if let Ok(mut r) = r.lock() {
                                r.push(x);
                            }
                        }
                        Err(err) => {
                            if let Ok(mut e) = e.lock() {
                                e.push(err.to_string());
                            }
                        }
                    }
                }
            })
            .map_err(DirtyError::io("start uffd handoff thread", path))?;
        Ok(HandoffListener {
            path: path.to_path_buf(),
            received,
            errors,
            stop,
            thread: Some(thread),
        })
    }

    /// The socket path (for `FTVM_UFFD_SOCK`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The uffd handed over by process `pid`, waiting up to `timeout` for it. With several
    /// (one per mapping of the RAM file), the first.
    pub fn take(&self, pid: u32, timeout: Duration) -> Result<HandedUffd, DirtyError> {
        let t0 = Instant::now();
        loop {
            if let Ok(mut r) = self.received.lock() {
                if let Some(i) = r.iter().position(|(p, _)| *p == pid) {
                    return Ok(r.remove(i).1);
                }
            }
            if t0.elapsed() >= timeout {
                let errors = self.errors.lock().map(|e| e.join("; ")).unwrap_or_default();
                return Err(DirtyError::Handoff(format!(
                    "process {pid} handed no userfaultfd to {} within {timeout:?} (was it \
                     started with the ftvm preload library, FTVM_RAM_FILE and \
                     FTVM_UFFD_MODE=handoff? see its 'ftvm-preload:' stderr line){}",
                    self.path.display(),
                    if errors.is_empty() {
                        String::new()
                    } else {
                        format!("; errors: {errors}")
                    }
                )));
            }
            std::thread::sleep(ACCEPT_POLL);
        }
    }
}

impl Drop for HandoffListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
