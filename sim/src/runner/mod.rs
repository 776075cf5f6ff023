//! One simulated run: build the turmoil world from a scenario, step it millisecond by
//! millisecond, fire faults, run the time-based checks, and judge the expectations at the end.

mod expect;
pub use expect::idle_pct;
mod faults;
mod registration;

pub(crate) use registration::HeldTokens;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use ftvm_model::{Generation, NodeId, RoleKind, Time, WitnessState};

use crate::host::{clients::run_clients, node::run_node, witness::run_witness};
use crate::net::shaper::Shaper;
use crate::observer::Observer;
use crate::report::{RunOptions, RunReport, RunStats, Verdict};
use crate::rng::SimRng;
use crate::scenario::{Scenario, VM_ID};
use crate::trace::{HostId, Trace, TraceKind};
use crate::world::{Shared, World};
use faults::FaultPlan;

/// Random stream of the link shaper.
const SHAPER_STREAM: u64 = 3_000;
/// Random stream of the witness-traffic disorder.
const DISORDER_STREAM: u64 = 5_000;

/// Run scenario `s` with `seed`. Never panics: a panic inside the simulation is reported as
/// [`Verdict::Crashed`].
pub fn run_scenario(s: &Scenario, seed: u64, opts: &RunOptions) -> RunReport {
    let wall = Instant::now();
    // With `swarm`, this seed's own timings; every bound below derives from them.
    let s = &s.swarmed(seed);
    let world = new_world(s, seed, opts);
    if s.swarm {
        let (t, n) = (&s.timing, &s.network);
        let what = format!(
            "swarm: epoch {:?}, heartbeat {:?}, failure timeout {:?}, witness retry {:?}, \
             join retry {:?}, latency {:?}..{:?}",
            t.epoch,
            t.heartbeat,
            t.failure_timeout,
            t.witness_retry,
            t.join_retry,
            n.latency_min,
            n.latency_max
        );
        world
            .borrow_mut()
            .note(Time::ZERO, HostId::Runner, TraceKind::Note(what));
    }
    let crashed = catch_unwind(AssertUnwindSafe(|| simulate(s, seed, &world))).err();
    let world = match Rc::try_unwrap(world) {
        Ok(cell) => cell.into_inner(),
        // A host future still holds the world (only possible after a panic): copy out.
        Err(rc) => return crashed_report(s, seed, &rc, wall),
    };
    let mut report = expect::judge(s, seed, world, wall.elapsed());
    if let Some(p) = crashed {
        report.verdict = Verdict::Crashed;
        report
            .unmet
            .insert(0, format!("simulation panicked: {}", panic_text(&p)));
    }
    report
}

fn new_world(s: &Scenario, seed: u64, opts: &RunOptions) -> Shared {
    #[allow(unused_mut)]
    let mut config = s.model_config();
    #[cfg(feature = "mutants")]
    {
        config.mutant = opts.mutant;
    }
    let initial = WitnessState::initial(VM_ID, NodeId(1));
    Rc::new(RefCell::new(World {
        scenario: s.clone(),
        config,
        seed,
        obs: Observer::new(s.expect.invariants.clone(), initial),
        trace: Trace::new(opts.trace),
        shaper: Shaper::new(
            &s.network,
            SimRng::derive(seed, SHAPER_STREAM),
            SimRng::derive(seed, DISORDER_STREAM),
        ),
        witness_disk: initial,
        starts: Default::default(),
        resume: Default::default(),
        catching_up: Default::default(),
        kept: s
            .faults
            .iter()
            .any(|f| {
                matches!(
                    f.action,
                    crate::scenario::FaultAction::Restart {
                        keep_replica: true,
                        ..
                    }
                )
            })
            .then(BTreeMap::new),
        sending: Default::default(),
        bytes_sent: 0,
        unfired: Vec::new(),
        elapsed: Duration::ZERO,
        held_tokens: HeldTokens::default(),
        journals: opts.journals.then(BTreeMap::new),
        witness_journal: opts.journals.then(Vec::new),
    }))
}

/// The simulation's outcome is recorded in the world (observer, trace, faults left).
fn simulate(s: &Scenario, seed: u64, world: &Shared) {
    let mut sim = turmoil::Builder::new()
        .tick_duration(s.network.step)
        .simulation_duration(s.duration + Duration::from_secs(60))
        .epoch(UNIX_EPOCH)
        .rng_seed(seed)
        .enable_random_order()
        .min_message_latency(s.network.latency_min)
        .max_message_latency(s.network.latency_max)
        .build();
    let mut hosts = vec![HostId::Witness];
    let w = world.clone();
    sim.host(HostId::Witness.name(), move || run_witness(w.clone()));
    for k in 1..=s.topology.nodes {
        let node = NodeId(k);
        hosts.push(HostId::Node(node));
        let w = world.clone();
        sim.host(HostId::Node(node).name(), move || run_node(w.clone(), node));
    }
    hosts.push(HostId::Clients);
    let w = world.clone();
    sim.host(HostId::Clients.name(), move || run_clients(w.clone()));

    let mut plan = FaultPlan::new(s, seed, hosts);
    let budget = liveness_budget(s);
    while sim.elapsed() < s.duration {
        let now = sim.elapsed();
        let t = Time::from_duration(now);
        // Judge what the last step produced, once, before this instant's faults change it: a
        // VM that started serving in that step and crashes now did serve. (A watch armed by
        // these faults cannot be met or missed at the instant it is armed.)
        world.borrow_mut().obs.check_liveness(t);
        let before = world.borrow().obs.active_primary();
        if plan.fire_due(&mut sim, world, now) > 0 {
            watch_liveness(world, &plan, t, before, budget);
        }
        if world.borrow().obs.violation().is_some() {
            break;
        }
        let stepped = sim.step();
        {
            let mut wb = world.borrow_mut();
            HeldTokens::note(&mut wb);
            HeldTokens::check(&mut wb, Time::from_duration(sim.elapsed()));
        }
        // A primary that stopped its VM in this step while the witness still names it (a fence
        // that was no takeover): its backup must notice the silence and take over in time.
        if before.is_some_and(|(p, _)| fenced(world, p)) {
            let t = Time::from_duration(sim.elapsed());
            watch_liveness(world, &plan, t, before, budget);
        }
        if let Err(e) = stepped {
            let mut wb = world.borrow_mut();
            wb.note(
                t,
                HostId::Runner,
                TraceKind::Note(format!("simulation error: {e}")),
            );
            wb.obs.fail(
                crate::invariant::Invariant::Driver,
                t,
                None,
                format!("a host's software failed: {e}"),
            );
            break;
        }
    }
    let mut wb = world.borrow_mut();
    wb.unfired = plan.unfired().map(|f| f.action.to_string()).collect();
    wb.elapsed = sim.elapsed();
}

/// Whether node `p` has fenced itself.
fn fenced(world: &Shared, p: NodeId) -> bool {
    world
        .borrow()
        .obs
        .view(p)
        .and_then(|v| v.status)
        .is_some_and(|s| s.role == RoleKind::Fenced)
}

/// Failure timeout + restore + slack + a witness round trip at the worst latency.
fn liveness_budget(s: &Scenario) -> Duration {
    s.timing.failure_timeout
        + s.timing.restore
        + s.expect.liveness_slack
        + s.network.latency_max * 4
}

/// After faults fired, or after a step in which the active primary fenced itself: if that
/// primary (as it was before) is now dead, fenced or cut off from its registered backup, that
/// backup is up, registered and has a clean path to the witness, and the primary is dead or
/// has a clean path to the witness too, a VM must serve
/// again within the budget. A watch whose backup or live primary lost its path is dropped (the
/// promise no longer applies).
fn watch_liveness(
    world: &Shared,
    plan: &FaultPlan,
    t: Time,
    before: Option<(NodeId, Generation)>,
    budget: Duration,
) {
    let mut wb = world.borrow_mut();
    let clean_path = |wb: &World, b: NodeId| {
        let (bh, wh) = (HostId::Node(b), HostId::Witness);
        !plan.is_down(bh)
            && !plan.is_down(wh)
            && !plan.blocked(bh, wh)
            && !plan.blocked(wh, bh)
            && wb.shaper.loss(bh, wh) == 0.0
            && wb.shaper.loss(wh, bh) == 0.0
            // Reordered witness traffic or lost replies may hold a takeover up by as much as
            // the disorder's delay bound: such a path is not clean either.
            && !wb.shaper.disorder.config().slows()
    };
    // A live primary whose path to the witness is damaged may still win the race for the
    // register (its requests get through) and then never hear that it won: nobody can serve
    // until the path heals, and no protocol could do better. The promise needs the primary
    // either dead or cleanly connected to the witness.
    let primary_ok = |wb: &World, p: NodeId| plan.is_down(HostId::Node(p)) || clean_path(wb, p);
    if let Some((p, b)) = wb.obs.watched() {
        let why = if !clean_path(&wb, b) {
            Some(format!("{b} lost its path to the witness"))
        } else if !primary_ok(&wb, p) {
            Some(format!("the live {p} has a damaged path to the witness"))
        } else {
            None
        };
        if let Some(why) = why {
            wb.obs.disarm_liveness();
            wb.note(
                t,
                HostId::Runner,
                TraceKind::Note(format!("liveness watch dropped: {why}")),
            );
        }
    }
    let Some((p, g)) = before else { return };
    let ws = *wb.obs.witness();
    let Some(r) = ws.backup.filter(|_| ws.generation == g && ws.primary == p) else {
        return;
    };
    let ready = wb.obs.view(r.node).is_some_and(|v| {
        v.alive
            && v.status
                .is_some_and(|s| s.registration == Some(r) && s.generation == g)
    });
    let (ph, bh) = (HostId::Node(p), HostId::Node(r.node));
    let stopped = wb
        .obs
        .view(p)
        .and_then(|v| v.status)
        .is_some_and(|s| s.role == RoleKind::Fenced);
    let lost = plan.is_down(ph) || plan.blocked(ph, bh) || plan.blocked(bh, ph) || stopped;
    if ready && lost && clean_path(&wb, r.node) && primary_ok(&wb, p) {
        wb.obs.arm_liveness(t, p, g, r.node, t + budget);
        wb.note(
            t,
            HostId::Runner,
            TraceKind::Note(format!(
                "liveness watch: {p} of {g} lost, {} must serve by {}",
                r.node,
                t + budget
            )),
        );
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn crashed_report(s: &Scenario, seed: u64, world: &Shared, wall: Instant) -> RunReport {
    let wb = world.borrow();
    RunReport {
        scenario: s.name.clone(),
        seed,
        verdict: Verdict::Crashed,
        violation: wb.obs.violation().cloned(),
        unmet: vec!["simulation panicked and left its world borrowed".into()],
        trace: Vec::new(),
        stats: RunStats {
            wall_s: wall.elapsed().as_secs_f64(),
            ..RunStats::default()
        },
        journals: Vec::new(),
        witness_journal: Vec::new(),
    }
}
