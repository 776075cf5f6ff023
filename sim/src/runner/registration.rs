//! The witness must never name as backup a node that gave that replica up.
//!
//! A backup throws its replica away only when the witness denied its takeover, and a denial
//! voids the replica's token for good (`floor`), so no `RegisterBackup` for it, however late,
//! can apply afterwards (`ftvm_model::witness`, point 3). A register naming such a backup
//! would let nobody take over while the primary believes it is protected: the liveness promise
//! is broken the moment it happens, before any crash shows it. No single report shows it (the
//! register and the replica live on different hosts), so the runner notes after every step
//! which tokens each node's replica has carried, and the register is compared with them after
//! every step and every request the witness handles: a node that, in the same start of its
//! software, held the token the witness registers and no longer holds it, gave it up. (A
//! restart loses the replica without giving it up: the register may still name a crashed
//! backup until its primary drops it. A backup that made itself primary without the witness
//! is `single_active`'s business, not this check's.)

use std::collections::{BTreeMap, BTreeSet};

use ftvm_model::{Epoch, NodeId, RoleKind, Time};

use crate::invariant::Invariant;
use crate::world::World;

/// Node → (the start of its software, the tokens its replica carried in that start).
#[derive(Debug, Default)]
pub(crate) struct HeldTokens(BTreeMap<NodeId, (u32, BTreeSet<Epoch>)>);

impl HeldTokens {
    /// Record the token each node's replica carries now.
    pub fn note(world: &mut World) {
        for n in (1..=world.scenario.topology.nodes).map(NodeId) {
            let start = world.starts.get(&n).copied().unwrap_or(0);
            let token = world
                .obs
                .view(n)
                .and_then(|v| v.status)
                .and_then(|s| s.registration);
            let entry = world.held_tokens.0.entry(n).or_default();
            if entry.0 != start {
                *entry = (start, BTreeSet::new());
            }
            if let Some(r) = token {
                entry.1.insert(r.since);
            }
        }
    }

    /// Fail `liveness` if the witness registers a backup that gave that replica up.
    pub fn check(world: &mut World, now: Time) {
        let w = *world.obs.witness();
        let Some(r) = w.backup else { return };
        let Some(view) = world.obs.view(r.node) else {
            return;
        };
        let Some(status) = view
            .status
            .filter(|s| view.alive && s.role != RoleKind::Primary)
        else {
            return;
        };
        let start = world.starts.get(&r.node).copied().unwrap_or(0);
        let held = world
            .held_tokens
            .0
            .get(&r.node)
            .is_some_and(|(s, h)| *s == start && h.contains(&r.since));
        if held && status.registration != Some(r) {
            let detail = format!(
                "the witness registers {} (synced at {}) as the backup of {} in {}, but {} gave \
                 that replica up (it is {:?}, {}): nobody could take over",
                r.node, r.since, w.primary, w.generation, r.node, status.role, status.phase
            );
            world
                .obs
                .fail(Invariant::Liveness, now, Some(r.node), detail);
        }
    }
}
