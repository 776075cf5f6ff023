//! Link faults for a local deployment of two (or three) agent hosts and a witness: a relay in
//! each agent host's namespace ([`relay`](super::relay)) carrying its links to the other node and to the
//! witness, and nftables loss rules ([`loss`](super::loss)) on every link, the clients' link to
//! the VM included.
//!
//! Node 1 lives on [`Host::Primary`], node 2 on [`Host::Backup`], node 3 on [`Host::Spare`]
//! (whatever their roles become).
//! Each agent dials the other node at [`FaultNet::peer_addr`] and the witness at
//! [`FaultNet::witness_addr`], on its own loopback; those addresses are the same in both
//! namespaces, so one command line fits either host.

use std::net::{Ipv4Addr, SocketAddr};

use super::loss::{LossError, LossRules};
use super::relay::{FaultLinks, LinkEnd, Relay, RelayError, Route, Shape};
use super::topology::{Host, Topology};

/// Port the agents listen on (the deployment's convention).
pub const AGENT_PORT: u16 = 7000;
/// Port the witness listens on.
pub const WITNESS_PORT: u16 = 7100;
/// Loopback port of the relay to node `k` is this plus `k`.
const PEER_RELAY_BASE: u16 = 7200;
/// Loopback port of the relay to the witness.
const WITNESS_RELAY_PORT: u16 = 7300;

/// Errors of the fault network.
#[derive(Debug, thiserror::Error)]
pub enum FaultNetError {
    /// A relay did not start.
    #[error(transparent)]
    Relay(#[from] RelayError),
    /// A loss rule was refused.
    #[error(transparent)]
    Loss(#[from] LossError),
    /// Only nodes 1, 2 (and 3 with a spare host) have hosts here.
    #[error("node n{0} has no host in this deployment")]
    NoSuchNode(u32),
}

/// One end of a link, as the faults name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// A node (its agent and VM).
    Node(u32),
    /// The witness.
    Witness,
    /// The clients (they reach only the VM's service, wherever it runs).
    Clients,
}

impl Side {
    /// The relayed link end, if the side's links are relayed (the clients' are not: they
    /// carry the VM's bridged traffic).
    pub fn link_end(self) -> Option<LinkEnd> {
        match self {
            Side::Node(k) => Some(LinkEnd::Node(k)),
            Side::Witness => Some(LinkEnd::Witness),
            Side::Clients => None,
        }
    }
}

/// The relays and loss rules of one deployment.
pub struct FaultNet {
    links: FaultLinks,
    loss: LossRules,
    namespaces: Vec<(Host, String)>,
    addrs: Vec<(Host, Ipv4Addr)>,
    nodes: u32,
    vm: Ipv4Addr,
    _relays: Vec<Relay>,
}

/// The host node `k` runs on.
pub fn host_of(node: u32) -> Result<Host, FaultNetError> {
    match node {
        1 => Ok(Host::Primary),
        2 => Ok(Host::Backup),
        3 => Ok(Host::Spare),
        k => Err(FaultNetError::NoSuchNode(k)),
    }
}

impl FaultNet {
    /// Starts the relays of both agent hosts; every relayed link starts as `defaults`.
    pub fn start(topo: &Topology, defaults: Shape) -> Result<FaultNet, FaultNetError> {
        let links = FaultLinks::new(defaults);
        let nodes = topo.agent_hosts().len() as u32;
        let mut relays = Vec::new();
        for me in 1..=nodes {
            let mut routes: Vec<Route> = (1..=nodes)
                .filter(|&other| other != me)
                .map(|other| {
                    Ok(Route {
                        listen: FaultNet::peer_addr(other),
                        upstream: SocketAddr::from((topo.addr(host_of(other)?), AGENT_PORT)),
                        local: LinkEnd::Node(me),
                        remote: LinkEnd::Node(other),
                        checkpoint_link: true,
                    })
                })
                .collect::<Result<_, FaultNetError>>()?;
            routes.push(Route {
                listen: FaultNet::witness_addr(),
                upstream: SocketAddr::from((topo.addr(Host::Switch), WITNESS_PORT)),
                local: LinkEnd::Node(me),
                remote: LinkEnd::Witness,
                checkpoint_link: false,
            });
            relays.push(Relay::start(
                Some(&topo.ns(host_of(me)?)),
                routes,
                links.clone(),
            )?);
        }
        let mut hosts = topo.agent_hosts();
        hosts.extend([Host::Switch, Host::Client]);
        Ok(FaultNet {
            links,
            loss: LossRules::new(),
            namespaces: hosts.iter().map(|&h| (h, topo.ns(h))).collect(),
            addrs: hosts.iter().map(|&h| (h, topo.addr(h))).collect(),
            nodes,
            vm: topo.vm_addr(),
            _relays: relays,
        })
    }

    /// Where an agent dials node `k` (on its own host's loopback).
    pub fn peer_addr(k: u32) -> SocketAddr {
        let port = u16::try_from(k)
            .ok()
            .and_then(|k| PEER_RELAY_BASE.checked_add(k))
            .unwrap_or(PEER_RELAY_BASE);
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    /// Where an agent dials the witness (on its own host's loopback).
    pub fn witness_addr() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, WITNESS_RELAY_PORT))
    }

    /// The relayed links' faults (latency, bandwidth, holds, corruption).
    pub fn links(&self) -> &FaultLinks {
        &self.links
    }

    fn ns(&self, h: Host) -> &str {
        self.namespaces
            .iter()
            .find(|(x, _)| *x == h)
            .map_or("", |(_, n)| n.as_str())
    }

    fn addr(&self, h: Host) -> Ipv4Addr {
        self.addrs
            .iter()
            .find(|(x, _)| *x == h)
            .map_or(Ipv4Addr::UNSPECIFIED, |(_, a)| *a)
    }

    /// Segment loss on the link `a ↔ b`, both ways. Returns false when the link carries
    /// nothing here (the clients and the witness never talk).
    pub fn set_loss(&mut self, a: Side, b: Side, rate: f64) -> Result<bool, FaultNetError> {
        let (ns, peer) = match (a, b) {
            (Side::Node(x), Side::Node(y)) if x != y => {
                let (lo, hi) = (x.min(y), x.max(y));
                (self.ns(host_of(lo)?).to_string(), self.addr(host_of(hi)?))
            }
            (Side::Node(x), Side::Witness) | (Side::Witness, Side::Node(x)) => {
                (self.ns(host_of(x)?).to_string(), self.addr(Host::Switch))
            }
            // The clients talk to the VM, on whichever node it runs.
            (Side::Node(_), Side::Clients) | (Side::Clients, Side::Node(_)) => {
                (self.ns(Host::Client).to_string(), self.vm)
            }
            _ => return Ok(false),
        };
        self.loss.set(&ns, peer, rate)?;
        Ok(true)
    }

    /// Segment loss on every link.
    pub fn set_loss_everywhere(&mut self, rate: f64) -> Result<(), FaultNetError> {
        let mut links = vec![(Side::Node(1), Side::Clients)];
        for a in 1..=self.nodes {
            links.push((Side::Node(a), Side::Witness));
            for b in a + 1..=self.nodes {
                links.push((Side::Node(a), Side::Node(b)));
            }
        }
        for (a, b) in links {
            self.set_loss(a, b, rate)?;
        }
        Ok(())
    }
}
