//! What a driver tells a [`crate::Node`].

use crate::ids::{Epoch, NodeId};
use crate::msg::PeerMsg;
use crate::witness_msg::WitnessReply;

/// An event the driver feeds to [`crate::Node::handle`].
///
/// Ordering the driver must keep: every message, checkpoint input and `Heard` of one connection
/// arrives after that connection's `Connected` (on the connecting side) and before its
/// `Disconnected`; nothing of an old connection arrives after the `Disconnected`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Input {
    /// The time returned by [`crate::Node::poll_timeout`] has come.
    Timeout,
    /// The checkpoint link to `peer` is up (answer to `Action::Connect`).
    Connected {
        /// The peer.
        peer: NodeId,
    },
    /// The checkpoint link to `peer` is down, or a `Connect` to it failed.
    Disconnected {
        /// The peer.
        peer: NodeId,
    },
    /// Bytes arrived from `from` (e.g. the middle of a large checkpoint). Counts as a sign of life
    /// only, and for a backup only while a stream is under way: a slow multi-second full sync
    /// must not look like a dead primary while the heartbeats queue up behind it, but a node
    /// that merely refuses or closes connections is not alive. Optional for drivers whose
    /// messages are never delayed.
    Heard {
        /// The sender.
        from: NodeId,
    },
    /// A control message from a peer node.
    Message {
        /// The sender.
        from: NodeId,
        /// The message.
        msg: PeerMsg,
    },
    /// The witness answered.
    WitnessReply(WitnessReply),
    /// Primary: the VM is paused and `epoch`'s dirty pages + device state are captured.
    CaptureDone {
        /// Captured epoch.
        epoch: Epoch,
        /// Pages captured (metrics only).
        pages: u64,
        /// Bytes captured (metrics only).
        bytes: u64,
    },
    /// Primary: the copy asked by `Action::PreCopy` is done (or there was nothing to copy); the
    /// full capture of `epoch` may pause the VM now.
    PreCopied {
        /// The epoch of the `PreCopy`.
        epoch: Epoch,
    },
    /// Primary: the VM runs again after a capture, with frames tagged `epoch` (the answer to
    /// `ResumeVm`, once the VM really runs: with some capture modes that is long after
    /// `CaptureDone`). Optional: the output epoch policy measures the pause up to it, and up to
    /// `CaptureDone` from a driver that does not send it.
    Resumed {
        /// The epoch the VM now runs.
        epoch: Epoch,
        /// How long the VM was stopped, as the driver measured it (stop → cont), in µs;
        /// 0: not measured (the model then counts from its `Capture` to this input).
        paused_us: u64,
    },
    /// Primary: the gate holds a frame of the running epoch `epoch` (the driver says so once per
    /// epoch, at its first held frame). Under [`crate::EpochPolicy::Output`] it may end the epoch
    /// early; otherwise it changes nothing.
    OutputHeld {
        /// Tag of the held frame.
        epoch: Epoch,
    },
    /// Primary: checkpoint `epoch` is fully handed to the socket and its buffers are reusable.
    CheckpointSent {
        /// Sent epoch.
        epoch: Epoch,
    },
    /// Backup: the first bytes of checkpoint `epoch` arrived (sign of life; used by the
    /// `AckBeforeCommit` mutant).
    CheckpointStarted {
        /// Arriving epoch.
        epoch: Epoch,
    },
    /// Backup: checkpoint `epoch` is fully received and staged; `ok` = checksum verified.
    /// A truncated or corrupt checkpoint arrives as `ok: false` (or as a `Disconnected`).
    CheckpointReceived {
        /// Received epoch.
        epoch: Epoch,
        /// Complete and verified.
        ok: bool,
    },
    /// Backup: the staged checkpoint `epoch` is durably and atomically applied to the replica.
    Committed {
        /// Committed epoch.
        epoch: Epoch,
    },
    /// Backup after a granted takeover: the VM runs from the replica.
    VmStarted,
}
