//! Transition tests of the primary role, input by input.

use std::time::Duration;

use crate::action::{Action, Gate, Scope};
use crate::config::Start;
use crate::ids::{Epoch, Generation, NodeId, VmId};
use crate::input::Input;
use crate::msg::{PeerMsg, RejectReason};
use crate::status::{Phase, RoleKind};
use crate::testkit::{config, One};
use crate::witness::Witness;
use crate::witness_msg::{Registration, WitnessRequest};

const P: NodeId = NodeId(1);
const B: NodeId = NodeId(2);
const C: NodeId = NodeId(3);
const G1: Generation = Generation(1);

fn join(from: NodeId) -> Input {
    join_offering(from, None)
}

/// `from`'s `Join`, offering `replica`.
fn join_offering(from: NodeId, replica: Option<crate::msg::ReplicaAt>) -> Input {
    let cfg = config();
    Input::Message {
        from,
        msg: PeerMsg::Join {
            vm: cfg.vm,
            node: from,
            ram_pages: cfg.ram_pages,
            page_size: cfg.page_size,
            disk_blocks: cfg.disk_blocks,
            known: Generation::UNKNOWN,
            replica,
        },
    }
}

fn ack(from: NodeId, e: u64) -> Input {
    Input::Message {
        from,
        msg: PeerMsg::Ack {
            generation: G1,
            epoch: Epoch(e),
        },
    }
}

fn reject(to: NodeId, reason: RejectReason) -> Action {
    Action::Send {
        to,
        msg: PeerMsg::Reject {
            generation: G1,
            reason,
        },
    }
}

/// Actions other than heartbeats (which go out on their own timer).
fn no_hb(actions: Vec<Action>) -> Vec<Action> {
    let hb = |a: &Action| {
        matches!(
            a,
            Action::Send {
                msg: PeerMsg::Heartbeat { .. },
                ..
            }
        )
    };
    actions.into_iter().filter(|a| !hb(a)).collect()
}

fn reg(e: u64) -> Registration {
    Registration {
        node: B,
        since: Epoch(e),
    }
}

/// A primary with backup B registered (sync epoch 1 acked) and a witness that agrees.
fn protected() -> (One, Witness) {
    protected_with(config())
}

/// [`protected`] under `cfg`.
fn protected_with(cfg: crate::config::Config) -> (One, Witness) {
    let mut w = Witness::new(cfg.vm, P);
    let mut p = One::with(cfg, P, Start::Primary);
    p.on(Input::Timeout);
    p.on(join(B));
    p.on(Input::CaptureDone {
        epoch: Epoch(1),
        pages: 256,
        bytes: 1 << 20,
    });
    p.on(Input::CheckpointSent { epoch: Epoch(1) });
    let a = p.on(ack(B, 1));
    let Some(Action::ToWitness(req)) = a.first().copied() else {
        panic!("{a:?}")
    };
    let reply = w.handle(p.now, req);
    p.on(Input::WitnessReply(reply));
    assert_eq!(p.status().phase, Phase::Protected);
    (p, w)
}

/// [`protected`], then B's link closes and B does not rejoin: dropped at the witness, the
/// primary runs degraded with its gate open.
fn degraded() -> (One, Witness) {
    let (mut p, mut w) = protected();
    let drop = WitnessRequest::DropBackup {
        generation: G1,
        primary: P,
        backup: reg(1),
    };
    p.on(Input::Disconnected { peer: B });
    p.after(config().rejoin_grace());
    p.on(Input::WitnessReply(w.handle(p.now, drop)));
    assert_eq!(p.status().gate, Some(Gate::Open));
    (p, w)
}

#[test]
fn fresh_start_holds_output_and_runs_the_vm() {
    let mut p = One::new(P, Start::Primary);
    assert_eq!(p.node.poll_timeout(), Some(crate::time::Time::ZERO));
    let a = p.on(Input::Timeout);
    assert_eq!(
        a,
        vec![
            Action::SetOutputGate(Gate::Held),
            Action::ResumeVm { epoch: Epoch(1) }
        ]
    );
    let s = p.status();
    assert_eq!(
        (s.role, s.phase, s.generation),
        (RoleKind::Primary, Phase::Waiting, G1)
    );
    assert_eq!(
        p.node.poll_timeout(),
        None,
        "nothing to do until someone joins"
    );
}

#[test]
fn sync_then_register_then_release_on_acks() {
    let mut w = Witness::new(config().vm, P);
    let mut p = One::new(P, Start::Primary);
    p.on(Input::Timeout);
    let a = p.on(join(B));
    assert_eq!(
        a,
        vec![
            Action::Send {
                to: B,
                msg: PeerMsg::SyncStart {
                    generation: G1,
                    epoch: Epoch(1),
                    base: None,
                    lineage: 0,
                    continues: false
                }
            },
            Action::PreCopy { epoch: Epoch(1) },
        ]
    );
    assert_eq!(p.status().phase, Phase::Syncing);
    // RAM is copied aside while the VM runs; only then does the full capture pause it.
    assert_eq!(
        p.on(Input::PreCopied { epoch: Epoch(1) }),
        vec![
            Action::PauseVm,
            Action::Capture {
                epoch: Epoch(1),
                scope: Scope::Full
            },
        ]
    );
    let a = p.on(Input::CaptureDone {
        epoch: Epoch(1),
        pages: 256,
        bytes: 1 << 20,
    });
    assert_eq!(
        a,
        vec![
            Action::ResumeVm { epoch: Epoch(2) },
            Action::SendCheckpoint {
                to: B,
                epoch: Epoch(1),
                full: true,
                generation: G1
            },
        ]
    );
    assert!(p.on(Input::CheckpointSent { epoch: Epoch(1) }).is_empty());
    // The next incremental waits for its epoch time.
    let a = no_hb(p.after(config().epoch_interval));
    assert_eq!(
        a,
        vec![
            Action::PauseVm,
            Action::Capture {
                epoch: Epoch(2),
                scope: Scope::Epoch
            }
        ]
    );
    let a = p.on(ack(B, 1));
    let register = WitnessRequest::RegisterBackup {
        generation: G1,
        primary: P,
        backup: reg(1),
    };
    assert_eq!(a, vec![Action::ToWitness(register)]);
    assert_eq!(p.status().phase, Phase::Registering);
    // Acks before the grant release nothing.
    p.on(Input::CaptureDone {
        epoch: Epoch(2),
        pages: 3,
        bytes: 1,
    });
    p.on(Input::CheckpointSent { epoch: Epoch(2) });
    assert!(p.on(ack(B, 2)).is_empty());
    let a = p.on(Input::WitnessReply(w.handle(p.now, register)));
    assert_eq!(a, vec![Action::ReleaseOutput { through: Epoch(2) }]);
    let s = p.status();
    assert_eq!(
        (s.phase, s.released, s.registration),
        (Phase::Protected, Epoch(2), Some(reg(1)))
    );
    // Steady state: capture, send, ack, release.
    let a = no_hb(p.after(config().epoch_interval));
    assert_eq!(
        a,
        vec![
            Action::PauseVm,
            Action::Capture {
                epoch: Epoch(3),
                scope: Scope::Epoch
            }
        ]
    );
    p.on(Input::CaptureDone {
        epoch: Epoch(3),
        pages: 3,
        bytes: 1,
    });
    assert_eq!(
        p.on(ack(B, 3)),
        vec![Action::ReleaseOutput { through: Epoch(3) }]
    );
    assert!(p.on(ack(B, 3)).is_empty(), "duplicate ack");
    assert!(
        p.on(ack(B, 9)).is_empty(),
        "ack of something never captured"
    );
}

#[test]
fn a_full_sync_pauses_only_after_its_pre_copy_and_nothing_else_is_captured_meanwhile() {
    let mut p = One::new(P, Start::Primary);
    p.on(Input::Timeout);
    let a = p.on(join(B));
    assert_eq!(a.last(), Some(&Action::PreCopy { epoch: Epoch(1) }));
    // The copy outlasts several epochs and output waits at the gate: still no pause.
    for _ in 0..3 {
        let a = p.after(config().epoch_interval);
        assert!(!a.contains(&Action::PauseVm), "{a:?}");
    }
    assert!(!p
        .on(Input::OutputHeld { epoch: Epoch(1) })
        .contains(&Action::PauseVm));
    // A pre-copy answer of another epoch is stale.
    assert_eq!(no_hb(p.on(Input::PreCopied { epoch: Epoch(2) })), vec![]);
    let a = p.on(Input::PreCopied { epoch: Epoch(1) });
    assert_eq!(
        a,
        vec![
            Action::PauseVm,
            Action::Capture {
                epoch: Epoch(1),
                scope: Scope::Full
            }
        ]
    );
    // Answered twice: the second changes nothing.
    assert_eq!(no_hb(p.on(Input::PreCopied { epoch: Epoch(1) })), vec![]);
}

#[test]
fn slow_link_stretches_epochs_and_unacked_checkpoints_are_bounded() {
    let (mut p, _w) = protected();
    let step = config().epoch_interval;
    // Not sent yet: no new capture however late it gets.
    let a = no_hb(p.after(step));
    assert!(
        matches!(
            a[..],
            [
                Action::PauseVm,
                Action::Capture {
                    epoch: Epoch(2),
                    ..
                }
            ]
        ),
        "{a:?}"
    );
    p.on(Input::CaptureDone {
        epoch: Epoch(2),
        pages: 1,
        bytes: 1,
    });
    assert!(p
        .after(step * 3)
        .iter()
        .all(|a| !matches!(a, Action::Capture { .. })));
    // Sent: the overdue capture happens at once.
    let a = p.on(Input::CheckpointSent { epoch: Epoch(2) });
    assert!(
        matches!(
            a[..],
            [
                Action::PauseVm,
                Action::Capture {
                    epoch: Epoch(3),
                    ..
                }
            ]
        ),
        "{a:?}"
    );
    p.on(Input::CaptureDone {
        epoch: Epoch(3),
        pages: 1,
        bytes: 1,
    });
    p.on(Input::CheckpointSent { epoch: Epoch(3) });
    // max_unacked = 2 (epochs 2 and 3 outstanding): capturing stops, heartbeats go on.
    let alive = PeerMsg::Heartbeat {
        generation: G1,
        epoch: Epoch(1),
    };
    p.on(Input::Message {
        from: B,
        msg: alive,
    });
    let a = p.after(step * 2);
    assert!(
        a.iter().all(|a| !matches!(a, Action::Capture { .. })),
        "{a:?}"
    );
    assert!(a.iter().any(|a| matches!(
        a,
        Action::Send {
            msg: PeerMsg::Heartbeat { .. },
            ..
        }
    )));
    let a = p.on(ack(B, 2));
    assert!(a.contains(&Action::ReleaseOutput { through: Epoch(2) }));
    assert!(a.contains(&Action::Capture {
        epoch: Epoch(4),
        scope: Scope::Epoch
    }));
}

#[test]
fn bad_joins_are_rejected() {
    let cfg = config();
    let mut p = One::new(P, Start::Primary);
    p.on(Input::Timeout);
    let bad = |vm: VmId, ram_pages: u64, page_size: u32, disk_blocks: u64| Input::Message {
        from: C,
        msg: PeerMsg::Join {
            vm,
            node: C,
            ram_pages,
            page_size,
            disk_blocks,
            known: G1,
            replica: None,
        },
    };
    let (ram, page, disk) = (cfg.ram_pages, cfg.page_size, cfg.disk_blocks);
    let a = p.on(bad(VmId(99), ram, page, disk));
    assert_eq!(a, vec![reject(C, RejectReason::WrongVm)]);
    let a = p.on(bad(cfg.vm, ram + 1, page, disk));
    assert_eq!(a, vec![reject(C, RejectReason::RamSizeMismatch)]);
    let a = p.on(bad(cfg.vm, ram, 2 * page, disk));
    assert_eq!(a, vec![reject(C, RejectReason::PageSizeMismatch)]);
    // A disk where the VM has none.
    let a = p.on(bad(cfg.vm, ram, page, 8));
    assert_eq!(a, vec![reject(C, RejectReason::DiskSizeMismatch)]);
    assert_eq!(p.status().phase, Phase::Waiting);
    // A second backup while one is syncing.
    p.on(join(B));
    assert_eq!(p.on(join(C)), vec![reject(C, RejectReason::HaveBackup)]);
    assert_eq!(p.status().peer, Some(B));
}

#[test]
fn busy_while_settling_a_lost_backup() {
    let (mut p, _w) = protected();
    p.on(Input::Disconnected { peer: B });
    // Waiting for B to come back, another joiner finds the place taken.
    assert_eq!(p.status().phase, Phase::Rejoining);
    assert_eq!(p.on(join(C)), vec![reject(C, RejectReason::HaveBackup)]);
    p.after(config().rejoin_grace());
    assert_eq!(p.status().phase, Phase::Dropping);
    assert_eq!(p.on(join(C)), vec![reject(C, RejectReason::Busy)]);
}

#[test]
fn lost_backup_is_dropped_then_the_gate_opens() {
    let (mut p, mut w) = protected();
    let a = p.on(Input::Disconnected { peer: B });
    let drop = WitnessRequest::DropBackup {
        generation: G1,
        primary: P,
        backup: reg(1),
    };
    assert_eq!(a, vec![], "its link is gone already: nothing to close");
    // It does not come back within the grace: dropped.
    assert_eq!(
        p.after(config().rejoin_grace()),
        vec![Action::ToWitness(drop)]
    );
    let s = p.status();
    assert_eq!((s.phase, s.gate), (Phase::Dropping, Some(Gate::Held)));
    // Witness unreachable: resend every witness_retry, output stays held.
    assert_eq!(
        p.after(config().witness_retry),
        vec![Action::ToWitness(drop)]
    );
    let a = p.on(Input::WitnessReply(w.handle(p.now, drop)));
    assert_eq!(a, vec![Action::SetOutputGate(Gate::Open)]);
    assert_eq!(p.status().phase, Phase::Degraded);
    assert_eq!(p.node.poll_timeout(), None);
}

#[test]
fn silent_backup_is_lost_after_the_failure_timeout() {
    let (mut p, _w) = protected();
    let t0 = p.now;
    let timeout = config().failure_timeout;
    // Heartbeats keep going out; just before the timeout nothing is lost.
    p.at(t0 + (timeout - Duration::from_millis(1)));
    assert_eq!(p.status().phase, Phase::Protected);
    let a = p.at(t0 + timeout);
    assert!(a.contains(&Action::Disconnect { peer: B }), "{a:?}");
    assert_eq!(p.status().phase, Phase::Dropping);
}

#[test]
fn degraded_primary_syncs_with_output_flowing_then_holds_it_for_one_epoch() {
    let (mut p, _w) = degraded();
    let a = p.on(join(C));
    // Pre-copy: no backup is registered, so the gate stays open through the sync.
    assert!(!a.contains(&Action::SetOutputGate(Gate::Held)), "{a:?}");
    assert_eq!(
        a[0],
        Action::Send {
            to: C,
            msg: PeerMsg::SyncStart {
                generation: G1,
                epoch: Epoch(2),
                base: None,
                lineage: 0,
                continues: false
            }
        }
    );
    assert_eq!(&a[1..], &[Action::PreCopy { epoch: Epoch(2) }]);
    p.on(Input::PreCopied { epoch: Epoch(2) });
    capture_done(&mut p, 2);
    p.on(Input::CheckpointSent { epoch: Epoch(2) });
    // The next epoch is captured before the sync is acked: the stream runs on, gate open.
    no_hb(p.after(config().epoch_interval));
    capture_done(&mut p, 3);
    p.on(Input::CheckpointSent { epoch: Epoch(3) });
    let a = p.on(ack(C, 2));
    assert!(a.is_empty(), "epoch 3 is still unacked: {a:?}");
    assert_eq!(
        (p.status().phase, p.status().gate),
        (Phase::Syncing, Some(Gate::Open))
    );
    // Caught up: hold output from the running epoch and capture it at once.
    let a = p.on(ack(C, 3));
    assert_eq!(
        a,
        vec![
            Action::SetOutputGate(Gate::Held),
            Action::PauseVm,
            Action::Capture {
                epoch: Epoch(4),
                scope: Scope::Epoch
            }
        ]
    );
    capture_done(&mut p, 4);
    // Only the ack of that epoch registers the joiner (its token is the sync epoch).
    let a = p.on(ack(C, 4));
    assert_eq!(
        a,
        vec![Action::ToWitness(WitnessRequest::RegisterBackup {
            generation: G1,
            primary: P,
            backup: Registration {
                node: C,
                since: Epoch(2)
            },
        })]
    );
    assert_eq!(p.status().phase, Phase::Registering);
}

#[test]
fn a_stream_always_one_checkpoint_behind_still_closes_the_gate_after_its_rounds() {
    use crate::primary::PRE_COPY_ROUNDS;
    let (mut p, _w) = degraded();
    p.on(join(C));
    p.on(Input::PreCopied { epoch: Epoch(2) });
    capture_done(&mut p, 2);
    p.on(Input::CheckpointSent { epoch: Epoch(2) });
    // Every ack arrives after the next epoch was captured: never `acked == captured`.
    let mut closed_at = None;
    for e in 3..3 + PRE_COPY_ROUNDS + 2 {
        let a = no_hb(p.after(config().epoch_interval));
        assert_eq!(captures(&a), vec![Epoch(e)], "epoch {e}");
        capture_done(&mut p, e);
        p.on(Input::CheckpointSent { epoch: Epoch(e) });
        let a = p.on(ack(C, e - 1));
        if a.contains(&Action::SetOutputGate(Gate::Held)) {
            closed_at = Some(e - 1);
            break;
        }
        assert_eq!(p.status().gate, Some(Gate::Open), "ack of {}", e - 1);
    }
    assert_eq!(
        closed_at,
        Some(2 + PRE_COPY_ROUNDS),
        "the gate closes once the acks are PRE_COPY_ROUNDS past the sync"
    );
}

#[test]
fn joiner_lost_during_pre_copy_changes_nothing_for_clients() {
    let (mut p, _w) = degraded();
    p.on(join(C));
    capture_done(&mut p, 2);
    p.on(ack(C, 2));
    // Caught up at once: the gate closed for epoch 3. Losing the joiner now, before its
    // registration was asked, reopens it without the witness.
    assert_eq!(p.status().gate, Some(Gate::Held));
    let a = p.on(Input::Disconnected { peer: C });
    assert_eq!(a, vec![Action::SetOutputGate(Gate::Open)]);
    assert_eq!(p.status().phase, Phase::Degraded);
}

#[test]
fn joiner_lost_with_register_outstanding_drops_at_once() {
    let mut p = One::new(P, Start::Primary);
    p.on(Input::Timeout);
    p.on(join(B));
    p.on(Input::CaptureDone {
        epoch: Epoch(1),
        pages: 1,
        bytes: 1,
    });
    p.on(ack(B, 1));
    assert_eq!(p.status().phase, Phase::Registering);
    let a = p.on(Input::Disconnected { peer: B });
    let drop = WitnessRequest::DropBackup {
        generation: G1,
        primary: P,
        backup: reg(1),
    };
    assert_eq!(a, vec![Action::ToWitness(drop)]);
    // A late "granted" for the register is not what we wait for any more.
    let mut w = Witness::new(config().vm, P);
    let register = WitnessRequest::RegisterBackup {
        generation: G1,
        primary: P,
        backup: reg(1),
    };
    assert!(p
        .on(Input::WitnessReply(w.handle(p.now, register)))
        .is_empty());
    assert_eq!(p.status().phase, Phase::Dropping);
    assert!(
        p.on(Input::WitnessReply(w.handle(p.now, drop))).is_empty(),
        "never protected"
    );
    assert_eq!(p.status().phase, Phase::Waiting);
    assert_eq!(p.status().gate, Some(Gate::Held));
}

#[test]
fn denied_drop_means_deposed_and_fenced_then_rejoins() {
    let (mut p, mut w) = protected();
    // B took over meanwhile.
    assert!(
        w.handle(
            p.now,
            WitnessRequest::Takeover {
                generation: G1,
                backup: reg(1)
            }
        )
        .granted
    );
    let drop = WitnessRequest::DropBackup {
        generation: G1,
        primary: P,
        backup: reg(1),
    };
    p.on(Input::Disconnected { peer: B });
    let a = p.on(Input::WitnessReply(w.handle(p.now, drop)));
    assert_eq!(a, vec![Action::Fence]);
    let s = p.status();
    assert_eq!((s.role, s.phase), (RoleKind::Fenced, Phase::Fenced));
    // After the rejoin delay it asks the witness whom to follow.
    let a = p.after(config().failure_timeout);
    assert_eq!(a, vec![Action::ToWitness(WitnessRequest::Query)]);
    let a = p.on(Input::WitnessReply(w.handle(p.now, WitnessRequest::Query)));
    assert_eq!(a, vec![Action::Connect { to: B }]);
    assert_eq!(p.status().role, RoleKind::Backup);
    assert_eq!(p.status().generation, Generation(2));
}

fn claim_join(from: NodeId, known: Generation) -> Input {
    let cfg = config();
    Input::Message {
        from,
        msg: PeerMsg::Join {
            vm: cfg.vm,
            node: from,
            ram_pages: cfg.ram_pages,
            page_size: cfg.page_size,
            disk_blocks: cfg.disk_blocks,
            known,
            replica: None,
        },
    }
}

const QUERY: Action = Action::ToWitness(WitnessRequest::Query);

/// Whether `actions` stop the VM for good.
fn fences(actions: &[Action]) -> bool {
    actions.contains(&Action::Fence)
}

#[test]
fn forged_newer_join_is_checked_with_the_witness_not_obeyed() {
    let (mut p, mut w) = protected();
    // The attack seen on real hosts: one Join with an absurd generation from a stranger.
    let a = p.on(claim_join(C, Generation(u64::MAX)));
    assert_eq!(a, vec![Action::Disconnect { peer: C }, QUERY]);
    let s = p.status();
    assert_eq!((s.role, s.phase), (RoleKind::Primary, Phase::Protected));
    // More claims while one Query is out: the link is closed again, no second Query.
    let a = p.on(claim_join(C, Generation(7)));
    assert_eq!(a, vec![Action::Disconnect { peer: C }]);
    // The Query is resent until answered, like every witness request.
    let a = no_hb(p.after(config().witness_retry));
    assert!(a.contains(&QUERY), "{a:?}");
    // The witness still names us: no fence, and nothing more to ask.
    let a = p.on(Input::WitnessReply(w.handle(p.now, WitnessRequest::Query)));
    assert!(!fences(&a), "{a:?}");
    assert!(!no_hb(p.after(config().witness_retry)).contains(&QUERY));
    // The VM keeps running: epochs go on and the backup's acks still release output.
    let (captured, running) = (p.status().captured, p.status().running_epoch);
    assert_eq!(p.status().role, RoleKind::Primary);
    let a = p.on(Input::CaptureDone {
        epoch: running,
        pages: 1,
        bytes: 4096,
    });
    assert!(a.contains(&Action::ResumeVm {
        epoch: running.next()
    }));
    assert!(p.status().captured > captured);
    p.on(Input::CheckpointSent { epoch: running });
    let a = p.on(ack(B, running.0));
    assert_eq!(a, vec![Action::ReleaseOutput { through: running }]);
}

#[test]
fn any_kind_of_newer_frame_is_only_a_claim() {
    let newer = Generation(2);
    for msg in [
        PeerMsg::Reject {
            generation: newer,
            reason: RejectReason::Busy,
        },
        PeerMsg::Heartbeat {
            generation: newer,
            epoch: Epoch(1),
        },
        PeerMsg::Ack {
            generation: newer,
            epoch: Epoch(1),
        },
        PeerMsg::SyncStart {
            generation: newer,
            epoch: Epoch(1),
            base: None,
            lineage: 0,
            continues: false,
        },
    ] {
        let (mut p, _w) = protected();
        let a = p.on(Input::Message { from: C, msg });
        assert_eq!(a, vec![Action::Disconnect { peer: C }, QUERY], "{msg:?}");
        assert_eq!(p.status().phase, Phase::Protected, "{msg:?}");
    }
}

#[test]
fn newer_frame_on_the_backup_link_drops_the_backup_and_asks() {
    let (mut p, mut w) = protected();
    let msg = PeerMsg::Heartbeat {
        generation: Generation(9),
        epoch: Epoch(1),
    };
    let a = p.on(Input::Message { from: B, msg });
    let drop = WitnessRequest::DropBackup {
        generation: G1,
        primary: P,
        backup: reg(1),
    };
    assert_eq!(
        a,
        vec![
            Action::Disconnect { peer: B },
            Action::ToWitness(drop),
            QUERY
        ]
    );
    assert_eq!(p.status().phase, Phase::Dropping);
    // The witness grants the drop and answers the Query: degraded, gate open, not fenced.
    let a = p.on(Input::WitnessReply(w.handle(p.now, drop)));
    assert_eq!(a, vec![Action::SetOutputGate(Gate::Open)]);
    let a = p.on(Input::WitnessReply(w.handle(p.now, WitnessRequest::Query)));
    assert!(a.is_empty(), "{a:?}");
    let s = p.status();
    assert_eq!((s.role, s.phase), (RoleKind::Primary, Phase::Degraded));
}

#[test]
fn witness_confirming_a_claim_fences_and_the_fenced_node_stays_silent() {
    let (mut p, mut w) = protected();
    // B really took over (say P's link to it still looks fine).
    let takeover = WitnessRequest::Takeover {
        generation: G1,
        backup: reg(1),
    };
    assert!(w.handle(p.now, takeover).granted);
    let a = p.on(claim_join(C, Generation(2)));
    assert_eq!(a, vec![Action::Disconnect { peer: C }, QUERY]);
    let a = p.on(Input::WitnessReply(w.handle(p.now, WitnessRequest::Query)));
    assert_eq!(a, vec![Action::Disconnect { peer: B }, Action::Fence]);
    let s = p.status();
    assert_eq!((s.role, s.phase), (RoleKind::Fenced, Phase::Fenced));
    // Fenced: no heartbeat, ack or reject to anyone until it rejoins; a Join only closes the
    // link it came on.
    let hb = config().heartbeat_interval;
    let mut t = Duration::ZERO;
    while t + hb < config().failure_timeout {
        assert!(p.after(hb).is_empty());
        t += hb;
        assert_eq!(p.on(join(B)), vec![Action::Disconnect { peer: B }]);
        assert_eq!(
            p.on(Input::Message {
                from: B,
                msg: PeerMsg::Heartbeat {
                    generation: G1,
                    epoch: Epoch(1)
                }
            }),
            vec![]
        );
    }
}

#[test]
fn unreachable_witness_while_checking_keeps_the_vm_running() {
    let (mut p, _w) = protected();
    p.on(claim_join(C, Generation(2)));
    let mut queries = 0;
    for _ in 0..20 {
        let a = no_hb(p.after(config().witness_retry));
        assert!(!fences(&a), "{a:?}");
        queries += a.iter().filter(|a| **a == QUERY).count();
    }
    assert_eq!(queries, 20, "one Query per witness_retry");
    assert_eq!(p.status().role, RoleKind::Primary);
}

#[test]
fn stale_messages_are_ignored() {
    let (mut p, _w) = protected();
    let old = PeerMsg::Ack {
        generation: Generation::UNKNOWN,
        epoch: Epoch(1),
    };
    assert!(p.on(Input::Message { from: B, msg: old }).is_empty());
    assert!(p.on(ack(C, 1)).is_empty(), "ack from a stranger");
}

#[test]
fn same_backup_joining_afresh_is_treated_as_lost() {
    let (mut p, _w) = protected();
    let a = p.on(join(B));
    let drop = WitnessRequest::DropBackup {
        generation: G1,
        primary: P,
        backup: reg(1),
    };
    assert_eq!(
        a,
        vec![
            Action::Disconnect { peer: B },
            Action::ToWitness(drop),
            reject(B, RejectReason::Busy)
        ]
    );
}

// --- Epoch policies ---

fn output_driven(max_idle_pct: u8) -> crate::config::Config {
    let mut cfg = config();
    cfg.epoch_policy = crate::EpochPolicy::Output(crate::OutputDriven {
        min_gap: Duration::from_millis(1),
        max_idle_pct,
    });
    cfg
}

fn captures(a: &[Action]) -> Vec<Epoch> {
    a.iter()
        .filter_map(|a| match a {
            Action::Capture { epoch, .. } => Some(*epoch),
            _ => None,
        })
        .collect()
}

fn capture_done(p: &mut One, e: u64) -> Vec<Action> {
    p.on(Input::CaptureDone {
        epoch: Epoch(e),
        pages: 1,
        bytes: 4096,
    })
}

#[test]
fn under_fixed_epochs_held_output_waits_for_the_epoch_to_end() {
    let (mut p, _w) = protected();
    p.now = p.now + Duration::from_millis(2);
    let a = p.on(Input::OutputHeld { epoch: Epoch(2) });
    assert!(captures(&a).is_empty(), "{a:?}");
    assert_eq!(
        p.node.poll_timeout(),
        Some(crate::time::Time::from_duration(Duration::from_millis(10))),
        "only the heartbeat is due before the epoch's end"
    );
}

#[test]
fn under_the_output_policy_held_output_ends_the_epoch_after_the_gap() {
    let (mut p, _w) = protected_with(output_driven(25));
    // The sync capture took no time, so the 1 ms minimum gap rules.
    p.now = p.now + Duration::from_micros(500);
    let a = p.on(Input::OutputHeld { epoch: Epoch(2) });
    assert!(captures(&a).is_empty(), "within the gap: {a:?}");
    assert_eq!(
        p.node.poll_timeout(),
        Some(crate::time::Time::from_duration(Duration::from_millis(1)))
    );
    let a = p.at(crate::time::Time::from_duration(Duration::from_millis(1)));
    assert_eq!(captures(&a), [Epoch(2)]);
    // A frame of the epoch under capture does not ask for another one.
    p.on(Input::OutputHeld { epoch: Epoch(2) });
    // This pause lasts 4 ms: at 25 % idle the VM must now run 12 ms before an early capture.
    p.now = p.now + Duration::from_millis(4);
    let a = capture_done(&mut p, 2);
    assert!(a.contains(&Action::ResumeVm { epoch: Epoch(3) }), "{a:?}");
    p.on(Input::CheckpointSent { epoch: Epoch(2) });
    p.on(ack(B, 2));
    let resumed = p.now;
    p.now = p.now + Duration::from_millis(1);
    let a = p.on(Input::OutputHeld { epoch: Epoch(3) });
    assert!(captures(&a).is_empty(), "{a:?}");
    let a = p.at(resumed + Duration::from_millis(11));
    assert!(captures(&a).is_empty(), "{a:?}");
    let a = p.at(resumed + Duration::from_millis(12));
    assert_eq!(captures(&a), [Epoch(3)]);
}

#[test]
fn held_output_never_puts_more_than_max_unacked_checkpoints_in_flight() {
    let (mut p, _w) = protected_with(output_driven(100));
    for e in 2..=3 {
        p.now = p.now + Duration::from_millis(1);
        let a = p.on(Input::OutputHeld { epoch: Epoch(e) });
        assert_eq!(captures(&a), [Epoch(e)], "epoch {e}");
        capture_done(&mut p, e);
        p.on(Input::CheckpointSent { epoch: Epoch(e) });
    }
    // Epochs 2 and 3 unacked: the limit of 2 is reached.
    p.now = p.now + Duration::from_millis(1);
    let a = p.on(Input::OutputHeld { epoch: Epoch(4) });
    assert!(captures(&a).is_empty(), "{a:?}");
    let a = p.on(ack(B, 2));
    assert_eq!(captures(&a), [Epoch(4)], "the ack frees a slot: {a:?}");
}

#[test]
fn held_output_of_an_old_epoch_changes_nothing() {
    let (mut p, _w) = protected_with(output_driven(25));
    p.now = p.now + Duration::from_millis(5);
    let a = p.on(Input::OutputHeld { epoch: Epoch(1) });
    assert!(captures(&a).is_empty(), "{a:?}");
}

#[test]
fn a_resume_reported_late_lengthens_the_pause_the_output_policy_spaces_captures_by() {
    let (mut p, _w) = protected_with(output_driven(50));
    p.now = p.now + Duration::from_millis(1);
    let a = p.on(Input::OutputHeld { epoch: Epoch(2) });
    assert_eq!(captures(&a), [Epoch(2)]);
    // CaptureDone 1 ms after the capture, but the VM runs again only 4 ms after it.
    p.now = p.now + Duration::from_millis(1);
    capture_done(&mut p, 2);
    p.on(Input::CheckpointSent { epoch: Epoch(2) });
    p.now = p.now + Duration::from_millis(3);
    p.on(Input::Resumed {
        epoch: Epoch(3),
        paused_us: 0,
    });
    let resumed = p.now;
    p.on(ack(B, 2));
    let a = p.on(Input::OutputHeld { epoch: Epoch(3) });
    assert!(captures(&a).is_empty(), "{a:?}");
    // At 50 % the VM must run as long as it was paused (4 ms), counted from the real resume.
    let a = p.at(resumed + Duration::from_micros(3_900));
    assert!(captures(&a).is_empty(), "{a:?}");
    let a = p.at(resumed + Duration::from_millis(4));
    assert_eq!(captures(&a), [Epoch(3)]);
    // A second report of the same resume changes nothing.
    p.on(Input::Resumed {
        epoch: Epoch(3),
        paused_us: 0,
    });
}

#[test]
fn the_pause_the_driver_measured_is_the_one_the_output_policy_uses() {
    let (mut p, _w) = protected_with(output_driven(50));
    p.now = p.now + Duration::from_millis(1);
    assert_eq!(
        captures(&p.on(Input::OutputHeld { epoch: Epoch(2) })),
        [Epoch(2)]
    );
    p.now = p.now + Duration::from_millis(4);
    capture_done(&mut p, 2);
    p.on(Input::CheckpointSent { epoch: Epoch(2) });
    // The model saw 4 ms from its Capture; the VM was stopped 2 ms of them.
    p.on(Input::Resumed {
        epoch: Epoch(3),
        paused_us: 2_000,
    });
    let resumed = p.now;
    p.on(ack(B, 2));
    p.on(Input::OutputHeld { epoch: Epoch(3) });
    assert!(captures(&p.at(resumed + Duration::from_micros(1_900))).is_empty());
    assert_eq!(
        captures(&p.at(resumed + Duration::from_millis(2))),
        [Epoch(3)]
    );
}

#[test]
fn a_joiner_with_another_disk_size_is_refused_for_good() {
    let mut cfg = config();
    cfg.disk_blocks = 64;
    let mut p = One::with(cfg.clone(), P, Start::Primary);
    p.on(Input::Timeout);
    let join = |disk_blocks: u64| Input::Message {
        from: B,
        msg: PeerMsg::Join {
            vm: cfg.vm,
            node: B,
            ram_pages: cfg.ram_pages,
            page_size: cfg.page_size,
            disk_blocks,
            known: Generation::UNKNOWN,
            replica: None,
        },
    };
    // No disk, a smaller one, a larger one: all refused, and the reason is permanent.
    for disk in [0, 63, 65] {
        assert_eq!(
            p.on(join(disk)),
            vec![reject(B, RejectReason::DiskSizeMismatch)]
        );
        assert_eq!(p.status().phase, Phase::Waiting);
        assert_eq!(p.status().peer, None);
    }
    assert!(RejectReason::DiskSizeMismatch.is_permanent());
    // The same disk size is accepted: the primary starts the sync.
    let a = p.on(join(64));
    assert!(
        !a.iter().any(|a| matches!(
            a,
            Action::Send {
                msg: PeerMsg::Reject { .. },
                ..
            }
        )),
        "{a:?}"
    );
    assert_eq!(p.status().peer, Some(B));
}

// --- Catch-up syncs ---

/// `join(from)` offering a replica of `epoch` (synced at 1) of `generation` and `lineage`.
fn join_with(from: NodeId, generation: Generation, lineage: u64, epoch: u64) -> Input {
    let replica = crate::msg::ReplicaAt {
        generation,
        lineage,
        since: Epoch(1),
        epoch: Epoch(epoch),
    };
    join_offering(from, Some(replica))
}

/// A protected primary (lineage 7) that captured and got acks for epochs 2 and 3, then lost
/// B and had the drop granted: degraded, ready for B's next join.
fn degraded_after_three_epochs() -> One {
    let mut cfg = config();
    cfg.incarnation = 7;
    let (mut p, mut w) = protected_with(cfg.clone());
    for e in 2..=3 {
        p.after(cfg.epoch_interval);
        capture_done(&mut p, e);
        p.on(Input::CheckpointSent { epoch: Epoch(e) });
        p.on(ack(B, e));
    }
    p.on(Input::Disconnected { peer: B });
    let a = p.after(config().rejoin_grace());
    let Some(Action::ToWitness(drop)) = a
        .iter()
        .copied()
        .find(|a| matches!(a, Action::ToWitness(WitnessRequest::DropBackup { .. })))
    else {
        panic!("{a:?}")
    };
    p.on(Input::WitnessReply(w.handle(p.now, drop)));
    assert_eq!(p.status().phase, Phase::Degraded);
    p
}

fn sync_start_base(a: &[Action]) -> Option<Option<Epoch>> {
    a.iter().find_map(|a| match a {
        Action::Send {
            msg: PeerMsg::SyncStart { base, .. },
            ..
        } => Some(*base),
        _ => None,
    })
}

#[test]
fn a_replica_this_primary_made_is_caught_up_not_synced_in_full() {
    let mut p = degraded_after_three_epochs();
    let a = p.on(join_with(B, G1, 7, 2));
    assert_eq!(sync_start_base(&a), Some(Some(Epoch(2))));
    assert!(a.contains(&Action::Capture {
        epoch: Epoch(4),
        scope: Scope::Since(Epoch(2))
    }));
    assert!(
        !a.contains(&Action::SetOutputGate(Gate::Held)),
        "no backup yet"
    );
    // The catch-up travels as a checkpoint that applies on top of the replica.
    let a = capture_done(&mut p, 4);
    assert!(a.contains(&Action::SendCheckpoint {
        to: B,
        epoch: Epoch(4),
        full: false,
        generation: G1
    }));
    // Its ack closes the gate for the running epoch, whose ack registers B afresh with the
    // catch-up's epoch as its token.
    p.on(Input::CheckpointSent { epoch: Epoch(4) });
    let a = p.on(ack(B, 4));
    assert!(a.contains(&Action::SetOutputGate(Gate::Held)), "{a:?}");
    capture_done(&mut p, 5);
    let a = p.on(ack(B, 5));
    assert_eq!(
        a,
        vec![Action::ToWitness(WitnessRequest::RegisterBackup {
            generation: G1,
            primary: P,
            backup: reg(4),
        })]
    );
}

#[test]
fn a_replica_of_another_history_gets_a_full_sync_and_says_why() {
    use crate::action::{Event, FullSyncReason};
    let cases = [
        (join_with(B, G1, 8, 2), FullSyncReason::OtherLineage),
        (
            join_with(B, Generation(2), 7, 2),
            FullSyncReason::OtherGeneration,
        ),
        (join_with(B, G1, 7, 9), FullSyncReason::OutsideHistory),
        (join(B), FullSyncReason::NoReplica),
    ];
    for (join, why) in cases {
        let mut p = degraded_after_three_epochs();
        let a = p.on_logged(join);
        assert_eq!(sync_start_base(&a), Some(None), "{why:?}");
        assert!(a.contains(&Action::PreCopy { epoch: Epoch(4) }));
        assert!(a.iter().any(|a| matches!(
            a,
            Action::Log(Event::SyncChosen { base: None, full_because: Some(w), .. }) if *w == why
        )));
    }
}

#[test]
fn a_replica_of_an_older_generation_gets_a_full_sync() {
    use crate::action::{Event, FullSyncReason};
    // A primary of generation 2 (after a takeover from epoch 5) with lineage 0.
    let cfg = config();
    let mut primary = crate::primary::Primary::after_takeover(Generation(2), Epoch(5));
    let mut ctx = crate::ctx::Ctx::new(&cfg, P, crate::time::Time::ZERO);
    primary.handle(&mut ctx, join_with(B, G1, 0, 4));
    assert!(ctx.out.iter().any(|a| matches!(
        a,
        Action::Log(Event::SyncChosen {
            full_because: Some(FullSyncReason::OtherGeneration),
            ..
        })
    )));
}

#[test]
fn a_registered_backup_whose_link_closed_is_awaited_then_continued_with_a_catch_up() {
    let (mut p, _w) = protected();
    let cfg = config();
    for e in 2..=3 {
        p.after(cfg.epoch_interval);
        capture_done(&mut p, e);
        p.on(Input::CheckpointSent { epoch: Epoch(e) });
    }
    p.on(ack(B, 2));
    // The backup found 3 damaged and closed its link: no drop, output held, registration kept.
    // Its link is gone: nothing to close (a `Disconnect` could close its rejoin's new link).
    let a = p.on(Input::Disconnected { peer: B });
    assert_eq!(a, vec![]);
    let s = p.status();
    assert_eq!(
        (s.phase, s.gate, s.registration),
        (Phase::Rejoining, Some(Gate::Held), Some(reg(1)))
    );
    assert!(
        captures(&p.after(cfg.epoch_interval)).is_empty(),
        "no stream, no capture"
    );
    // It rejoins offering its replica of 2: the stream continues with a catch-up from 2.
    let a = p.on(join_with(B, G1, 0, 2));
    assert!(a.contains(&Action::Send {
        to: B,
        msg: PeerMsg::SyncStart {
            generation: G1,
            epoch: Epoch(4),
            base: Some(Epoch(2)),
            lineage: 0,
            continues: true,
        }
    }));
    assert!(a.contains(&Action::Capture {
        epoch: Epoch(4),
        scope: Scope::Since(Epoch(2))
    }));
    assert!(
        !a.iter().any(|a| matches!(a, Action::ToWitness(_))),
        "no drop"
    );
    let a = capture_done(&mut p, 4);
    assert!(a.contains(&Action::SendCheckpoint {
        to: B,
        epoch: Epoch(4),
        full: false,
        generation: G1
    }));
    assert_eq!(
        p.on(ack(B, 4)),
        vec![Action::ReleaseOutput { through: Epoch(4) }]
    );
    let s = p.status();
    assert_eq!((s.phase, s.registration), (Phase::Protected, Some(reg(1))));
}

#[test]
fn a_rejoin_arriving_during_a_capture_is_taken_up_when_the_capture_is_done() {
    let (mut p, _w) = protected();
    let cfg = config();
    // Epoch 2's capture is under way when the backup's link closes and its rejoin arrives.
    assert_eq!(captures(&p.after(cfg.epoch_interval)), vec![Epoch(2)]);
    p.on(Input::Disconnected { peer: B });
    let a = p.on(join_with(B, G1, 0, 1));
    assert_eq!(a, vec![], "neither rejected nor started: a capture runs");
    let a = capture_done(&mut p, 2);
    assert!(
        a.contains(&Action::Send {
            to: B,
            msg: PeerMsg::SyncStart {
                generation: G1,
                epoch: Epoch(3),
                base: Some(Epoch(1)),
                lineage: 0,
                continues: true,
            }
        }),
        "{a:?}"
    );
    assert!(a.contains(&Action::Capture {
        epoch: Epoch(3),
        scope: Scope::Since(Epoch(1))
    }));
    assert_eq!(p.status().phase, Phase::Protected);
    // Had the grace run out first, the waiting offer is refused with the drop.
    let (mut p, _w) = protected();
    p.after(cfg.epoch_interval);
    p.on(Input::Disconnected { peer: B });
    p.on(join_with(B, G1, 0, 1));
    let a = p.after(cfg.rejoin_grace());
    assert!(a.contains(&reject(B, RejectReason::Busy)), "{a:?}");
    assert_eq!(p.status().phase, Phase::Dropping);
}

#[test]
fn a_backup_that_does_not_rejoin_within_the_grace_or_offers_too_little_is_dropped() {
    let drop = Action::ToWitness(WitnessRequest::DropBackup {
        generation: G1,
        primary: P,
        backup: reg(1),
    });
    let (mut p, _w) = protected();
    p.on(Input::Disconnected { peer: B });
    assert_eq!(p.after(config().rejoin_grace()), vec![drop]);
    assert_eq!(p.status().phase, Phase::Dropping);
    // Offering an epoch before the sync it is registered with cannot continue it.
    let (mut p, _w) = protected();
    p.on(Input::Disconnected { peer: B });
    let a = p.on(join_with(B, G1, 0, 0));
    assert_eq!(a, vec![drop, reject(B, RejectReason::Busy)]);
    // Silence is no closed link: dropped at once.
    let (mut p, _w) = protected();
    let a = p.after(config().failure_timeout);
    assert!(a.contains(&drop), "{a:?}");
}
