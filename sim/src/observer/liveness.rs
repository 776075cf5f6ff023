//! Liveness: once the active primary is lost (dead, or cut off from its registered backup)
//! while that backup is up and can reach the witness, some VM must serve again within the
//! budget (failure timeout + restore + slack + witness round trip).
//!
//! "Serving" means an up primary whose VM runs and which either belongs to a newer generation
//! (a takeover), or became degraded after the loss (it dropped its backup and opened its
//! gate), or is still getting acks after the loss (the cut healed before anyone noticed).

use ftvm_model::{Generation, NodeId, Phase, RoleKind, Time};

use super::Observer;
use crate::invariant::Invariant;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Watch {
    since: Time,
    deadline: Time,
    primary: NodeId,
    generation: Generation,
    backup: NodeId,
}

impl Observer {
    /// Start watching: some VM must serve by `deadline`. Already watching this primary and
    /// generation, the watch keeps its start but its deadline moves to `deadline` if later: a
    /// second fault on the same primary (a crash just before it would have noticed a cut) can
    /// restart the recovery it must wait for, and the promise counts from the last fault.
    pub fn arm_liveness(
        &mut self,
        now: Time,
        primary: NodeId,
        generation: Generation,
        backup: NodeId,
        deadline: Time,
    ) {
        if let Some(w) = self
            .watch
            .as_mut()
            .filter(|w| w.primary == primary && w.generation == generation)
        {
            w.deadline = w.deadline.max(deadline);
            return;
        }
        self.watch = Some(Watch {
            since: now,
            deadline,
            primary,
            generation,
            backup,
        });
    }

    /// The lost primary and the backup being counted on, if a watch is armed.
    pub fn watched(&self) -> Option<(NodeId, NodeId)> {
        self.watch.map(|w| (w.primary, w.backup))
    }

    /// The promise no longer applies (the backup or its path to the witness failed).
    pub fn disarm_liveness(&mut self) {
        self.watch = None;
    }

    /// Call on every simulation step.
    pub fn check_liveness(&mut self, now: Time) {
        let Some(w) = self.watch else { return };
        let serving = self.nodes.values().any(|v| {
            let Some(s) = v.status else { return false };
            v.alive
                && v.vm_running
                && s.role == RoleKind::Primary
                && s.phase != Phase::Fenced
                && (s.generation > w.generation
                    || (s.phase == Phase::Degraded && v.phase_since > w.since)
                    || (s.phase == Phase::Protected && v.acked_at > w.since))
        });
        if serving {
            let ms = now.saturating_since(w.since).as_millis() as u64;
            self.stats.outages_ms.push(ms);
            self.watch = None;
        } else if now > w.deadline {
            let detail = format!(
                "primary {} of {} was lost at {} with {} registered and able to reach the \
                 witness, yet no VM serves {} ms later",
                w.primary,
                w.generation,
                w.since,
                w.backup,
                now.saturating_since(w.since).as_millis()
            );
            self.watch = None;
            self.fail(Invariant::Liveness, now, Some(w.backup), detail);
        }
    }
}
