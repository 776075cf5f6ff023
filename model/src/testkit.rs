//! A tiny deterministic cluster for the model's own tests: nodes, a witness, a network with
//! latency/partitions/crashes, a fake VM whose state is an append-only log, and invariant
//! checks on every step. (The full simulator with turmoil lives in `ftvm-sim`; this one only
//! has to be small enough to trust.)
//!
//! Invariants checked on every event:
//! * **client chain**: all released frames (each carries the VM log at emission) are ordered
//!   by prefix — catches lost commitments (failover to an older state than a client saw) and
//!   split brain (two diverging VMs both talking);
//! * **output commit**: `ReleaseOutput { through: N }` only when the primary's backup has
//!   durably committed `N`, uncorrupted;
//! * **one releaser per generation**, and at most one up, unfenced primary with an open gate;
//! * **prefix consistency**: a commit never applies an incremental checkpoint onto anything
//!   but its base epoch, nor a damaged one; `StartVm` only from an intact replica of `from`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::action::Scope;
use crate::action::{Action, Gate};
use crate::config::{Config, Start};
use crate::gate::OutputGate;
use crate::ids::{Epoch, Generation, NodeId, VmId};
use crate::input::Input;
use crate::node::Node;
use crate::status::{RoleKind, Status};
use crate::time::Time;
use crate::witness::Witness;
use crate::witness_msg::WitnessRequest;

pub(crate) const WITNESS: NodeId = NodeId(100);

pub(crate) fn config() -> Config {
    Config::new(VmId(7), 256, WITNESS)
}

#[derive(Clone, Debug)]
struct Snapshot {
    log: Vec<u64>,
    base: Option<Epoch>,
    /// A catch-up sync (applies on any replica at or past `base`).
    catch_up: bool,
    ok: bool,
}

#[derive(Clone, Debug)]
pub(crate) struct Replica {
    pub epoch: Epoch,
    pub log: Vec<u64>,
    pub corrupt: bool,
}

pub(crate) struct Host {
    pub node: Node,
    pub up: bool,
    vm_log: Vec<u64>,
    vm_running: bool,
    gate: OutputGate<Vec<u64>>,
    prev_capture: Option<Epoch>,
    captures: BTreeMap<Epoch, Snapshot>,
    staged: BTreeMap<Epoch, Snapshot>,
    pub replica: Option<Replica>,
    timer: Option<Time>,
}

impl Host {
    fn new(node: Node) -> Host {
        Host {
            node,
            up: true,
            vm_log: Vec::new(),
            vm_running: false,
            gate: OutputGate::new(),
            prev_capture: None,
            captures: BTreeMap::new(),
            staged: BTreeMap::new(),
            replica: None,
            timer: None,
        }
    }
}

#[derive(Clone, Debug)]
enum Ev {
    Input {
        to: NodeId,
        input: Input,
        link: Option<u64>,
    },
    Staged {
        to: NodeId,
        epoch: Epoch,
        snap: Snapshot,
        link: u64,
    },
    /// A commit becomes durable (the replica changes only now, atomically).
    Durable {
        to: NodeId,
        epoch: Epoch,
        replica: Replica,
    },
    Timer(NodeId),
    Witness {
        from: NodeId,
        request: WitnessRequest,
    },
    Tick,
}

/// Deterministic pseudo-random numbers for fault injection (the model itself has no RNG).
#[derive(Clone, Debug)]
pub(crate) struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

pub(crate) struct Cluster {
    pub now: Time,
    pub cfg: Config,
    queue: BTreeMap<(Time, u64), Ev>,
    seq: u64,
    pub hosts: BTreeMap<NodeId, Host>,
    pub witness: Witness,
    links: BTreeMap<(NodeId, NodeId), u64>,
    next_link: u64,
    cut: BTreeSet<(NodeId, NodeId)>,
    pub latency: Duration,
    /// Extra random delay (ms, exclusive bound) of witness requests and replies: makes them
    /// arrive late, out of order, after their resends.
    pub witness_jitter_ms: u64,
    /// Probability (per mille) that a checkpoint arrives damaged.
    pub corrupt_per_mille: u64,
    pub rng: Lcg,
    longest_seen: Vec<u64>,
    pub frames_seen: u64,
    releasers: BTreeMap<Generation, BTreeSet<NodeId>>,
    pub violations: Vec<String>,
    next_id: u64,
    pub trace: Vec<String>,
}

fn norm(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    (a.min(b), a.max(b))
}

impl Cluster {
    /// Node 1 starts as primary, the others as its backups-to-be.
    pub fn new(cfg: Config, primary: NodeId, backups: &[NodeId]) -> Cluster {
        let mut c = Cluster {
            now: Time::ZERO,
            witness: Witness::new(cfg.vm, primary),
            cfg,
            queue: BTreeMap::new(),
            seq: 0,
            hosts: BTreeMap::new(),
            links: BTreeMap::new(),
            next_link: 1,
            cut: BTreeSet::new(),
            latency: Duration::from_millis(1),
            witness_jitter_ms: 0,
            corrupt_per_mille: 0,
            rng: Lcg(1),
            longest_seen: Vec::new(),
            frames_seen: 0,
            releasers: BTreeMap::new(),
            violations: Vec::new(),
            next_id: 1,
            trace: Vec::new(),
        };
        c.add(primary, Start::Primary);
        for &b in backups {
            c.add(b, Start::Backup { primary });
        }
        c.schedule(Duration::ZERO, Ev::Tick);
        c
    }

    /// Start (or restart, with a fresh process) host `id`.
    pub fn add(&mut self, id: NodeId, start: Start) {
        let node = Node::new(self.cfg.clone(), id, start);
        let replica = self.hosts.remove(&id).and_then(|h| h.replica);
        let mut host = Host::new(node);
        host.replica = replica;
        self.hosts.insert(id, host);
        self.input(id, Input::Timeout);
    }

    pub fn crash(&mut self, id: NodeId) {
        if let Some(h) = self.hosts.get_mut(&id) {
            h.up = false;
            h.vm_running = false;
            h.gate.apply(&Action::Fence);
        }
        self.links.retain(|(a, b), _| *a != id && *b != id);
    }

    pub fn restart(&mut self, id: NodeId) {
        self.add(id, Start::Rejoin);
    }

    pub fn cut(&mut self, a: NodeId, b: NodeId) {
        self.cut.insert(norm(a, b));
    }

    pub fn heal(&mut self, a: NodeId, b: NodeId) {
        self.cut.remove(&norm(a, b));
    }

    pub fn heal_all(&mut self) {
        self.cut.clear();
    }

    pub fn status(&self, id: NodeId) -> Status {
        self.hosts[&id].node.status()
    }

    fn reachable(&self, a: NodeId, b: NodeId) -> bool {
        let up = |n: NodeId| n == WITNESS || self.hosts.get(&n).is_some_and(|h| h.up);
        up(a) && up(b) && !self.cut.contains(&norm(a, b))
    }

    fn schedule(&mut self, after: Duration, ev: Ev) {
        self.seq += 1;
        self.queue.insert((self.now + after, self.seq), ev);
    }

    fn input(&mut self, to: NodeId, input: Input) {
        self.schedule(
            Duration::ZERO,
            Ev::Input {
                to,
                input,
                link: None,
            },
        );
    }

    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while let Some((&(t, seq), _)) = self.queue.iter().next() {
            if t > end {
                break;
            }
            let ev = self.queue.remove(&(t, seq)).unwrap_or(Ev::Tick);
            self.now = t;
            self.process(ev);
        }
        self.now = end;
    }

    fn process(&mut self, ev: Ev) {
        match ev {
            Ev::Tick => {
                self.tick();
                self.schedule(Duration::from_millis(3), Ev::Tick);
            }
            Ev::Timer(id) => {
                let due = self
                    .hosts
                    .get(&id)
                    .filter(|h| h.up)
                    .and_then(|h| h.node.poll_timeout());
                if let Some(h) = self.hosts.get_mut(&id) {
                    h.timer = None;
                }
                if due.is_some_and(|t| t <= self.now) {
                    self.deliver(id, Input::Timeout);
                } else {
                    self.arm(id);
                }
            }
            Ev::Input { to, input, link } => {
                if link.is_none_or(|l| self.links.values().any(|&x| x == l)) {
                    self.deliver(to, input);
                }
            }
            Ev::Staged {
                to,
                epoch,
                snap,
                link,
            } => {
                if self.links.values().any(|&x| x == link) {
                    if let Some(h) = self.hosts.get_mut(&to).filter(|h| h.up) {
                        let ok = snap.ok;
                        h.staged.insert(epoch, snap);
                        self.deliver(to, Input::CheckpointReceived { epoch, ok });
                    }
                }
            }
            Ev::Durable { to, epoch, replica } => {
                if let Some(h) = self.hosts.get_mut(&to).filter(|h| h.up) {
                    h.replica = Some(replica);
                    self.deliver(to, Input::Committed { epoch });
                }
            }
            Ev::Witness { from, request } => {
                let reply = self.witness.handle(self.now, request);
                if self.reachable(from, WITNESS) {
                    let ev = Ev::Input {
                        to: from,
                        input: Input::WitnessReply(reply),
                        link: None,
                    };
                    let jitter = Duration::from_millis(self.rng.below(self.witness_jitter_ms));
                    self.schedule(self.latency + jitter, ev);
                }
            }
        }
    }

    fn deliver(&mut self, id: NodeId, input: Input) {
        let Some(h) = self.hosts.get_mut(&id).filter(|h| h.up) else {
            return;
        };
        let actions = h.node.handle(self.now, input);
        if !matches!(input, Input::Timeout) || !actions.is_empty() {
            self.trace.push(format!("{} {id} <- {input:?}", self.now));
        }
        for a in actions {
            self.trace.push(format!("{} {id} -> {a:?}", self.now));
            self.perform(id, a);
        }
        self.check_global();
        self.arm(id);
    }

    fn arm(&mut self, id: NodeId) {
        let Some(h) = self.hosts.get_mut(&id).filter(|h| h.up) else {
            return;
        };
        let Some(t) = h.node.poll_timeout() else {
            return;
        };
        if h.timer.is_some_and(|x| x <= t) {
            return;
        }
        h.timer = Some(t);
        let after = t.saturating_since(self.now);
        self.schedule(after, Ev::Timer(id));
    }

    fn violation(&mut self, what: String) {
        if self.violations.len() < 20 {
            self.violations.push(format!("{} {what}", self.now));
        }
    }

    fn see(&mut self, from: NodeId, frames: Vec<Vec<u64>>) {
        let generation = self.status(from).generation;
        for f in frames {
            self.frames_seen += 1;
            self.releasers.entry(generation).or_default().insert(from);
            if f.starts_with(&self.longest_seen) {
                self.longest_seen = f;
            } else if !self.longest_seen.starts_with(&f) {
                self.violation(format!("client saw diverging histories (from {from})"));
            }
        }
        for (g, set) in &self.releasers {
            if set.len() > 1 {
                let msg = format!("two releasers in {g}: {set:?}");
                self.violation(msg);
                break;
            }
        }
    }

    fn tick(&mut self) {
        let ids: Vec<NodeId> = self.hosts.keys().copied().collect();
        for id in ids {
            let id_val = self.next_id;
            let Some(h) = self.hosts.get_mut(&id).filter(|h| h.up && h.vm_running) else {
                continue;
            };
            self.next_id += 1;
            h.vm_log.push(id_val);
            let frame = h.vm_log.clone();
            if let Some(f) = h.gate.emit(frame) {
                self.see(id, vec![f]);
            }
        }
    }

    fn check_global(&mut self) {
        let open: Vec<NodeId> = self
            .hosts
            .iter()
            .filter(|(_, h)| h.up && !h.gate.is_fenced())
            .filter(|(_, h)| {
                let s = h.node.status();
                s.role == RoleKind::Primary && s.gate == Some(Gate::Open)
            })
            .map(|(id, _)| *id)
            .collect();
        if open.len() > 1 {
            self.violation(format!("several primaries with open gates: {open:?}"));
        }
    }

    fn perform(&mut self, id: NodeId, a: Action) {
        let released = match self.hosts.get_mut(&id) {
            Some(h) => h.gate.apply(&a),
            None => return,
        };
        if !released.is_empty() {
            self.see(id, released);
        }
        let lat = self.latency;
        match a {
            Action::PreCopy { epoch } => {
                // The copy runs while the VM does: a few milliseconds, drawn.
                let took = Duration::from_micros(self.rng.below(3000));
                let ev = Ev::Input {
                    to: id,
                    input: Input::PreCopied { epoch },
                    link: None,
                };
                self.schedule(took, ev);
            }
            Action::PauseVm => self.host(id).vm_running = false,
            Action::ResumeVm { .. } => self.host(id).vm_running = true,
            Action::Capture { epoch, scope } => {
                let h = self.host(id);
                let (base, catch_up) = match scope {
                    Scope::Full => (None, false),
                    Scope::Epoch => (h.prev_capture, false),
                    Scope::Since(b) => (Some(b), true),
                };
                h.prev_capture = Some(epoch);
                let snap = Snapshot {
                    log: h.vm_log.clone(),
                    base,
                    catch_up,
                    ok: true,
                };
                h.captures.insert(epoch, snap);
                let ev = Ev::Input {
                    to: id,
                    input: Input::CaptureDone {
                        epoch,
                        pages: 1,
                        bytes: 1,
                    },
                    link: None,
                };
                self.schedule(Duration::from_micros(500), ev);
            }
            Action::SendCheckpoint { to, epoch, .. } => {
                let snap = self.host(id).captures.remove(&epoch);
                let sent = Ev::Input {
                    to: id,
                    input: Input::CheckpointSent { epoch },
                    link: None,
                };
                self.schedule(Duration::from_micros(700), sent);
                let link = self.links.get(&norm(id, to)).copied();
                if let (Some(mut snap), Some(link), true) = (snap, link, self.reachable(id, to)) {
                    if self.rng.below(1000) < self.corrupt_per_mille {
                        snap.ok = false;
                    }
                    let start = Input::CheckpointStarted { epoch };
                    self.schedule(
                        lat,
                        Ev::Input {
                            to,
                            input: start,
                            link: Some(link),
                        },
                    );
                    self.schedule(
                        lat + Duration::from_millis(1),
                        Ev::Staged {
                            to,
                            epoch,
                            snap,
                            link,
                        },
                    );
                }
            }
            Action::Send { to, msg } => {
                if let Some(&link) = self.links.get(&norm(id, to)) {
                    if self.reachable(id, to) {
                        let input = Input::Message { from: id, msg };
                        self.schedule(
                            lat,
                            Ev::Input {
                                to,
                                input,
                                link: Some(link),
                            },
                        );
                    }
                }
            }
            Action::Connect { to } => {
                if self.reachable(id, to) {
                    let link = self.next_link;
                    self.next_link += 1;
                    self.links.insert(norm(id, to), link);
                    let input = Input::Connected { peer: to };
                    self.schedule(
                        lat,
                        Ev::Input {
                            to: id,
                            input,
                            link: Some(link),
                        },
                    );
                } else {
                    let input = Input::Disconnected { peer: to };
                    self.schedule(
                        lat,
                        Ev::Input {
                            to: id,
                            input,
                            link: None,
                        },
                    );
                }
            }
            Action::Disconnect { peer } => {
                if self.links.remove(&norm(id, peer)).is_some() && self.reachable(id, peer) {
                    let input = Input::Disconnected { peer: id };
                    self.schedule(
                        lat,
                        Ev::Input {
                            to: peer,
                            input,
                            link: None,
                        },
                    );
                }
            }
            Action::ToWitness(request) => {
                if self.reachable(id, WITNESS) {
                    let jitter = Duration::from_millis(self.rng.below(self.witness_jitter_ms));
                    self.schedule(lat + jitter, Ev::Witness { from: id, request });
                }
            }
            Action::ReleaseOutput { through } => {
                let peer = self.status(id).peer;
                let ok = peer
                    .and_then(|p| self.hosts.get(&p))
                    .and_then(|h| h.replica.as_ref())
                    .is_some_and(|r| r.epoch >= through && !r.corrupt);
                if !ok {
                    self.violation(format!(
                        "{id} released {through} before its backup committed it"
                    ));
                }
            }
            Action::SetOutputGate(_) | Action::Log(_) => {}
            Action::Commit { epoch, .. } => {
                let h = self.host(id);
                let Some(snap) = h.staged.remove(&epoch) else {
                    return self.violation(format!("{id} commits unstaged {epoch}"));
                };
                let fits = match (snap.base, &h.replica) {
                    (None, _) => true,
                    // A catch-up holds every write after its base, so it also fits a replica a
                    // little past it (a commit that landed after the join).
                    (Some(b), Some(r)) if snap.catch_up => r.epoch >= b && !r.corrupt,
                    (Some(b), Some(r)) => r.epoch == b && !r.corrupt,
                    (Some(_), None) => false,
                };
                let replica = Replica {
                    epoch,
                    log: snap.log,
                    corrupt: !(fits && snap.ok),
                };
                self.schedule(
                    Duration::from_micros(300),
                    Ev::Durable {
                        to: id,
                        epoch,
                        replica,
                    },
                );
            }
            Action::DiscardStaged => self.host(id).staged.clear(),
            Action::StartVm { from, .. } => {
                let h = self.host(id);
                match h.replica.clone() {
                    Some(r) if r.epoch == from && !r.corrupt => {
                        h.vm_log = r.log;
                        h.vm_running = true;
                        h.prev_capture = Some(from);
                        let ev = Ev::Input {
                            to: id,
                            input: Input::VmStarted,
                            link: None,
                        };
                        self.schedule(Duration::from_millis(2), ev);
                    }
                    other => {
                        self.violation(format!("{id} starts from {from} but replica is {other:?}"))
                    }
                }
            }
            Action::Fence => self.host(id).vm_running = false,
        }
    }

    fn host(&mut self, id: NodeId) -> &mut Host {
        self.hosts.get_mut(&id).expect("host exists")
    }

    /// Fail the test with the trace tail if any invariant broke.
    pub fn assert_clean(&self) {
        if !self.violations.is_empty() {
            let tail: Vec<&String> = self.trace.iter().rev().take(80).collect();
            let tail: Vec<&String> = tail.into_iter().rev().collect();
            panic!(
                "violations: {:#?}\ntrace tail:\n{}",
                self.violations,
                tail.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
}

/// Direct driving of one node for transition tests.
pub(crate) struct One {
    pub node: Node,
    pub now: Time,
}

impl One {
    pub fn new(me: NodeId, start: Start) -> One {
        One::with(config(), me, start)
    }

    pub fn with(cfg: Config, me: NodeId, start: Start) -> One {
        One {
            node: Node::new(cfg, me, start),
            now: Time::ZERO,
        }
    }

    /// Handle `input` at the current time; actions without the `Log` noise.
    pub fn on(&mut self, input: Input) -> Vec<Action> {
        self.node
            .handle(self.now, input)
            .into_iter()
            .filter(|a| !matches!(a, Action::Log(_)))
            .collect()
    }

    /// Handle `input` at the current time; every action, `Log` included.
    pub fn on_logged(&mut self, input: Input) -> Vec<Action> {
        self.node.handle(self.now, input)
    }

    /// Advance to `t` and fire the timer if due.
    pub fn at(&mut self, t: Time) -> Vec<Action> {
        self.now = t;
        self.on(Input::Timeout)
    }

    /// Advance by `d` and fire the timer.
    pub fn after(&mut self, d: Duration) -> Vec<Action> {
        self.at(self.now + d)
    }

    pub fn status(&self) -> Status {
        self.node.status()
    }
}
