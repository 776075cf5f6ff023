//! The `sendmsg`-based transports: `copy`, `msg-zerocopy` and `auto`.
//!
//! `copy` sends batched iovecs plainly; the kernel has copied them when `sendmsg` returns.
//! `msg-zerocopy` sets `SO_ZEROCOPY` and sends with `MSG_ZEROCOPY`: every successful call gets the
//! next per-socket call id (a failed call does not), and the kernel later queues completions for
//! ranges of ids on the socket error queue. `auto` is `msg-zerocopy` that switches to plain sends
//! for good when completions say the kernel copied anyway; sends issued before the switch are
//! still released by their completions.

use std::io::IoSlice;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use super::auto::FallbackPolicy;
use super::iov::{IovBuf, IovQueue, IOV_MAX};
use super::release::{Completions, ReleaseTracker};
use super::socket::{self, ZcCompletion};
use super::{
    SendTicket, Transport, TransportError, TransportKind, TransportOptions, TransportStats,
};

/// Reap the error queue once this many zero-copy calls are outstanding, so notifications do not
/// pile up against `optmem_max` (each pending one is charged to the socket).
const REAP_THRESHOLD: usize = 32;
/// How long to wait for completions after ENOBUFS before trying again.
const ENOBUFS_BACKOFF: Duration = Duration::from_millis(1);

pub(crate) struct SendmsgTransport {
    kind: TransportKind,
    stream: TcpStream,
    opts: TransportOptions,
    /// New calls use MSG_ZEROCOPY (large enough ones).
    zerocopy: bool,
    /// Set for `auto` until it falls back.
    policy: Option<FallbackPolicy>,
    told_copied: bool,
    tracker: ReleaseTracker,
    stats: TransportStats,
    queue: IovQueue,
    window: IovBuf,
}

impl SendmsgTransport {
    pub(crate) fn new(
        kind: TransportKind,
        stream: TcpStream,
        opts: TransportOptions,
    ) -> Result<Self, TransportError> {
        let zerocopy = kind != TransportKind::Copy;
        if zerocopy {
            socket::enable_zerocopy(stream.as_raw_fd()).map_err(|e| {
                TransportError::Unsupported {
                    kind,
                    why: format!("setsockopt(SO_ZEROCOPY): {e}"),
                }
            })?;
        }
        Ok(SendmsgTransport {
            kind,
            stream,
            opts,
            zerocopy,
            policy: (kind == TransportKind::Auto).then(FallbackPolicy::new),
            told_copied: false,
            tracker: ReleaseTracker::new(),
            stats: TransportStats {
                zerocopy_active: zerocopy,
                ..TransportStats::default()
            },
            queue: IovQueue::new(),
            window: IovBuf::new(),
        })
    }

    fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Reads every queued completion; returns how many calls were newly completed.
    fn reap(&mut self) -> Result<u64, TransportError> {
        let mut total = 0;
        while let Some(c) = socket::read_zc_completion(self.fd())
            .map_err(|e| TransportError::io("recvmsg(MSG_ERRQUEUE)", e))?
        {
            total += self.apply(c);
        }
        Ok(total)
    }

    /// Applies one completion: kernel ids are our operation numbers modulo 2^32.
    fn apply(&mut self, c: ZcCompletion) -> u64 {
        self.stats.notifications += 1;
        let Some((first, count)) = ops_of(self.tracker.base(), c) else {
            return 0;
        };
        let newly = self.tracker.complete(first, count);
        if c.copied {
            self.stats.copied_completions += newly;
            self.tell_copied();
        } else {
            self.stats.zerocopy_completions += newly;
        }
        if let Some(policy) = self.policy.as_mut() {
            let (z, k) = if c.copied { (0, newly) } else { (newly, 0) };
            if let Some(why) = policy.observe(z, k) {
                tracing::warn!("transport auto: falling back to copy: {why}");
                self.policy = None;
                self.zerocopy = false;
                self.stats.zerocopy_active = false;
                self.stats.fallbacks += 1;
            }
        }
        newly
    }

    /// Says once that zero-copy does not pay on this path (`auto` says it when it falls back).
    fn tell_copied(&mut self) {
        if !self.told_copied && self.kind == TransportKind::MsgZeroCopy {
            self.told_copied = true;
            tracing::warn!(
                "transport msg-zerocopy: the kernel copied zero-copy sends on this path \
                 (loopback, veth, or no scatter-gather): plain `copy` is cheaper here"
            );
        }
    }

    /// Waits up to `timeout` for completions or an error; returns completions reaped.
    fn wait_completions(&mut self, timeout: Duration) -> Result<u64, TransportError> {
        let ready =
            socket::wait(self.fd(), false, timeout).map_err(|e| TransportError::io("poll", e))?;
        let reaped = self.reap()?;
        if reaped == 0 && (ready.error || ready.hangup) {
            self.check_socket()?;
        }
        Ok(reaped)
    }

    /// Turns a socket error or hang-up seen by poll into an error (instead of spinning on it).
    fn check_socket(&self) -> Result<(), TransportError> {
        if let Some(e) = socket::take_error(self.fd())
            .map_err(|e| TransportError::io("getsockopt(SO_ERROR)", e))?
        {
            return Err(TransportError::io("socket error", e));
        }
        if socket::wait(self.fd(), false, Duration::from_millis(1))
            .map_err(|e| TransportError::io("poll", e))?
            .hangup
        {
            return Err(TransportError::io(
                "socket hung up with sends outstanding",
                std::io::ErrorKind::ConnectionReset.into(),
            ));
        }
        Ok(())
    }

    fn send_queue(&mut self) -> Result<(), TransportError> {
        let stall = self.opts.stall_timeout;
        let mut last_progress = Instant::now();
        // Set when ENOBUFS persists with nothing left to reap: the next call goes out plain.
        let mut plain_once = false;
        while self.queue.remaining() > 0 {
            let want = self
                .queue
                .window(&mut self.window, IOV_MAX, self.opts.max_bytes_per_call);
            let zc = self.zerocopy && !plain_once && want >= self.opts.zerocopy_min_bytes;
            // Only the send's last call pushes its tail out; earlier ones say more follows, so
            // a short segment does not go out between calls (costly on loopback, whose MSS is
            // just under 64 KiB).
            let more = want < self.queue.remaining();
            match socket::sendmsg(self.fd(), &self.window, zc, more) {
                Ok(n) => {
                    plain_once = false;
                    last_progress = Instant::now();
                    self.stats.calls += 1;
                    self.stats.bytes += n as u64;
                    if n < want {
                        self.stats.partial_sends += 1;
                    }
                    if zc {
                        // The kernel gave this call the next id, even for a partial send.
                        self.tracker.add_op();
                        self.stats.zerocopy_calls += 1;
                        if self.tracker.outstanding() >= REAP_THRESHOLD {
                            self.reap()?;
                        }
                    }
                    self.queue.advance(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Socket buffer full: reap what completed meanwhile, then wait for room.
                    if self.tracker.outstanding() > 0 && self.reap()? > 0 {
                        last_progress = Instant::now();
                    }
                    let left = stall.saturating_sub(last_progress.elapsed());
                    if left.is_zero() {
                        return Err(TransportError::Stalled(stall));
                    }
                    let ready = socket::wait(self.fd(), true, left)
                        .map_err(|e| TransportError::io("poll", e))?;
                    if !ready.writable
                        && (ready.error || ready.hangup)
                        && (self.tracker.outstanding() == 0 || self.reap()? == 0)
                    {
                        self.check_socket()?;
                    }
                }
                Err(e) if zc && e.raw_os_error() == Some(libc::ENOBUFS) => {
                    // optmem_max or the locked-page limit: completions free both.
                    self.stats.enobufs_retries += 1;
                    if self.reap()? > 0 {
                        last_progress = Instant::now();
                    } else if self.tracker.outstanding() == 0 {
                        if self.stats.fallbacks == 0 {
                            tracing::warn!(
                                "transport {}: ENOBUFS with no zero-copy send outstanding \
                                 (net.core.optmem_max too small?): sending plainly",
                                self.kind
                            );
                        }
                        self.stats.fallbacks += 1;
                        plain_once = true;
                    } else {
                        if last_progress.elapsed() >= stall {
                            return Err(TransportError::Stalled(stall));
                        }
                        if self.wait_completions(ENOBUFS_BACKOFF)? > 0 {
                            last_progress = Instant::now();
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(TransportError::io("sendmsg", e)),
            }
        }
        Ok(())
    }
}

/// The operations (first, count) a completion covers, given that every operation below `base`
/// is complete: kernel ids are operation numbers modulo 2^32, and a completion never reaches
/// more than 2^31 calls back. `None` if it lies entirely below `base`.
fn ops_of(base: u64, c: ZcCompletion) -> Option<(u64, u64)> {
    let ahead = c.last.wrapping_sub(base as u32);
    if ahead >= 1 << 31 {
        return None;
    }
    let last = base + u64::from(ahead);
    let first = last.saturating_sub(c.calls() - 1).max(base);
    Some((first, last - first + 1))
}

impl Transport for SendmsgTransport {
    fn kind(&self) -> TransportKind {
        self.kind
    }

    unsafe fn send(&mut self, segs: &[IoSlice<'_>]) -> Result<SendTicket, TransportError> {
        let ticket = self.tracker.begin();
        self.stats.sends += 1;
        self.queue.load(segs);
        let sent = self.send_queue();
        // Forget the caller's addresses whatever happened.
        self.queue.load(&[]);
        self.window.0.clear();
        sent?;
        self.tracker.end(ticket);
        if self.tracker.outstanding() > 0 {
            // Keeps the watermark fresh and lets `auto` decide early.
            self.reap()?;
        }
        Ok(ticket)
    }

    fn poll_released(&mut self) -> Result<SendTicket, TransportError> {
        if self.tracker.outstanding() > 0 {
            self.reap()?;
        }
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

impl Completions for SendmsgTransport {
    fn tracker(&self) -> &ReleaseTracker {
        &self.tracker
    }

    fn reap_ready(&mut self) -> Result<u64, TransportError> {
        if self.tracker.outstanding() == 0 {
            return Ok(0);
        }
        self.reap()
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<u64, TransportError> {
        self.wait_completions(timeout)
    }
}

impl Drop for SendmsgTransport {
    fn drop(&mut self) {
        // The caller may free or reuse the memory once we are gone.
        let stall = self.opts.stall_timeout;
        self.settle(stall);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(first: u32, last: u32) -> ZcCompletion {
        ZcCompletion {
            first,
            last,
            copied: false,
        }
    }

    #[test]
    fn kernel_ids_map_to_operations_across_the_u32_wrap() {
        assert_eq!(ops_of(0, c(0, 9)), Some((0, 10)));
        assert_eq!(ops_of(5, c(5, 5)), Some((5, 1)));
        // Ids wrap after 2^32 calls; operation numbers keep counting.
        let base = (1u64 << 32) - 3;
        assert_eq!(ops_of(base, c(u32::MAX - 2, 4)), Some((base, 8)));
        assert_eq!(ops_of(1 << 32, c(0, 0)), Some((1 << 32, 1)));
        // Entirely old, or straddling `base`: only the part at or above `base` counts.
        assert_eq!(ops_of(100, c(10, 20)), None);
        assert_eq!(ops_of(100, c(90, 104)), Some((100, 5)));
    }
}
