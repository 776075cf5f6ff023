//! Properties of failover correctness over random fault schedules: whatever crashes, cuts,
//! holds, losses, slow links, corruptions and duplicated, reordered or lost witness messages
//! hit the cluster, in any order and at any moment, with protocol timings and latencies drawn
//! per run (the base scenario swarms them),
//! every invariant holds (output commit, prefix consistency, no lost commitments, single active
//! VM per generation, liveness) — checked on every event of the run, not only at its end.
//!
//! Cases: 256 each under `.ci/test` (`PROPTEST_CASES`), fewer locally. A failure prints the
//! shrunk schedule and its simulator seed; `PROPTEST_RNG_SEED` explores other schedules.

use ftvm_sim::{run_scenario, RunOptions, Scenario, Verdict};
use ftvm_tests::schedule::{
    base_scenario, crash_disturbance, mixed_disturbance, network_disturbance, schedule,
    witness_schedule,
};
use ftvm_tests::{explain, proptest_config};
use proptest::prelude::*;

fn check(s: &Scenario, seed: u64) -> Result<(), TestCaseError> {
    s.check().map_err(TestCaseError::fail)?;
    let r = run_scenario(s, seed, &RunOptions::default());
    prop_assert!(
        r.violation.is_none() && r.verdict != Verdict::Crashed,
        "\n{}",
        explain(s, &r)
    );
    // A run whose service never answered anyone would make the invariants vacuous.
    prop_assert!(r.stats.observed.epochs > 0, "no epoch: {}", r.summary());
    Ok(())
}

proptest! {
    #![proptest_config(proptest_config(48))]

    /// Nodes and the witness crash (power cut or process death) and mostly come back, at
    /// random times or mid-checkpoint; two or three nodes.
    #[test]
    fn crashes_and_restarts_keep_every_invariant(
        sch in schedule(2..=3, 1..=5, 2500, crash_disturbance)
    ) {
        check(&sch.apply(&base_scenario()), sch.seed)?;
    }

    /// Partitions (both ways and one way), isolation, holds, loss, slow links and corrupted
    /// checkpoints; every host stays up.
    #[test]
    fn network_faults_keep_every_invariant(
        sch in schedule(2..=3, 1..=6, 2500, network_disturbance)
    ) {
        check(&sch.apply(&base_scenario()), sch.seed)?;
    }

    /// Everything at once.
    #[test]
    fn mixed_faults_keep_every_invariant(sch in schedule(2..=3, 2..=7, 2500, mixed_disturbance)) {
        check(&sch.apply(&base_scenario()), sch.seed)?;
    }

    /// Witness traffic duplicated, reordered and losing replies from the start, the first
    /// registration maybe overtaken by a takeover, crashes right after a registration was
    /// granted: stale requests and replies never break an invariant.
    #[test]
    fn witness_races_keep_every_invariant(sch in witness_schedule()) {
        check(&sch.apply(&base_scenario()), sch.seed)?;
    }

    /// A random schedule replays byte for byte from its seed.
    #[test]
    fn random_runs_replay_from_their_seed(sch in witness_schedule()) {
        let s = sch.apply(&base_scenario());
        let opts = RunOptions::default().traced(true);
        let render = || {
            run_scenario(&s, sch.seed, &opts)
                .trace
                .iter()
                .map(|e| format!("{e}\n"))
                .collect::<String>()
        };
        let first = render();
        prop_assert!(!first.is_empty());
        prop_assert_eq!(first, render());
    }
}
