//! Which connection speaks for which node. A connection this node dialled speaks for the node
//! it dialled; an accepted one speaks for the node it proved to be (the real agent's
//! handshake; the simulator's host name) once that node sends its `Join`. Nothing a connection
//! says counts before it is bound, the live link of the node's peer is never displaced by a
//! newcomer, and leftovers of replaced or closed connections are ignored.
//!
//! The live link of any other node may be displaced by a newcomer that proved to be the same
//! node. Such a link carries nothing the node waits for (a joiner it refused, say), so nothing
//! on it shows when its far end is gone: if the close was lost (a partition, a crashed host),
//! refusing every newcomer in its name would shut that node out for good.

use std::collections::BTreeMap;

use ftvm_model::{NodeId, PeerMsg};

/// What a message on a connection counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaker {
    /// It comes from this node's live link.
    Peer(NodeId),
    /// The connection's `Join` bound it: from now on it is that node's live link.
    Joined(NodeId),
    /// A `Join` that names another node than the connection proved to be, or a node whose
    /// link is live: the connection must be closed.
    Refused {
        /// The node the connection proved to be.
        proven: Option<NodeId>,
        /// The node its `Join` named.
        claimed: NodeId,
    },
    /// Not (or no longer) a live link: ignored.
    Nobody,
}

/// What became of an accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission<C> {
    /// The node it proved to be is this node's peer and has a live link: close the newcomer.
    Refused,
    /// It may stay (and speaks once it joins); `displaced`: that node's previous live link,
    /// to close.
    Admitted {
        /// The previous live link of that node.
        displaced: Option<C>,
    },
}

/// What became of a dialled connection that connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialled<C> {
    /// It is now the peer's live link; the one it replaced (if any) must be closed.
    Live {
        /// The previous live link of that peer.
        replaced: Option<C>,
    },
    /// A later dial superseded it (or the dial was given up): close it.
    Stale,
}

/// The connection ↔ peer bookkeeping of one node.
#[derive(Debug, Clone)]
pub struct PeerTable<C> {
    /// Each peer's live link.
    live: BTreeMap<NodeId, C>,
    /// The reverse of `live`.
    speaks_for: BTreeMap<C, NodeId>,
    /// Accepted connections not yet joined, with the node each proved to be.
    proven: BTreeMap<C, NodeId>,
    /// Dials under way, one per peer (the latest).
    dialling: BTreeMap<NodeId, C>,
}

impl<C> Default for PeerTable<C> {
    fn default() -> Self {
        PeerTable {
            live: BTreeMap::new(),
            speaks_for: BTreeMap::new(),
            proven: BTreeMap::new(),
            dialling: BTreeMap::new(),
        }
    }
}

impl<C: Copy + Ord> PeerTable<C> {
    /// An empty table.
    pub fn new() -> PeerTable<C> {
        PeerTable::default()
    }

    /// An incoming connection proved to be `proven`; `peer`: the node this node treats as its
    /// peer (whose link it watches). A newcomer naming the peer while its link is live is
    /// refused (a genuine peer whose old link died dials again once this side has noticed);
    /// one naming any other node displaces that node's live link.
    pub fn accepted(&mut self, conn: C, proven: NodeId, peer: Option<NodeId>) -> Admission<C> {
        if self.live.contains_key(&proven) && peer == Some(proven) {
            return Admission::Refused;
        }
        let displaced = self.live.remove(&proven);
        if let Some(old) = displaced {
            self.speaks_for.remove(&old);
        }
        self.proven.insert(conn, proven);
        Admission::Admitted { displaced }
    }

    /// This node began dialling `peer` on `conn` (a later dial supersedes it).
    pub fn dialling(&mut self, peer: NodeId, conn: C) {
        self.dialling.insert(peer, conn);
    }

    /// The dial on `conn` connected.
    pub fn connected(&mut self, conn: C, peer: NodeId) -> Dialled<C> {
        if self.dialling.get(&peer) != Some(&conn) {
            return Dialled::Stale;
        }
        self.dialling.remove(&peer);
        let replaced = self.live.insert(peer, conn);
        if let Some(old) = replaced {
            self.speaks_for.remove(&old);
        }
        self.speaks_for.insert(conn, peer);
        Dialled::Live { replaced }
    }

    /// The dial on `conn` failed. True when it was the dial under way (the node hears of it).
    pub fn connect_failed(&mut self, conn: C, peer: NodeId) -> bool {
        if self.dialling.get(&peer) == Some(&conn) {
            self.dialling.remove(&peer);
            true
        } else {
            false
        }
    }

    /// Who `msg`, arriving on `conn`, comes from.
    pub fn speaker(&mut self, conn: C, msg: &PeerMsg) -> Speaker {
        if let Some(&peer) = self.speaks_for.get(&conn) {
            return Speaker::Peer(peer);
        }
        let PeerMsg::Join { node, .. } = *msg else {
            return Speaker::Nobody;
        };
        let Some(proven) = self.proven.get(&conn).copied() else {
            return Speaker::Nobody;
        };
        if proven != node || self.live.contains_key(&node) {
            self.proven.remove(&conn);
            return Speaker::Refused {
                proven: Some(proven),
                claimed: node,
            };
        }
        self.proven.remove(&conn);
        self.live.insert(node, conn);
        self.speaks_for.insert(conn, node);
        Speaker::Joined(node)
    }

    /// The live link's peer, if `conn` is one.
    pub fn peer_of(&self, conn: C) -> Option<NodeId> {
        self.speaks_for.get(&conn).copied()
    }

    /// `peer`'s live link.
    pub fn link_of(&self, peer: NodeId) -> Option<C> {
        self.live.get(&peer).copied()
    }

    /// `conn` is gone. Returns the peer whose live link it was (the node hears of the loss).
    pub fn closed(&mut self, conn: C) -> Option<NodeId> {
        self.proven.remove(&conn);
        self.dialling.retain(|_, c| *c != conn);
        let peer = self.speaks_for.remove(&conn)?;
        if self.live.get(&peer) == Some(&conn) {
            self.live.remove(&peer);
        }
        Some(peer)
    }

    /// The node drops `peer`: returns its live link, to close.
    pub fn disconnect(&mut self, peer: NodeId) -> Option<C> {
        let conn = self.live.remove(&peer)?;
        self.speaks_for.remove(&conn);
        Some(conn)
    }

    /// Forgets every connection (a fenced node closes them all); returns them.
    pub fn drain(&mut self) -> Vec<C> {
        let mut all: Vec<C> = self.speaks_for.keys().copied().collect();
        all.extend(self.proven.keys().copied());
        all.extend(self.dialling.values().copied());
        *self = PeerTable::default();
        all
    }
}

#[cfg(test)]
#[path = "peers_tests.rs"]
mod tests;
