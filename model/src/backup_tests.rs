//! Transition tests of the backup role (and its hand-over to primary or joiner), input by input.

use std::time::Duration;

use crate::action::{Action, Gate};
use crate::config::Start;
use crate::ids::{Epoch, Generation, NodeId};
use crate::input::Input;
use crate::msg::{PeerMsg, RejectReason};
use crate::status::{Phase, RoleKind};
use crate::testkit::{config, One};
use crate::witness::Witness;
use crate::witness_msg::{Registration, WitnessRequest};

const P: NodeId = NodeId(1);
const B: NodeId = NodeId(2);
const G1: Generation = Generation(1);

fn from_p(msg: PeerMsg) -> Input {
    Input::Message { from: P, msg }
}

fn ack(e: u64) -> Action {
    Action::Send {
        to: P,
        msg: PeerMsg::Ack {
            generation: G1,
            epoch: Epoch(e),
        },
    }
}

/// The commit of `epoch` of G1 (lineage 0) into a replica synced at `since`.
fn commit(epoch: u64, since: u64) -> Action {
    Action::Commit {
        epoch: Epoch(epoch),
        replica: crate::msg::ReplicaAt {
            generation: G1,
            lineage: 0,
            since: Epoch(since),
            epoch: Epoch(epoch),
        },
    }
}

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

/// A fresh backup B told by P that the full sync of epoch `sync` follows: Syncing.
fn syncing(sync: u64) -> One {
    let mut b = One::new(B, Start::Backup { primary: P });
    b.on(Input::Timeout);
    b.on(Input::Connected { peer: P });
    b.on(from_p(PeerMsg::SyncStart {
        generation: G1,
        epoch: Epoch(sync),
        base: None,
        lineage: 0,
        continues: false,
    }));
    b
}

/// Backup B synced at epoch `sync` (committed, acked): Protecting.
fn protecting(sync: u64) -> One {
    let mut b = syncing(sync);
    b.on(Input::CheckpointReceived {
        epoch: Epoch(sync),
        ok: true,
    });
    b.on(Input::Committed { epoch: Epoch(sync) });
    assert_eq!(b.status().phase, Phase::Protecting);
    b
}

/// A witness where P registered B with token `sync`.
fn witness_with_b(sync: u64) -> Witness {
    let mut w = Witness::new(config().vm, P);
    let backup = Registration {
        node: B,
        since: Epoch(sync),
    };
    let req = WitnessRequest::RegisterBackup {
        generation: G1,
        primary: P,
        backup,
    };
    assert!(w.handle(crate::time::Time::ZERO, req).granted);
    w
}

#[test]
fn joins_syncs_commits_and_acks_in_order() {
    let cfg = config();
    let mut b = One::new(B, Start::Backup { primary: P });
    assert_eq!(b.on(Input::Timeout), vec![Action::Connect { to: P }]);
    assert_eq!(b.status().phase, Phase::Joining);
    let join = PeerMsg::Join {
        vm: cfg.vm,
        node: B,
        ram_pages: cfg.ram_pages,
        page_size: cfg.page_size,
        disk_blocks: cfg.disk_blocks,
        known: Generation::UNKNOWN,
        replica: None,
    };
    assert_eq!(
        b.on(Input::Connected { peer: P }),
        vec![Action::Send { to: P, msg: join }]
    );
    assert!(b
        .on(from_p(PeerMsg::SyncStart {
            generation: G1,
            epoch: Epoch(5),
            base: None,
            lineage: 0,
            continues: false
        }))
        .is_empty());
    assert_eq!(b.status().phase, Phase::Syncing);
    assert_eq!(b.status().generation, G1);
    let a = b.on(Input::CheckpointReceived {
        epoch: Epoch(5),
        ok: true,
    });
    assert_eq!(a, vec![commit(5, 5)]);
    // The next one arrives while 5 commits: it waits its turn.
    assert!(b
        .on(Input::CheckpointReceived {
            epoch: Epoch(6),
            ok: true
        })
        .is_empty());
    let a = b.on(Input::Committed { epoch: Epoch(5) });
    assert_eq!(a, vec![ack(5), commit(6, 5)]);
    let s = b.status();
    assert_eq!(s.phase, Phase::Protecting);
    assert_eq!(
        s.registration,
        Some(Registration {
            node: B,
            since: Epoch(5)
        })
    );
    assert_eq!(b.on(Input::Committed { epoch: Epoch(6) }), vec![ack(6)]);
    assert_eq!(b.status().committed, Some(Epoch(6)));
    assert!(
        b.on(Input::Committed { epoch: Epoch(6) }).is_empty(),
        "duplicate completion"
    );
}

#[test]
fn damaged_or_out_of_order_checkpoint_keeps_the_replica_and_rejoins_at_once() {
    for (epoch, ok) in [(2u64, false), (3, true), (1, true)] {
        let mut b = protecting(1);
        let a = b.on(Input::CheckpointReceived {
            epoch: Epoch(epoch),
            ok,
        });
        assert_eq!(
            a,
            vec![Action::Disconnect { peer: P }, Action::DiscardStaged],
            "{epoch} {ok}"
        );
        let s = b.status();
        assert_eq!(s.phase, Phase::Joining);
        assert_eq!(s.committed, Some(Epoch(1)), "the replica is kept");
        assert_eq!(s.registration.map(|r| r.since), Some(Epoch(1)));
        // It reconnects without waiting for join_retry, offering the replica.
        assert_eq!(b.on(Input::Timeout), vec![Action::Connect { to: P }]);
        let a = b.on(Input::Connected { peer: P });
        assert!(matches!(
            a.as_slice(),
            [Action::Send { msg: PeerMsg::Join { replica: Some(r), .. }, .. }] if r.epoch == Epoch(1)
        ));
        // The primary kept it registered: the catch-up continues the stream, token unchanged.
        assert!(b
            .on(from_p(PeerMsg::SyncStart {
                generation: G1,
                epoch: Epoch(4),
                base: Some(Epoch(1)),
                lineage: 0,
                continues: true,
            }))
            .is_empty());
        assert_eq!(b.status().phase, Phase::Protecting);
        assert_eq!(
            b.on(Input::CheckpointReceived {
                epoch: Epoch(4),
                ok: true
            }),
            vec![commit(4, 1)]
        );
        assert_eq!(b.on(Input::Committed { epoch: Epoch(4) }), vec![ack(4)]);
        assert_eq!(b.status().registration.map(|r| r.since), Some(Epoch(1)));
    }
}

#[test]
fn a_registered_backup_whose_rejoin_link_is_refused_retries_within_the_grace() {
    // The primary has not seen the old link close yet, so it refuses the new one: the backup
    // must try again well before the primary's rejoin grace (the failure timeout) runs out,
    // not after the whole join retry.
    let cfg = config();
    assert!(cfg.heartbeat_interval < cfg.join_retry);
    let mut b = protecting(1);
    b.on(Input::CheckpointReceived {
        epoch: Epoch(2),
        ok: false,
    });
    assert_eq!(b.on(Input::Timeout), vec![Action::Connect { to: P }]);
    b.on(Input::Connected { peer: P });
    assert!(b.on(Input::Disconnected { peer: P }).is_empty());
    assert!(b.after(cfg.heartbeat_interval / 2).is_empty());
    assert_eq!(
        b.after(cfg.heartbeat_interval / 2),
        vec![Action::Connect { to: P }]
    );
    // A backup with nothing registered waits the whole join retry, as before.
    let mut b = syncing(1);
    b.on(Input::Disconnected { peer: P });
    assert!(b.after(cfg.heartbeat_interval).is_empty());
    assert_eq!(
        b.after(cfg.join_retry - cfg.heartbeat_interval),
        vec![Action::Connect { to: P }]
    );
}

#[test]
fn a_continuation_on_another_base_or_after_a_damaged_sync_restarts_the_stream() {
    let mut b = protecting(1);
    b.on(Input::CheckpointReceived {
        epoch: Epoch(2),
        ok: false,
    });
    b.on(Input::Timeout);
    b.on(Input::Connected { peer: P });
    let a = b.on(from_p(PeerMsg::SyncStart {
        generation: G1,
        epoch: Epoch(4),
        base: Some(Epoch(2)),
        lineage: 0,
        continues: true,
    }));
    assert_eq!(a, vec![Action::Disconnect { peer: P }]);
    assert_eq!(b.status().phase, Phase::Joining);
    assert_eq!(b.status().committed, Some(Epoch(1)), "the replica is kept");
    // A damaged sync checkpoint has no replica of its stream to go on from: a fresh join
    // after join_retry.
    let mut b = syncing(1);
    let a = b.on(Input::CheckpointReceived {
        epoch: Epoch(1),
        ok: false,
    });
    assert_eq!(
        a,
        vec![Action::Disconnect { peer: P }, Action::DiscardStaged]
    );
    assert!(b.on(Input::Timeout).is_empty());
    assert_eq!(
        b.after(config().join_retry),
        vec![Action::Connect { to: P }]
    );
}

#[test]
fn link_loss_discards_staged_but_keeps_the_replica() {
    let mut b = protecting(1);
    b.on(Input::CheckpointReceived {
        epoch: Epoch(2),
        ok: true,
    });
    b.on(Input::CheckpointReceived {
        epoch: Epoch(3),
        ok: true,
    });
    let a = b.on(Input::Disconnected { peer: P });
    assert_eq!(a, vec![Action::DiscardStaged]);
    // The commit already under way still lands, but nothing more is committed or acked.
    assert!(b.on(Input::Committed { epoch: Epoch(2) }).is_empty());
    assert_eq!(b.status().committed, Some(Epoch(2)));
    assert_eq!(b.status().phase, Phase::Joining);
}

#[test]
fn takeover_granted_restores_and_becomes_primary_of_the_next_generation() {
    let mut w = witness_with_b(1);
    let mut b = protecting(1);
    b.on(Input::CheckpointReceived {
        epoch: Epoch(2),
        ok: true,
    });
    b.on(Input::Committed { epoch: Epoch(2) });
    let t0 = b.now;
    let timeout = config().failure_timeout;
    assert!(no_hb(b.at(t0 + (timeout - Duration::from_millis(1)))).is_empty());
    let a = b.at(t0 + timeout);
    let takeover = WitnessRequest::Takeover {
        generation: G1,
        backup: Registration {
            node: B,
            since: Epoch(1),
        },
    };
    assert_eq!(
        a,
        vec![
            Action::Disconnect { peer: P },
            Action::DiscardStaged,
            Action::ToWitness(takeover)
        ]
    );
    assert_eq!(b.status().phase, Phase::TakingOver);
    // Heartbeats of the old primary no longer matter; resend until answered.
    assert!(b
        .on(from_p(PeerMsg::Heartbeat {
            generation: G1,
            epoch: Epoch(9)
        }))
        .is_empty());
    assert_eq!(
        b.after(config().witness_retry),
        vec![Action::ToWitness(takeover)]
    );
    let a = b.on(Input::WitnessReply(w.handle(b.now, takeover)));
    let g2 = Generation(2);
    assert_eq!(
        a,
        vec![
            Action::SetOutputGate(Gate::Open),
            Action::StartVm {
                from: Epoch(2),
                generation: g2
            }
        ]
    );
    assert_eq!(b.status().phase, Phase::Restoring);
    assert!(b.on(Input::VmStarted).is_empty());
    let s = b.status();
    assert_eq!(
        (s.role, s.phase, s.generation),
        (RoleKind::Primary, Phase::Degraded, g2)
    );
    assert!(s.failed_over);
    assert_eq!((s.gate, s.running_epoch), (Some(Gate::Open), Epoch(3)));
}

#[test]
fn takeover_denied_gives_the_replica_up_and_rejoins() {
    let mut w = Witness::new(config().vm, P); // P dropped B (or never registered it)
    let mut b = protecting(1);
    let a = b.after(config().failure_timeout);
    let Some(Action::ToWitness(req)) = a.last().copied() else {
        panic!("{a:?}")
    };
    let a = b.on(Input::WitnessReply(w.handle(b.now, req)));
    assert_eq!(a, vec![Action::ToWitness(WitnessRequest::Query)]);
    let s = b.status();
    assert_eq!((s.role, s.committed), (RoleKind::Joiner, None));
    // The witness still names P: join it again (full sync).
    let a = b.on(Input::WitnessReply(w.handle(b.now, WitnessRequest::Query)));
    assert_eq!(a, vec![Action::Connect { to: P }]);
    assert_eq!(b.status().role, RoleKind::Backup);
}

#[test]
fn silence_during_a_commit_waits_for_it_then_takes_over_with_the_new_replica() {
    let mut w = witness_with_b(1);
    let mut b = protecting(1);
    b.on(Input::CheckpointReceived {
        epoch: Epoch(2),
        ok: true,
    }); // Commit { 2 } under way
    let a = b.after(config().failure_timeout);
    assert_eq!(
        a,
        vec![Action::Disconnect { peer: P }, Action::DiscardStaged]
    );
    assert_eq!(b.status().phase, Phase::TakingOver);
    assert_eq!(b.node.poll_timeout(), None, "waiting for the commit");
    let a = b.on(Input::Committed { epoch: Epoch(2) });
    let Some(Action::ToWitness(req)) = a.first().copied() else {
        panic!("{a:?}")
    };
    assert_eq!(a.len(), 1, "no ack to a silent primary: {a:?}");
    let a = b.on(Input::WitnessReply(w.handle(b.now, req)));
    assert!(a.contains(&Action::StartVm {
        from: Epoch(2),
        generation: Generation(2)
    }));
}

#[test]
fn no_replica_no_takeover() {
    let mut b = syncing(1);
    // The primary dies mid-sync: nothing committed, so ask the witness whom to join.
    let a = b.after(config().failure_timeout);
    assert_eq!(
        a,
        vec![
            Action::Disconnect { peer: P },
            Action::DiscardStaged,
            Action::ToWitness(WitnessRequest::Query)
        ]
    );
    assert_eq!(b.status().role, RoleKind::Joiner);
}

#[test]
fn streaming_bytes_keep_a_slow_sync_alive() {
    let mut b = syncing(1);
    for _ in 0..10 {
        b.after(Duration::from_millis(100));
        b.on(Input::Heard { from: P });
    }
    assert_eq!(
        b.status().phase,
        Phase::Syncing,
        "a 1 s transfer is not a dead primary"
    );
}

#[test]
fn permanent_reject_fences_transient_reject_retries() {
    let mut b = One::new(B, Start::Backup { primary: P });
    b.on(Input::Timeout);
    b.on(Input::Connected { peer: P });
    let msg = PeerMsg::Reject {
        generation: G1,
        reason: RejectReason::Busy,
    };
    assert_eq!(b.on(from_p(msg)), vec![Action::Disconnect { peer: P }]);
    assert_eq!(b.status().phase, Phase::Joining);
    assert_eq!(
        b.after(config().join_retry),
        vec![Action::Connect { to: P }]
    );
    b.on(Input::Connected { peer: P });
    let msg = PeerMsg::Reject {
        generation: G1,
        reason: RejectReason::RamSizeMismatch,
    };
    assert_eq!(
        b.on(from_p(msg)),
        vec![Action::Disconnect { peer: P }, Action::Fence]
    );
    assert_eq!(b.status().role, RoleKind::Fenced);
    assert_eq!(b.node.poll_timeout(), None, "misconfigured: never retries");
}

#[test]
fn a_backup_refuses_joiners() {
    let mut b = protecting(1);
    let cfg = config();
    let c = NodeId(3);
    let join = PeerMsg::Join {
        vm: cfg.vm,
        node: c,
        ram_pages: cfg.ram_pages,
        page_size: cfg.page_size,
        disk_blocks: cfg.disk_blocks,
        known: G1,
        replica: None,
    };
    let a = b.on(Input::Message { from: c, msg: join });
    let reject = PeerMsg::Reject {
        generation: G1,
        reason: RejectReason::NotPrimary,
    };
    assert_eq!(a, vec![Action::Send { to: c, msg: reject }]);
}

#[test]
fn heartbeats_flow_both_while_syncing_and_protecting() {
    let mut b = protecting(4);
    let a = b.after(config().heartbeat_interval);
    let hb = PeerMsg::Heartbeat {
        generation: G1,
        epoch: Epoch(4),
    };
    assert_eq!(a, vec![Action::Send { to: P, msg: hb }]);
}

#[test]
fn bytes_while_joining_are_no_sign_of_life() {
    // B follows P, loses the link, and keeps reconnecting to a P that stopped its VM and only
    // closes its connections (or sends bytes that are no busy reject of its generation).
    let mut b = protecting(1);
    b.on(Input::Disconnected { peer: P });
    let ft = config().failure_timeout;
    let step = config().heartbeat_interval;
    let mut waited = Duration::ZERO;
    let mut asked = None;
    while waited <= ft {
        let a = b.after(step);
        waited += step;
        if a.contains(&Action::Connect { to: P }) {
            b.on(Input::Connected { peer: P });
        }
        b.on(Input::Heard { from: P });
        b.on(from_p(PeerMsg::Reject {
            generation: G1,
            reason: RejectReason::NotPrimary,
        }));
        if let Some(Action::ToWitness(r @ WitnessRequest::Takeover { .. })) = a.last() {
            asked = Some(*r);
            break;
        }
    }
    assert!(asked.is_some(), "no takeover within the failure timeout");
    assert!(waited <= ft + step, "asked after {waited:?}");
    assert_eq!(b.status().phase, Phase::TakingOver);
}

#[test]
fn a_backup_announces_its_disk_and_a_disk_mismatch_fences_it() {
    let mut cfg = config();
    cfg.disk_blocks = 1 << 20;
    let mut b = One::with(cfg.clone(), B, Start::Backup { primary: P });
    assert_eq!(b.on(Input::Timeout), vec![Action::Connect { to: P }]);
    let join = PeerMsg::Join {
        vm: cfg.vm,
        node: B,
        ram_pages: cfg.ram_pages,
        page_size: cfg.page_size,
        disk_blocks: 1 << 20,
        known: Generation::UNKNOWN,
        replica: None,
    };
    assert_eq!(
        b.on(Input::Connected { peer: P }),
        vec![Action::Send { to: P, msg: join }]
    );
    let msg = PeerMsg::Reject {
        generation: G1,
        reason: RejectReason::DiskSizeMismatch,
    };
    assert_eq!(
        b.on(from_p(msg)),
        vec![Action::Disconnect { peer: P }, Action::Fence]
    );
    assert_eq!(b.status().role, RoleKind::Fenced);
    assert_eq!(b.node.poll_timeout(), None, "misconfigured: never retries");
}

// --- Catch-up syncs ---

fn offer(epoch: u64) -> Option<crate::msg::ReplicaAt> {
    Some(crate::msg::ReplicaAt {
        generation: G1,
        lineage: 0,
        since: Epoch(1),
        epoch: Epoch(epoch),
    })
}

/// The `Join` B sends after a link loss, having committed through `committed`.
fn rejoin(b: &mut One) -> Option<crate::msg::ReplicaAt> {
    b.on(Input::Disconnected { peer: P });
    assert_eq!(
        b.after(config().join_retry),
        vec![Action::Connect { to: P }]
    );
    let a = b.on(Input::Connected { peer: P });
    match a.as_slice() {
        [Action::Send {
            msg: PeerMsg::Join { replica, .. },
            ..
        }] => *replica,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_rejoining_backup_offers_its_replica_and_commits_the_catch_up_on_top() {
    let mut b = protecting(1);
    b.on(Input::CheckpointReceived {
        epoch: Epoch(2),
        ok: true,
    });
    b.on(Input::Committed { epoch: Epoch(2) });
    assert_eq!(rejoin(&mut b), offer(2));
    let a = b.on(from_p(PeerMsg::SyncStart {
        generation: G1,
        epoch: Epoch(6),
        base: Some(Epoch(2)),
        lineage: 0,
        continues: false,
    }));
    assert!(a.is_empty(), "{a:?}");
    assert_eq!(b.status().phase, Phase::Syncing);
    assert_eq!(
        b.on(Input::CheckpointReceived {
            epoch: Epoch(6),
            ok: true
        }),
        vec![commit(6, 6)]
    );
    assert_eq!(b.on(Input::Committed { epoch: Epoch(6) }), vec![ack(6)]);
    let s = b.status();
    assert_eq!(s.phase, Phase::Protecting);
    assert_eq!(
        s.registration,
        Some(Registration {
            node: B,
            since: Epoch(6)
        }),
        "a catch-up is a sync: the replica's token is its epoch"
    );
}

#[test]
fn a_catch_up_on_top_of_something_else_is_refused() {
    let bad = [
        (Some(Epoch(1)), 0, G1),            // not the epoch offered
        (Some(Epoch(2)), 9, G1),            // another primary's lineage
        (Some(Epoch(7)), 0, G1),            // base not before the sync
        (Some(Epoch(2)), 0, Generation(2)), // another generation
    ];
    for (base, lineage, generation) in bad {
        let mut b = protecting(1);
        b.on(Input::CheckpointReceived {
            epoch: Epoch(2),
            ok: true,
        });
        b.on(Input::Committed { epoch: Epoch(2) });
        rejoin(&mut b);
        let a = b.on(from_p(PeerMsg::SyncStart {
            generation,
            epoch: Epoch(7),
            base,
            lineage,
            continues: false,
        }));
        assert_eq!(
            a,
            vec![Action::Disconnect { peer: P }],
            "{base:?} {lineage}"
        );
        assert_eq!(b.status().phase, Phase::Joining);
        assert_eq!(b.status().committed, Some(Epoch(2)), "the replica is kept");
    }
}

#[test]
fn a_backup_without_a_replica_offers_nothing_and_a_full_sync_replaces_an_offered_one() {
    let mut b = One::new(B, Start::Backup { primary: P });
    b.on(Input::Timeout);
    let a = b.on(Input::Connected { peer: P });
    assert!(matches!(
        a.as_slice(),
        [Action::Send {
            msg: PeerMsg::Join { replica: None, .. },
            ..
        }]
    ));
    let mut b = protecting(1);
    assert_eq!(rejoin(&mut b), offer(1));
    b.on(from_p(PeerMsg::SyncStart {
        generation: G1,
        epoch: Epoch(9),
        base: None,
        lineage: 3,
        continues: false,
    }));
    b.on(Input::CheckpointReceived {
        epoch: Epoch(9),
        ok: true,
    });
    b.on(Input::Committed { epoch: Epoch(9) });
    assert_eq!(
        rejoin(&mut b),
        Some(crate::msg::ReplicaAt {
            generation: G1,
            lineage: 3,
            since: Epoch(9),
            epoch: Epoch(9),
        })
    );
}

#[test]
fn a_restarted_backup_asks_the_witness_then_offers_its_kept_replica() {
    let replica = offer(4).unwrap();
    let mut b = One::new(B, Start::Resume { replica });
    assert_eq!(
        b.on(Input::Timeout),
        vec![Action::ToWitness(WitnessRequest::Query)]
    );
    let w = witness_with_b(1);
    b.on(Input::WitnessReply(crate::witness_msg::WitnessReply {
        request: WitnessRequest::Query,
        granted: true,
        state: *w.state(),
    }));
    assert_eq!(b.status().role, RoleKind::Backup);
    assert_eq!(b.status().committed, Some(Epoch(4)));
    b.on(Input::Timeout);
    let a = b.on(Input::Connected { peer: P });
    assert!(matches!(
        a.as_slice(),
        [Action::Send { msg: PeerMsg::Join { replica: Some(r), .. }, .. }] if *r == replica
    ));
    // A replica of an older generation than the witness names is not kept.
    let mut b = One::new(B, Start::Resume { replica });
    b.on(Input::Timeout);
    let mut state = *w.state();
    state.generation = Generation(2);
    b.on(Input::WitnessReply(crate::witness_msg::WitnessReply {
        request: WitnessRequest::Query,
        granted: true,
        state,
    }));
    assert_eq!(b.status().committed, None);
}
