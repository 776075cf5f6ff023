use std::collections::VecDeque;

use ftvm_driver::{Effect, LinkEvent};
use ftvm_model::{
    Action, Config, Epoch, Gate, Generation, Input, NodeId, ReplicaAt, Scope, Start, VmId,
};

use super::actions::witness_exchange_timeout;
use super::event::{CommitError, ConnId, Event};
use super::mem_vm::MemLauncher;
use super::*;

fn backup(dir: &std::path::Path) -> Agent<MemLauncher> {
    agent(dir, NodeId(2), Start::Backup { primary: NodeId(1) })
}

fn primary(dir: &std::path::Path) -> Agent<MemLauncher> {
    agent(dir, NodeId(1), Start::Primary)
}

/// What the core hands `execute` for an action it did no bookkeeping for.
fn bare(action: Action) -> Effect<ConnId, HeldFrame> {
    Effect::of(action)
}

/// Makes `conn` the live link of `peer` as a dial that connected would.
fn live_link(agent: &mut Agent<MemLauncher>, conn: ConnId, peer: NodeId) {
    agent.driver.dialling(peer, conn);
    assert_eq!(
        agent.driver.connected(conn, peer),
        ftvm_driver::Verdict::Feed(Input::Connected { peer })
    );
}

/// What the model's `Commit` of `epoch` says in a stream of generation 1, lineage 9, synced at
/// epoch 1.
fn replica_at(epoch: u64) -> ReplicaAt {
    ReplicaAt {
        generation: Generation(1),
        lineage: 9,
        since: Epoch(1),
        epoch: Epoch(epoch),
    }
}

fn agent(dir: &std::path::Path, node: NodeId, start: Start) -> Agent<MemLauncher> {
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let cfg = AgentConfig {
        node,
        start,
        model: Config::new(VmId(7), 16, NodeId(0)),
        listen: addr,
        peers: BTreeMap::new(),
        witness: addr.into(),
        replica_dir: dir.join("replica"),
        replica_ram: dir.join("replica.ram"),
        replica_disk: None,
        replica_durable: false,
        transport: TransportKind::Copy,
        capture: CaptureMode::Staged,
        metrics: None,
        status_file: None,
        verbose: false,
        verify_every: None,
        limits: AgentLimits::default(),
        journal: None,
        resume_replica: true,
        identity: Arc::new(
            crate::auth::Identity::generate_set(&[node])
                .unwrap()
                .1
                .remove(&node)
                .unwrap(),
        ),
        protection: Protection::Mac,
    };
    let launcher = MemLauncher {
        ram_bytes: 16 * 4096,
        page_size: 4096,
        pages_per_ms: 1,
        seed: 1,
        cow: Default::default(),
        launched: Default::default(),
        failing_restores: 0,
    };
    Agent::new(cfg, launcher).unwrap()
}

/// A checkpoint the link's reader dropped reaches the model as the simulator reports one:
/// `CheckpointReceived { ok: false }`, and what arrived of it is staged beside it (nothing, here).
#[tokio::test]
async fn a_damaged_checkpoint_reaches_the_model_as_received_not_ok() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = backup(dir.path());
    let conn = ConnId(1_000_001);
    live_link(&mut agent, conn, NodeId(1));
    let mut pending = VecDeque::new();
    let staged = StagedCheckpoint {
        epoch: 5,
        ..StagedCheckpoint::default()
    };
    let ev = Event::Link {
        conn,
        event: LinkEvent::CheckpointReceived(staged),
    };
    agent.on_event(ev, &mut pending).await.unwrap();
    assert!(agent.driver.staged().contains_key(&Epoch(5)));
    pending.clear();
    let ev = Event::Link {
        conn,
        event: LinkEvent::CheckpointDamaged {
            epoch: Epoch(5),
            partial: None,
        },
    };
    agent.on_event(ev, &mut pending).await.unwrap();
    assert_eq!(
        pending,
        [Input::CheckpointReceived {
            epoch: Epoch(5),
            ok: false
        }]
    );
    assert!(!agent.driver.staged().contains_key(&Epoch(5)));
    // From a connection that speaks for no peer: nothing.
    pending.clear();
    let ev = Event::Link {
        conn: ConnId(1_000_002),
        event: LinkEvent::CheckpointDamaged {
            epoch: Epoch(6),
            partial: None,
        },
    };
    agent.on_event(ev, &mut pending).await.unwrap();
    assert!(pending.is_empty());
}

/// A commit the replica refuses is a typed error, and one of an epoch never staged too.
#[tokio::test]
async fn commit_failures_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = backup(dir.path());
    let mut pending = VecDeque::new();
    agent
        .execute(
            bare(Action::Commit {
                epoch: Epoch(3),
                replica: replica_at(3),
            }),
            &mut pending,
        )
        .await
        .unwrap();
    let ev = agent.rx.recv().await.unwrap();
    let Event::Committed { epoch, error } = ev else {
        panic!("expected the commit's result");
    };
    assert_eq!(epoch, Epoch(3));
    assert!(matches!(error, Some(CommitError::NotStaged)));
    let err = agent
        .on_event(Event::Committed { epoch, error }, &mut pending)
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        AgentError::Commit {
            epoch: 3,
            source: CommitError::NotStaged
        }
    ));
}

#[test]
fn a_witness_exchange_outlives_many_resends_within_bounds() {
    use std::time::Duration;
    assert_eq!(
        witness_exchange_timeout(Duration::from_millis(50)),
        Duration::from_secs(1)
    );
    assert_eq!(
        witness_exchange_timeout(Duration::from_millis(5)),
        Duration::from_millis(500)
    );
    assert_eq!(
        witness_exchange_timeout(Duration::from_secs(1)),
        Duration::from_secs(5)
    );
}

/// A fresh primary's first `ResumeVm` boots its VM; `PauseVm` and `Capture` then produce a
/// checkpoint of the epoch with every page when full, and `CaptureDone` for the model.
#[tokio::test]
async fn resume_boots_and_capture_stages_the_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = primary(dir.path());
    let mut pending = VecDeque::new();
    let resume = bare(Action::ResumeVm { epoch: Epoch(1) });
    agent.execute(resume, &mut pending).await.unwrap();
    assert!(agent.vm.is_some(), "booted");
    agent
        .execute(bare(Action::PauseVm), &mut pending)
        .await
        .unwrap();
    assert!(agent.paused_at.is_some());
    let capture = bare(Action::Capture {
        epoch: Epoch(1),
        scope: Scope::Full,
    });
    agent.execute(capture, &mut pending).await.unwrap();
    let captured = agent.captured.as_ref().expect("captured");
    assert_eq!((captured.epoch, captured.full), (1, true));
    // A full capture lists the pages that are not zero.
    let ram = agent.vm.as_ref().expect("a VM").guest_ram();
    let nonzero: Vec<u64> = (0..ram.pages())
        .filter(|&p| ram.page(p).is_some_and(|b| b.iter().any(|&x| x != 0)))
        .collect();
    assert_eq!(captured.indices, nonzero);
    let n = nonzero.len() as u64;
    assert!(matches!(
        pending.pop_front(),
        Some(Input::CaptureDone {
            epoch: Epoch(1),
            pages,
            ..
        }) if pages == n
    ));
    let resume = bare(Action::ResumeVm { epoch: Epoch(2) });
    agent.execute(resume, &mut pending).await.unwrap();
    assert!(agent.paused_at.is_none(), "the pause was recorded");
    assert!(
        agent.open_epochs.contains_key(&1),
        "epoch 1 waits for its ack"
    );
}

/// A capture with no VM is a typed error, not a panic.
#[tokio::test]
async fn capture_without_a_vm_fails_typed() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = backup(dir.path());
    let capture = bare(Action::Capture {
        epoch: Epoch(1),
        scope: Scope::Epoch,
    });
    let err = agent
        .execute(capture, &mut VecDeque::new())
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::Vm(_)), "{err}");
}

/// A staged checkpoint handed to `Commit` reaches the replica and `Committed` reports it.
#[tokio::test]
async fn commit_applies_the_staged_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = backup(dir.path());
    let staged = StagedCheckpoint {
        generation: 1,
        epoch: 4,
        full: true,
        indices: vec![3],
        data: vec![7; 4096],
        device: b"dev".to_vec(),
        spooled: 0,
        disk_data: Vec::new(),
        disk_indices: Vec::new(),
    };
    let mut commit = bare(Action::Commit {
        epoch: Epoch(4),
        replica: replica_at(4),
    });
    commit.staged = Some(staged);
    let mut pending = VecDeque::new();
    agent.execute(commit, &mut pending).await.unwrap();
    let ev = agent.rx.recv().await.unwrap();
    agent.on_event(ev, &mut pending).await.unwrap();
    assert_eq!(pending, [Input::Committed { epoch: Epoch(4) }]);
    let mut r = agent.replica.lock().unwrap();
    assert_eq!(r.committed().map(|c| c.epoch), Some(4));
    assert_eq!(r.device_state().unwrap(), b"dev");
}

/// `StartVm` restores the VM from the replica and tells the model it runs.
#[tokio::test]
async fn start_vm_restores_from_the_replica() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = backup(dir.path());
    let mut pending = VecDeque::new();
    let mut commit = bare(Action::Commit {
        epoch: Epoch(1),
        replica: replica_at(1),
    });
    commit.staged = Some(StagedCheckpoint {
        generation: 1,
        epoch: 1,
        full: true,
        device: b"dev".to_vec(),
        ..StagedCheckpoint::default()
    });
    agent.execute(commit, &mut pending).await.unwrap();
    let ev = agent.rx.recv().await.unwrap();
    agent.on_event(ev, &mut pending).await.unwrap();
    pending.clear();
    let start = bare(Action::StartVm {
        from: Epoch(1),
        generation: Generation(2),
    });
    agent.execute(start, &mut pending).await.unwrap();
    assert!(agent.vm.is_some());
    assert_eq!(pending, [Input::VmStarted]);
    assert_eq!(agent.launcher.launched.lock().unwrap().len(), 1);
}

/// `Fence` kills the VM and closes the links the core hands it; the frames it drops are
/// refunded to the output cap.
#[tokio::test]
async fn fence_kills_the_vm_and_drops_held_output() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = primary(dir.path());
    let mut pending = VecDeque::new();
    let resume = bare(Action::ResumeVm { epoch: Epoch(1) });
    agent.execute(resume, &mut pending).await.unwrap();
    let now = Instant::now();
    agent.output_cap.charge(100, now);
    let mut fence = bare(Action::Fence);
    fence.dropped = vec![HeldFrame::new(vec![0; 100], now)];
    fence.close = vec![ConnId(9)];
    agent.execute(fence, &mut pending).await.unwrap();
    assert!(agent.vm.is_none(), "killed");
    assert_eq!(agent.output_cap.stats(Instant::now()).held_bytes, 0);
    assert_eq!(agent.output.take_stats().dropped, 1);
}

/// Frames of the VM go through the core's gate: a fresh primary's gate holds them (tagged
/// with the epoch), and their bytes stay charged to the output cap until they leave.
#[tokio::test]
async fn vm_frames_are_held_at_the_cores_gate() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = primary(dir.path());
    let mut pending = VecDeque::new();
    // The start as the agent's loop runs it: the core's effects, executed.
    for effect in agent.driver.handle(Time::ZERO, Input::Timeout) {
        agent.execute(effect, &mut pending).await.unwrap();
    }
    assert!(agent.vm.is_some(), "booted");
    agent.output_cap.charge(3, Instant::now());
    agent
        .on_event(Event::VmFrame(vec![1, 2, 3]), &mut pending)
        .await
        .unwrap();
    assert_eq!(agent.driver.gate().held(), 1, "held");
    assert_eq!(agent.driver.gate().gate(), Gate::Held);
    assert_eq!(agent.output_cap.stats(Instant::now()).held_bytes, 3);
    assert_eq!(agent.output.take_stats().passed, 0);
}

/// A replica lock poisoned by a panicking thread stops a takeover with its own error, not as a
/// configuration problem.
#[tokio::test]
async fn a_poisoned_replica_lock_is_its_own_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = backup(dir.path());
    let replica = agent.replica.clone();
    let panicked = std::thread::spawn(move || {
        let _held = replica.lock().unwrap();
        panic!("poisoning the replica lock on purpose");
    })
    .join();
    assert!(panicked.is_err());
    let start = bare(Action::StartVm {
        from: Epoch(1),
        generation: ftvm_model::Generation(2),
    });
    let err = agent
        .execute(start, &mut VecDeque::new())
        .await
        .unwrap_err();
    assert!(
        matches!(err, AgentError::ReplicaLockPoisoned),
        "expected ReplicaLockPoisoned, got {err:?}"
    );
}

/// A backup start with a kept, resumable replica becomes `Start::Resume` from it (unless
/// `resume_replica` is off); a primary start, or a replica with nothing to offer, is left as
/// configured.
#[test]
fn a_backup_start_resumes_from_a_kept_replica() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = backup(dir.path()).cfg;
    let kept = replica_at(6);
    let resume = Start::Resume { replica: kept };
    assert_eq!(start_with(&cfg, Some(kept)), resume);
    assert_eq!(start_with(&cfg, None), cfg.start);
    cfg.start = Start::Rejoin;
    assert_eq!(start_with(&cfg, Some(kept)), resume);
    cfg.resume_replica = false;
    assert_eq!(start_with(&cfg, Some(kept)), Start::Rejoin);
    cfg.resume_replica = true;
    cfg.start = Start::Primary;
    assert_eq!(start_with(&cfg, Some(kept)), Start::Primary);
}

/// An agent draws its lineage at start, and a backup whose replica directory holds a committed
/// replica starts as a joiner offering it (the model asks the witness first), not as the
/// configured backup.
#[tokio::test]
async fn an_agent_draws_its_lineage_and_resumes_from_its_replica_directory() {
    let dir = tempfile::tempdir().unwrap();
    let agent = backup(dir.path());
    assert_ne!(agent.cfg.model.incarnation, 0, "a lineage was drawn");
    assert!(matches!(
        agent.driver.node().role(),
        ftvm_model::Role::Backup(_)
    ));
    {
        let mut r = agent.replica.lock().unwrap();
        let staged = StagedCheckpoint {
            generation: 1,
            epoch: 6,
            device: b"dev".to_vec(),
            ..StagedCheckpoint::default()
        };
        r.commit(&staged, replica_at(6)).unwrap();
    }
    drop(agent);
    let agent = backup(dir.path());
    assert!(
        matches!(agent.driver.node().role(), ftvm_model::Role::Joiner(_)),
        "{:?}",
        agent.driver.node().role()
    );
    assert_eq!(
        agent.replica.lock().unwrap().replica_at(),
        Some(replica_at(6))
    );
}
