//! The witness's register and the requests/replies that read and CAS it.
//! The rules themselves (and why they are safe) live in [`crate::witness`].

use serde::{Deserialize, Serialize};

use crate::ids::{Epoch, Generation, NodeId, VmId};

/// A backup registration: node plus *token*, the epoch of the full checkpoint its replica
/// was synced from. Epochs strictly increase within a generation, so the token names one sync
/// of one joiner uniquely and lets the witness tell a fresh request from a stale duplicate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Registration {
    /// The backup.
    pub node: NodeId,
    /// Epoch of the full sync the backup's replica descends from.
    pub since: Epoch,
}

/// The witness's register for one VM. Persist it before sending a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WitnessState {
    /// The VM this register belongs to.
    pub vm: VmId,
    /// Current generation.
    pub generation: Generation,
    /// The only node allowed to act as primary in `generation`.
    pub primary: NodeId,
    /// The only node allowed to take over from `primary`, if any.
    pub backup: Option<Registration>,
    /// Registrations of this generation with `since <= floor` are void (dropped, or given up by
    /// a denied takeover); a late duplicate of their `RegisterBackup` is refused.
    pub floor: Epoch,
    /// The registration whose takeover started `generation` (`None` in generation 1); lets a
    /// retried `Takeover` be answered "granted" again.
    pub promoted: Option<Registration>,
}

impl WitnessState {
    /// Initial state of a fresh VM: `{generation 1, primary, no backup}`.
    pub fn initial(vm: VmId, primary: NodeId) -> WitnessState {
        WitnessState {
            vm,
            generation: Generation::FIRST,
            primary,
            backup: None,
            floor: Epoch::NONE,
            promoted: None,
        }
    }
}

/// A request to the witness. Every request may be delivered late, twice, or never: nodes
/// resend until they see the reply to the request they are waiting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WitnessRequest {
    /// Read the register.
    Query,
    /// Primary: record `backup` as the one node allowed to take over.
    RegisterBackup {
        /// Primary's generation.
        generation: Generation,
        /// The requesting primary.
        primary: NodeId,
        /// The backup and its sync token.
        backup: Registration,
    },
    /// Primary: revoke the registration `backup` (and every older token of this generation).
    DropBackup {
        /// Primary's generation.
        generation: Generation,
        /// The requesting primary.
        primary: NodeId,
        /// The newest registration the primary ever asked for in this generation.
        backup: Registration,
    },
    /// Backup: make me primary of `generation + 1`.
    Takeover {
        /// Generation of the primary being replaced.
        generation: Generation,
        /// The requesting backup and the token of its replica.
        backup: Registration,
    },
}

impl WitnessRequest {
    /// The node this request says it comes from (`None` for `Query`, which anyone may send).
    pub fn sender(&self) -> Option<NodeId> {
        match *self {
            WitnessRequest::Query => None,
            WitnessRequest::RegisterBackup { primary, .. }
            | WitnessRequest::DropBackup { primary, .. } => Some(primary),
            WitnessRequest::Takeover { backup, .. } => Some(backup.node),
        }
    }
}

/// The witness's answer: the request it answers (so a node can ignore stale replies), whether it
/// was granted, and the register after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WitnessReply {
    /// The request this answers.
    pub request: WitnessRequest,
    /// Whether the request took (or had already taken) effect.
    pub granted: bool,
    /// The register after handling the request.
    pub state: WitnessState,
}
