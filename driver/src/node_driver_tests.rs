use ftvm_model::{Config, Gate, Generation, NodeId, PeerMsg, Start, VmId};

use super::*;
use crate::journal::{replay, Divergence};

type Driver = NodeDriver<u64, &'static str>;

fn config() -> Config {
    Config::new(VmId(7), 16, NodeId(0))
}

fn backup() -> Driver {
    NodeDriver::new(Node::new(
        config(),
        NodeId(2),
        Start::Backup { primary: NodeId(1) },
    ))
}

fn staged(epoch: u64) -> StagedCheckpoint {
    StagedCheckpoint {
        epoch,
        ..StagedCheckpoint::default()
    }
}

fn live(d: &mut Driver, conn: u64, peer: u32) {
    d.dialling(NodeId(peer), conn);
    assert_eq!(
        d.connected(conn, NodeId(peer)),
        Verdict::Feed(Input::Connected { peer: NodeId(peer) })
    );
}

#[test]
fn checkpoints_count_only_from_live_links_and_damaged_ones_are_not_ok() {
    let mut d = backup();
    let ev = LinkEvent::CheckpointReceived(staged(3));
    assert_eq!(d.on_link(5, ev), Verdict::Ignore, "no live link yet");
    assert!(d.staged().is_empty());
    live(&mut d, 5, 1);
    assert_eq!(
        d.on_link(5, LinkEvent::CheckpointStarted(Epoch(3))),
        Verdict::Feed(Input::CheckpointStarted { epoch: Epoch(3) })
    );
    assert_eq!(
        d.on_link(5, LinkEvent::CheckpointReceived(staged(3))),
        Verdict::Feed(Input::CheckpointReceived {
            epoch: Epoch(3),
            ok: true
        })
    );
    let damaged = LinkEvent::CheckpointDamaged {
        epoch: Epoch(4),
        partial: Some(staged(4)),
    };
    assert_eq!(
        d.on_link(5, damaged),
        Verdict::Feed(Input::CheckpointReceived {
            epoch: Epoch(4),
            ok: false
        })
    );
    assert_eq!(
        d.staged().keys().copied().collect::<Vec<_>>(),
        vec![Epoch(3), Epoch(4)],
        "what arrived of a damaged checkpoint is kept beside it"
    );
}

#[test]
fn a_commit_takes_its_checkpoint_and_drops_older_ones() {
    let mut d = backup();
    live(&mut d, 5, 1);
    for e in 1..=4 {
        d.on_link(5, LinkEvent::CheckpointReceived(staged(e)));
    }
    let e = d.bookkeep(
        Time::ZERO,
        Action::Commit {
            epoch: Epoch(3),
            replica: ftvm_model::ReplicaAt::default(),
        },
    );
    assert_eq!(e.staged.map(|s| s.epoch), Some(3));
    assert_eq!(d.staged().keys().copied().collect::<Vec<_>>(), [Epoch(4)]);
    let e = d.bookkeep(
        Time::ZERO,
        Action::Commit {
            epoch: Epoch(3),
            replica: ftvm_model::ReplicaAt::default(),
        },
    );
    assert!(e.staged.is_none(), "never staged twice");
    d.bookkeep(Time::ZERO, Action::DiscardStaged);
    assert!(d.staged().is_empty());
}

#[test]
fn sends_go_on_the_peers_live_link_and_a_new_dial_supersedes_it() {
    let mut d = backup();
    live(&mut d, 5, 1);
    let msg = PeerMsg::Heartbeat {
        generation: Generation(1),
        epoch: Epoch(0),
    };
    let e = d.bookkeep(Time::ZERO, Action::Send { to: NodeId(1), msg });
    assert_eq!(e.link, Some(5));
    let e = d.bookkeep(Time::ZERO, Action::Connect { to: NodeId(1) });
    assert_eq!(e.close, vec![5], "the old link is closed");
    assert_eq!(d.heard(5), Verdict::Ignore, "and speaks for nobody");
    let e = d.bookkeep(Time::ZERO, Action::Send { to: NodeId(1), msg });
    assert_eq!(e.link, None);
}

#[test]
fn the_gate_holds_releases_opens_and_a_fence_drops_and_closes_everything() {
    let mut d = backup();
    live(&mut d, 5, 1);
    assert_eq!(
        d.accepted(6, NodeId(3)),
        Accepted::Admitted(Verdict::Ignore)
    );
    d.bookkeep(Time::ZERO, Action::ResumeVm { epoch: Epoch(1) });
    assert_eq!(d.emit(Time::ZERO, "a").frame, None);
    d.bookkeep(Time::ZERO, Action::ResumeVm { epoch: Epoch(2) });
    assert_eq!(d.emit(Time::ZERO, "b").frame, None);
    let e = d.bookkeep(Time::ZERO, Action::ReleaseOutput { through: Epoch(1) });
    assert_eq!(e.released, vec!["a"]);
    // The VM runs epoch 2, which is not released: "c" waits too.
    assert_eq!(d.emit(Time::ZERO, "c").frame, None);
    let e = d.bookkeep(Time::ZERO, Action::Fence);
    assert_eq!(e.dropped, vec!["b", "c"]);
    let mut closed = e.close;
    closed.sort();
    assert_eq!(closed, vec![5, 6]);
    assert_eq!(
        d.emit(Time::ZERO, "d").frame,
        None,
        "fenced: nothing leaves"
    );
    let e = d.bookkeep(Time::ZERO, Action::SetOutputGate(Gate::Open));
    assert!(e.released.is_empty());
    // Taking over later runs a new VM behind a new gate, tagged from the restored epoch on.
    d.bookkeep(
        Time::ZERO,
        Action::StartVm {
            from: Epoch(9),
            generation: Generation(3),
        },
    );
    assert!(!d.gate().is_fenced());
    assert_eq!(d.gate().tag(), Epoch(10));
    let e = d.bookkeep(Time::ZERO, Action::SetOutputGate(Gate::Open));
    assert!(e.released.is_empty(), "the old VM's frames stayed dropped");
    assert_eq!(d.emit(Time::ZERO, "e").frame, Some("e"));
}

#[test]
fn a_journal_replays_to_the_same_actions_and_a_tampered_one_does_not() {
    let mut d: Driver = NodeDriver::new(Node::new(config(), NodeId(1), Start::Primary));
    d.record(Time::ZERO, Start::Primary, Journal::new());
    d.handle(Time::ZERO, Input::Timeout);
    // A backup joins: the primary answers, pauses and captures the sync.
    let join = PeerMsg::Join {
        vm: VmId(7),
        node: NodeId(2),
        ram_pages: 16,
        page_size: 4096,
        known: Generation::UNKNOWN,
        replica: None,
        disk_blocks: 0,
    };
    let t = Time::from_duration(std::time::Duration::from_millis(3));
    let from = NodeId(2);
    let answer = d.handle(t, Input::Message { from, msg: join });
    assert!(!answer.is_empty(), "the join is answered");
    if let Some(due) = d.poll_timeout() {
        d.handle(due, Input::Timeout);
    }
    let entries = d.journal_mut().map(|j| j.drain()).unwrap_or_default();
    let inputs = replay(config(), NodeId(1), Start::Primary, &entries).unwrap();
    assert!(inputs >= 2, "{inputs} inputs");
    // Drop one recorded action: the replay must notice.
    let at = entries
        .iter()
        .rposition(|e| matches!(e.record, Record::Action(_)))
        .unwrap();
    let mut tampered = entries.clone();
    tampered.remove(at);
    assert!(matches!(
        replay(config(), NodeId(1), Start::Primary, &tampered),
        Err(Divergence::Actions(_))
    ));
    // The journal says how the node started: a replay as another node diverges.
    assert!(replay(config(), NodeId(2), Start::Rejoin, &entries).is_err());
    // A restarted process's lines follow its own `Started`.
    let mut twice = entries.clone();
    twice.extend(entries.iter().copied());
    assert_eq!(
        replay(config(), NodeId(1), Start::Rejoin, &twice).unwrap(),
        2 * inputs
    );
}

#[test]
fn the_node_hears_of_held_output_once_per_epoch_and_never_when_it_leaves_or_is_dropped() {
    let mut d = backup();
    let held = |e| Some(Input::OutputHeld { epoch: Epoch(e) });
    d.bookkeep(Time::ZERO, Action::ResumeVm { epoch: Epoch(1) });
    assert_eq!(d.emit(Time::ZERO, "a").feed, held(1));
    assert_eq!(d.emit(Time::ZERO, "b").feed, None, "once per epoch");
    d.bookkeep(Time::ZERO, Action::ResumeVm { epoch: Epoch(2) });
    assert_eq!(d.emit(Time::ZERO, "c").feed, held(2));
    d.bookkeep(Time::ZERO, Action::SetOutputGate(Gate::Open));
    let out = d.emit(Time::ZERO, "d");
    assert_eq!(
        (out.frame, out.feed),
        (Some("d"), None),
        "an open gate holds nothing"
    );
    d.bookkeep(Time::ZERO, Action::SetOutputGate(Gate::Held));
    d.bookkeep(Time::ZERO, Action::Fence);
    assert_eq!(
        d.emit(Time::ZERO, "e").feed,
        None,
        "fenced: dropped, not held"
    );
    // A takeover restarts the tags below the old ones: the first held frame is told again.
    d.bookkeep(
        Time::ZERO,
        Action::StartVm {
            from: Epoch(0),
            generation: Generation(2),
        },
    );
    d.bookkeep(Time::ZERO, Action::SetOutputGate(Gate::Held));
    assert_eq!(d.emit(Time::ZERO, "f").feed, held(1));
}
