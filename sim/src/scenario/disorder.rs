//! What the network may do to witness exchanges beyond latency and segment loss: deliver a
//! message again later, deliver it only late (behind messages sent after it), or lose a reply
//! after the witness acted on its request. The safety argument in `ftvm_model::witness` allows
//! all of it; a peer link is one TCP stream whose order TCP guarantees, but every witness
//! exchange takes its own connection, so nothing orders them against each other.

use std::fmt;
use std::time::Duration;

/// Disorder of witness requests and replies (all zero: none).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WitnessDisorder {
    /// Probability that a request or a reply is delivered as usual *and* once more later (a
    /// stale duplicate; a request's copy travels over a connection of its own).
    pub duplicate: f64,
    /// Probability that a request or a reply is delivered only late, after messages sent
    /// after it (the first connection stalls while the sender's resend overtakes it).
    pub reorder: f64,
    /// Probability that the witness's reply is lost after the witness applied the request.
    pub reply_loss: f64,
    /// A late delivery comes `1..=max_delay` after the original (uniformly).
    pub max_delay: Duration,
}

impl WitnessDisorder {
    /// Whether any disorder is switched on.
    pub fn active(&self) -> bool {
        self.duplicate > 0.0 || self.reorder > 0.0 || self.reply_loss > 0.0
    }

    /// Whether exchanges may take longer than a round trip (reordered or lost replies).
    pub fn slows(&self) -> bool {
        self.reorder > 0.0 || self.reply_loss > 0.0
    }

    /// Checks the ranges; `what` names the setting in errors.
    pub(crate) fn check(&self, what: &str) -> Result<(), String> {
        for (name, p) in [
            ("duplicate", self.duplicate),
            ("reorder", self.reorder),
            ("reply_loss", self.reply_loss),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{what}: {name} must be in 0..=1"));
            }
        }
        if self.duplicate + self.reorder > 1.0 {
            return Err(format!("{what}: duplicate + reorder must be at most 1"));
        }
        if (self.duplicate > 0.0 || self.reorder > 0.0) && self.max_delay.is_zero() {
            return Err(format!(
                "{what}: late deliveries need a delay bound of at least 1 ms"
            ));
        }
        if self.max_delay > Duration::from_secs(60) {
            return Err(format!("{what}: the delay bound must be at most 60000 ms"));
        }
        Ok(())
    }
}

impl fmt::Display for WitnessDisorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.active() {
            return f.write_str("witness traffic in order");
        }
        write!(
            f,
            "witness traffic: duplicate {}, reorder {}, reply loss {}, late by up to {} ms",
            self.duplicate,
            self.reorder,
            self.reply_loss,
            self.max_delay.as_millis()
        )
    }
}
