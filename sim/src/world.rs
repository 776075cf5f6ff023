//! State shared by every simulated host and the runner: the scenario, the observer with its
//! checkers, the trace, the link shaper, and what survives a host crash (the witness's
//! persisted register, how often each node started).
//!
//! turmoil runs all hosts on one thread, so this is an `Rc<RefCell<_>>`. No borrow is ever
//! held across an `.await` or across a turmoil call that runs host code.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use ftvm_model::{Config, NodeId, Time, WitnessState};

use crate::net::shaper::Shaper;
use crate::observer::Observer;
use crate::scenario::Scenario;
use crate::trace::{HostId, Trace, TraceKind};

pub(crate) struct World {
    pub scenario: Scenario,
    /// Model configuration of every node (mutant included).
    pub config: Config,
    pub seed: u64,
    pub obs: Observer,
    pub trace: Trace,
    pub shaper: Shaper,
    /// The witness's "disk": written before every reply, read at every (re)start.
    pub witness_disk: WitnessState,
    /// How many times each node's software has started.
    pub starts: BTreeMap<NodeId, u32>,
    /// Nodes whose next start keeps their committed replica (`restart … keep_replica`).
    pub resume: std::collections::BTreeSet<NodeId>,
    /// Each node's replica as of its last commit, kept while the scenario restarts some node
    /// with its replica (the "disk" such a restart reads).
    pub kept: Option<BTreeMap<NodeId, crate::vm::replica::Replica>>,
    /// The checkpoint each node is writing right now: (bytes written, frame length). Fault
    /// triggers use it.
    pub sending: BTreeMap<NodeId, (u64, u64)>,
    /// The last catch-up sync each node captured as a primary (the `catching_up` trigger
    /// holds until its backup acks it).
    pub catching_up: BTreeMap<NodeId, ftvm_model::Epoch>,
    /// Bytes handed to the simulated network.
    pub bytes_sent: u64,
    /// Faults that never fired (set at the end of the run).
    pub unfired: Vec<String>,
    /// Simulated time the run covered (set at the end of the run).
    pub elapsed: std::time::Duration,
    /// The replica tokens each node has held (for the runner's registration check).
    pub held_tokens: crate::runner::HeldTokens,
    /// Every node's journal, when the run records them.
    pub journals: Option<BTreeMap<NodeId, crate::HostJournal>>,
    /// The witness's decisions, when the run records journals.
    pub witness_journal: Option<Vec<ftvm_driver::journal::WitnessEntry>>,
}

pub(crate) type Shared = Rc<RefCell<World>>;

impl World {
    pub fn note(&mut self, at: Time, host: HostId, what: TraceKind) {
        self.trace.push(at, host, what);
    }
}

/// Simulated time as seen from inside a host.
pub(crate) fn now() -> Time {
    Time::from_duration(turmoil::sim_elapsed().unwrap_or_default())
}
