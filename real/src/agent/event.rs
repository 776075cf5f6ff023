//! What the agent's helper threads and tasks report to its event loop.

use ftvm_model::{Epoch, WitnessReply};

use super::cow::CowStats;
use crate::replica::{ReplicaError, StagedCheckpoint};
use crate::transport::TransportStats;

/// Why a commit failed. Staging already refused every checkpoint that does not fit the
/// replica, so these are local failures (disk, a missing checkpoint), not a peer's doing.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The model asked to commit an epoch that was never staged.
    #[error("no staged checkpoint of that epoch")]
    NotStaged,
    /// The replica store failed.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// A thread panicked while holding the replica.
    #[error("replica lock poisoned")]
    LockPoisoned,
}

/// Identifies one checkpoint-link connection (a peer may reconnect: each gets a new id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// An event for the agent loop.
pub enum Event {
    /// An incoming connection was accepted and authenticated as `peer`.
    Accepted {
        /// Its id.
        conn: ConnId,
        /// The node it proved to be.
        peer: ftvm_model::NodeId,
        /// The link.
        link: super::link::Link,
    },
    /// Our `Connect` succeeded.
    Connected {
        /// The peer we dialled.
        peer: ftvm_model::NodeId,
        /// Its id.
        conn: ConnId,
        /// The link.
        link: super::link::Link,
    },
    /// Our `Connect` failed.
    ConnectFailed {
        /// The peer we dialled.
        peer: ftvm_model::NodeId,
        /// The dial's connection id.
        conn: ConnId,
        /// Why.
        why: String,
    },
    /// Bytes arrived.
    Heard {
        /// On which connection.
        conn: ConnId,
    },
    /// What the link's reader (the driver core's `LinkReader`) delivered: a message, or a
    /// checkpoint started, received whole, or cut short (the link closes right after, a
    /// `LinkClosed` follows).
    Link {
        /// On which connection.
        conn: ConnId,
        /// What.
        event: ftvm_driver::LinkEvent,
    },
    /// Our checkpoint went out; the staging buffer comes back for reuse.
    CheckpointSent {
        /// Its epoch.
        epoch: Epoch,
        /// Bytes on the wire.
        bytes: u64,
        /// Send-updated-states time.
        send_us: u64,
        /// Transport counters after the send.
        stats: TransportStats,
        /// What copy-on-write cost it (zero in other capture modes).
        cow: CowStats,
        /// The buffer.
        staged: StagedCheckpoint,
    },
    /// All of guest RAM is copied into `staged` for the full capture of `epoch`
    /// (`Action::PreCopy`), while the VM ran.
    PreCopied {
        /// The capture it is for.
        epoch: ftvm_model::Epoch,
        /// The buffer, `data` holding RAM in page order.
        staged: StagedCheckpoint,
        /// How long the copy took.
        took: std::time::Duration,
    },
    /// A checkpoint send failed (its link closes): the staging buffer comes back for reuse.
    BufferBack {
        /// The buffer.
        staged: StagedCheckpoint,
    },
    /// The connection is gone.
    LinkClosed {
        /// Which.
        conn: ConnId,
        /// Why.
        why: String,
    },
    /// The witness answered.
    Witness(WitnessReply),
    /// A commit finished (or failed).
    Committed {
        /// Epoch.
        epoch: Epoch,
        /// Why it failed, if it did.
        error: Option<CommitError>,
    },
    /// A frame from the VM (to the gate).
    VmFrame(Vec<u8>),
    /// A frame from the wire (to the VM).
    WireFrame(Vec<u8>),
}
