//! The driver core of one node: the model's `Node` with the bookkeeping every executor needs
//! around it. Executors report what happened on their connections and VM; the core turns it
//! into model inputs (through the peer table and staging) and returns the model's actions with
//! what the core already did for each (frames the gate released, the checkpoint to commit,
//! connections to close). What is left to the executor is I/O only.

use std::collections::BTreeMap;

use ftvm_model::{Action, Epoch, Input, Node, NodeId, OutputGate, Start, Status, Time};

use crate::checkpoint::StagedCheckpoint;
use crate::journal::{Journal, Record};
use crate::link::LinkEvent;
use crate::peers::{Admission, Dialled, PeerTable, Speaker};

/// One model action and what the core did for it.
#[derive(Debug)]
pub struct Effect<C, F> {
    /// The action, for the executor to carry out.
    pub action: Action,
    /// `ReleaseOutput` / `SetOutputGate`: frames that may now leave, in emission order.
    pub released: Vec<F>,
    /// `Fence`: frames held at the gate that will never leave.
    pub dropped: Vec<F>,
    /// `Disconnect` / `Connect` / `Fence`: connections to close (they speak for nobody any more).
    pub close: Vec<C>,
    /// `Commit`: the checkpoint to apply (`None`: it was never staged, a broken contract).
    pub staged: Option<StagedCheckpoint>,
    /// `Send` / `SendCheckpoint`: the peer's live link (`None`: there is none).
    pub link: Option<C>,
}

impl<C, F> Effect<C, F> {
    /// `action` with no bookkeeping attached (what an executor's tests hand its `execute`).
    pub fn of(action: Action) -> Effect<C, F> {
        Effect {
            action,
            released: Vec::new(),
            dropped: Vec::new(),
            close: Vec::new(),
            staged: None,
            link: None,
        }
    }
}

/// What the executor must do about a connection event besides feeding the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict<C> {
    /// Nothing to feed, nothing to do.
    Ignore,
    /// Feed this input to [`NodeDriver::handle`].
    Feed(Input),
    /// Close this connection (refused, superseded or replaced); feed the input, if any.
    Close(C, Option<Input>),
}

/// Whether an accepted connection may stay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted<C> {
    /// It names the node's peer, whose link is live: close it.
    Refused,
    /// Keep it, and carry out the verdict (close a link it displaced).
    Admitted(Verdict<C>),
}

/// What became of a frame the VM emitted.
#[derive(Debug, PartialEq, Eq)]
pub struct Emitted<F> {
    /// The frame, if it may leave now (the gate holds it otherwise, or drops it when fenced).
    pub frame: Option<F>,
    /// Feed this input to [`NodeDriver::handle`]: the first frame of the running epoch is held
    /// (`OutputHeld`, which may end the epoch early under the output epoch policy).
    pub feed: Option<Input>,
}

/// A node, its connections, its output gate and its staged checkpoints.
#[derive(Debug)]
pub struct NodeDriver<C, F> {
    node: Node,
    peers: PeerTable<C>,
    gate: OutputGate<F>,
    staged: BTreeMap<Epoch, StagedCheckpoint>,
    journal: Option<Journal>,
    /// The newest epoch whose held output the node was told of (`OutputHeld`).
    told_held: Option<Epoch>,
}

impl<C: Copy + Ord, F> NodeDriver<C, F> {
    /// Drives `node`.
    pub fn new(node: Node) -> NodeDriver<C, F> {
        NodeDriver {
            node,
            peers: PeerTable::new(),
            gate: OutputGate::new(),
            staged: BTreeMap::new(),
            journal: None,
            told_held: None,
        }
    }

    /// Records every input, action and release from now on (see [`Journal`]), after a
    /// `Started` line saying how this node started.
    pub fn record(&mut self, now: Time, start: Start, mut journal: Journal) {
        journal.push(now, Record::Started(start));
        journal.push(now, Record::Lineage(self.node.config().incarnation));
        self.journal = Some(journal);
    }

    /// The journal, if recording.
    pub fn journal_mut(&mut self) -> Option<&mut Journal> {
        self.journal.as_mut()
    }

    /// The model node.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The node's status.
    pub fn status(&self) -> Status {
        self.node.status()
    }

    /// When the node wants a `Timeout`.
    pub fn poll_timeout(&self) -> Option<Time> {
        self.node.poll_timeout()
    }

    /// The output gate (its tag, what it holds).
    pub fn gate(&self) -> &OutputGate<F> {
        &self.gate
    }

    /// The peer whose live link `conn` is.
    pub fn peer_of(&self, conn: C) -> Option<NodeId> {
        self.peers.peer_of(conn)
    }

    /// Checkpoints received and not yet committed or discarded.
    pub fn staged(&self) -> &BTreeMap<Epoch, StagedCheckpoint> {
        &self.staged
    }

    /// Feeds one input to the node; returns its actions with the core's share of each done.
    pub fn handle(&mut self, now: Time, input: Input) -> Vec<Effect<C, F>> {
        let actions = self.node.handle(now, input);
        if let Some(j) = self.journal.as_mut() {
            j.push(now, Record::Input(input));
            for a in &actions {
                j.push(now, Record::Action(*a));
            }
        }
        actions.into_iter().map(|a| self.bookkeep(now, a)).collect()
    }

    fn bookkeep(&mut self, now: Time, action: Action) -> Effect<C, F> {
        let mut e = Effect::of(action);
        match action {
            Action::ReleaseOutput { .. } | Action::SetOutputGate(_) | Action::ResumeVm { .. } => {
                let tagged = self.gate.apply_tagged(&action);
                self.note_released(now, &tagged);
                e.released = tagged.into_iter().map(|(_, f)| f).collect();
            }
            Action::StartVm { .. } => {
                // A node fenced earlier and now taking over runs a new VM behind a new gate;
                // the old VM's output stayed dropped.
                if self.gate.is_fenced() {
                    self.gate = OutputGate::new();
                }
                // Its tags restart from the restored epoch.
                self.told_held = None;
                self.gate.apply(&action);
            }
            Action::Fence => {
                e.dropped = self.gate.take_held();
                self.told_held = None;
                self.gate.apply(&action);
                self.staged.clear();
                e.close = self.peers.drain();
            }
            Action::Commit { epoch, .. } => {
                // The model commits in order: older staged checkpoints were superseded.
                e.staged = self.staged.remove(&epoch);
                self.staged.retain(|&k, _| k > epoch);
            }
            Action::DiscardStaged => self.staged.clear(),
            // A new dial supersedes whatever link the node had to that peer: the executor
            // calls `dialling` with the new connection.
            Action::Disconnect { peer } | Action::Connect { to: peer } => {
                e.close.extend(self.peers.disconnect(peer))
            }
            Action::Send { to, .. } | Action::SendCheckpoint { to, .. } => {
                e.link = self.peers.link_of(to);
            }
            Action::PreCopy { .. }
            | Action::PauseVm
            | Action::Capture { .. }
            | Action::ToWitness(_)
            | Action::Log(_) => {}
        }
        e
    }

    fn note_released(&mut self, now: Time, tagged: &[(Epoch, F)]) {
        let (Some(j), Some(newest)) = (self.journal.as_mut(), tagged.iter().map(|t| t.0).max())
        else {
            return;
        };
        let frames = tagged.len() as u64;
        j.push(now, Record::Released { frames, newest });
    }

    /// The VM emitted `frame` at `now`: whether it may leave now, and what to tell the node.
    pub fn emit(&mut self, now: Time, frame: F) -> Emitted<F> {
        let tag = self.gate.tag();
        let Some(out) = self.gate.emit(frame) else {
            let first = !self.gate.is_fenced() && self.told_held.is_none_or(|e| e < tag);
            if first {
                self.told_held = Some(tag);
            }
            return Emitted {
                frame: None,
                feed: first.then_some(Input::OutputHeld { epoch: tag }),
            };
        };
        if let Some(j) = self.journal.as_mut() {
            j.push(
                now,
                Record::Released {
                    frames: 1,
                    newest: tag,
                },
            );
        }
        Emitted {
            frame: Some(out),
            feed: None,
        }
    }

    /// An incoming connection proved to be `proven`: whether it may stay (see
    /// [`PeerTable::accepted`]), and the link it displaced, if any, to close (the node hears
    /// that link's loss, as from any close).
    pub fn accepted(&mut self, conn: C, proven: NodeId) -> Accepted<C> {
        let peer = self.node.status().peer;
        match self.peers.accepted(conn, proven, peer) {
            Admission::Refused => Accepted::Refused,
            Admission::Admitted { displaced: None } => Accepted::Admitted(Verdict::Ignore),
            Admission::Admitted {
                displaced: Some(old),
            } => Accepted::Admitted(Verdict::Close(
                old,
                Some(Input::Disconnected { peer: proven }),
            )),
        }
    }

    /// This node dials `peer` on `conn` (for the node's `Connect`).
    pub fn dialling(&mut self, peer: NodeId, conn: C) {
        self.peers.dialling(peer, conn);
    }

    /// The dial on `conn` connected.
    pub fn connected(&mut self, conn: C, peer: NodeId) -> Verdict<C> {
        match self.peers.connected(conn, peer) {
            Dialled::Stale => Verdict::Close(conn, None),
            Dialled::Live {
                replaced: Some(old),
            } => Verdict::Close(old, Some(Input::Connected { peer })),
            Dialled::Live { replaced: None } => Verdict::Feed(Input::Connected { peer }),
        }
    }

    /// The dial on `conn` failed.
    pub fn connect_failed(&mut self, conn: C, peer: NodeId) -> Verdict<C> {
        if self.peers.connect_failed(conn, peer) {
            Verdict::Feed(Input::Disconnected { peer })
        } else {
            Verdict::Ignore
        }
    }

    /// Bytes arrived on `conn` (liveness only).
    pub fn heard(&self, conn: C) -> Verdict<C> {
        match self.peers.peer_of(conn) {
            Some(from) => Verdict::Feed(Input::Heard { from }),
            None => Verdict::Ignore,
        }
    }

    /// `conn` is gone.
    pub fn closed(&mut self, conn: C) -> Verdict<C> {
        match self.peers.closed(conn) {
            Some(peer) => Verdict::Feed(Input::Disconnected { peer }),
            None => Verdict::Ignore,
        }
    }

    /// What `conn`'s link delivered. Checkpoints are staged here, damaged ones included (the
    /// node hears `ok: false` and never commits one unless it is broken).
    pub fn on_link(&mut self, conn: C, event: LinkEvent) -> Verdict<C> {
        let live = self.peers.peer_of(conn).is_some();
        match event {
            LinkEvent::Message(msg) => match self.peers.speaker(conn, &msg) {
                Speaker::Peer(from) | Speaker::Joined(from) => {
                    Verdict::Feed(Input::Message { from, msg })
                }
                Speaker::Refused { .. } => Verdict::Close(conn, None),
                Speaker::Nobody => Verdict::Ignore,
            },
            LinkEvent::CheckpointStarted(epoch) if live => {
                Verdict::Feed(Input::CheckpointStarted { epoch })
            }
            LinkEvent::CheckpointReceived(staged) if live => {
                let epoch = Epoch(staged.epoch);
                self.staged.insert(epoch, staged);
                Verdict::Feed(Input::CheckpointReceived { epoch, ok: true })
            }
            LinkEvent::CheckpointDamaged { epoch, partial } if live => {
                match partial {
                    Some(p) => self.staged.insert(epoch, p),
                    None => self.staged.remove(&epoch),
                };
                Verdict::Feed(Input::CheckpointReceived { epoch, ok: false })
            }
            LinkEvent::CheckpointStarted(_)
            | LinkEvent::CheckpointReceived(_)
            | LinkEvent::CheckpointDamaged { .. } => Verdict::Ignore,
        }
    }
}

#[cfg(test)]
#[path = "node_driver_tests.rs"]
mod tests;
