//! Mutants prove the checkers: each planted protocol bug (ftvm-model's `mutants` feature) must
//! be caught by the simulator's invariant checkers within a bounded number of seeds, by the
//! invariant it breaks, on a run that passes without the bug. A checker that catches nothing is
//! not a checker.
//!
//! Run with `cargo test -p ftvm-tests --features mutants` (`.ci/test` does). The test prints,
//! per mutant and scenario, the first seed that caught it.
#![cfg(feature = "mutants")]

use ftvm_model::Mutant;
use ftvm_sim::{run_scenario, Invariant, RunOptions, Scenario, Verdict};
use ftvm_tests::{load, scenario_names, under_other_policy};

/// Seeds tried per mutant and scenario before giving up on that pair.
const SEED_BOUND: u64 = 20;

/// The invariants a mutant may legitimately be caught by (the bug it plants breaks these).
fn breaks(m: Mutant) -> &'static [Invariant] {
    match m {
        Mutant::ReleaseBeforeAck => &[Invariant::OutputCommit],
        Mutant::CommitPartial => &[Invariant::PrefixConsistency],
        Mutant::FailoverWithoutWitness => &[Invariant::SingleActive, Invariant::NoLostCommitments],
        Mutant::ReuseGeneration => &[Invariant::SingleActive],
        Mutant::AckBeforeCommit => &[
            Invariant::OutputCommit,
            Invariant::NoLostCommitments,
            Invariant::PrefixConsistency,
        ],
        // A late RegisterBackup brings back a backup the primary dropped: the open gate then
        // releases what that backup never committed (or the backup, if it still has its
        // replica, takes over from behind the released output; or, if it gave the replica up,
        // the register names a backup that cannot take over).
        Mutant::DropKeepsFloor => &[
            Invariant::OutputCommit,
            Invariant::NoLostCommitments,
            Invariant::Liveness,
        ],
        // The register names a backup that gave its replica up.
        Mutant::DenialKeepsFloor => &[Invariant::Liveness],
        // The replica disk takes writes of an epoch it did not (or not yet) commit.
        Mutant::DiskWritesBeforeCommit => &[Invariant::DiskConsistency],
        // The catch-up misses an epoch's writes: the replica is no state the VM was in.
        Mutant::CatchUpSkipsEpoch => &[Invariant::PrefixConsistency, Invariant::DiskConsistency],
    }
}

/// The scenario that must catch each mutant (the others are reported, not required).
fn designated(m: Mutant) -> &'static str {
    match m {
        Mutant::ReleaseBeforeAck => "steady",
        Mutant::CommitPartial => "corrupt-checkpoint",
        Mutant::FailoverWithoutWitness => "link-cut",
        Mutant::ReuseGeneration => "primary-crash-mid-epoch",
        Mutant::AckBeforeCommit => "primary-crash-mid-transfer",
        Mutant::DropKeepsFloor => "stale-witness-traffic",
        Mutant::DenialKeepsFloor => "register-overtaken",
        Mutant::DiskWritesBeforeCommit => "disk-crash-mid-epoch",
        Mutant::CatchUpSkipsEpoch => "backup-restart-keeps-replica",
    }
}

/// First seed in `0..SEED_BOUND` where `m` planted in `s` breaks an invariant.
fn first_catch(s: &Scenario, m: Mutant) -> Option<(u64, Invariant, String)> {
    let opts = RunOptions::default().with_mutant(m);
    (0..SEED_BOUND).find_map(|seed| {
        let r = run_scenario(s, seed, &opts);
        r.violation
            .as_ref()
            .map(|v| (seed, v.invariant, format!("{} ({})", v.detail, r.summary())))
    })
}

#[test]
fn every_mutant_is_caught_by_the_invariant_it_breaks() {
    let mut table = String::from("mutant / scenario: first seed caught (invariant)\n");
    let mut failures = Vec::new();
    for m in Mutant::ALL {
        // The designated scenario must catch it, by an invariant the bug breaks, under both
        // epoch policies.
        let name = designated(m);
        let file = load(name);
        for s in [file.clone(), under_other_policy(&file)] {
            let policy = s.timing.epoch_policy.name();
            match first_catch(&s, m) {
                None => failures.push(format!(
                    "{m:?} survived {name} ({policy} epochs) over seeds 0..{SEED_BOUND}"
                )),
                Some((seed, inv, detail)) => {
                    if !breaks(m).contains(&inv) {
                        failures.push(format!(
                            "{m:?} on {name} seed {seed} was caught by {inv:?}, expected one of \
                         {:?}: {detail}",
                            breaks(m)
                        ));
                    }
                    // The same run without the bug is clean: the mutant, not the scenario, broke it.
                    let clean = run_scenario(&s, seed, &RunOptions::default());
                    if clean.verdict != Verdict::Pass {
                        failures.push(format!(
                            "{name} seed {seed} fails without any mutant: {}",
                            clean.summary()
                        ));
                    }
                    table.push_str(&format!(
                        "{m:?} / {name}, {policy} epochs: seed {seed} ({inv:?}), {} seed(s) to \
                     catch\n",
                        seed + 1
                    ));
                }
            }
        }
    }
    println!("{table}");
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// Informative sweep: which scenarios catch which mutant (every mutant must be caught by at
/// least two scenarios, so no single file carries a checker alone).
#[test]
fn mutants_are_caught_across_scenarios() {
    let names = scenario_names();
    let mut report = String::new();
    let mut weak = Vec::new();
    for m in Mutant::ALL {
        let mut caught = Vec::new();
        for name in &names {
            if let Some((seed, inv, _)) = first_catch(&load(name), m) {
                caught.push(format!("{name}@{seed}:{inv:?}"));
            }
        }
        report.push_str(&format!(
            "{m:?}: caught in {} of {}: {}\n",
            caught.len(),
            names.len(),
            caught.join(" ")
        ));
        if caught.len() < 2 {
            weak.push(format!("{m:?} caught by {} scenario(s) only", caught.len()));
        }
    }
    println!("{report}");
    assert!(weak.is_empty(), "\n{}\n{report}", weak.join("\n"));
}

/// The property tests' random fault schedules catch every mutant too (so a green property run
/// means something): schedules are drawn from a fixed RNG until one run breaks an invariant,
/// first from the mixed-fault schedules, then, for a mutant those never caught, from the
/// witness-race schedules (the floor mutants need a stale or overtaken witness request).
#[test]
fn random_fault_schedules_catch_every_mutant() {
    use ftvm_tests::schedule::{base_scenario, mixed_disturbance, schedule, witness_schedule};
    use proptest::strategy::{BoxedStrategy, Strategy, ValueTree};
    use proptest::test_runner::{Config, TestRng, TestRunner};

    const SCHEDULE_BOUND: usize = 64;
    let base = base_scenario();
    let strategies: [(&str, BoxedStrategy<_>); 2] = [
        (
            "mixed",
            schedule(2..=3, 2..=7, 2500, mixed_disturbance).boxed(),
        ),
        ("witness-race", witness_schedule().boxed()),
    ];
    let mut report = String::new();
    let mut survivors = Vec::new();
    for m in Mutant::ALL {
        let opts = RunOptions::default().with_mutant(m);
        let caught = strategies.iter().find_map(|(name, strategy)| {
            let mut runner = TestRunner::new_with_rng(
                Config::default(),
                TestRng::from_seed(Default::default(), &[7; 32]),
            );
            (1..=SCHEDULE_BOUND).find_map(|n| {
                let sch = strategy.new_tree(&mut runner).expect("schedule").current();
                let r = run_scenario(&sch.apply(&base), sch.seed, &opts);
                r.violation.map(|v| (*name, n, v.invariant))
            })
        });
        match caught {
            Some((name, n, inv)) if breaks(m).contains(&inv) => {
                report.push_str(&format!("{m:?}: {name} schedule #{n} ({inv:?})\n"))
            }
            Some((name, n, inv)) => survivors.push(format!(
                "{m:?}: {name} schedule #{n} was caught by {inv:?}, expected one of {:?}",
                breaks(m)
            )),
            None => survivors.push(format!(
                "{m:?} survived {SCHEDULE_BOUND} schedules of each kind"
            )),
        }
    }
    println!("{report}");
    assert!(survivors.is_empty(), "\n{}\n{report}", survivors.join("\n"));
}
