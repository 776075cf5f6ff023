//! A planted protocol bug on real hosts is caught by the run's invariant check: `ftvm demo`
//! with both agents running the model's `ReleaseBeforeAck` mutant (frames of an epoch leave the
//! primary as soon as it is captured, before the backup acked it). The client sees nothing
//! wrong (no host failed while the bug mattered); the journals show the frames that left
//! ahead of their commit, and the demo fails with the simulator's output-commit report.
//!
//! Needs the `mutants` feature: `cargo test -p ftvm --features mutants --test real_mutant`.
#![cfg(feature = "mutants")]

mod common;

#[test]
fn a_release_before_ack_in_the_real_agent_is_caught_by_the_run_check() {
    let run = common::run_demo(
        "mutant",
        "fttm",
        39,
        &[
            "--before-kill",
            "2",
            "--after-kill",
            "2",
            "--mutant",
            "release-before-ack",
        ],
    );
    assert!(!run.ok, "the planted bug went unnoticed");
    let (s, stdout) = (run.summary, run.stdout);
    // The run itself worked: the client got replies and lost nothing it could see.
    assert!(s["client"]["replies"].as_u64().unwrap_or(0) > 10, "{s}");
    assert_eq!(s["client"]["lost"], 0, "{s}");
    assert_eq!(s["invariants"]["passed"], false, "{s}");
    let findings = s["invariants"]["findings"].to_string();
    assert!(
        findings.contains("output_commit violated"),
        "caught by another check: {findings}"
    );
    assert!(stdout.contains("== invariants: fail demo"), "{stdout}");
}
