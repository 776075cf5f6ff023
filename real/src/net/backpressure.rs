//! The output gate's byte cap, enforced by back-pressure on the VM instead of by dropping.
//!
//! Bytes of guest frames are charged when the agent reads them from QEMU's netdev socket and
//! refunded when they leave the agent (released or passed by the gate, or dropped by a fence).
//! When the charge reaches the cap, the reader stops reading the socket until releases bring it
//! down to the low-water mark (half the cap, so reading does not flap on and off around the
//! cap). Nothing is dropped and the agent does not grow: the held bytes stay under the cap plus
//! one frame.
//!
//! Why the guest then stalls instead of losing packets (QEMU's `net/stream.c`, or
//! `net/stream_data.c` in later versions, with `net/queue.c` and virtio-net): the stream
//! netdev writes each frame to the socket without blocking; when the socket is full the write
//! would block, so its receive handler returns 0 and watches for the socket to become writable.
//! A 0 from a receive handler makes the net queue keep the packet (it drops only packets whose
//! sender gave no completion callback, and virtio-net always gives one) and report 0 to
//! virtio-net, which then stops taking frames from the guest's transmit ring until the
//! completion callback runs, that is until the queued packet went out once the socket drained.
//! The guest's ring fills and its driver stops transmitting, as on a saturated link.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Default cap: 64 MiB of held guest frames.
pub const DEFAULT_OUTPUT_CAP_BYTES: u64 = 64 << 20;

/// The cap's counters, for status.json and the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CapStats {
    /// Bytes of guest frames read and not yet out of the agent.
    pub held_bytes: u64,
    /// The cap.
    pub cap_bytes: u64,
    /// Times the cap was reached (reading paused).
    pub cap_hits: u64,
    /// Time reading was paused at the cap, microseconds (a pause in progress included).
    pub cap_paused_us: u64,
    /// Reading is paused now.
    pub reading_paused: bool,
}

#[derive(Debug, Default)]
struct State {
    held: u64,
    paused_since: Option<Instant>,
    hits: u64,
    paused: Duration,
    /// Counters at the last [`OutputCap::take_since_last`].
    last_hits: u64,
    last_paused: Duration,
}

impl State {
    fn paused_total(&self, now: Instant) -> Duration {
        self.paused + self.paused_since.map_or(Duration::ZERO, |t| now - t)
    }
}

/// The byte budget shared by the netdev reader (charges, waits) and the gate (refunds).
#[derive(Debug)]
pub struct OutputCap {
    cap: u64,
    low: u64,
    state: Mutex<State>,
    resume: Notify,
}

impl OutputCap {
    /// A cap of `cap` bytes (at least 1), resuming at half of it.
    pub fn new(cap: u64) -> OutputCap {
        let cap = cap.max(1);
        OutputCap {
            cap,
            low: cap / 2,
            state: Mutex::new(State::default()),
            resume: Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is plain counters, consistent after every statement.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A frame of `bytes` was read from the VM; reading pauses if that reached the cap.
    pub fn charge(&self, bytes: u64, now: Instant) {
        let mut s = self.state();
        s.held = s.held.saturating_add(bytes);
        if s.held >= self.cap && s.paused_since.is_none() {
            s.paused_since = Some(now);
            s.hits += 1;
        }
    }

    /// Frames of `bytes` left the agent; reading resumes once at or below the low-water mark.
    pub fn refund(&self, bytes: u64, now: Instant) {
        let mut s = self.state();
        s.held = s.held.saturating_sub(bytes);
        if s.held <= self.low {
            if let Some(since) = s.paused_since.take() {
                s.paused += now.saturating_duration_since(since);
                drop(s);
                self.resume.notify_waiters();
            }
        }
    }

    /// Reading is paused at the cap.
    pub fn paused(&self) -> bool {
        self.state().paused_since.is_some()
    }

    /// Returns when the reader may read the next frame.
    pub async fn admitted(&self) {
        loop {
            let resumed = self.resume.notified();
            tokio::pin!(resumed);
            // Registered before the check, so a refund between the check and the wait wakes it.
            resumed.as_mut().enable();
            if !self.paused() {
                return;
            }
            resumed.await;
        }
    }

    /// The counters now (hits and paused time since the start).
    pub fn stats(&self, now: Instant) -> CapStats {
        let s = self.state();
        CapStats {
            held_bytes: s.held,
            cap_bytes: self.cap,
            cap_hits: s.hits,
            cap_paused_us: s.paused_total(now).as_micros() as u64,
            reading_paused: s.paused_since.is_some(),
        }
    }

    /// The counters with hits and paused time since the previous call (per-epoch metrics).
    pub fn take_since_last(&self, now: Instant) -> CapStats {
        let mut s = self.state();
        let total = s.paused_total(now);
        let out = CapStats {
            held_bytes: s.held,
            cap_bytes: self.cap,
            cap_hits: s.hits - s.last_hits,
            cap_paused_us: total.saturating_sub(s.last_paused).as_micros() as u64,
            reading_paused: s.paused_since.is_some(),
        };
        s.last_hits = s.hits;
        s.last_paused = total;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_at_the_cap_and_resumes_at_half() {
        let t0 = Instant::now();
        let c = OutputCap::new(100);
        c.charge(60, t0);
        assert!(!c.paused());
        c.charge(40, t0);
        assert!(c.paused(), "100 of 100");
        c.refund(49, t0 + Duration::from_millis(1));
        assert!(c.paused(), "51 is above the low-water mark");
        c.refund(1, t0 + Duration::from_millis(3));
        assert!(!c.paused(), "50 is at it");
        let s = c.stats(t0 + Duration::from_millis(3));
        assert_eq!((s.held_bytes, s.cap_bytes, s.cap_hits), (50, 100, 1));
        assert_eq!(s.cap_paused_us, 3000);
        // Per-epoch view: the hit once, then nothing new.
        assert_eq!(c.take_since_last(t0).cap_hits, 1);
        assert_eq!(c.take_since_last(t0).cap_hits, 0);
    }

    #[tokio::test]
    async fn a_waiting_reader_wakes_when_releases_reach_low_water() {
        let c = std::sync::Arc::new(OutputCap::new(10));
        c.charge(10, Instant::now());
        let waiter = tokio::spawn({
            let c = c.clone();
            async move { c.admitted().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "paused at the cap");
        c.refund(4, Instant::now());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "6 is above the low-water mark of 5");
        c.refund(1, Instant::now());
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken at low water")
            .unwrap();
    }
}
