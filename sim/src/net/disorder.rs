//! Draws of the witness-traffic disorder (see [`WitnessDisorder`]) from a random stream of its
//! own, so switching it on leaves every other random choice of a run where it was. Nothing is
//! drawn while it is off: runs without it replay exactly as before it existed.

use std::time::Duration;

use crate::rng::SimRng;
use crate::scenario::WitnessDisorder;

/// How one witness message travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// As usual.
    Now,
    /// As usual, and a stale copy arrives this much later.
    AlsoLater(Duration),
    /// Only this much later (it falls behind whatever is sent meanwhile).
    OnlyLater(Duration),
}

#[derive(Debug)]
pub(crate) struct Disorder {
    cfg: WitnessDisorder,
    rng: SimRng,
}

impl Disorder {
    pub fn new(cfg: WitnessDisorder, rng: SimRng) -> Disorder {
        Disorder { cfg, rng }
    }

    pub fn set(&mut self, cfg: WitnessDisorder) {
        self.cfg = cfg;
    }

    pub fn config(&self) -> WitnessDisorder {
        self.cfg
    }

    /// How the next request or reply travels.
    pub fn delivery(&mut self) -> Delivery {
        let c = self.cfg;
        if c.duplicate <= 0.0 && c.reorder <= 0.0 {
            return Delivery::Now;
        }
        let u = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        if u >= c.duplicate + c.reorder {
            return Delivery::Now;
        }
        let max = c.max_delay.as_millis().max(1) as u64;
        let late = Duration::from_millis(1 + self.rng.below(max));
        if u < c.duplicate {
            Delivery::AlsoLater(late)
        } else {
            Delivery::OnlyLater(late)
        }
    }

    /// Whether the reply the witness is about to send is lost.
    pub fn reply_lost(&mut self) -> bool {
        self.cfg.reply_loss > 0.0 && self.rng.chance(self.cfg.reply_loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(duplicate: f64, reorder: f64, reply_loss: f64) -> WitnessDisorder {
        WitnessDisorder {
            duplicate,
            reorder,
            reply_loss,
            max_delay: Duration::from_millis(300),
        }
    }

    #[test]
    fn off_draws_nothing_and_delivers_now() {
        let mut d = Disorder::new(WitnessDisorder::default(), SimRng::derive(1, 2));
        let before = d.rng.clone();
        for _ in 0..100 {
            assert_eq!(d.delivery(), Delivery::Now);
            assert!(!d.reply_lost());
        }
        assert_eq!(d.rng, before, "no draw while switched off");
    }

    #[test]
    fn draws_follow_the_rates_and_the_bound() {
        let mut d = Disorder::new(cfg(0.3, 0.2, 0.1), SimRng::derive(7, 9));
        let (mut dup, mut late, mut lost) = (0, 0, 0);
        for _ in 0..10_000 {
            match d.delivery() {
                Delivery::Now => {}
                Delivery::AlsoLater(t) | Delivery::OnlyLater(t)
                    if t.is_zero() || t > Duration::from_millis(300) =>
                {
                    panic!("delay {t:?} out of bounds")
                }
                Delivery::AlsoLater(_) => dup += 1,
                Delivery::OnlyLater(_) => late += 1,
            }
            lost += usize::from(d.reply_lost());
        }
        assert!((2_700..3_300).contains(&dup), "{dup} duplicates");
        assert!((1_700..2_300).contains(&late), "{late} reordered");
        assert!((800..1_200).contains(&lost), "{lost} replies lost");
        d.set(cfg(1.0, 0.0, 0.0));
        assert!(matches!(d.delivery(), Delivery::AlsoLater(_)));
        d.set(cfg(0.0, 1.0, 0.0));
        assert!(matches!(d.delivery(), Delivery::OnlyLater(_)));
    }
}
