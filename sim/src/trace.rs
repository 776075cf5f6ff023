//! The event trace of a run: every model input and action, fault, witness decision and client
//! reply, stamped with simulated time. Same scenario + seed ⇒ the same trace, byte for byte.

use std::collections::VecDeque;
use std::fmt;

use ftvm_model::{Action, Epoch, Generation, Input, NodeId, Start, Time, WitnessReply};

use crate::vm::service::Reply;

/// Which simulated host an event happened on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HostId {
    /// The runner itself (faults, checker notes).
    Runner,
    /// The witness host.
    Witness,
    /// A protocol node.
    Node(NodeId),
    /// The client host.
    Clients,
}

impl HostId {
    /// The turmoil host name.
    pub fn name(self) -> String {
        match self {
            HostId::Runner => "sim".into(),
            HostId::Witness => "witness".into(),
            HostId::Node(n) => format!("n{}", n.0),
            HostId::Clients => "clients".into(),
        }
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// What happened.
#[derive(Clone, Debug)]
pub enum TraceKind {
    /// A node's software started.
    Start(Start),
    /// A fault fired.
    Fault(String),
    /// Input fed to the node's model.
    Input(Input),
    /// Action the node's model returned.
    Action(Action),
    /// The witness handled a request.
    Witness(WitnessReply),
    /// The VM captured an epoch; hash of its state.
    Captured {
        /// Epoch.
        epoch: Epoch,
        /// State hash.
        hash: u64,
    },
    /// The replica committed an epoch; hash of its state.
    Committed {
        /// Epoch.
        epoch: Epoch,
        /// State hash.
        hash: u64,
    },
    /// A reply frame left the host.
    Released {
        /// Reply.
        reply: Reply,
        /// Generation of the VM that produced it.
        generation: Generation,
        /// Epoch tag.
        tag: Epoch,
    },
    /// A client got a reply from a node.
    ClientReply {
        /// Reply.
        reply: Reply,
        /// Node it came from.
        from: NodeId,
    },
    /// A client attempt failed (refused, closed or timed out).
    ClientRetry {
        /// Client.
        client: u32,
        /// Request.
        req: u64,
        /// Node tried.
        node: NodeId,
        /// Why.
        why: &'static str,
    },
    /// Free-form note.
    Note(String),
}

impl fmt::Display for TraceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TraceKind::Start(s) => write!(f, "start {s:?}"),
            TraceKind::Fault(s) => write!(f, "FAULT {s}"),
            TraceKind::Input(i) => write!(f, "<- {i:?}"),
            TraceKind::Action(a) => write!(f, "-> {a:?}"),
            TraceKind::Witness(r) => write!(
                f,
                "witness {:?} granted={} now g{} primary n{} backup {:?}",
                r.request, r.granted, r.state.generation.0, r.state.primary.0, r.state.backup
            ),
            TraceKind::Captured { epoch, hash } => write!(f, "captured {epoch} state {hash:016x}"),
            TraceKind::Committed { epoch, hash } => {
                write!(f, "replica committed {epoch} state {hash:016x}")
            }
            TraceKind::Released {
                reply,
                generation,
                tag,
            } => write!(
                f,
                "released reply c{} r{} k{}={} ({generation} {tag})",
                reply.client, reply.req, reply.key, reply.value
            ),
            TraceKind::ClientReply { reply, from } => write!(
                f,
                "c{} got r{} k{}={} from {from}",
                reply.client, reply.req, reply.key, reply.value
            ),
            TraceKind::ClientRetry {
                client,
                req,
                node,
                why,
            } => write!(f, "c{client} r{req} to {node}: {why}"),
            TraceKind::Note(s) => f.write_str(s),
        }
    }
}

/// One trace line.
#[derive(Clone, Debug)]
pub struct TraceEvent {
    /// Simulated time.
    pub at: Time,
    /// Host.
    pub host: HostId,
    /// What happened.
    pub what: TraceKind,
}

impl fmt::Display for TraceEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>12} {:<8} {}",
            self.at.to_string(),
            self.host.name(),
            self.what
        )
    }
}

/// Where events go: everything, or only the last `TAIL` (enough context for a violation
/// without the cost of keeping a long run's history).
#[derive(Debug)]
pub(crate) struct Trace {
    full: bool,
    events: VecDeque<TraceEvent>,
}

pub(crate) const TAIL: usize = 300;

impl Trace {
    pub fn new(full: bool) -> Trace {
        Trace {
            full,
            events: VecDeque::new(),
        }
    }

    pub fn push(&mut self, at: Time, host: HostId, what: TraceKind) {
        if !self.full && self.events.len() >= TAIL {
            self.events.pop_front();
        }
        self.events.push_back(TraceEvent { at, host, what });
    }

    pub fn into_events(self) -> Vec<TraceEvent> {
        self.events.into()
    }
}
