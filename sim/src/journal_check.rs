//! Real runs checked like simulated ones. Every real agent can write a journal (the driver
//! core's record of its model's inputs and actions, and of the frames that left its gate, with
//! a wall clock); merged in wall-clock order, the journals of all hosts drive the same
//! observer and invariant checkers a simulated run does, and each journal is replayed through a
//! fresh model to show the agent drove it deterministically.
//!
//! What a journal cannot show is checked less: there are no state hashes (prefix consistency
//! checks that captures increase and that every commit is of an epoch its primary captured, not
//! the replica's contents; the real suites compare RAM digests for that), no client replies (no
//! lost commitments is left to the clients' own checks) and no fault timeline (liveness is the
//! client's outage bound). Output commit and single active are checked in full.

use std::collections::{BTreeMap, BTreeSet};

use ftvm_driver::journal::{replay, Divergence, HostEntry, Record, WitnessEntry};
use ftvm_model::{Action, Config, Generation, Input, NodeId, PeerMsg, Start, Time, WitnessState};

use crate::invariant::{Invariant, Violation};
use crate::observer::{Instance, ObservedStats, Observer};
use crate::vm::replica::Origin;

/// One host's journal: the lines its agent wrote, in order.
#[derive(Clone, Debug)]
pub struct HostJournal {
    /// The node.
    pub node: NodeId,
    /// The model configuration its processes ran.
    pub config: Config,
    /// How its first process started (lines before a `Started` line belong to it).
    pub start: Start,
    /// Its lines.
    pub entries: Vec<HostEntry>,
}

/// What checking the journals found.
#[derive(Clone, Debug)]
pub struct JournalReport {
    /// The first broken invariant (times are from the earliest line of any journal).
    pub violation: Option<Violation>,
    /// Per node, the journal's inputs replayed, or where the replay diverged.
    pub replays: BTreeMap<NodeId, Result<usize, Divergence>>,
    /// What the observer counted.
    pub stats: ObservedStats,
}

impl JournalReport {
    /// No invariant broken and every journal replayed.
    pub fn passed(&self) -> bool {
        self.violation.is_none() && self.replays.values().all(Result::is_ok)
    }

    /// One line per finding, as `ftvm sim` prints its runs' (empty when passed).
    pub fn findings(&self) -> Vec<String> {
        let mut out: Vec<String> = self.violation.iter().map(|v| v.to_string()).collect();
        for (node, r) in &self.replays {
            if let Err(d) = r {
                out.push(format!("replay of {node}'s journal diverged: {d}"));
            }
        }
        out
    }
}

/// Where each node's VM and replica stand while the journals are walked.
#[derive(Default)]
struct NodeState {
    /// The VM running here, if any.
    instance: Option<Instance>,
    /// Its generation.
    generation: Generation,
    /// The primary whose stream this replica follows.
    stream: Option<NodeId>,
    /// What the commit under way makes the replica (from the model's `Commit`).
    committing: Option<ftvm_model::ReplicaAt>,
    /// Generation of the stream the replica's last commit came from (or of the replica a
    /// restarted backup kept).
    replica_generation: Option<Generation>,
    /// A fresh primary boots its VM at its first `ResumeVm`.
    fresh_primary: bool,
}

/// Checks the journals of one run: `initial` is the witness register the run started from,
/// `witness` the witness's decisions.
pub fn check_journals(
    initial: WitnessState,
    journals: &[HostJournal],
    witness: &[WitnessEntry],
    enabled: &BTreeSet<Invariant>,
) -> JournalReport {
    let replays = journals
        .iter()
        .map(|j| {
            let entries: Vec<_> = j.entries.iter().map(|e| e.entry).collect();
            (j.node, replay(j.config.clone(), j.node, j.start, &entries))
        })
        .collect();
    let mut obs = Observer::new(enabled.clone(), initial);
    let mut nodes: BTreeMap<NodeId, NodeState> = journals
        .iter()
        .map(|j| (j.node, NodeState::started(j.start)))
        .collect();
    // One order for all hosts: the wall clock, the witness's decision before anything a node
    // recorded at the same microsecond (no node hears of a decision before it is made), then
    // each journal's own order.
    let mut merged: Vec<(u64, Source)> = witness
        .iter()
        .enumerate()
        .map(|(i, w)| (w.wall_us, Source::Witness(i)))
        .chain(journals.iter().enumerate().flat_map(|(h, j)| {
            j.entries
                .iter()
                .enumerate()
                .map(move |(i, e)| (e.wall_us, Source::Node(h, i)))
        }))
        .collect();
    merged.sort_unstable();
    let t0 = merged.first().map_or(0, |m| m.0);
    for (wall, source) in merged {
        if obs.violation().is_some() {
            break;
        }
        let now = Time::from_micros(wall.saturating_sub(t0));
        match source {
            Source::Witness(i) => obs.witness_handled(&witness[i].reply),
            Source::Node(h, i) => {
                let e = &journals[h].entries[i];
                if let Some(state) = nodes.get_mut(&e.node) {
                    observe(&mut obs, now, e.node, state, e.entry.record);
                }
            }
        }
    }
    JournalReport {
        violation: obs.violation().cloned(),
        replays,
        stats: obs.stats.clone(),
    }
}

/// Where a merged line comes from (the witness sorts first at equal times).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    Witness(usize),
    Node(usize, usize),
}

impl NodeState {
    fn started(start: Start) -> NodeState {
        NodeState {
            fresh_primary: start == Start::Primary,
            generation: Generation::FIRST,
            replica_generation: match start {
                Start::Resume { replica } => Some(replica.generation),
                _ => None,
            },
            ..NodeState::default()
        }
    }
}

fn observe(obs: &mut Observer, now: Time, node: NodeId, s: &mut NodeState, record: Record) {
    match record {
        Record::Started(start) => *s = NodeState::started(start),
        Record::Lineage(_) => {}
        Record::Input(Input::Message {
            from,
            msg: PeerMsg::SyncStart { .. },
        }) => s.stream = Some(from),
        Record::Action(Action::Commit { replica, .. }) => s.committing = Some(replica),
        Record::Input(Input::Committed { epoch }) => {
            let at = s.committing.take().filter(|r| r.epoch == epoch);
            if let (Some(primary), Some(r)) = (s.stream, at) {
                s.replica_generation = Some(r.generation);
                let origin = Origin {
                    primary,
                    generation: r.generation,
                    epoch,
                };
                obs.committed(now, node, origin, Some(r.since), None);
            }
        }
        Record::Input(_) => {}
        Record::Action(Action::ResumeVm { .. }) if s.fresh_primary => {
            s.fresh_primary = false;
            s.instance = Some(obs.new_instance(node));
        }
        Record::Action(Action::Capture { epoch, .. }) => {
            if let Some(instance) = s.instance {
                obs.captured(now, node, instance, s.generation, epoch, None);
            }
        }
        Record::Action(Action::StartVm { from, generation }) => {
            let instance = obs.new_instance(node);
            let lineage = s.replica_generation.unwrap_or(generation);
            obs.restored(now, node, instance, lineage, from, &[]);
            s.instance = Some(instance);
            s.generation = generation;
        }
        Record::Action(Action::Fence) => s.instance = None,
        Record::Action(_) => {}
        Record::Released { frames, newest } => {
            if let Some(instance) = s.instance {
                obs.released_frames(now, node, instance, s.generation, newest, frames);
            } else {
                let detail = format!("{frames} frames left {node}, where no VM runs");
                obs.fail(Invariant::Driver, now, Some(node), detail);
            }
        }
    }
}

#[cfg(test)]
#[path = "journal_check_tests.rs"]
mod tests;
