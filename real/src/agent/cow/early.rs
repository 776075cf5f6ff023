//! When the copy-on-write engine re-protects pages early, while the VM still runs.
//!
//! A capture must write-protect every page the guest made writable since the last one, and it
//! does so with the VM paused. Here each `UFFDIO_WRITEPROTECT` call costs microseconds and each
//! page a fraction of one, so with thousands of scattered dirty pages that protection *is* the
//! pause. Most of it can be done before the pause: a page protected early that the guest does
//! not write again stays protected until the capture, which then only has to protect the pages
//! written since the last early pass. A page written again after an early pass just faults once
//! more (the handler logs it and lets it go); nothing about what a checkpoint contains changes.
//!
//! The passes follow the epoch: the engine takes the epoch's length to be the shortest of the
//! last few gaps between captures (an epoch stretched by a slow ack must not push the passes
//! past the next capture), and runs passes half-way to the expected next capture, then each time half
//! of the remaining time has gone by, until less than [`MIN_LEAD`] is left; right before the
//! pause one last pass runs (`CowEngine::protect_before_pause`, called by the VM's
//! `prepare_pause`). So a guest that writes early in its epoch or steadily leaves the pause only
//! what it wrote during that last pass. A page the guest writes again after a pass protected it
//! is *hot*: the scheduled passes leave it alone for the rest of the epoch, so it costs the guest
//! at most two extra faults per epoch (one after a scheduled pass, one after the last).

use std::time::{Duration, Instant};

/// No pass is started closer than this to the expected capture: a pass that the capture has to
/// wait for would lengthen the pause it is meant to shorten.
pub(super) const MIN_LEAD: Duration = Duration::from_millis(1);

/// At most this many passes per epoch (bounds the extra faults of a page rewritten all along).
pub(super) const MAX_PASSES: usize = 6;

/// A pass runs only when at least this many pages are writable. The capture protects fewer in
/// well under a millisecond, and every page protected early may cost the guest another fault.
pub(super) const MIN_PASS_PAGES: u64 = 256;

/// Gaps between captures remembered for the estimate of the epoch.
const GAPS: usize = 4;

/// Offsets after a capture at which early passes run, for an epoch of `interval`.
pub(super) fn pass_offsets(interval: Duration) -> Vec<Duration> {
    let mut out = Vec::new();
    let mut left = interval;
    while out.len() < MAX_PASSES {
        left /= 2;
        if left < MIN_LEAD {
            break;
        }
        out.push(interval - left);
    }
    out
}

/// What the pass thread knows about the captures.
#[derive(Debug, Default)]
pub(super) struct Schedule {
    /// Captures so far (a pass plan belongs to one of them).
    pub(super) captures: u64,
    /// When the last capture ran.
    pub(super) last: Option<Instant>,
    /// The last gaps between captures, newest last.
    gaps: Vec<Duration>,
    /// The engine stops: the pass thread exits.
    pub(super) stopping: bool,
}

impl Schedule {
    /// A capture ran at `now`.
    pub(super) fn captured(&mut self, now: Instant) {
        if let Some(l) = self.last {
            if self.gaps.len() == GAPS {
                self.gaps.remove(0);
            }
            self.gaps.push(now.saturating_duration_since(l));
        }
        self.last = Some(now);
        self.captures += 1;
    }

    /// The expected epoch length: the shortest recent gap between captures.
    pub(super) fn interval(&self) -> Option<Duration> {
        self.gaps.iter().min().copied()
    }

    /// The instants of the passes planned after the last capture.
    pub(super) fn plan(&self) -> Vec<Instant> {
        match (self.last, self.interval()) {
            (Some(last), Some(interval)) => pass_offsets(interval)
                .into_iter()
                .map(|o| last + o)
                .collect(),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: f64) -> Duration {
        Duration::from_secs_f64(v / 1000.0)
    }

    #[test]
    fn passes_halve_the_time_left_until_a_millisecond_is_left() {
        assert_eq!(
            pass_offsets(ms(25.0)),
            vec![ms(12.5), ms(18.75), ms(21.875), ms(23.4375)]
        );
        assert_eq!(pass_offsets(ms(10.0)), vec![ms(5.0), ms(7.5), ms(8.75)]);
        assert_eq!(pass_offsets(ms(1.5)), Vec::<Duration>::new());
        assert_eq!(pass_offsets(ms(1000.0)).len(), MAX_PASSES);
        assert!(pass_offsets(ms(1000.0)).windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn the_plan_follows_the_last_gap_between_captures() {
        let t0 = Instant::now();
        let mut s = Schedule::default();
        s.captured(t0);
        assert!(s.plan().is_empty(), "one capture tells no epoch length");
        s.captured(t0 + ms(10.0));
        assert_eq!(s.captures, 2);
        assert_eq!(s.plan(), vec![t0 + ms(15.0), t0 + ms(17.5), t0 + ms(18.75)]);
        // A stretched epoch does not move the plan late; the shortest of the last 4 gaps rules.
        s.captured(t0 + ms(40.0));
        assert_eq!(s.interval(), Some(ms(10.0)));
        for k in 1..=3 {
            s.captured(t0 + ms(40.0 + 20.0 * f64::from(k)));
        }
        assert_eq!(s.interval(), Some(ms(20.0)));
    }
}
