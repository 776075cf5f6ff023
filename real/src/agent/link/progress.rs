//! How far the sync checkpoint going out (a backup's full sync: all of RAM and every data block
//! of the disk; or its catch-up: everything written since its replica's epoch) has got, for the status file and the demo's progress line: a sync of a big VM takes
//! seconds, and a user watching it wants bytes, rate and time left, not silence.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Progress of the full checkpoint being sent, shared by the agent and its link writers.
#[derive(Debug, Default)]
pub struct SyncProgress {
    total: AtomicU64,
    done: AtomicU64,
    started: Mutex<Option<Instant>>,
}

/// A snapshot of [`SyncProgress`].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct SyncReport {
    /// Bytes handed to the transport so far.
    pub bytes_done: u64,
    /// Bytes of the whole checkpoint.
    pub bytes_total: u64,
    /// Bytes per second since the send began.
    pub rate_bytes_per_s: f64,
    /// Seconds left at that rate.
    pub eta_s: f64,
}

impl SyncProgress {
    /// A full checkpoint of `total` bytes starts going out.
    pub fn begin(&self, total: u64) {
        *self.started.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }

    /// `n` more bytes went out.
    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// The checkpoint is out (or its send failed): nothing to report any more.
    pub fn end(&self) {
        *self.started.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Where the send stands, while one is under way.
    pub fn report(&self) -> Option<SyncReport> {
        let started = (*self.started.lock().unwrap_or_else(|e| e.into_inner()))?;
        let total = self.total.load(Ordering::Relaxed);
        let done = self.done.load(Ordering::Relaxed).min(total);
        let secs = started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
        let eta = if rate > 0.0 {
            (total - done) as f64 / rate
        } else {
            f64::INFINITY
        };
        Some(SyncReport {
            bytes_done: done,
            bytes_total: total,
            rate_bytes_per_s: rate,
            eta_s: if eta.is_finite() { eta } else { -1.0 },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_only_while_a_send_is_under_way() {
        let p = SyncProgress::default();
        assert!(p.report().is_none());
        p.begin(1000);
        p.add(250);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let r = p.report().unwrap();
        assert_eq!((r.bytes_done, r.bytes_total), (250, 1000));
        assert!(r.rate_bytes_per_s > 0.0 && r.eta_s > 0.0, "{r:?}");
        p.add(10_000);
        assert_eq!(p.report().unwrap().bytes_done, 1000, "never past the total");
        p.end();
        assert!(p.report().is_none());
    }
}
