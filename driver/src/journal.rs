//! A node's journal: every input the node was fed and every action it returned, with the
//! model time of each, plus what left the output gate. It is what makes a run checkable after
//! the fact: fed again to a fresh node, the inputs must give the same actions (the executor
//! drives the model deterministically: [`replay`]), and the releases, commits and takeovers in
//! it are what the invariant checkers need.

use ftvm_model::{Action, Config, Epoch, Input, Node, NodeId, Start, Time, WitnessReply};
use serde::{Deserialize, Serialize};

/// One journal line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Model time.
    pub at: Time,
    /// What happened.
    pub record: Record,
}

/// What a journal records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Record {
    /// A node process started this way (a restarted host's journal goes on with a fresh node).
    Started(Start),
    /// Right after `Started`: the lineage the process drew ([`ftvm_model::Config::incarnation`],
    /// different at each start, while the rest of the configuration stays the same).
    Lineage(u64),
    /// The node was fed this input.
    Input(Input),
    /// The node returned this action (in order, after its input).
    Action(Action),
    /// Frames left the output gate (after an action, or at once when the VM emitted them).
    Released {
        /// How many.
        frames: u64,
        /// The newest epoch tag among them.
        newest: Epoch,
    },
}

/// A journal line as an executor writes it: the entry with its node and a clock reading, so
/// that the journals of several hosts can be merged in one order. Real hosts stamp the
/// machine's monotonic clock, which every process of one machine shares (as the test hosts,
/// processes in network namespaces, do); the simulator stamps simulated time. Journals of
/// separate machines do not merge meaningfully.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostEntry {
    /// The node that recorded it.
    pub node: NodeId,
    /// When it was written: microseconds on the host's clock (see above).
    pub wall_us: u64,
    /// The entry.
    #[serde(flatten)]
    pub entry: Entry,
}

/// A line of a host's journal file: how the process that wrote the lines after it was
/// configured (its first line), or an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostLine {
    /// The model configuration of the process (a replay needs it).
    Config {
        /// The node.
        node: NodeId,
        /// Its configuration.
        config: Config,
    },
    /// An entry.
    Entry(HostEntry),
}

/// A line of the witness's journal: one decision, written when the witness made it (before
/// its reply was sent, so before any node could act on it). The register the nodes' replies
/// show can lag or skip decisions (replies are lost and arrive late); the witness's own record
/// is the register's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessEntry {
    /// When the witness decided, on the same clock as [`HostEntry::wall_us`].
    pub wall_us: u64,
    /// The reply it computed (request, verdict, register after it).
    pub reply: WitnessReply,
}

/// The entries of one node, in order.
#[derive(Debug, Clone, Default)]
pub struct Journal {
    entries: Vec<Entry>,
}

impl Journal {
    /// An empty journal.
    pub fn new() -> Journal {
        Journal::default()
    }

    /// Appends an entry.
    pub fn push(&mut self, at: Time, record: Record) {
        self.entries.push(Entry { at, record });
    }

    /// The entries so far.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Takes the entries recorded since the last call (for an executor that writes them out).
    pub fn drain(&mut self) -> Vec<Entry> {
        std::mem::take(&mut self.entries)
    }
}

/// Where a replay first disagreed with the journal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Divergence {
    /// The fresh node returned other actions for the same input.
    #[error("{0}")]
    Actions(Box<Mismatch>),
    /// An action with no input before it.
    #[error("the journal starts with an action, not an input")]
    Orphan,
}

/// One input after which a replay's actions differ from the journal's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "input {index} ({input:?}) at {at:?}: journal has {recorded:?}, the model gives {replayed:?}"
)]
pub struct Mismatch {
    /// Index of the input among the journal's inputs.
    pub index: usize,
    /// When.
    pub at: Time,
    /// The input.
    pub input: Input,
    /// What the journal recorded.
    pub recorded: Vec<Action>,
    /// What a fresh node returned.
    pub replayed: Vec<Action>,
}

/// Feeds the journal's inputs to a fresh node built from `config` and `me`, and checks that it
/// returns the recorded actions after each. A `Started` entry begins a fresh node started that
/// way (a restarted process); entries before the first one belong to a node started as `start`.
/// Returns how many inputs it replayed.
pub fn replay(
    config: Config,
    me: NodeId,
    mut start: Start,
    entries: &[Entry],
) -> Result<usize, Divergence> {
    let mut node = Node::new(config.clone(), me, start);
    let mut inputs = 0;
    let mut i = 0;
    while i < entries.len() {
        let Entry { at, record } = entries[i];
        i += 1;
        let input = match record {
            Record::Input(input) => input,
            Record::Started(s) => {
                start = s;
                node = Node::new(config.clone(), me, start);
                continue;
            }
            Record::Lineage(incarnation) => {
                let mut c = config.clone();
                c.incarnation = incarnation;
                node = Node::new(c, me, start);
                continue;
            }
            Record::Action(_) => return Err(Divergence::Orphan),
            Record::Released { .. } => continue,
        };
        let mut recorded = Vec::new();
        while let Some(e) = entries.get(i) {
            match e.record {
                Record::Action(a) => recorded.push(a),
                Record::Released { .. } => {}
                Record::Input(_) | Record::Started(_) | Record::Lineage(_) => break,
            }
            i += 1;
        }
        let replayed = node.handle(at, input);
        if replayed != recorded {
            return Err(Divergence::Actions(Box::new(Mismatch {
                index: inputs,
                at,
                input,
                recorded,
                replayed,
            })));
        }
        inputs += 1;
    }
    Ok(inputs)
}
