//! Real runs are checked from their journals (`ftvm_sim::check_journals`): the journals the
//! driver core writes, merged across hosts, must give the verdict the simulator's own
//! observers give. Here the journals come from simulated runs, where both verdicts exist side
//! by side: every scenario file's journals pass and count what the run counted, a tampered
//! journal fails its replay, and (with `--features mutants`) a planted release-before-ack is
//! caught from the journals alone.

use ftvm_driver::journal::Record;
use ftvm_model::{Action, NodeId, WitnessState};
use ftvm_sim::{check_journals, run_scenario, RunOptions, RunReport, Scenario, Verdict};
use ftvm_tests::{load, scenario_names};

fn journaled(s: &Scenario, seed: u64, opts: RunOptions) -> (RunReport, ftvm_sim::JournalReport) {
    let opts = opts.with_journals();
    let r = run_scenario(s, seed, &opts);
    let j = check_journals(
        initial(),
        &r.journals,
        &r.witness_journal,
        &s.expect.invariants,
    );
    (r, j)
}

/// The register every scenario starts from.
fn initial() -> WitnessState {
    WitnessState::initial(ftvm_sim::scenario::VM_ID, NodeId(1))
}

#[test]
fn every_scenario_file_checks_the_same_from_its_journals() {
    for name in scenario_names() {
        let s = load(&name);
        for seed in 0..4 {
            let (run, journals) = journaled(&s, seed, RunOptions::default());
            assert_eq!(
                run.verdict,
                Verdict::Pass,
                "{name} seed {seed}: {}",
                run.summary()
            );
            assert!(
                journals.passed(),
                "{name} seed {seed}: the run passed, its journals did not: {:?}",
                journals.findings()
            );
            let (o, j) = (&run.stats.observed, &journals.stats);
            assert!(j.epochs > 0, "{name}: no capture in the journals");
            assert_eq!(
                (
                    j.epochs,
                    j.commits,
                    j.failovers,
                    j.max_generation,
                    j.released
                ),
                (
                    o.epochs,
                    o.commits,
                    o.failovers,
                    o.max_generation,
                    o.released
                ),
                "{name}: journals count (epochs, commits, failovers, generation, releases) \
             other than the run"
            );
            for (node, replay) in &journals.replays {
                let inputs = replay.as_ref().expect("replayed");
                assert!(*inputs > 0, "{name}: {node}'s journal has no input");
            }
        }
    }
}

#[test]
fn a_tampered_journal_fails_its_replay() {
    let s = load("steady");
    let (mut run, _) = journaled(&s, 0, RunOptions::default());
    let primary = run
        .journals
        .iter_mut()
        .find(|j| j.node == NodeId(1))
        .expect("the primary's journal");
    let capture = primary
        .entries
        .iter_mut()
        .find(|e| matches!(e.entry.record, Record::Action(Action::Capture { .. })))
        .expect("a capture");
    capture.entry.record = Record::Action(Action::Fence);
    let report = check_journals(
        initial(),
        &run.journals,
        &run.witness_journal,
        &s.expect.invariants,
    );
    assert!(!report.passed());
    assert!(
        report.replays[&NodeId(1)].is_err(),
        "the tampered journal replayed: {:?}",
        report.findings()
    );
    assert!(report.replays[&NodeId(2)].is_ok());
}

#[cfg(feature = "mutants")]
#[test]
fn a_release_before_ack_is_caught_from_the_journals() {
    use ftvm_model::Mutant;
    use ftvm_sim::Invariant;
    let s = load("steady");
    let (run, journals) = journaled(
        &s,
        0,
        RunOptions::default().with_mutant(Mutant::ReleaseBeforeAck),
    );
    assert_eq!(
        run.violation.as_ref().map(|v| v.invariant),
        Some(Invariant::OutputCommit)
    );
    assert_eq!(
        journals.violation.as_ref().map(|v| v.invariant),
        Some(Invariant::OutputCommit),
        "{:?}",
        journals.findings()
    );
    // The model with the same mutant drove the run: the journals replay.
    assert!(journals.replays.values().all(Result::is_ok));
}

/// A corrupted checkpoint reaches the backup's model as `CheckpointReceived { ok: false }` (the
/// path `ftvm/tests/real_scenarios.rs` shows from a real backup's journal), and the model's
/// answer is to discard it and keep its replica.
#[test]
fn a_corrupt_checkpoint_reaches_the_backup_model_as_received_not_ok() {
    use ftvm_model::Input;
    let s = load("corrupt-checkpoint");
    let (run, journals) = journaled(&s, 0, RunOptions::default());
    assert!(journals.passed(), "{:?}", journals.findings());
    let backup = run
        .journals
        .iter()
        .find(|j| j.node == NodeId(2))
        .expect("the backup's journal");
    let damaged = backup
        .entries
        .iter()
        .filter(|e| {
            matches!(
                e.entry.record,
                Record::Input(Input::CheckpointReceived { ok: false, .. })
            )
        })
        .count();
    assert!(
        damaged > 0,
        "no damaged checkpoint reached the backup's model"
    );
}
