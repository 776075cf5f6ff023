//! Firing a scenario's faults on the turmoil world at the right moment, and keeping the
//! link state consistent: the partitions in force are the explicit ones plus every link of a
//! host that died silently; holds are tracked apart (turmoil cannot mix the two on a link).

use std::collections::BTreeSet;
use std::time::Duration;

use ftvm_model::{Epoch, Generation, NodeId, PeerMsg, Phase, RejectReason, RoleKind, Time};
use turmoil::Sim;

use crate::rng::SimRng;
use crate::scenario::{
    Fault, FaultAction, ForgedFrame, HostRef, Scenario, Trigger, WitnessDisorder, VM_ID, WITNESS_ID,
};
use crate::trace::{HostId, TraceKind};
use crate::world::Shared;

/// Random stream of the fault jitter.
const JITTER_STREAM: u64 = 2_000;

pub(crate) struct FaultPlan {
    /// (fire at, fault), in firing order.
    pending: Vec<(Duration, Fault)>,
    hosts: Vec<HostId>,
    /// Directed cuts asked for by faults.
    cuts: BTreeSet<(HostId, HostId)>,
    /// Hosts that lost power: all their links are dark.
    dark: BTreeSet<HostId>,
    /// Crashed hosts.
    down: BTreeSet<HostId>,
    /// Held pairs (ordered low, high).
    held: BTreeSet<(HostId, HostId)>,
    /// Directed cuts currently applied in turmoil.
    applied: BTreeSet<(HostId, HostId)>,
}

fn pair(a: HostId, b: HostId) -> (HostId, HostId) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

impl FaultPlan {
    pub fn new(s: &Scenario, seed: u64, hosts: Vec<HostId>) -> FaultPlan {
        let mut rng = SimRng::derive(seed, JITTER_STREAM);
        let mut pending: Vec<(Duration, Fault)> = s
            .faults
            .iter()
            .map(|f| {
                let j = rng.below(f.jitter.as_micros() as u64 + 1);
                (f.at + Duration::from_micros(j), f.clone())
            })
            .collect();
        pending.sort_by_key(|(at, _)| *at);
        FaultPlan {
            pending,
            hosts,
            cuts: BTreeSet::new(),
            dark: BTreeSet::new(),
            down: BTreeSet::new(),
            held: BTreeSet::new(),
            applied: BTreeSet::new(),
        }
    }

    /// Faults that never fired.
    pub fn unfired(&self) -> impl Iterator<Item = &Fault> {
        self.pending.iter().map(|(_, f)| f)
    }

    pub fn is_down(&self, h: HostId) -> bool {
        self.down.contains(&h)
    }

    /// No message can pass `a → b` (cut, dark or held).
    pub fn blocked(&self, a: HostId, b: HostId) -> bool {
        self.cuts.contains(&(a, b))
            || self.dark.contains(&a)
            || self.dark.contains(&b)
            || self.held.contains(&pair(a, b))
    }

    /// Fire every fault whose time has come and whose trigger holds, in order. A fault
    /// waiting on its trigger (or on a host alias that names nobody yet) holds back the
    /// faults after it, so the file's order is kept.
    pub fn fire_due(&mut self, sim: &mut Sim<'_>, w: &Shared, now: Duration) -> usize {
        let mut fired = 0;
        while let Some((at, f)) = self.pending.first() {
            if *at > now || !trigger_holds(w, f.when) {
                break;
            }
            let f = f.clone();
            let Some(action) = self.resolve(w, &f.action) else {
                break;
            };
            self.pending.remove(0);
            let t = Time::from_duration(now);
            w.borrow_mut()
                .note(t, HostId::Runner, TraceKind::Fault(action.describe()));
            self.apply(sim, w, t, &action);
            fired += 1;
        }
        fired
    }

    fn resolve(&self, w: &Shared, a: &FaultAction) -> Option<Resolved> {
        let h = |r: &HostRef| resolve_host(w, *r);
        Some(match a {
            FaultAction::Crash { host, silent } => Resolved::Crash(h(host)?, *silent),
            FaultAction::Restart { host, keep_replica } => {
                Resolved::Restart(h(host)?, *keep_replica)
            }
            FaultAction::Partition { a, b, oneway } => Resolved::Cut(h(a)?, h(b)?, *oneway, true),
            FaultAction::Repair { a, b, oneway } => Resolved::Cut(h(a)?, h(b)?, *oneway, false),
            FaultAction::Isolate { host } => Resolved::Isolate(h(host)?),
            FaultAction::Heal => Resolved::Heal,
            FaultAction::Hold { a, b } => Resolved::Hold(h(a)?, h(b)?, true),
            FaultAction::Release { a, b } => Resolved::Hold(h(a)?, h(b)?, false),
            FaultAction::Loss { link: None, rate } => Resolved::Loss(None, *rate),
            FaultAction::Loss {
                link: Some((a, b)),
                rate,
            } => Resolved::Loss(Some((h(a)?, h(b)?)), *rate),
            FaultAction::Latency { a, b, min, max } => Resolved::Latency(h(a)?, h(b)?, *min, *max),
            FaultAction::Bandwidth { a, b, bytes_per_ms } => {
                Resolved::Bandwidth(h(a)?, h(b)?, *bytes_per_ms)
            }
            FaultAction::Corrupt { from, to } => Resolved::Corrupt(h(from)?, h(to)?),
            FaultAction::ForgeGeneration {
                from,
                to,
                frame,
                generation,
            } => {
                let (a, b) = (h(from)?, h(to)?);
                let HostId::Node(sender) = a else { return None };
                let msg = forged_msg(&w.borrow().scenario, sender, *frame, *generation);
                Resolved::Forge(a, b, msg)
            }
            FaultAction::ForgeWitnessReply { host } => Resolved::ForgeReply(h(host)?),
            FaultAction::WitnessDisorder(d) => Resolved::Disorder(*d),
        })
    }

    fn apply(&mut self, sim: &mut Sim<'_>, w: &Shared, t: Time, action: &Resolved) {
        match *action {
            Resolved::Crash(host, silent) => {
                if let HostId::Node(n) = host {
                    w.borrow_mut().obs.set_alive(n, false);
                }
                if silent {
                    self.dark.insert(host);
                    self.reconcile(sim);
                }
                sim.crash(host.name());
                self.down.insert(host);
            }
            Resolved::Restart(host, keep) => {
                // Only a crashed host can be started again: bouncing a running one would wipe
                // its replica behind the checkers' back (a crash nobody scheduled).
                if !self.down.contains(&host) {
                    w.borrow_mut().note(
                        t,
                        HostId::Runner,
                        TraceKind::Note(format!("restart {host} ignored: it is running")),
                    );
                    return;
                }
                self.dark.remove(&host);
                self.reconcile(sim);
                if let HostId::Node(n) = host {
                    let mut world = w.borrow_mut();
                    if keep {
                        world.resume.insert(n);
                    } else {
                        world.resume.remove(&n);
                    }
                }
                sim.bounce(host.name());
                self.down.remove(&host);
                if let HostId::Node(n) = host {
                    w.borrow_mut().obs.set_alive(n, true);
                }
            }
            Resolved::Cut(a, b, oneway, cut) => {
                let mut set = |x, y| {
                    if cut {
                        self.cuts.insert((x, y));
                    } else {
                        self.cuts.remove(&(x, y));
                    }
                };
                set(a, b);
                if !oneway {
                    set(b, a);
                }
                self.reconcile(sim);
            }
            Resolved::Isolate(host) => {
                for &o in self.hosts.iter().filter(|o| **o != host) {
                    self.cuts.insert((host, o));
                    self.cuts.insert((o, host));
                }
                self.reconcile(sim);
            }
            Resolved::Heal => {
                self.cuts.clear();
                for (a, b) in std::mem::take(&mut self.held) {
                    sim.release(a.name(), b.name());
                    self.applied.remove(&(a, b));
                    self.applied.remove(&(b, a));
                }
                self.reconcile(sim);
            }
            Resolved::Hold(a, b, hold) => {
                // A hold replaces the link's state in turmoil; cuts are re-applied at release.
                self.applied.remove(&(a, b));
                self.applied.remove(&(b, a));
                if hold {
                    sim.hold(a.name(), b.name());
                    self.held.insert(pair(a, b));
                } else {
                    sim.release(a.name(), b.name());
                    self.held.remove(&pair(a, b));
                    self.reconcile(sim);
                }
            }
            Resolved::Loss(link, rate) => {
                let mut world = w.borrow_mut();
                match link {
                    None => world.shaper.set_loss_everywhere(rate),
                    Some((a, b)) => world.shaper.set_loss(a, b, rate),
                }
            }
            Resolved::Latency(a, b, min, max) => {
                sim.set_link_latency(a.name(), b.name(), min);
                sim.set_link_max_message_latency(a.name(), b.name(), max);
            }
            Resolved::Bandwidth(a, b, bw) => w.borrow_mut().shaper.set_bandwidth(a, b, bw),
            Resolved::Corrupt(a, b) => w.borrow_mut().shaper.arm_corruption(a, b),
            Resolved::Forge(a, b, msg) => {
                let frame = ftvm_model::wire::encode_peer(VM_ID, &msg);
                w.borrow_mut().shaper.arm_forgery(a, b, frame);
            }
            Resolved::ForgeReply(host) => w.borrow_mut().shaper.arm_reply_forgery(host),
            Resolved::Disorder(d) => w.borrow_mut().shaper.disorder.set(d),
        }
        let _ = t;
    }

    /// Bring turmoil's directed partitions in line with `cuts` ∪ links of dark hosts, leaving
    /// held pairs alone.
    fn reconcile(&mut self, sim: &mut Sim<'_>) {
        let mut want = self.cuts.clone();
        for &d in &self.dark {
            for &o in self.hosts.iter().filter(|o| **o != d) {
                want.insert((d, o));
                want.insert((o, d));
            }
        }
        want.retain(|(a, b)| !self.held.contains(&pair(*a, *b)));
        for &(a, b) in want.difference(&self.applied) {
            sim.partition_oneway(a.name(), b.name());
        }
        for &(a, b) in self.applied.difference(&want) {
            if !self.held.contains(&pair(a, b)) {
                sim.repair_oneway(a.name(), b.name());
            }
        }
        self.applied = want;
    }
}

/// A fault with its hosts resolved.
enum Resolved {
    Crash(HostId, bool),
    Restart(HostId, bool),
    Cut(HostId, HostId, bool, bool),
    Isolate(HostId),
    Heal,
    Hold(HostId, HostId, bool),
    Loss(Option<(HostId, HostId)>, f64),
    Latency(HostId, HostId, Duration, Duration),
    Bandwidth(HostId, HostId, Option<u64>),
    Corrupt(HostId, HostId),
    Forge(HostId, HostId, PeerMsg),
    ForgeReply(HostId),
    Disorder(WitnessDisorder),
}

impl Resolved {
    fn describe(&self) -> String {
        match self {
            Resolved::Crash(h, silent) => {
                format!(
                    "crash {h}{}",
                    if *silent {
                        " (power cut)"
                    } else {
                        " (process)"
                    }
                )
            }
            Resolved::Restart(h, false) => format!("restart {h}"),
            Resolved::Restart(h, true) => format!("restart {h} keeping its replica"),
            Resolved::Cut(a, b, oneway, cut) => format!(
                "{} {a} {} {b}",
                if *cut { "partition" } else { "repair" },
                if *oneway { "->" } else { "<->" }
            ),
            Resolved::Isolate(h) => format!("isolate {h}"),
            Resolved::Heal => "heal every link".into(),
            Resolved::Hold(a, b, hold) => {
                format!("{} {a} <-> {b}", if *hold { "hold" } else { "release" })
            }
            Resolved::Loss(None, r) => format!("loss {r} on every link"),
            Resolved::Loss(Some((a, b)), r) => format!("loss {r} on {a} <-> {b}"),
            Resolved::Latency(a, b, min, max) => format!(
                "latency {a} <-> {b} {}..{} ms",
                min.as_millis(),
                max.as_millis()
            ),
            Resolved::Bandwidth(a, b, Some(bw)) => format!("bandwidth {a} <-> {b} {bw} B/ms"),
            Resolved::Bandwidth(a, b, None) => format!("bandwidth {a} <-> {b} unlimited"),
            Resolved::Corrupt(a, b) => format!("damage the next checkpoint {a} -> {b}"),
            Resolved::Forge(a, b, msg) => format!("forge {msg:?} on the link {a} -> {b}"),
            Resolved::ForgeReply(h) => format!("forge the next witness reply to {h}"),
            Resolved::Disorder(d) => d.to_string(),
        }
    }
}

/// The message a `forge-generation` fault slips onto a link from `sender`.
fn forged_msg(s: &Scenario, sender: NodeId, frame: ForgedFrame, generation: u64) -> PeerMsg {
    let generation = Generation(generation);
    match frame {
        ForgedFrame::Join => PeerMsg::Join {
            vm: VM_ID,
            node: sender,
            ram_pages: s.vm.pages,
            page_size: s.vm.page_size,
            known: generation,
            disk_blocks: 0,
            replica: None,
        },
        ForgedFrame::Heartbeat => PeerMsg::Heartbeat {
            generation,
            epoch: Epoch(1),
        },
        ForgedFrame::Ack => PeerMsg::Ack {
            generation,
            epoch: Epoch(1),
        },
        ForgedFrame::Reject => PeerMsg::Reject {
            generation,
            reason: RejectReason::Busy,
        },
    }
}

/// The active primary as the observer sees it.
fn active_primary(w: &Shared) -> Option<NodeId> {
    w.borrow().obs.active_primary().map(|(n, _)| n)
}

fn resolve_host(w: &Shared, r: HostRef) -> Option<HostId> {
    match r {
        HostRef::Node(k) => Some(HostId::Node(NodeId(k))),
        HostRef::Witness => Some(HostId::Witness),
        HostRef::Clients => Some(HostId::Clients),
        HostRef::Primary => active_primary(w).map(HostId::Node),
        HostRef::Backup => backup_of_active(w).map(HostId::Node),
        HostRef::Spare => {
            let p = active_primary(w)?;
            let b = backup_of_active(w);
            let world = w.borrow();
            let n = world.scenario.topology.nodes;
            (1..=n)
                .map(NodeId)
                .filter(|k| *k != p && Some(*k) != b)
                .find(|k| world.obs.view(*k).is_some_and(|v| v.alive))
                .map(HostId::Node)
        }
    }
}

/// The backup following the active primary.
fn backup_of_active(w: &Shared) -> Option<NodeId> {
    let p = active_primary(w)?;
    let world = w.borrow();
    let peer = world.obs.view(p)?.status?.peer?;
    let v = world.obs.view(peer)?;
    let s = v.status?;
    (v.alive && s.role == RoleKind::Backup && peer != WITNESS_ID).then_some(peer)
}

fn trigger_holds(w: &Shared, when: Trigger) -> bool {
    if when == Trigger::At {
        return true;
    }
    let Some(p) = active_primary(w) else {
        return false;
    };
    let world = w.borrow();
    let progress = world.sending.get(&p).copied();
    let sending = progress.is_some();
    // Mid-transfer: at least half of the checkpoint is on the wire, not all of it.
    let half_sent = progress.is_some_and(|(done, total)| done * 2 >= total && done < total);
    let phase = world.obs.view(p).and_then(|v| v.status).map(|s| s.phase);
    match when {
        Trigger::At => true,
        Trigger::Sending => half_sent,
        Trigger::BetweenCheckpoints => !sending,
        Trigger::Syncing => phase == Some(Phase::Syncing),
        Trigger::Registering => phase == Some(Phase::Registering),
        Trigger::Protected => phase == Some(Phase::Protected),
        Trigger::CatchingUp => {
            let acked = world.obs.view(p).and_then(|v| v.status).map(|s| s.acked);
            world
                .catching_up
                .get(&p)
                .is_some_and(|&e| acked.is_some_and(|a| a < e))
        }
    }
}
