//! Checkpoint transports: how a checkpoint's bytes leave the primary (what they rely on:
//! docs/ARCHITECTURE.md, Zero-copy sends).
//!
//! A checkpoint is mostly guest pages sent straight from the mapped guest RAM (or from a staging
//! buffer). With a zero-copy send the kernel reads those pages *after* the send call returned —
//! TCP may even retransmit from them — so the memory must stay unchanged until the transport says
//! it is **released**. Every [`Transport::send`] returns a [`SendTicket`]; the release watermark
//! ([`Transport::poll_released`]) is the highest ticket such that it and every earlier send are
//! released.
//!
//! Implementations ([`TransportKind`]):
//! - `copy`: batched `sendmsg` with large iovecs; released when `send` returns.
//! - `msg-zerocopy`: `SO_ZEROCOPY` + `MSG_ZEROCOPY`; released by completions on the socket error
//!   queue.
//! - `uring-zc`: io_uring `SENDMSG_ZC`; released by the notification CQE.
//! - `auto`: `msg-zerocopy` that falls back to `copy` for good once completions say the kernel
//!   copied anyway (always so on loopback and veth).
//!
//! All of them are synchronous and meant for a dedicated sender thread (from tokio: a
//! `spawn_blocking` task or a thread fed by a channel). They never issue one syscall per page:
//! segments are coalesced when adjacent and sent in calls of up to `IOV_MAX` iovecs and
//! [`TransportOptions::max_bytes_per_call`] bytes.
//!
//! After any error the connection's byte stream is unusable (a send may have been partly
//! queued): drop the transport and the connection.

mod auto;
mod iov;
mod kind;
mod release;
mod sendmsg;
mod socket;
mod uring_zc;

pub mod bench;

use std::io::IoSlice;
use std::net::TcpStream;
use std::time::Duration;

pub use kind::TransportKind;

/// Identifies one [`Transport::send`] call. Tickets grow by one per call, starting at 1;
/// [`SendTicket::NONE`] (0) is "no send yet".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct SendTicket(u64);

impl SendTicket {
    /// Precedes every ticket: released from the start.
    pub const NONE: SendTicket = SendTicket(0);

    /// The ticket's sequence number (1 for the first send).
    pub fn value(self) -> u64 {
        self.0
    }

    pub(crate) fn next(self) -> SendTicket {
        SendTicket(self.0 + 1)
    }
}

impl std::fmt::Display for SendTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Counters of one transport since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TransportStats {
    /// Payload bytes the kernel accepted.
    pub bytes: u64,
    /// [`Transport::send`] calls (tickets issued).
    pub sends: u64,
    /// Send syscalls or io_uring send operations issued (plain and zero-copy).
    pub calls: u64,
    /// Of `calls`, those made with zero-copy (`MSG_ZEROCOPY` or `SENDMSG_ZC`).
    pub zerocopy_calls: u64,
    /// Zero-copy calls whose completion said the pages were sent without a copy.
    pub zerocopy_completions: u64,
    /// Zero-copy calls whose completion said the kernel copied anyway
    /// (`SO_EE_CODE_ZEROCOPY_COPIED` / `IORING_NOTIF_USAGE_ZC_COPIED`). Once everything is
    /// released, `zerocopy_completions + copied_completions == zerocopy_calls`.
    pub copied_completions: u64,
    /// Completion notifications received (the kernel coalesces ranges of calls into one).
    pub notifications: u64,
    /// Calls that sent only part of what they were given (the rest went in later calls).
    pub partial_sends: u64,
    /// Times a zero-copy call failed with ENOBUFS (optmem / locked-page limits) and was retried
    /// after reaping completions.
    pub enobufs_retries: u64,
    /// Times zero-copy was given up in favour of a plain send: `auto` switching to `copy` (at
    /// most once), or a chunk sent plain because ENOBUFS persisted with nothing left to reap.
    pub fallbacks: u64,
    /// Whether new sends currently use zero-copy.
    pub zerocopy_active: bool,
}

/// Tuning of a transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportOptions {
    /// Most payload bytes per send syscall (each call also takes at most `IOV_MAX` iovecs).
    pub max_bytes_per_call: usize,
    /// Calls smaller than this go out as plain sends even on zero-copy transports: zero-copy
    /// only pays above ~10 KB per call (docs/ARCHITECTURE.md, Zero-copy sends). 0 makes every
    /// call zero-copy.
    pub zerocopy_min_bytes: usize,
    /// How long a send or a wait for release may go without any progress before it fails with
    /// [`TransportError::Stalled`] (the peer stopped reading).
    pub stall_timeout: Duration,
}

impl Default for TransportOptions {
    fn default() -> Self {
        Self {
            max_bytes_per_call: 4 << 20,
            zerocopy_min_bytes: 16 << 10,
            stall_timeout: Duration::from_secs(10),
        }
    }
}

/// Errors of the transports.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// `--transport` named no transport.
    #[error("unknown transport {0:?} (expected one of: copy, msg-zerocopy, uring-zc, auto)")]
    UnknownKind(String),
    /// Options that cannot work.
    #[error("invalid transport options: {0}")]
    BadOptions(&'static str),
    /// The kernel or the socket lacks what this transport needs.
    #[error("transport {kind} is not supported here: {why}")]
    Unsupported {
        /// The transport asked for.
        kind: TransportKind,
        /// What is missing.
        why: String,
    },
    /// A syscall failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// Nothing was sent and nothing released for the whole stall timeout.
    #[error("transport stalled: no progress for {0:?} (peer not reading?)")]
    Stalled(Duration),
    /// A wait for a ticket that no send returned.
    #[error("ticket {asked} was never issued (last issued: {last})")]
    BadTicket {
        /// The ticket waited for.
        asked: SendTicket,
        /// The newest ticket issued.
        last: SendTicket,
    },
}

impl TransportError {
    pub(crate) fn io(op: &'static str, source: std::io::Error) -> Self {
        TransportError::Io { op, source }
    }
}

/// Sends a checkpoint's bytes over a connected TCP socket.
pub trait Transport: Send {
    /// The transport asked for (`auto` stays `auto` after falling back; see
    /// [`TransportStats::zerocopy_active`]).
    fn kind(&self) -> TransportKind;

    /// Sends `segs` in order, after everything sent before. Returns once every byte is queued in
    /// the kernel (it waits while the socket buffer is full); the bytes may still be read from
    /// `segs` later, until the returned ticket is released.
    ///
    /// # Safety
    /// The memory behind every segment must stay mapped and **unchanged** until
    /// [`poll_released`](Self::poll_released) reports this ticket (or a later one), or
    /// [`wait_released`](Self::wait_released) for it returned `Ok`, or the transport was dropped
    /// (drop waits up to the stall timeout for outstanding releases). Zero-copy sends read it
    /// asynchronously — TCP may retransmit from it — so a change before release ships bytes that
    /// were never meant to be sent (a torn page on the backup) or, if the memory is unmapped and
    /// reused, leaks whatever replaced it. The process itself is not corrupted either way.
    unsafe fn send(&mut self, segs: &[IoSlice<'_>]) -> Result<SendTicket, TransportError>;

    /// Reaps completions without blocking and returns the release watermark: every send with a
    /// ticket ≤ the returned one has had its buffers released.
    fn poll_released(&mut self) -> Result<SendTicket, TransportError>;

    /// Blocks until every send up to and including `ticket` is released.
    fn wait_released(&mut self, ticket: SendTicket) -> Result<(), TransportError>;

    /// The newest ticket issued ([`SendTicket::NONE`] before the first send).
    fn last_ticket(&self) -> SendTicket;

    /// Counters since the transport was opened.
    fn stats(&self) -> TransportStats;

    /// Sends `segs` and waits until they are released: safe, because the borrow covers the
    /// whole time the kernel may read them. Meant for small headers and device state.
    fn send_and_wait(&mut self, segs: &[IoSlice<'_>]) -> Result<SendTicket, TransportError> {
        // SAFETY: `segs` stays borrowed (hence mapped and unchanged) until wait_released returns.
        // If the wait fails the transport is broken and must be dropped (documented above); drop
        // waits for outstanding releases again.
        let ticket = unsafe { self.send(segs)? };
        self.wait_released(ticket)?;
        Ok(ticket)
    }
}

/// Opens a transport of `kind` on a connected TCP stream (the transport owns it; keep a
/// `try_clone` to read acks). Fails with a clear error if the kernel lacks what `kind` needs.
pub fn open(
    kind: TransportKind,
    stream: TcpStream,
    opts: TransportOptions,
) -> Result<Box<dyn Transport>, TransportError> {
    if opts.max_bytes_per_call == 0 {
        return Err(TransportError::BadOptions("max_bytes_per_call must be > 0"));
    }
    Ok(match kind {
        TransportKind::Copy | TransportKind::MsgZeroCopy | TransportKind::Auto => {
            Box::new(sendmsg::SendmsgTransport::new(kind, stream, opts)?)
        }
        TransportKind::UringZc => Box::new(uring_zc::UringZc::new(stream, opts)?),
    })
}
