//! Swarm testing of timings, after TigerBeetle's VOPR: with `swarm = true` each seed runs the
//! scenario with its own protocol timers and link latencies, drawn around the file's values
//! within bounds the protocol must cope with, so the seeds of one file explore timing
//! relations (a failure timeout close to the witness round trip, epochs longer than the
//! heartbeat...) that a single hand-picked configuration never shows.
//!
//! Expectations derived from timings follow the timings actually used: a longer failure
//! timeout, epoch or witness retry lengthens the allowed outage and the liveness slack by as
//! much, and a longer epoch lowers the replies expected in proportion.

use std::time::Duration;

use ftvm_model::{EpochPolicy, OutputDriven};

use super::Scenario;
use crate::rng::SimRng;

/// Random stream of the swarm draws.
const SWARM_STREAM: u64 = 4_000;

/// `d` scaled by a factor drawn uniformly in `lo..=hi` per mille, in whole milliseconds.
fn scaled(rng: &mut SimRng, d: Duration, lo: u64, hi: u64) -> Duration {
    let permille = lo + rng.below(hi - lo + 1);
    Duration::from_millis((d.as_millis() as u64 * permille).div_ceil(1000))
}

impl Scenario {
    /// The scenario as run with `seed`: itself, or with `swarm` its timings drawn from the
    /// seed (epoch ×0.5–2, heartbeat ×0.5–2, failure timeout ×0.6–2 and at least three
    /// heartbeats, witness retry ×0.4–2.5, join retry ×0.5–2, latencies ×0.5–3), half the
    /// time under the other epoch policy (output bounds drawn too), captures pausing the VM
    /// up to 1 ms, half the time full syncs copying RAM aside for up to two epochs, and the
    /// expectations that depend on them adjusted. The result always passes
    /// [`Scenario::check`].
    pub fn swarmed(&self, seed: u64) -> Scenario {
        if !self.swarm {
            return self.clone();
        }
        let mut rng = SimRng::derive(seed, SWARM_STREAM);
        let mut s = self.clone();
        let t = &mut s.timing;
        let floor = self.network.step * 5;
        t.epoch = scaled(&mut rng, t.epoch, 500, 2000).max(floor);
        t.heartbeat = scaled(&mut rng, t.heartbeat, 500, 2000).max(Duration::from_millis(1));
        t.failure_timeout = scaled(&mut rng, t.failure_timeout, 600, 2000).max(t.heartbeat * 3);
        t.witness_retry = scaled(&mut rng, t.witness_retry, 400, 2500).max(self.network.step);
        t.join_retry = scaled(&mut rng, t.join_retry, 500, 2000).max(self.network.step);
        let n = &mut s.network;
        n.latency_max = scaled(&mut rng, n.latency_max, 500, 3000);
        n.latency_min = scaled(&mut rng, n.latency_min, 500, 1500).min(n.latency_max);
        // Drawn after the timings above, so adding these left the earlier draws unchanged.
        // Half the seeds end epochs on output (the other policy than the file's half the
        // time), with bounds of their own; captures pause the VM for up to a millisecond.
        if rng.below(2) == 1 {
            s.timing.epoch_policy = match self.timing.epoch_policy {
                EpochPolicy::Fixed => EpochPolicy::Output(OutputDriven {
                    min_gap: Duration::from_micros(rng.below(3000)),
                    max_idle_pct: 10 + u8::try_from(rng.below(91)).unwrap_or(90),
                }),
                EpochPolicy::Output(_) => EpochPolicy::Fixed,
            };
        }
        if s.vm.capture_pause.is_zero() {
            s.vm.capture_pause = Duration::from_micros(rng.below(1000));
        }
        // Half the seeds copy RAM aside for a full sync for up to two of their epochs.
        if s.vm.pre_copy.is_zero() && rng.below(2) == 1 {
            let most = u64::try_from(s.timing.epoch.as_micros() * 2).unwrap_or(u64::MAX);
            s.vm.pre_copy = Duration::from_micros(rng.below(most));
        }

        let grow = |new: Duration, old: Duration| new.saturating_sub(old);
        let (a, b) = (&s.timing, &self.timing);
        let waits = grow(a.heartbeat, b.heartbeat)
            + grow(a.epoch, b.epoch)
            + grow(a.witness_retry, b.witness_retry);
        s.expect.liveness_slack += waits;
        let round_trips = grow(s.network.latency_max, self.network.latency_max) * 4;
        if let Some(max) = s.expect.max_outage.as_mut() {
            *max += waits + grow(a.failure_timeout, b.failure_timeout) + round_trips;
        }
        // A response crosses the client link and waits for a checkpoint's round trip: longer
        // latencies lengthen it by as much. Under fixed epochs it waits for the epoch's end,
        // so a bound made for output-driven epochs no longer applies.
        if let Some(max) = s.expect.max_response_p50.as_mut() {
            *max += round_trips;
        }
        if let Some(max) = s.expect.max_response.as_mut() {
            *max += waits + round_trips;
        }
        if a.epoch_policy == EpochPolicy::Fixed {
            s.expect.max_response_p50 = None;
        }
        if a.epoch > b.epoch {
            let shrink = |n: u64| n * b.epoch.as_micros() as u64 / a.epoch.as_micros() as u64;
            s.expect.min_replies = s.expect.min_replies.map(shrink);
        }
        if s.check().is_err() {
            // Unreachable by construction (the bounds above keep every rule); never run an
            // invalid configuration.
            return self.clone();
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use crate::scenario::Scenario;

    fn base(swarm: bool) -> Scenario {
        let text = format!(
            "name = \"s\"\nduration_ms = 1000\nswarm = {swarm}\n[expect]\nmax_outage_ms = 400\n\
             min_replies = 100\n"
        );
        Scenario::from_toml(&text, "test").unwrap()
    }

    #[test]
    fn off_changes_nothing() {
        let s = base(false);
        assert_eq!(s.swarmed(3), s);
    }

    #[test]
    fn every_seed_gets_valid_timings_of_its_own_and_bounds_that_follow() {
        let s = base(true);
        let mut epochs = std::collections::BTreeSet::new();
        for seed in 0..500 {
            let w = s.swarmed(seed);
            assert_eq!(w.check(), Ok(()), "seed {seed}");
            assert_eq!(w, s.swarmed(seed), "seed {seed} replays");
            let (a, b) = (&w.timing, &s.timing);
            assert!(a.failure_timeout >= a.heartbeat * 3, "seed {seed}");
            assert!(a.epoch >= w.network.step * 5, "seed {seed}");
            assert!(
                w.network.latency_min <= w.network.latency_max,
                "seed {seed}"
            );
            let outage = w.expect.max_outage.unwrap();
            assert!(outage >= s.expect.max_outage.unwrap(), "seed {seed}");
            if a.failure_timeout > b.failure_timeout {
                assert!(
                    outage
                        >= s.expect.max_outage.unwrap() + (a.failure_timeout - b.failure_timeout),
                    "seed {seed}: the outage bound follows the failure timeout"
                );
            }
            if a.epoch > b.epoch {
                assert!(w.expect.min_replies.unwrap() < 100, "seed {seed}");
            }
            epochs.insert(a.epoch);
        }
        assert!(epochs.len() > 20, "{} distinct epochs", epochs.len());
    }
}
