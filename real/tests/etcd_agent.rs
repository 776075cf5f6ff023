//! Agents (in-memory VM, real sockets) on an etcd witness of a real 3-member cluster: the pair
//! protects and fails over through etcd; with etcd's quorum gone the backup of a dead primary
//! does not take over and the primary of a dead backup keeps its output held, and both carry on
//! once the quorum is back. With etcd's access control on, a backup whose certificate etcd
//! denies never takes over, and the register is left as it was.

mod etcd_common;
mod mem_cluster;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use ftvm_model::{Generation, NodeId, Start, VmId};
use ftvm_real::agent::witness_client::WitnessClient;
use ftvm_real::agent::{Agent, AgentError, AgentExit};
use ftvm_real::etcd_witness::EtcdWitness;
use ftvm_real::host::etcd_cluster::EtcdCluster;

use mem_cluster::*;

const VM: VmId = VmId(7);

type Task = tokio::task::JoinHandle<Result<AgentExit, AgentError>>;

struct Pair {
    p_status: std::path::PathBuf,
    b_status: std::path::PathBuf,
    ptask: Task,
    btask: Task,
    kill_p: Option<tokio::sync::oneshot::Sender<()>>,
    kill_b: Option<tokio::sync::oneshot::Sender<()>>,
    b_launched: std::sync::Arc<std::sync::Mutex<Vec<ftvm_real::agent::mem_vm::MemRam>>>,
}

/// Primary 1 and backup 2 of VM 7 on `witness`, protected.
async fn pair(dir: &Path, witness: &EtcdWitness) -> Pair {
    pair_on(dir, witness, witness).await
}

/// Primary 1 on `wp` and backup 2 on `wb` (one etcd cluster, each with its own certificate),
/// protected; the primary's witness creates the register.
async fn pair_on(dir: &Path, wp: &EtcdWitness, wb: &EtcdWitness) -> Pair {
    let witness = wp;
    witness
        .init(VM, NodeId(1), etcd_common::T)
        .await
        .expect("init");
    let addrs: BTreeMap<NodeId, SocketAddr> =
        [(NodeId(1), free_addr()), (NodeId(2), free_addr())].into();
    let keys = keys();
    let p = host(
        dir,
        1,
        Start::Primary,
        &addrs,
        WitnessClient::Etcd(wp.clone()),
        &keys,
    );
    let b = host(
        dir,
        2,
        Start::Backup { primary: NodeId(1) },
        &addrs,
        WitnessClient::Etcd(wb.clone()),
        &keys,
    );
    let (p_status, b_status) = (
        p.cfg.status_file.clone().unwrap(),
        b.cfg.status_file.clone().unwrap(),
    );
    let primary = Agent::new(p.cfg.clone(), launcher(&p)).unwrap();
    let backup = Agent::new(b.cfg.clone(), launcher(&b)).unwrap();
    let (kill_p, p_rx) = tokio::sync::oneshot::channel::<()>();
    let (kill_b, b_rx) = tokio::sync::oneshot::channel::<()>();
    let ptask = tokio::spawn(primary.run(async {
        let _ = p_rx.await;
    }));
    let btask = tokio::spawn(backup.run(async {
        let _ = b_rx.await;
    }));
    wait_for("protection", Duration::from_secs(20), || {
        status(&p_status)["phase"] == "protected"
    })
    .await;
    let s = witness.query(VM, etcd_common::T).await.unwrap();
    assert_eq!(s.backup.map(|r| r.node), Some(NodeId(2)), "{s:?}");
    Pair {
        p_status,
        b_status,
        ptask,
        btask,
        kill_p: Some(kill_p),
        kill_b: Some(kill_b),
        b_launched: b.launched.clone(),
    }
}

async fn cluster_and_witness(dir: &Path) -> (EtcdCluster, EtcdWitness) {
    let etcd = etcd_common::cluster(&dir.join("etcd")).await;
    let w = etcd_common::witness(&etcd);
    (etcd, w)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protects_and_fails_over_through_the_etcd_witness() {
    let dir = tempfile::tempdir().unwrap();
    let (_etcd, w) = cluster_and_witness(dir.path()).await;
    let mut pair = pair(dir.path(), &w).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let _ = pair.kill_p.take().unwrap().send(());
    let _ = (&mut pair.ptask).await;
    let killed = Instant::now();
    wait_for("failover", Duration::from_secs(10), || {
        let s = status(&pair.b_status);
        s["role"] == "Primary" && s["failed_over"] == true
    })
    .await;
    let took = killed.elapsed();
    assert_eq!(status(&pair.b_status)["generation"], 2);
    assert_eq!(pair.b_launched.lock().unwrap().len(), 1, "one restored VM");
    let s = w.query(VM, etcd_common::T).await.unwrap();
    assert_eq!((s.generation, s.primary), (Generation(2), NodeId(2)));
    eprintln!("failover through etcd took {took:?}");
    pair.btask.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_etcd_quorum_the_backup_does_not_take_over_until_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (mut etcd, w) = cluster_and_witness(dir.path()).await;
    let mut pair = pair(dir.path(), &w).await;
    etcd.kill(0).unwrap();
    etcd.kill(1).unwrap();

    let _ = pair.kill_p.take().unwrap().send(());
    let _ = (&mut pair.ptask).await;
    // Far longer than a failover takes with the witness up (well under a second here).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = status(&pair.b_status);
    assert_ne!(s["role"], "Primary", "took over without the witness: {s}");
    assert_eq!(s["generation"], 1, "{s}");
    assert!(pair.b_launched.lock().unwrap().is_empty(), "a VM started");
    assert!(!pair.btask.is_finished(), "the backup gave up: {s}");

    etcd.restart(1).unwrap();
    let back = Instant::now();
    wait_for(
        "failover once etcd is back",
        Duration::from_secs(20),
        || {
            let s = status(&pair.b_status);
            s["role"] == "Primary" && s["failed_over"] == true
        },
    )
    .await;
    eprintln!("took over {:?} after the quorum returned", back.elapsed());
    let s = w.query(VM, etcd_common::T).await.unwrap();
    assert_eq!((s.generation, s.primary), (Generation(2), NodeId(2)));
    pair.btask.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_etcd_quorum_the_primary_of_a_dead_backup_holds_its_output() {
    let dir = tempfile::tempdir().unwrap();
    let (mut etcd, w) = cluster_and_witness(dir.path()).await;
    let mut pair = pair(dir.path(), &w).await;
    etcd.kill(1).unwrap();
    etcd.kill(2).unwrap();

    let _ = pair.kill_b.take().unwrap().send(());
    let _ = (&mut pair.btask).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The backup may still be registered: the primary cannot drop it, so it must not open its
    // gate (it would let out output the registered backup never saw).
    let s = status(&pair.p_status);
    assert_eq!(s["phase"], "dropping", "{s}");
    assert_eq!(s["role"], "Primary", "{s}");
    assert!(!pair.ptask.is_finished());

    etcd.restart(2).unwrap();
    wait_for(
        "degraded once etcd is back",
        Duration::from_secs(20),
        || status(&pair.p_status)["phase"] == "degraded",
    )
    .await;
    let s = w.query(VM, etcd_common::T).await.unwrap();
    assert_eq!(
        (s.generation, s.primary, s.backup),
        (Generation(1), NodeId(1), None)
    );
    pair.ptask.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_whose_certificate_etcd_denies_never_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    // node-1 is an agent of the witness; node-2's certificate is the CA's but no etcd user.
    let (etcd, ca, _admin) = etcd_common::tls_cluster(&dir.path().join("etcd"), &["node-1"]).await;
    let prefix = etcd_common::PREFIX;
    let wp = etcd_common::tls_witness(&etcd, prefix, &etcd_common::cert(&ca, "node-1"));
    let wb = etcd_common::tls_witness(&etcd, prefix, &etcd_common::cert(&ca, "node-2"));
    let mut pair = pair_on(dir.path(), &wp, &wb).await;
    let registered = wp.query(VM, etcd_common::T).await.unwrap();

    let _ = pair.kill_p.take().unwrap().send(());
    let _ = (&mut pair.ptask).await;
    // Far longer than a failover takes when etcd lets the backup in (well under a second).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = status(&pair.b_status);
    assert_ne!(
        s["role"], "Primary",
        "took over without the witness's grant: {s}"
    );
    assert_eq!(s["generation"], 1, "{s}");
    assert!(pair.b_launched.lock().unwrap().is_empty(), "a VM started");
    // Its requests were refused, not lost: the register is the one the primary left.
    assert_eq!(wp.query(VM, etcd_common::T).await.unwrap(), registered);
    let e = wb.query(VM, etcd_common::T).await.unwrap_err();
    assert!(
        matches!(e, ftvm_real::etcd_witness::EtcdWitnessError::Denied { .. }) && e.is_permanent(),
        "{e}"
    );
    pair.btask.abort();
    drop(etcd);
}
