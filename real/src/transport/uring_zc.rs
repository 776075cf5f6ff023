//! `uring-zc`: io_uring `SENDMSG_ZC` (kernel ≥ 6.2 for usage reports).
//!
//! Each operation yields a result CQE (bytes sent, `IORING_CQE_F_MORE` set when a notification
//! will follow) and later a notification CQE (`IORING_CQE_F_NOTIF`) once the kernel no longer
//! needs the pages; only then is the buffer released. With `IORING_SEND_ZC_REPORT_USAGE` the
//! notification's `res` says whether the kernel copied after all.
//!
//! One send operation is in flight at a time, with `MSG_WAITALL` so the kernel itself retries a
//! socket whose buffer is full; if a result is still short (interrupted, error after progress),
//! the rest goes in the next operation. Keeping one in flight keeps the byte stream in order
//! without linked requests, and costs the same one `io_uring_enter` per call as `sendmsg`.

use std::io::IoSlice;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, types, IoUring, Probe};

use super::iov::{IovBuf, IovQueue, IOV_MAX};
use super::release::{Completions, ReleaseTracker};
use super::socket;
use super::{
    SendTicket, Transport, TransportError, TransportKind, TransportOptions, TransportStats,
};

/// `IORING_SEND_ZC_REPORT_USAGE` (sqe ioprio): ask notifications to say whether data was copied.
const IORING_SEND_ZC_REPORT_USAGE: u16 = 8;
/// `IORING_NOTIF_USAGE_ZC_COPIED`: bit of a notification's `res`: the kernel copied.
const IORING_NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;
/// Ring size: one send in flight plus the notifications of earlier ones (the kernel buffers CQEs
/// beyond that instead of dropping them, and we drain after every operation).
const RING_ENTRIES: u32 = 64;

/// The msghdr an in-flight operation points at.
struct MsgHdr(Box<libc::msghdr>);

// SAFETY: the msghdr only holds addresses for the kernel (our own iovec array, no name, no
// control data); this process never dereferences them through it.
unsafe impl Send for MsgHdr {}

/// The result CQE of the operation in flight.
struct OpResult {
    res: i32,
    notif_follows: bool,
}

pub(crate) struct UringZc {
    stream: TcpStream,
    ring: IoUring,
    opts: TransportOptions,
    tracker: ReleaseTracker,
    stats: TransportStats,
    queue: IovQueue,
    window: IovBuf,
    msg: MsgHdr,
    result: Option<(u64, OpResult)>,
    told_copied: bool,
}

impl UringZc {
    pub(crate) fn new(stream: TcpStream, opts: TransportOptions) -> Result<Self, TransportError> {
        let unsupported = |why: String| TransportError::Unsupported {
            kind: TransportKind::UringZc,
            why,
        };
        let ring =
            IoUring::new(RING_ENTRIES).map_err(|e| unsupported(format!("io_uring_setup: {e}")))?;
        if !ring.params().is_feature_ext_arg() {
            return Err(unsupported(
                "io_uring lacks IORING_FEAT_EXT_ARG (kernel < 5.11)".into(),
            ));
        }
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| unsupported(format!("IORING_REGISTER_PROBE: {e}")))?;
        if !probe.is_supported(opcode::SendMsgZc::CODE) {
            return Err(unsupported(
                "IORING_OP_SENDMSG_ZC missing (kernel < 6.1)".into(),
            ));
        }
        // SAFETY: msghdr is plain data; zeroed means no address and no control messages.
        let msg: libc::msghdr = unsafe { std::mem::zeroed() };
        Ok(UringZc {
            stream,
            ring,
            opts,
            tracker: ReleaseTracker::new(),
            stats: TransportStats {
                zerocopy_active: true,
                ..TransportStats::default()
            },
            queue: IovQueue::new(),
            window: IovBuf::new(),
            msg: MsgHdr(Box::new(msg)),
            result: None,
            told_copied: false,
        })
    }

    fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Takes every CQE: notifications release operations, a result is kept for the caller.
    /// Returns the number of CQEs taken.
    fn drain(&mut self) -> usize {
        let mut taken = 0;
        for cqe in self.ring.completion() {
            taken += 1;
            let op = cqe.user_data();
            if cqueue::notif(cqe.flags()) {
                self.stats.notifications += 1;
                let newly = self.tracker.complete(op, 1);
                if cqe.result() as u32 & IORING_NOTIF_USAGE_ZC_COPIED != 0 {
                    self.stats.copied_completions += newly;
                    if !self.told_copied {
                        self.told_copied = true;
                        tracing::warn!(
                            "transport uring-zc: the kernel copied zero-copy sends on this path \
                             (loopback, veth, or no scatter-gather): plain `copy` is cheaper here"
                        );
                    }
                } else {
                    self.stats.zerocopy_completions += newly;
                }
            } else {
                self.result = Some((
                    op,
                    OpResult {
                        res: cqe.result(),
                        notif_follows: cqueue::more(cqe.flags()),
                    },
                ));
            }
        }
        taken
    }

    /// Submits what is queued and waits up to `timeout` for at least one CQE; returns whether
    /// any arrived.
    fn enter(&mut self, timeout: Duration) -> Result<bool, TransportError> {
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            // The CQ overflowed into the kernel's backlog: draining makes room.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(TransportError::io("io_uring_enter", e)),
        }
        Ok(self.drain() > 0)
    }

    /// Sends the current window as one `SENDMSG_ZC` and waits for its result; returns the bytes
    /// sent (0 after a retryable failure).
    fn send_op(&mut self, more: bool) -> Result<usize, TransportError> {
        let op = self.tracker.add_op();
        self.msg.0.msg_iov = self.window.0.as_mut_ptr();
        self.msg.0.msg_iovlen = self.window.0.len();
        let sqe = opcode::SendMsgZc::new(types::Fd(self.fd()), &*self.msg.0)
            .flags(
                (libc::MSG_WAITALL | libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 })
                    as u32,
            )
            .ioprio(IORING_SEND_ZC_REPORT_USAGE)
            .build()
            .user_data(op);
        // SAFETY: the SQE points at `self.msg`, which points at `self.window`; both stay in place
        // and unchanged until this operation's result CQE, which we wait for below before
        // returning (or the error path drops the transport, whose Drop waits again). The pages
        // themselves are the caller's, kept unchanged until release per `Transport::send`.
        let pushed = unsafe { self.ring.submission().push(&sqe) };
        if pushed.is_err() {
            // Cannot happen with one operation in flight; guard anyway.
            self.tracker.complete(op, 1);
            return Err(TransportError::io(
                "io_uring submission queue full",
                std::io::ErrorKind::WouldBlock.into(),
            ));
        }
        let stall = self.opts.stall_timeout;
        let mut last_progress = Instant::now();
        let result = loop {
            if let Some((id, r)) = self.result.take() {
                debug_assert_eq!(id, op);
                break r;
            }
            let left = stall.saturating_sub(last_progress.elapsed());
            if left.is_zero() {
                return Err(TransportError::Stalled(stall));
            }
            if self.enter(left)? {
                last_progress = Instant::now();
            }
        };
        if result.notif_follows {
            self.stats.zerocopy_calls += 1;
        } else {
            // No notification will come: nothing of it is pinned.
            self.tracker.complete(op, 1);
        }
        match result.res {
            n if n >= 0 => {
                self.stats.calls += 1;
                Ok(n as usize)
            }
            e if -e == libc::ENOBUFS || -e == libc::EAGAIN => {
                self.stats.enobufs_retries += 1;
                // Let notifications free pinned pages before retrying.
                self.enter(Duration::from_millis(1))?;
                Ok(0)
            }
            e if -e == libc::EINTR => Ok(0),
            e => Err(TransportError::io(
                "io_uring SENDMSG_ZC",
                std::io::Error::from_raw_os_error(-e),
            )),
        }
    }

    /// Sends the current window with a plain `sendmsg` (small calls), waiting for room.
    fn send_plain(&mut self, more: bool) -> Result<usize, TransportError> {
        let stall = self.opts.stall_timeout;
        let start = Instant::now();
        loop {
            match socket::sendmsg(self.fd(), &self.window, false, more) {
                Ok(n) => {
                    self.stats.calls += 1;
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let left = stall.saturating_sub(start.elapsed());
                    if left.is_zero() {
                        return Err(TransportError::Stalled(stall));
                    }
                    let ready = socket::wait(self.fd(), true, left)
                        .map_err(|e| TransportError::io("poll", e))?;
                    if !ready.writable && (ready.error || ready.hangup) {
                        if let Some(e) = socket::take_error(self.fd())
                            .map_err(|e| TransportError::io("getsockopt(SO_ERROR)", e))?
                        {
                            return Err(TransportError::io("socket error", e));
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(TransportError::io("sendmsg", e)),
            }
        }
    }

    fn send_queue(&mut self) -> Result<(), TransportError> {
        while self.queue.remaining() > 0 {
            let want = self
                .queue
                .window(&mut self.window, IOV_MAX, self.opts.max_bytes_per_call);
            // As in `sendmsg.rs`: only the send's last call pushes its tail out.
            let more = want < self.queue.remaining();
            let n = if want >= self.opts.zerocopy_min_bytes {
                self.send_op(more)?
            } else {
                self.send_plain(more)?
            };
            self.stats.bytes += n as u64;
            if n > 0 && n < want {
                self.stats.partial_sends += 1;
            }
            self.queue.advance(n);
        }
        Ok(())
    }
}

impl Transport for UringZc {
    fn kind(&self) -> TransportKind {
        TransportKind::UringZc
    }

    unsafe fn send(&mut self, segs: &[IoSlice<'_>]) -> Result<SendTicket, TransportError> {
        let ticket = self.tracker.begin();
        self.stats.sends += 1;
        self.queue.load(segs);
        let sent = self.send_queue();
        self.queue.load(&[]);
        sent?;
        self.tracker.end(ticket);
        Ok(ticket)
    }

    fn poll_released(&mut self) -> Result<SendTicket, TransportError> {
        self.drain();
        Ok(self.tracker.released())
    }

    fn wait_released(&mut self, ticket: SendTicket) -> Result<(), TransportError> {
        let stall = self.opts.stall_timeout;
        self.wait_ticket(ticket, stall)
    }

    fn last_ticket(&self) -> SendTicket {
        self.tracker.last_ticket()
    }

    fn stats(&self) -> TransportStats {
        self.stats
    }
}

impl Completions for UringZc {
    fn tracker(&self) -> &ReleaseTracker {
        &self.tracker
    }

    fn reap_ready(&mut self) -> Result<u64, TransportError> {
        Ok(self.drain() as u64)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<u64, TransportError> {
        Ok(u64::from(self.enter(timeout)?))
    }
}

impl Drop for UringZc {
    fn drop(&mut self) {
        // The caller may reuse the memory once we are gone; the ring is torn down after this.
        let stall = self.opts.stall_timeout;
        self.settle(stall);
    }
}
