//! A damaged checkpoint takes one path in the simulator and on a real backup: the backup's
//! model hears `CheckpointReceived { ok: false }`, drops the stream (`Disconnect` of the
//! primary, staged checkpoints discarded) and never commits that epoch; the link's closure that
//! follows no longer reaches the model. The real agent's side of this is checked in
//! `real/src/agent/agent_tests.rs` and `real/tests/agent_mem.rs`.

use std::path::Path;

use ftvm_model::{Action, Input, NodeId};
use ftvm_sim::{run_scenario, HostId, RunOptions, Scenario, TraceKind, Verdict};

#[test]
fn a_corrupt_checkpoint_reaches_the_backup_model_as_received_not_ok_and_drops_the_stream() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/corrupt-checkpoint.toml");
    let s = Scenario::load(&path).unwrap();
    let report = run_scenario(&s, 1, &RunOptions::default().traced(true));
    assert_eq!(report.verdict, Verdict::Pass, "{:?}", report.unmet);
    let backup = HostId::Node(NodeId(2));
    let events: Vec<&TraceKind> = report
        .trace
        .iter()
        .filter(|e| e.host == backup)
        .map(|e| &e.what)
        .collect();
    let damaged: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, w)| {
            matches!(
                w,
                TraceKind::Input(Input::CheckpointReceived { ok: false, .. })
            )
        })
        .map(|(i, _)| i)
        .collect();
    assert!(
        !damaged.is_empty(),
        "no damaged checkpoint reached the backup's model"
    );
    for &i in &damaged {
        let TraceKind::Input(Input::CheckpointReceived { epoch, .. }) = events[i] else {
            unreachable!()
        };
        // The model's answer, before its next input.
        let answer: Vec<&Action> = events[i + 1..]
            .iter()
            .take_while(|w| !matches!(w, TraceKind::Input(_)))
            .filter_map(|w| match w {
                TraceKind::Action(a) => Some(a),
                _ => None,
            })
            .collect();
        assert!(
            answer.contains(&&Action::Disconnect { peer: NodeId(1) }),
            "epoch {epoch:?}: the stream was not dropped: {answer:?}"
        );
        assert!(answer.contains(&&Action::DiscardStaged), "{answer:?}");
        // The closing link does not reach the model a second time, and the epoch is never
        // committed.
        let rest = &events[i + 1..];
        assert!(!rest.iter().any(|w| matches!(
            w,
            TraceKind::Action(Action::Commit { epoch: e, .. }) if e == epoch
        )));
        let next_input = rest.iter().find(|w| matches!(w, TraceKind::Input(inp) if !matches!(inp, Input::Timeout | Input::WitnessReply(_))));
        assert!(
            !matches!(
                next_input,
                Some(TraceKind::Input(Input::Disconnected { .. }))
            ),
            "epoch {epoch:?}: {next_input:?}"
        );
    }
}
