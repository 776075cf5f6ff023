//! What a node host's helper tasks (socket readers and writers, connects, witness calls)
//! tell its main loop. Connection-scoped events carry the connection id, so the loop can drop
//! the leftovers of a connection it has already replaced or closed.

use ftvm_model::{Epoch, NodeId, PeerMsg, WitnessReply};
use turmoil::net::TcpStream;

use crate::vm::replica::Staged;
use crate::vm::service::Request;

pub(crate) type ConnId = u64;

pub(crate) enum HostEvent {
    /// A peer connected to our checkpoint port.
    PeerAccepted { peer: NodeId, stream: TcpStream },
    /// Our `Connect` succeeded.
    Connected {
        conn: ConnId,
        peer: NodeId,
        stream: TcpStream,
    },
    /// Our `Connect` failed.
    ConnectFailed { conn: ConnId, peer: NodeId },
    /// A control message arrived.
    Peer { conn: ConnId, msg: PeerMsg },
    /// Bytes arrived without completing a frame (liveness only).
    Heard { conn: ConnId },
    /// The first bytes of a checkpoint arrived.
    CheckpointStarted { conn: ConnId, epoch: Epoch },
    /// A checkpoint ended: verified (`complete`) or cut short / damaged.
    CheckpointDone { conn: ConnId, cp: Box<Staged> },
    /// Our writer handed the checkpoint's last byte to the socket.
    CheckpointSent { conn: ConnId, epoch: Epoch },
    /// The connection is gone (EOF, reset, bad frame or failed write).
    Closed { conn: ConnId },
    /// The witness answered.
    Witness(WitnessReply),
    /// A client connected to the service port.
    ClientAccepted { stream: TcpStream },
    /// A client request arrived.
    Request { client_conn: ConnId, req: Request },
    /// A client connection closed.
    ClientClosed { client_conn: ConnId },
}
