//! What a node host's helper tasks (socket readers and writers, connects, witness calls)
//! tell its main loop. Connection-scoped events carry the connection id, so the loop can drop
//! the leftovers of a connection it has already replaced or closed.

use ftvm_driver::LinkEvent;
use ftvm_model::{Epoch, NodeId, WitnessReply};
use turmoil::net::TcpStream;

use crate::vm::service::Request;

pub(crate) type ConnId = u64;

pub(crate) enum HostEvent {
    /// A peer connected to our checkpoint port (`peer`: the node its address names).
    PeerAccepted { peer: NodeId, stream: TcpStream },
    /// Our `Connect` succeeded.
    Connected {
        conn: ConnId,
        peer: NodeId,
        stream: TcpStream,
    },
    /// Our `Connect` failed.
    ConnectFailed { conn: ConnId, peer: NodeId },
    /// What the link's reader (the driver's `LinkReader`) delivered.
    Link { conn: ConnId, event: LinkEvent },
    /// Bytes arrived (liveness only).
    Heard { conn: ConnId },
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
