//! Turns completions of individual zero-copy operations into the release watermark of tickets.
//!
//! Operations are numbered 0, 1, 2, … in the order they were issued (for `MSG_ZEROCOPY` this is
//! exactly the kernel's per-socket call id, modulo 2^32). Completions may cover ranges and may in
//! principle arrive out of order; a ticket is released once every operation issued up to the end
//! of its send, and every earlier ticket, is complete.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{SendTicket, TransportError};

/// A transport whose buffers are released by completions the kernel reports later (the
/// `MSG_ZEROCOPY` error queue, io_uring notification CQEs): how to wait for them.
pub(crate) trait Completions {
    /// The release watermark the completions advance.
    fn tracker(&self) -> &ReleaseTracker;
    /// Applies the completions already reported, without waiting; returns how many.
    fn reap_ready(&mut self) -> Result<u64, TransportError>;
    /// Waits up to `timeout` for completions and applies them; returns how many.
    fn wait_ready(&mut self, timeout: Duration) -> Result<u64, TransportError>;

    /// Waits until `ticket` is released; fails once `stall` passes without any completion.
    fn wait_ticket(&mut self, ticket: SendTicket, stall: Duration) -> Result<(), TransportError> {
        let last = self.tracker().last_ticket();
        if ticket > last {
            return Err(TransportError::BadTicket {
                asked: ticket,
                last,
            });
        }
        let mut last_progress = Instant::now();
        self.reap_ready()?;
        while self.tracker().released() < ticket {
            let left = stall.saturating_sub(last_progress.elapsed());
            if left.is_zero() {
                return Err(TransportError::Stalled(stall));
            }
            if self.wait_ready(left)? > 0 {
                last_progress = Instant::now();
            }
        }
        Ok(())
    }

    /// Before the transport goes away: waits (at most `stall`) for the completions of
    /// everything sent, so that its caller may free or reuse the memory afterwards.
    fn settle(&mut self, stall: Duration) {
        let deadline = Instant::now() + stall;
        let mut failed = self.reap_ready().err();
        while failed.is_none() && self.tracker().outstanding() > 0 && Instant::now() < deadline {
            failed = self.wait_ready(Duration::from_millis(10)).err();
        }
        // Nothing to return to a drop; but memory the kernel may still read is about to be
        // reused, which the log must show (the receiver's checksums catch what it changes).
        let outstanding = self.tracker().outstanding();
        if outstanding > 0 {
            match failed {
                Some(e) => tracing::warn!(
                    outstanding,
                    error = %e,
                    "transport closed with zero-copy sends unreleased: waiting for them failed"
                ),
                None => tracing::warn!(
                    outstanding,
                    ?stall,
                    "transport closed with zero-copy sends unreleased after waiting"
                ),
            }
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct ReleaseTracker {
    last_ticket: SendTicket,
    released: SendTicket,
    /// Every operation below `base` is complete.
    base: u64,
    /// Completion flags of operations `base..base + done.len()`.
    done: VecDeque<bool>,
    /// Operations issued and not yet complete.
    outstanding: usize,
    /// Ended tickets not yet released, each with the number of operations issued when it ended.
    pending: VecDeque<(SendTicket, u64)>,
}

impl ReleaseTracker {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Starts the next send and returns its ticket.
    pub(crate) fn begin(&mut self) -> SendTicket {
        self.last_ticket = self.last_ticket.next();
        self.last_ticket
    }

    /// Records an operation that will complete later; returns its number.
    pub(crate) fn add_op(&mut self) -> u64 {
        let id = self.next_op();
        self.done.push_back(false);
        self.outstanding += 1;
        id
    }

    /// Number the next operation will get.
    pub(crate) fn next_op(&self) -> u64 {
        self.base + self.done.len() as u64
    }

    /// Ends the send of `ticket` (from [`begin`](Self::begin)): it is released once every
    /// operation issued so far is complete.
    pub(crate) fn end(&mut self, ticket: SendTicket) {
        debug_assert_eq!(ticket, self.last_ticket);
        self.pending.push_back((ticket, self.next_op()));
        self.advance();
    }

    /// Marks operations `first..first + count` complete; returns how many were newly completed
    /// (unknown or repeated numbers are ignored).
    pub(crate) fn complete(&mut self, first: u64, count: u64) -> u64 {
        let mut newly = 0;
        let end = first.saturating_add(count).min(self.next_op());
        for id in first.max(self.base)..end {
            let slot = &mut self.done[(id - self.base) as usize];
            if !*slot {
                *slot = true;
                newly += 1;
            }
        }
        self.outstanding -= newly as usize;
        self.advance();
        newly
    }

    fn advance(&mut self) {
        while self.done.front() == Some(&true) {
            self.done.pop_front();
            self.base += 1;
        }
        while let Some(&(t, end_op)) = self.pending.front() {
            if end_op > self.base {
                break;
            }
            self.released = t;
            self.pending.pop_front();
        }
    }

    /// Every send with a ticket ≤ this is released.
    pub(crate) fn released(&self) -> SendTicket {
        self.released
    }

    /// The newest ticket issued.
    pub(crate) fn last_ticket(&self) -> SendTicket {
        self.last_ticket
    }

    /// Operations issued and not yet complete.
    pub(crate) fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// The first incomplete operation (everything below it is complete).
    pub(crate) fn base(&self) -> u64 {
        self.base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_sends_release_at_once() {
        let mut r = ReleaseTracker::new();
        let t = r.begin();
        r.end(t);
        assert_eq!(r.released(), t);
    }

    #[test]
    fn watermark_waits_for_every_earlier_operation() {
        let mut r = ReleaseTracker::new();
        let t1 = r.begin();
        let a = r.add_op();
        let b = r.add_op();
        r.end(t1);
        let t2 = r.begin();
        let c = r.add_op();
        r.end(t2);
        // A send without zero-copy operations still waits for the earlier ones.
        let t3 = r.begin();
        r.end(t3);
        assert_eq!((a, b, c), (0, 1, 2));
        assert_eq!(r.released(), SendTicket::NONE);
        // Out of order: c first releases nothing.
        assert_eq!(r.complete(c, 1), 1);
        assert_eq!(r.released(), SendTicket::NONE);
        assert_eq!(r.complete(a, 1), 1);
        assert_eq!(r.released(), SendTicket::NONE);
        assert_eq!(r.outstanding(), 1);
        // Duplicates and unknown ids are ignored.
        assert_eq!(r.complete(a, 1), 0);
        assert_eq!(r.complete(10, 5), 0);
        assert_eq!(r.complete(b, 1), 1);
        assert_eq!(r.released(), t3);
        assert_eq!(r.outstanding(), 0);
    }

    #[test]
    fn ranges_complete_many() {
        let mut r = ReleaseTracker::new();
        let t = r.begin();
        for _ in 0..100 {
            r.add_op();
        }
        r.end(t);
        assert_eq!(r.complete(0, 60), 60);
        assert_eq!(r.complete(50, 50), 40);
        assert_eq!(r.released(), t);
        assert_eq!(r.base(), 100);
    }
}
