//! Every scenario file over a fixed set of seeds: all invariants hold and every expectation of
//! the file is met. `ftvm sim scenarios/<name>.toml --seeds 0..200` runs the wider sweep.

use ftvm_model::{Action, Event, NodeId, WitnessRequest};
use ftvm_sim::{run_scenario, HostId, RunOptions, Scenario, TraceKind, Verdict};
use ftvm_tests::{assert_pass, load, scenario_names};

/// Seeds every scenario runs with under `cargo test` (a fixed set: a failure names its seed).
const SEEDS: std::ops::Range<u64> = 0..24;

/// The scenarios the protocol must be shown to survive; a missing file fails the suite.
const REQUIRED: [&str; 13] = [
    "steady",
    "primary-crash-mid-epoch",
    "primary-crash-mid-transfer",
    "backup-crash-reprotect",
    "link-cut",
    "primary-isolated",
    "loss-5pct",
    "slow-link",
    "flapping-link",
    "crash-during-initial-sync",
    "new-primary-failure",
    "forged-generation",
    "fenced-primary-goes-silent",
];

#[test]
fn every_required_scenario_has_a_file() {
    let names = scenario_names();
    for r in REQUIRED {
        assert!(
            names.iter().any(|n| n == r),
            "scenarios/{r}.toml is missing"
        );
    }
}

#[test]
fn every_scenario_file_parses_and_checks() {
    for name in scenario_names() {
        let s = load(&name);
        assert_eq!(
            s.name, name,
            "scenarios/{name}.toml names itself {:?}",
            s.name
        );
        s.check()
            .unwrap_or_else(|e| panic!("scenarios/{name}.toml: {e}"));
        assert!(!s.description.trim().is_empty(), "{name}: no description");
    }
}

/// One test per scenario, so a failure names the scenario and the others still run.
macro_rules! scenario_tests {
    ($($test:ident => $file:literal),* $(,)?) => {
        /// The scenario files that have a test below.
        const TESTED: &[&str] = &[$($file),*];
        $(
        #[test]
        fn $test() {
            let s = load($file);
            let mut epochs = 0;
            for seed in SEEDS {
                epochs += assert_pass(&s, seed).stats.observed.epochs;
            }
            // And under the other epoch policy: every invariant and expectation but the
            // response time a file promises for its own policy.
            let mut other = ftvm_tests::under_other_policy(&s);
            other.expect.max_response_p50 = None;
            for seed in SEEDS {
                epochs += assert_pass(&other, seed).stats.observed.epochs;
            }
            // A run that checkpoints nothing proves nothing.
            assert!(epochs > 0, "{}: no epoch was committed over {SEEDS:?}", $file);
        }
    )*};
}

scenario_tests! {
    steady => "steady",
    primary_crash_mid_epoch => "primary-crash-mid-epoch",
    primary_crash_mid_transfer => "primary-crash-mid-transfer",
    backup_crash_reprotect => "backup-crash-reprotect",
    link_cut => "link-cut",
    primary_isolated => "primary-isolated",
    loss_5pct => "loss-5pct",
    slow_link => "slow-link",
    flapping_link => "flapping-link",
    crash_during_initial_sync => "crash-during-initial-sync",
    new_primary_failure => "new-primary-failure",
    corrupt_checkpoint => "corrupt-checkpoint",
    witness_outage => "witness-outage",
    forged_generation => "forged-generation",
    fenced_primary_goes_silent => "fenced-primary-goes-silent",
    stale_witness_traffic => "stale-witness-traffic",
    witness_retried_transaction => "witness-retried-transaction",
    register_overtaken => "register-overtaken",
    output_driven_epochs => "output-driven-epochs",
    disk_crash_mid_epoch => "disk-crash-mid-epoch",
    disk_failover_during_sync => "disk-failover-during-sync",
    corrupt_then_crash_during_catch_up => "corrupt-then-crash-during-catch-up",
    flapping_link_30 => "flapping-link-30",
    backup_restart_keeps_replica => "backup-restart-keeps-replica",
    reprotect_large_vm => "reprotect-large-vm",
}

/// A scenario file added without a test above would go unchecked: list them all here.
#[test]
fn every_scenario_file_has_a_test() {
    for name in scenario_names() {
        assert!(
            TESTED.contains(&name.as_str()),
            "scenarios/{name}.toml has no test in tests/tests/scenario_suite.rs"
        );
    }
}

/// Every scenario file also passes, expectations included, when each seed draws its own
/// protocol timings and latencies (`swarm`): the bounds derived from the timings follow the
/// ones drawn, and the timings the files picked are not the only ones the protocol survives.
#[test]
fn every_scenario_passes_with_swarmed_timings() {
    for name in scenario_names() {
        let mut s = load(&name);
        s.swarm = true;
        let mut timings = std::collections::BTreeSet::new();
        for seed in 0..6 {
            let r = assert_pass(&s, seed);
            assert!(r.stats.observed.epochs > 0, "{name} seed {seed}: no epoch");
            let t = s.swarmed(seed).timing;
            timings.insert((t.epoch, t.failure_timeout, t.witness_retry));
        }
        assert!(timings.len() > 1, "{name}: every seed ran the same timings");
    }
}

/// Same scenario and seed ⇒ byte-identical trace; another seed ⇒ another run.
#[test]
fn runs_replay_from_their_seed() {
    for name in [
        "primary-crash-mid-transfer",
        "loss-5pct",
        "new-primary-failure",
    ] {
        let s = load(name);
        let opts = RunOptions::default().traced(true);
        let render = |seed| {
            let r = run_scenario(&s, seed, &opts);
            assert_ne!(r.verdict, Verdict::Crashed, "{}", r.summary());
            r.trace.iter().map(|e| format!("{e}\n")).collect::<String>()
        };
        let a = render(5);
        assert!(
            a.lines().count() > 100,
            "{name}: trace too short to mean anything"
        );
        assert_eq!(a, render(5), "{name}: seed 5 did not replay identically");
        assert_ne!(a, render(6), "{name}: seeds 5 and 6 gave the same trace");
    }
}

/// The expectations are judged, not just the invariants: a scenario whose fault cannot fire
/// or whose expectation cannot be met is reported `UNMET`, not passed.
#[test]
fn unmet_expectations_fail_the_run() {
    let mut s = load("steady");
    s.expect.failover = Some(true);
    let r = run_scenario(&s, 0, &RunOptions::default());
    assert_eq!(r.verdict, Verdict::Unmet, "{}", r.summary());
    assert!(!r.unmet.is_empty());
}

/// The forged frames of `forged-generation` do reach the primary (a forgery that never arrived
/// would pass without proving anything), and each is only a claim: it asks the witness and
/// never fences.
#[test]
fn forged_generations_reach_the_primary_and_are_only_checked() {
    let s = load("forged-generation");
    for seed in 0..4 {
        let r = run_scenario(&s, seed, &RunOptions::default().traced(true));
        assert_eq!(r.verdict, Verdict::Pass, "seed {seed}: {}", r.summary());
        let claims = r
            .trace
            .iter()
            .filter(|e| {
                matches!(
                    e.what,
                    TraceKind::Action(Action::Log(Event::GenerationClaimed { .. }))
                )
            })
            .count();
        assert!(claims >= 2, "seed {seed}: {claims} claim(s) seen, 2 forged");
        let queries = r
            .trace
            .iter()
            .filter(|e| {
                e.host == HostId::Node(NodeId(1))
                    && matches!(
                        e.what,
                        TraceKind::Action(Action::ToWitness(WitnessRequest::Query))
                    )
            })
            .count();
        assert!(
            queries >= 2,
            "seed {seed}: the primary asked {queries} time(s)"
        );
        assert_eq!(r.stats.observed.fences, 0, "seed {seed}");
    }
}

/// In `fenced-primary-goes-silent` the primary does fence with its backup still following, the
/// liveness watch is armed by the fence, and the backup's takeover ends the outage within the
/// failure timeout plus a witness round trip and the restore.
#[test]
fn a_fenced_primary_is_replaced_after_its_silence() {
    let s = load("fenced-primary-goes-silent");
    let most = s.timing.failure_timeout + s.timing.restore + s.timing.heartbeat * 2;
    for seed in 0..4 {
        let r = assert_pass(&s, seed);
        let o = &r.stats.observed;
        assert_eq!(o.fences, 1, "seed {seed}");
        assert_eq!(o.failovers, 1, "seed {seed}");
        assert_eq!(o.outages_ms.len(), 1, "seed {seed}: {:?}", o.outages_ms);
        let out = std::time::Duration::from_millis(o.outages_ms[0]);
        assert!(
            out <= most + s.network.latency_max * 4 + s.network.step * 2,
            "seed {seed}: outage {out:?}"
        );
    }
}

/// The witness disorder of `stale-witness-traffic` does what the safety argument assumes a
/// network may do: stale `RegisterBackup` requests reach the witness after the register voided
/// their token (and are refused), replies are lost after the witness acted, and requests and
/// replies arrive twice or late.
#[test]
fn stale_witness_requests_arrive_after_the_register_changed() {
    let s = load("stale-witness-traffic");
    let (mut refused_stale, mut lost, mut twice, mut late) = (0, 0, 0, 0);
    for seed in 0..6 {
        let r = run_scenario(&s, seed, &RunOptions::default().traced(true));
        assert_eq!(r.verdict, Verdict::Pass, "seed {seed}: {}", r.summary());
        for e in &r.trace {
            match &e.what {
                TraceKind::Witness(reply) => {
                    if let WitnessRequest::RegisterBackup { backup, .. } = reply.request {
                        if !reply.granted && reply.state.floor >= backup.since {
                            refused_stale += 1;
                        }
                    }
                }
                TraceKind::Note(n) if n.contains("lost") => lost += 1,
                TraceKind::Note(n) if n.contains("arrive again") => twice += 1,
                TraceKind::Note(n) if n.contains("held back") => late += 1,
                _ => {}
            }
        }
    }
    assert!(
        refused_stale > 0,
        "no stale RegisterBackup reached the witness"
    );
    assert!(lost > 0, "no witness reply was lost");
    assert!(twice > 0, "no witness message arrived twice");
    assert!(late > 0, "no witness message arrived only late");
}

/// `[expect_real]` replaces what it names for real hosts only, and must say why.
#[test]
fn real_host_expectations_replace_only_what_they_name() {
    let s = load("fenced-primary-goes-silent");
    assert_eq!(s.expect.failover, Some(true));
    let (real, why) = s.on_real_hosts();
    assert!(why.is_some_and(|w| w.contains("sealed")));
    assert_eq!(real.expect.failover, Some(false));
    assert_eq!(real.expect.min_generation, Some(1));
    assert_eq!(real.expect.max_fences, Some(0));
    assert_eq!(real.expect.min_replies, s.expect.min_replies);
    let (same, none) = load("steady").on_real_hosts();
    assert!(none.is_none());
    assert_eq!(same, load("steady"));
    let text = "name = \"x\"\nduration_ms = 1000\n[expect_real]\nwhy = \" \"\nfailover = false\n";
    let err = Scenario::from_toml(text, "inline").unwrap_err().to_string();
    assert!(err.contains("expect_real.why"), "{err}");
}

/// What the output epoch policy is for, shown in the simulator on the same seeds: clients get
/// their replies at least twice as fast as under fixed 25 ms epochs, the service answers at
/// least as many requests, and the VM stays paused no more than the policy's bound.
#[test]
fn output_driven_epochs_answer_faster_within_their_idle_bound() {
    let output = load("output-driven-epochs");
    let ftvm_model::EpochPolicy::Output(bounds) = output.timing.epoch_policy else {
        panic!("output-driven-epochs.toml must use the output policy");
    };
    let mut fixed = output.with_epoch_policy(ftvm_model::EpochPolicy::Fixed);
    fixed.expect.max_response_p50 = None;
    fixed.expect.max_idle_pct = None;
    for seed in 0..6 {
        let o = assert_pass(&output, seed).stats;
        let f = assert_pass(&fixed, seed).stats;
        let (op, fp) = (o.observed.response_p50_us, f.observed.response_p50_us);
        assert!(
            op > 0 && op * 2 <= fp,
            "seed {seed}: response p50 {op} µs under the output policy, {fp} µs fixed"
        );
        assert!(
            o.observed.replies_seen >= f.observed.replies_seen,
            "seed {seed}: {} replies under the output policy, {} fixed",
            o.observed.replies_seen,
            f.observed.replies_seen
        );
        let idle = ftvm_sim::idle_pct(
            o.observed.paused_us,
            std::time::Duration::from_millis(o.sim_ms),
        );
        assert!(
            idle > 0.0 && idle <= f64::from(bounds.max_idle_pct),
            "seed {seed}: VM paused {idle:.1}% (bound {}%)",
            bounds.max_idle_pct
        );
    }
}
