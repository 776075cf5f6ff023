use std::collections::VecDeque;

use ftvm_model::{Config, Epoch, Input, NodeId, Start, VmId};

use super::event::{ConnId, Event};
use super::mem_vm::MemLauncher;
use super::*;

fn backup(dir: &std::path::Path) -> Agent<MemLauncher> {
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let cfg = AgentConfig {
        node: NodeId(2),
        start: Start::Backup { primary: NodeId(1) },
        model: Config::new(VmId(7), 16, NodeId(0)),
        listen: addr,
        peers: BTreeMap::new(),
        witness: addr,
        replica_dir: dir.join("replica"),
        replica_ram: dir.join("replica.ram"),
        transport: TransportKind::Copy,
        capture: CaptureMode::Staged,
        metrics: None,
        status_file: None,
        verbose: false,
        verify_every: None,
        limits: AgentLimits::default(),
        identity: Arc::new(
            crate::auth::Identity::generate_set(&[NodeId(2)])
                .unwrap()
                .1
                .remove(&NodeId(2))
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
/// `CheckpointReceived { ok: false }`, and nothing of it stays staged.
#[tokio::test]
async fn a_damaged_checkpoint_reaches_the_model_as_received_not_ok() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = backup(dir.path());
    let conn = ConnId(1_000_001);
    agent.conn_peer.insert(conn, NodeId(1));
    agent.peer_conn.insert(NodeId(1), conn);
    agent.staged.insert(5, StagedCheckpoint::default());
    let mut pending = VecDeque::new();
    let ev = Event::CheckpointDamaged {
        conn,
        epoch: Epoch(5),
        why: "bad frame".into(),
    };
    agent.on_event(ev, &mut pending).await.unwrap();
    assert_eq!(
        pending,
        [Input::CheckpointReceived {
            epoch: Epoch(5),
            ok: false
        }]
    );
    assert!(!agent.staged.contains_key(&5));
    // From a connection that speaks for no peer: nothing.
    pending.clear();
    let ev = Event::CheckpointDamaged {
        conn: ConnId(1_000_002),
        epoch: Epoch(6),
        why: "bad frame".into(),
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
        .execute(Action::Commit { epoch: Epoch(3) }, &mut pending)
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
    let start = Action::StartVm {
        from: Epoch(1),
        generation: ftvm_model::Generation(2),
    };
    let err = agent
        .execute(start, &mut VecDeque::new())
        .await
        .unwrap_err();
    assert!(
        matches!(err, AgentError::ReplicaLockPoisoned),
        "expected ReplicaLockPoisoned, got {err:?}"
    );
}
