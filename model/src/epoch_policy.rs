//! When a primary closes an epoch.
//!
//! A reply the VM produces in epoch `N` leaves only once the backup acked `N`, so a
//! request–reply client waits for the end of the epoch its reply fell into, then for the pause,
//! the send and the ack. With a fixed epoch it nearly always waits for a whole epoch: each new
//! request arrives just after a release, at the start of the next epoch.
//!
//! [`EpochPolicy::Output`] closes the epoch as soon as output waits at the gate instead, so the
//! wait shrinks to the pause, the send and the ack. Left alone, a steady stream of requests
//! would then keep the VM paused most of the time (every reply would trigger a capture right
//! after the previous one ended), so an early capture must also wait until the VM has run long
//! enough since the last pause:
//!
//! ```text
//! run ≥ max(min_gap, pause × (100 − max_idle_pct) / max_idle_pct)
//! ```
//!
//! which keeps `pause / (pause + run)`, the share of time the VM is paused, at or under
//! `max_idle_pct` percent for early captures whatever the request rate. The limits that hold
//! under every policy still apply: at most `max_unacked` checkpoints in flight, one capture and
//! one send at a time, and `epoch_interval` as the longest epoch (a VM that emits nothing is
//! still checkpointed every `epoch_interval`).

use std::time::Duration;

use crate::time::Time;

/// When a primary captures its next checkpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EpochPolicy {
    /// Every `epoch_interval` (the classic Remus loop).
    #[default]
    Fixed,
    /// As soon as output waits at the gate, within the bounds of [`OutputDriven`].
    Output(OutputDriven),
}

/// The bounds of output-driven epochs (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutputDriven {
    /// Least time the VM runs between the end of one pause and an early capture.
    pub min_gap: Duration,
    /// Largest share of time, in percent (1–100), early captures may keep the VM paused.
    pub max_idle_pct: u8,
}

impl Default for OutputDriven {
    /// 1 ms gap, 50 % idle at most: after a pause the VM runs at least as long as it was
    /// paused. That lets one client's request wait little more than the pause, the send and
    /// the ack (its request arrives about a send and an ack after the previous resume), while
    /// a flood of requests still leaves the guest half of the CPU. Lower it to trade response
    /// time for guest throughput (`ftvm bench e2e --policies output:25,output:50` shows both).
    fn default() -> OutputDriven {
        OutputDriven {
            min_gap: Duration::from_millis(1),
            max_idle_pct: 50,
        }
    }
}

impl OutputDriven {
    /// The least time the VM must run after a pause of `pause` before an early capture.
    pub fn gap_after(&self, pause: Duration) -> Duration {
        let pct = u128::from(self.max_idle_pct.clamp(1, 100));
        // Rounded up, so the bound holds to the nanosecond.
        let nanos = (pause.as_nanos() * (100 - pct)).div_ceil(pct);
        let stretched = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        self.min_gap.max(stretched)
    }

    /// The earliest time an early capture may start, the VM having resumed at `resumed` after
    /// a pause of `pause`.
    pub fn earliest(&self, resumed: Time, pause: Duration) -> Time {
        resumed + self.gap_after(pause)
    }
}

impl EpochPolicy {
    /// The policy named `name` (`fixed` or `output`, as the command line and scenario files
    /// spell it), `output` with `bounds`; `None` for an unknown name.
    pub fn named(name: &str, bounds: OutputDriven) -> Option<EpochPolicy> {
        match name {
            "fixed" => Some(EpochPolicy::Fixed),
            "output" => Some(EpochPolicy::Output(bounds)),
            _ => None,
        }
    }

    /// The policy's name as the command line and scenario files spell it.
    pub fn name(&self) -> &'static str {
        match self {
            EpochPolicy::Fixed => "fixed",
            EpochPolicy::Output(_) => "output",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_gap_is_the_minimum_until_the_pause_needs_more() {
        let p = OutputDriven {
            min_gap: ms(1),
            max_idle_pct: 25,
        };
        // 0.2 ms pause: 0.6 ms of running would do, the floor is 1 ms.
        assert_eq!(p.gap_after(Duration::from_micros(200)), ms(1));
        // 4 ms pause at 25 %: run 12 ms, so 4 / 16 = 25 %.
        assert_eq!(p.gap_after(ms(4)), ms(12));
        assert_eq!(
            p.earliest(Time::from_duration(ms(10)), ms(4)),
            Time::from_duration(ms(22))
        );
    }

    #[test]
    fn the_idle_share_never_exceeds_the_bound() {
        for pct in [1u8, 10, 25, 50, 99, 100] {
            let p = OutputDriven {
                min_gap: Duration::ZERO,
                max_idle_pct: pct,
            };
            for pause_us in [1u64, 7, 200, 3_400, 35_000] {
                let pause = Duration::from_micros(pause_us);
                let run = p.gap_after(pause);
                let share = pause.as_secs_f64() / (pause + run).as_secs_f64();
                assert!(
                    share <= f64::from(pct) / 100.0 + 1e-9,
                    "pct {pct}, pause {pause:?}: share {share}"
                );
            }
        }
    }

    #[test]
    fn out_of_range_percentages_are_clamped_not_a_panic() {
        let zero = OutputDriven {
            min_gap: Duration::ZERO,
            max_idle_pct: 0,
        };
        assert_eq!(zero.gap_after(ms(1)), ms(99));
        let over = OutputDriven {
            min_gap: Duration::ZERO,
            max_idle_pct: 200,
        };
        assert_eq!(over.gap_after(ms(1)), Duration::ZERO);
    }
}
