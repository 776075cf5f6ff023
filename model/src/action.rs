//! What a [`crate::Node`] asks its driver to do.

use crate::ids::{Epoch, Generation, NodeId};
use crate::msg::{PeerMsg, RejectReason};
use crate::status::Phase;
use crate::witness_msg::WitnessRequest;

/// State of the host's network output gate for the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Gate {
    /// Frames wait until a `ReleaseOutput` covers their epoch tag.
    Held,
    /// Release everything held now, then pass new frames straight through (allowed only while
    /// the witness records no backup for our generation and we know it).
    Open,
}

/// What a captured checkpoint holds besides the device state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Scope {
    /// The pages and disk blocks written since the previous capture (an ordinary epoch).
    Epoch,
    /// All of RAM and the whole disk (a full sync).
    Full,
    /// Every page and disk block written after epoch `base` was captured, up to this capture
    /// (a catch-up sync on top of a replica of `base`). The driver keeps, for each page and
    /// block, the last epoch that wrote it, so any `base` this VM's run has captured works.
    Since(Epoch),
}

/// Why a primary answers a join with a full sync rather than a catch-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum FullSyncReason {
    /// The joiner offered no replica.
    NoReplica,
    /// Its replica followed another generation (another primary's history).
    OtherGeneration,
    /// Its replica came from another run of a primary (another lineage).
    OtherLineage,
    /// It offered an epoch this primary never captured, or one before its history begins.
    OutsideHistory,
}

/// An effect the driver must carry out, in the order given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Action {
    /// Before a full capture (a full sync): copy all of guest RAM aside while the VM keeps
    /// running, tracking what it writes from here on; answer with `Input::PreCopied`. The
    /// `PauseVm` and `Capture { scope: Full }` that follow then need to take only the pages
    /// written since, so no pause copies all of RAM. A driver with nothing to prepare (its
    /// full captures copy nothing in the pause) answers at once.
    PreCopy {
        /// The epoch the full capture will close.
        epoch: Epoch,
    },
    /// Pause the VM (a `Capture` follows).
    PauseVm,
    /// While paused: capture the pages and disk blocks `scope` names plus device state as
    /// checkpoint `epoch`; answer with `Input::CaptureDone`.
    Capture {
        /// Epoch being closed.
        epoch: Epoch,
        /// What the checkpoint holds.
        scope: Scope,
    },
    /// Run the VM; the frames it emits from now on are tagged `epoch`. A driver in
    /// `paused-send` mode may delay the resume until the checkpoint is sent.
    ResumeVm {
        /// Tag of the frames emitted from now on.
        epoch: Epoch,
    },
    /// Transmit the captured checkpoint `epoch` (wire header carries `generation`); answer
    /// with `Input::CheckpointSent`.
    SendCheckpoint {
        /// Receiver.
        to: NodeId,
        /// Checkpoint epoch.
        epoch: Epoch,
        /// Full checkpoint (a full sync) or one that applies on top of the replica (an
        /// ordinary epoch or a catch-up sync).
        full: bool,
        /// Generation for the frame header.
        generation: Generation,
    },
    /// Send a control message on the checkpoint link to `to`.
    Send {
        /// Receiver.
        to: NodeId,
        /// Message.
        msg: PeerMsg,
    },
    /// Open the checkpoint link to `to`; answer `Connected` or `Disconnected`.
    Connect {
        /// Peer.
        to: NodeId,
    },
    /// Close the checkpoint link to `peer` (no `Disconnected` needs to follow).
    Disconnect {
        /// Peer.
        peer: NodeId,
    },
    /// Send a request to the witness (`Config::witness`); feed the answer back as
    /// `Input::WitnessReply`. The node resends on its own until answered.
    ToWitness(WitnessRequest),
    /// Frames tagged `<= through` may leave the host.
    ReleaseOutput {
        /// Highest releasable tag.
        through: Epoch,
    },
    /// Switch the output gate.
    SetOutputGate(Gate),
    /// Backup: atomically apply staged checkpoint `epoch` to the replica; answer `Committed`.
    Commit {
        /// Epoch to apply.
        epoch: Epoch,
        /// What the replica is once this commit lands. A driver that keeps the replica across
        /// a restart stores it with the commit (atomically) and starts with
        /// [`crate::Start::Resume`] from it.
        replica: crate::msg::ReplicaAt,
    },
    /// Backup: throw away every staged, uncommitted checkpoint (a commit already under way
    /// completes and is answered).
    DiscardStaged,
    /// Backup, failover: restore replica + device state of `from` and run the VM as primary of
    /// `generation`; frames it emits are tagged `from + 1`. Answer `Input::VmStarted`.
    StartVm {
        /// Committed epoch to resume from.
        from: Epoch,
        /// Generation the VM now runs in.
        generation: Generation,
    },
    /// Stop the VM for good and drop held output; never release again. The model closes its
    /// tracked peer link first (`Disconnect`); a driver should also close every other
    /// checkpoint link it has, so no peer takes leftover bytes for a sign of life.
    Fence,
    /// Structured trace event; drivers may ignore it.
    Log(Event),
}

/// Events worth a trace line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Event {
    /// The node's phase changed.
    Phase {
        /// Old phase.
        from: Phase,
        /// New phase.
        to: Phase,
    },
    /// A join was refused (`peer` is the other side).
    Rejected {
        /// Other side.
        peer: NodeId,
        /// Why.
        reason: RejectReason,
    },
    /// The peer fell silent or its link dropped.
    PeerLost {
        /// The peer.
        peer: NodeId,
    },
    /// A checkpoint arrived bad or out of order; the stream restarts with a full sync.
    BadCheckpoint {
        /// Its epoch.
        epoch: Epoch,
    },
    /// A primary accepted a join: the stream starts with checkpoint `epoch`, a catch-up from
    /// `base` or, with `base: None`, a full sync for the reason given.
    SyncChosen {
        /// The joiner.
        peer: NodeId,
        /// Epoch of the sync checkpoint.
        epoch: Epoch,
        /// The joiner's committed epoch the catch-up applies on.
        base: Option<Epoch>,
        /// Why the sync is full (`None` for a catch-up).
        full_because: Option<FullSyncReason>,
    },
    /// Pre-copy done: the joiner committed the sync and every epoch after it, so the primary
    /// holds output from `epoch` on and registers the joiner once it acks `epoch`.
    GateClosing {
        /// The joiner.
        peer: NodeId,
        /// The first epoch whose frames are held again.
        epoch: Epoch,
    },
    /// A backup refused a `SyncStart` whose catch-up base is not what its `Join` offered.
    SyncRefused {
        /// Epoch of the announced sync.
        epoch: Epoch,
        /// Its base.
        base: Option<Epoch>,
    },
    /// A message from an older generation was ignored.
    StaleMessage {
        /// Sender.
        from: NodeId,
        /// Its generation.
        generation: Generation,
    },
    /// The witness refused a request.
    WitnessDenied(WitnessRequest),
    /// A peer's frame claimed a newer generation than this primary's; the primary closed that
    /// link and asks the witness (it fences only if the witness confirms).
    GenerationClaimed {
        /// The sender.
        from: NodeId,
        /// The generation it claimed.
        generation: Generation,
    },
    /// The witness showed that this node was deposed (a newer generation exists, or another
    /// primary holds ours).
    Deposed {
        /// The newer generation.
        by: Generation,
    },
}
