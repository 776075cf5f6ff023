//! The shared observer: every host reports what it does (captures, commits, restores,
//! releases, witness decisions, client replies, model status) the moment it does it, and the
//! invariant checkers run on each report. The first broken invariant is kept and stops the run.
//!
//! The observer sees the whole simulated world at once (all replicas, the witness register),
//! which no real node can; that global view is what makes the checks exact.

mod disk;
mod liveness;
mod release;
mod view;

use ftvm_model::{
    Epoch, Generation, NodeId, Registration, RoleKind, Status, Time, WitnessReply, WitnessState,
};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

use crate::invariant::{Invariant, Violation};
use crate::vm::replica::Origin;
use liveness::Watch;
pub(crate) use view::NodeView;

/// One VM incarnation: a fresh start or a takeover on some host.
pub(crate) type Instance = u64;

/// Counts for the run report.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ObservedStats {
    /// Checkpoints captured by primaries (simulated epochs).
    pub epochs: u64,
    /// Checkpoints committed by replicas.
    pub commits: u64,
    /// Takeovers (VMs started from a replica).
    pub failovers: u64,
    /// Highest generation the witness granted.
    pub max_generation: u64,
    /// Reply frames that left a host.
    pub released: u64,
    /// Replies clients received.
    pub replies_seen: u64,
    /// Primary lost → VM serving again, per armed liveness watch (milliseconds).
    pub outages_ms: Vec<u64>,
    /// Times a primary stopped its VM (fenced itself).
    pub fences: u64,
    /// Time VMs spent paused by captures, summed over hosts (microseconds).
    pub paused_us: u64,
    /// Clients' response times, request sent → reply received, retries included (µs).
    pub response_p50_us: u64,
    /// 99th percentile of the same.
    pub response_p99_us: u64,
    /// Syncs that sent all of RAM and disk (first protection, after a takeover, or a replica
    /// the primary could not catch up), counted when the primary captured them.
    pub full_syncs: u64,
    /// Of those, the ones a replica committed (a sync cut short is retried, and counted again
    /// above).
    pub full_syncs_committed: u64,
    /// Syncs that sent only what changed since the joiner's committed replica (captured).
    pub catch_ups: u64,
}

pub(crate) struct Observer {
    enabled: BTreeSet<Invariant>,
    violation: Option<Violation>,
    witness: WitnessState,
    /// Generation → the node the witness made its primary.
    granted: BTreeMap<Generation, NodeId>,
    /// Generation → the registration whose takeover ended it.
    promoted: BTreeMap<Generation, Registration>,
    /// (primary, generation, epoch) → state hash at capture (none: a real run without one).
    snapshots: BTreeMap<(NodeId, Generation, Epoch), Option<u64>>,
    last_capture: BTreeMap<Instance, Epoch>,
    /// (backup, generation, sync epoch) → highest epoch it ever committed on that replica.
    committed_max: BTreeMap<(NodeId, Generation, Epoch), Epoch>,
    instances: BTreeMap<Instance, NodeId>,
    /// Generation → the one instance that released output in it.
    releasers: BTreeMap<Generation, Instance>,
    /// Generation followed by a backup → (instance it started, epoch it resumed from).
    takeovers: BTreeMap<Generation, (Instance, Epoch)>,
    /// (counter, value) → (client, request) it was handed to.
    handed: BTreeMap<(u32, u64), (u32, u64)>,
    max_released: BTreeMap<u32, u64>,
    nodes: BTreeMap<NodeId, NodeView>,
    watch: Option<Watch>,
    /// Disk consistency's memory (`disk.rs`).
    disk: disk::DiskWatch,
    /// Every response time clients saw (µs), summarised into `stats` by [`Observer::settle`].
    responses: Vec<u64>,
    /// When each request was sent and how long its reply took (µs), in reply order.
    timed_responses: Vec<(Time, u64)>,
    pub stats: ObservedStats,
}

impl Observer {
    pub fn new(enabled: BTreeSet<Invariant>, initial: WitnessState) -> Observer {
        let mut granted = BTreeMap::new();
        granted.insert(initial.generation, initial.primary);
        Observer {
            enabled,
            violation: None,
            witness: initial,
            granted,
            promoted: BTreeMap::new(),
            snapshots: BTreeMap::new(),
            last_capture: BTreeMap::new(),
            committed_max: BTreeMap::new(),
            instances: BTreeMap::new(),
            releasers: BTreeMap::new(),
            takeovers: BTreeMap::new(),
            handed: BTreeMap::new(),
            max_released: BTreeMap::new(),
            nodes: BTreeMap::new(),
            watch: None,
            disk: disk::DiskWatch::default(),
            responses: Vec::new(),
            timed_responses: Vec::new(),
            stats: ObservedStats {
                max_generation: initial.generation.0,
                ..ObservedStats::default()
            },
        }
    }

    pub fn violation(&self) -> Option<&Violation> {
        self.violation.as_ref()
    }

    /// Record a broken invariant (the first enabled one wins).
    pub fn fail(&mut self, inv: Invariant, at: Time, node: Option<NodeId>, detail: String) {
        let on = inv == Invariant::Driver || self.enabled.contains(&inv);
        if on && self.violation.is_none() {
            self.violation = Some(Violation {
                invariant: inv,
                at,
                node,
                detail,
            });
        }
    }

    // ---- performance as the clients and the VM see it -----------------------------------

    /// A primary captured a checkpoint of `scope`: counts the syncs.
    pub fn sync_captured(&mut self, scope: ftvm_model::Scope) {
        match scope {
            ftvm_model::Scope::Full => self.stats.full_syncs += 1,
            ftvm_model::Scope::Since(_) => self.stats.catch_ups += 1,
            ftvm_model::Scope::Epoch => {}
        }
    }

    /// A replica committed a full checkpoint.
    pub fn full_sync_committed(&mut self) {
        self.stats.full_syncs_committed += 1;
    }

    /// A capture kept a VM paused for `d`.
    pub fn paused(&mut self, d: std::time::Duration) {
        self.stats.paused_us += u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    }

    /// A client got its reply `d` after it first sent the request at `sent`.
    pub fn response(&mut self, sent: Time, d: std::time::Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.responses.push(us);
        self.timed_responses.push((sent, us));
    }

    /// The longest response (µs) to a request sent at or after `from`, with its send time.
    pub fn longest_response_from(&self, from: Time) -> Option<(Time, u64)> {
        self.timed_responses
            .iter()
            .copied()
            .filter(|(sent, _)| *sent >= from)
            .max_by_key(|(_, us)| *us)
    }

    /// Summarises what is kept per event into `stats` (at the end of a run).
    pub fn settle(&mut self) {
        self.responses.sort_unstable();
        let pct = |p: usize| {
            let n = self.responses.len();
            (n > 0).then(|| self.responses[((n - 1) * p).div_ceil(100)])
        };
        self.stats.response_p50_us = pct(50).unwrap_or(0);
        self.stats.response_p99_us = pct(99).unwrap_or(0);
    }

    // ---- node views --------------------------------------------------------------------

    pub fn status(&mut self, now: Time, node: NodeId, s: Status, vm_running: bool) {
        let was_primary = self
            .nodes
            .get(&node)
            .and_then(|v| v.status)
            .is_some_and(|o| o.role == RoleKind::Primary);
        if was_primary && s.role == RoleKind::Fenced {
            self.stats.fences += 1;
        }
        self.nodes
            .entry(node)
            .or_insert_with(NodeView::new)
            .update(now, s, vm_running);
    }

    pub fn set_alive(&mut self, node: NodeId, alive: bool) {
        let v = self.nodes.entry(node).or_insert_with(NodeView::new);
        v.alive = alive;
        if !alive {
            // A restarted host reports afresh; its old role must not linger meanwhile.
            v.vm_running = false;
            v.status = None;
        }
    }

    pub fn view(&self, node: NodeId) -> Option<&NodeView> {
        self.nodes.get(&node)
    }

    /// The up, unfenced primary of the highest generation (ties: lowest node id).
    pub fn active_primary(&self) -> Option<(NodeId, Generation)> {
        self.nodes
            .values()
            .filter_map(NodeView::as_primary)
            .max_by_key(|(n, g)| (*g, std::cmp::Reverse(*n)))
    }

    pub fn witness(&self) -> &WitnessState {
        &self.witness
    }

    // ---- witness -----------------------------------------------------------------------

    pub fn witness_handled(&mut self, reply: &WitnessReply) {
        let old = self.witness;
        let new = reply.state;
        if new.generation > old.generation {
            if let Some(p) = new.promoted {
                self.promoted.insert(old.generation, p);
            }
            self.granted.insert(new.generation, new.primary);
            self.stats.max_generation = self.stats.max_generation.max(new.generation.0);
        }
        self.witness = new;
    }

    // ---- VM instances and prefix consistency -------------------------------------------

    /// A VM starts on `node` (fresh primary or takeover).
    pub fn new_instance(&mut self, node: NodeId) -> Instance {
        let id = self.instances.len() as Instance + 1;
        self.instances.insert(id, node);
        id
    }

    pub fn captured(
        &mut self,
        now: Time,
        node: NodeId,
        instance: Instance,
        generation: Generation,
        epoch: Epoch,
        hash: Option<u64>,
    ) {
        self.stats.epochs += 1;
        if let Some(prev) = self.last_capture.insert(instance, epoch) {
            if epoch <= prev {
                self.fail(
                    Invariant::PrefixConsistency,
                    now,
                    Some(node),
                    format!("captured {epoch} after {prev}: epochs must strictly increase"),
                );
            }
        }
        self.snapshots.insert((node, generation, epoch), hash);
    }

    /// A replica on `node` committed `origin`; `since` is its sync epoch, `hash` its new state
    /// (a real run records none: then only "the primary captured that epoch" is checked).
    pub fn committed(
        &mut self,
        now: Time,
        node: NodeId,
        origin: Origin,
        since: Option<Epoch>,
        hash: Option<u64>,
    ) {
        self.stats.commits += 1;
        let key = (origin.primary, origin.generation, origin.epoch);
        match (self.snapshots.get(&key).copied(), hash) {
            (Some(Some(h)), Some(hash)) if h != hash => self.fail(
                Invariant::PrefixConsistency,
                now,
                Some(node),
                format!(
                    "replica after committing {} {} from {} has state {hash:016x}, but the \
                     primary's VM at the end of that epoch was {h:016x} (partial or mixed epochs)",
                    origin.generation, origin.epoch, origin.primary
                ),
            ),
            (Some(_), _) => {}
            (None, _) => self.fail(
                Invariant::PrefixConsistency,
                now,
                Some(node),
                format!(
                    "replica committed {} {} from {}, an epoch that primary never captured",
                    origin.generation, origin.epoch, origin.primary
                ),
            ),
        }
        if let Some(since) = since {
            let e = self
                .committed_max
                .entry((node, origin.generation, since))
                .or_insert(Epoch::NONE);
            *e = (*e).max(origin.epoch);
        }
    }

    /// A backup on `node` resumes the VM as `instance` from its replica: committed `from` of
    /// the stream of generation `lineage`, holding `counters`.
    pub fn restored(
        &mut self,
        now: Time,
        node: NodeId,
        instance: Instance,
        lineage: Generation,
        from: Epoch,
        counters: &[u64],
    ) {
        self.stats.failovers += 1;
        self.takeovers.insert(lineage, (instance, from));
        for (k, max) in &self.max_released {
            let have = counters.get(*k as usize).copied().unwrap_or(0);
            if have < *max {
                let detail = format!(
                    "VM resumed from {lineage} {from} with counter {k} = {have}, but a reply \
                     carrying {k} = {max} already left a host"
                );
                self.fail(Invariant::NoLostCommitments, now, Some(node), detail);
                return;
            }
        }
    }
}
