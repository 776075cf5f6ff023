//! Listening tasks of a node host: the checkpoint port (peers identify by address) and the
//! VM's service port, plus the reader of one client connection.

use std::net::{IpAddr, Ipv4Addr};

use ftvm_model::NodeId;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc::UnboundedSender;
use turmoil::net::tcp::OwnedReadHalf;
use turmoil::net::TcpListener;

use super::event::{ConnId, HostEvent};
use crate::vm::service::{Request, REQUEST_LEN};

/// The node id of a host address (`n3` → 3), if it is a node.
pub(crate) fn node_of(addr: IpAddr) -> Option<NodeId> {
    let name = turmoil::reverse_lookup(addr)?;
    let k: u32 = name.strip_prefix('n')?.parse().ok()?;
    Some(NodeId(k))
}

pub(crate) async fn bind(port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)).await
}

pub(crate) async fn accept_peers(listener: TcpListener, tx: UnboundedSender<HostEvent>) {
    while let Ok((stream, addr)) = listener.accept().await {
        if let Some(peer) = node_of(addr.ip()) {
            let _ = tx.send(HostEvent::PeerAccepted { peer, stream });
        }
    }
}

pub(crate) async fn accept_clients(listener: TcpListener, tx: UnboundedSender<HostEvent>) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = tx.send(HostEvent::ClientAccepted { stream });
    }
}

pub(crate) async fn read_client(
    mut rd: OwnedReadHalf,
    client_conn: ConnId,
    tx: UnboundedSender<HostEvent>,
) {
    let mut buf = [0u8; REQUEST_LEN];
    while rd.read_exact(&mut buf).await.is_ok() {
        let Some(req) = Request::decode(&buf) else {
            break;
        };
        let _ = tx.send(HostEvent::Request { client_conn, req });
    }
    let _ = tx.send(HostEvent::ClientClosed { client_conn });
}
