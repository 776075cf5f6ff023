//! A snapshot of a node for metrics, traces and the simulator's invariant checkers.

use std::fmt;

use crate::action::Gate;
use crate::ids::{Epoch, Generation, NodeId};
use crate::witness_msg::Registration;

/// Which role a node currently holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum RoleKind {
    /// Runs the VM.
    Primary,
    /// Follows a primary (joining, syncing, protecting, or taking over from it).
    Backup,
    /// Has no replica and asks the witness whom to join.
    Joiner,
    /// Stopped for good (deposed primary or misconfigured joiner), maybe waiting to rejoin.
    Fenced,
}

/// Fine-grained state. Primary phases: `Waiting`, `Syncing`, `Registering`, `Protected`,
/// `Dropping`, `Degraded`. Backup phases: `Joining`, `Syncing`, `Protecting`, `TakingOver`,
/// `Restoring`. Joiner: `Locating`. Fenced: `Fenced`. `Syncing` is shared by both sides of a
/// sync; [`Status::role`] tells them apart. A backup that failed over is a primary with
/// [`Status::failed_over`] set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Phase {
    /// Primary without any backup yet, output held (fresh start, generation 1).
    Waiting,
    /// Primary: full checkpoint to a joiner under way, output held.
    /// Backup: receiving/committing that full checkpoint.
    Syncing,
    /// Primary: the joiner acked the sync; `RegisterBackup` is with the witness. Output held.
    Registering,
    /// Primary with a registered backup: output released on acks.
    Protected,
    /// Primary lost its backup; `DropBackup` is with the witness. Output held.
    Dropping,
    /// Primary whose backup broke its stream and said it comes back: its registration stands,
    /// output held, until it rejoins (a catch-up) or the rejoin grace runs out (then dropping).
    Rejoining,
    /// Primary, witness knows there is no backup: gate open, accepts joiners.
    Degraded,
    /// Stopped for good.
    Fenced,
    /// Joiner asking the witness who the primary is.
    Locating,
    /// Backup connecting to its primary / waiting for `SyncStart`.
    Joining,
    /// Backup committing incremental checkpoints and acking them.
    Protecting,
    /// Backup asked the witness for a takeover and waits for the answer.
    TakingOver,
    /// Takeover granted; the VM is being restored from the replica.
    Restoring,
}

impl Phase {
    /// Lower-case name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Waiting => "waiting",
            Phase::Syncing => "syncing",
            Phase::Registering => "registering",
            Phase::Protected => "protected",
            Phase::Dropping => "dropping",
            Phase::Rejoining => "rejoining",
            Phase::Degraded => "degraded",
            Phase::Fenced => "fenced",
            Phase::Locating => "locating",
            Phase::Joining => "joining",
            Phase::Protecting => "protecting",
            Phase::TakingOver => "taking-over",
            Phase::Restoring => "restoring",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What [`crate::Node::status`] reports. Fields that do not apply to the role are `None`/zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Status {
    /// This node.
    pub node: NodeId,
    /// Current role.
    pub role: RoleKind,
    /// Current phase.
    pub phase: Phase,
    /// Generation the node acts in (primary) or follows (backup); `UNKNOWN` if none yet.
    pub generation: Generation,
    /// Primary that got its role through a takeover.
    pub failed_over: bool,
    /// Primary: the other side (backup or joiner). Backup: its primary.
    pub peer: Option<NodeId>,
    /// Primary: output gate state.
    pub gate: Option<Gate>,
    /// Primary: tag of the frames the VM emits now.
    pub running_epoch: Epoch,
    /// Primary: last epoch captured.
    pub captured: Epoch,
    /// Primary: highest epoch acked by the current backup.
    pub acked: Epoch,
    /// Primary: highest `ReleaseOutput` tag issued (an open gate releases everything anyway).
    pub released: Epoch,
    /// Backup: last epoch durably committed in the replica.
    pub committed: Option<Epoch>,
    /// Backup: token of its replica (what it would present to take over).
    /// Primary: the registration it holds (or is settling) with the witness.
    pub registration: Option<Registration>,
}

impl Status {
    /// A node with neither VM nor replica nor peer (a joiner or a fenced node).
    pub(crate) fn without_vm(
        node: NodeId,
        role: RoleKind,
        phase: Phase,
        generation: Generation,
    ) -> Status {
        Status {
            node,
            role,
            phase,
            generation,
            failed_over: false,
            peer: None,
            gate: None,
            running_epoch: Epoch::default(),
            captured: Epoch::default(),
            acked: Epoch::default(),
            released: Epoch::default(),
            committed: None,
            registration: None,
        }
    }
}
