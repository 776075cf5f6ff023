//! What the agent's helper threads and tasks report to its event loop.

use ftvm_model::{Epoch, PeerMsg, WitnessReply};

use super::cow::CowStats;
use crate::replica::StagedCheckpoint;
use crate::transport::TransportStats;

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
        /// Why.
        why: String,
    },
    /// Bytes arrived.
    Heard {
        /// On which connection.
        conn: ConnId,
    },
    /// A control message arrived.
    Message {
        /// On which connection.
        conn: ConnId,
        /// The message.
        msg: PeerMsg,
    },
    /// A checkpoint began to arrive.
    CheckpointStarted {
        /// On which connection.
        conn: ConnId,
        /// Its epoch.
        epoch: Epoch,
    },
    /// A checkpoint arrived whole and its checksum matched.
    CheckpointReceived {
        /// On which connection.
        conn: ConnId,
        /// Its epoch.
        epoch: Epoch,
        /// Its contents.
        staged: StagedCheckpoint,
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
        /// Error text if it failed.
        error: Option<String>,
    },
    /// A frame from the VM (to the gate).
    VmFrame(Vec<u8>),
    /// A frame from the wire (to the VM).
    WireFrame(Vec<u8>),
}
