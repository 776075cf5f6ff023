//! The agent end to end over real loopback sockets, with an in-memory VM instead of QEMU:
//! witness, primary and backup agents protect the VM, the backup's replica matches the primary's
//! RAM, and when the primary dies the backup takes over from its replica in a new generation.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_model::{Config, NodeId, Start, VmId};
use ftvm_real::agent::capture::CaptureMode;
use ftvm_real::agent::mem_vm::{MemLauncher, MemRam};
use ftvm_real::agent::witness_store::{Open, WitnessStore};
use ftvm_real::agent::{witness, Agent, AgentConfig};
use ftvm_real::transport::TransportKind;

const PAGE: usize = 4096;
const PAGES: u64 = 256;

fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn status(path: &Path) -> serde_json::Value {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Host {
    cfg: AgentConfig,
    launched: Arc<Mutex<Vec<MemRam>>>,
}

fn host(
    dir: &Path,
    node: u32,
    start: Start,
    addrs: &BTreeMap<NodeId, SocketAddr>,
    witness: SocketAddr,
) -> Host {
    let mut model = Config::new(VmId(7), PAGES, NodeId(0));
    model.failure_timeout = Duration::from_millis(300);
    let d = dir.join(format!("n{node}"));
    std::fs::create_dir_all(&d).unwrap();
    Host {
        cfg: AgentConfig {
            node: NodeId(node),
            start,
            model,
            listen: addrs[&NodeId(node)],
            peers: addrs.clone(),
            witness,
            replica_dir: d.join("replica"),
            replica_ram: d.join("replica.ram"),
            transport: TransportKind::Copy,
            capture: CaptureMode::Staged,
            metrics: Some(d.join("metrics.jsonl")),
            status_file: Some(d.join("status.json")),
            verbose: true,
            verify_every: Some(5),
        },
        launched: Arc::new(Mutex::new(Vec::new())),
    }
}

fn launcher(h: &Host) -> MemLauncher {
    MemLauncher {
        ram_bytes: PAGES as usize * PAGE,
        page_size: PAGE,
        pages_per_ms: 2,
        seed: 11,
        cow: Default::default(),
        launched: h.launched.clone(),
        failing_restores: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protects_then_fails_over_to_the_replica() {
    let dir = tempfile::tempdir().unwrap();
    let waddr = free_addr();
    let addrs: BTreeMap<NodeId, SocketAddr> =
        [(NodeId(1), free_addr()), (NodeId(2), free_addr())].into();
    let (store, w) = WitnessStore::open(
        &dir.path().join("witness.json"),
        VmId(7),
        Open::Init { primary: NodeId(1) },
    )
    .unwrap();
    let wtask = tokio::spawn(witness::serve(waddr, store, w, true));

    let p = host(dir.path(), 1, Start::Primary, &addrs, waddr);
    let b = host(
        dir.path(),
        2,
        Start::Backup { primary: NodeId(1) },
        &addrs,
        waddr,
    );
    let (p_status, b_status) = (
        p.cfg.status_file.clone().unwrap(),
        b.cfg.status_file.clone().unwrap(),
    );
    let primary = Agent::new(p.cfg.clone(), launcher(&p)).unwrap();
    // The first start of the restored VM fails: the takeover must try again, not lose the VM.
    let backup = Agent::new(
        b.cfg.clone(),
        MemLauncher {
            failing_restores: 1,
            ..launcher(&b)
        },
    )
    .unwrap();
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
    let ptask = tokio::spawn(primary.run(async {
        let _ = kill_rx.await;
    }));
    let btask = tokio::spawn(backup.run(std::future::pending()));

    wait_for("protection", Duration::from_secs(20), || {
        status(&p_status)["phase"] == "protected"
    })
    .await;
    // Let it run protected for a while under the dirtying guest.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let acked = std::fs::read_to_string(dir.path().join("n1/metrics.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert!(acked >= 20, "only {acked} epochs acked in 1.5 s");

    // At every 5th checkpoint both sides recorded a RAM digest: primary while paused at the
    // capture, backup after the commit. They must agree.
    let digests = |n: &str| -> BTreeMap<u64, u64> {
        std::fs::read_to_string(dir.path().join(n).join("replica/verify.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| (v["epoch"].as_u64().unwrap(), v["digest"].as_u64().unwrap()))
            .collect()
    };
    let (pd, bd) = (digests("n1"), digests("n2"));
    let common: Vec<u64> = pd.keys().filter(|e| bd.contains_key(e)).copied().collect();
    assert!(
        common.len() >= 4,
        "only {} verified checkpoints",
        common.len()
    );
    for e in &common {
        assert_eq!(
            pd[e], bd[e],
            "replica differs from the primary at epoch {e}"
        );
    }

    // Freeze the guest: after the next acked epochs the replica must equal its RAM.
    let pram = p.launched.lock().unwrap()[0].clone();
    pram.set_frozen(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let replica = std::fs::read(dir.path().join("n2/replica.ram")).unwrap();
    let live = pram.snapshot();
    assert_eq!(replica.len(), live.len());
    let differing = (0..PAGES as usize)
        .filter(|&i| replica[i * PAGE..(i + 1) * PAGE] != live[i * PAGE..(i + 1) * PAGE])
        .count();
    assert_eq!(
        differing, 0,
        "replica differs from the primary in {differing} pages"
    );
    let writes_at_kill = pram.writes();
    assert!(writes_at_kill > 0);

    // The primary host dies.
    let _ = kill_tx.send(());
    let _ = ptask.await;
    let killed = Instant::now();
    wait_for("failover", Duration::from_secs(10), || {
        let s = status(&b_status);
        s["role"] == "Primary" && s["failed_over"] == true
    })
    .await;
    let failover = killed.elapsed();
    let s = status(&b_status);
    assert_eq!(s["generation"], 2);
    let restored = b.launched.lock().unwrap();
    assert_eq!(
        restored.len(),
        1,
        "one restored VM (after one failed start)"
    );
    let restored = restored[0].clone();
    // The restored VM starts from the replica: it carries every write the primary made.
    assert!(restored.writes() >= writes_at_kill);
    eprintln!("failover took {failover:?}");
    assert!(failover < Duration::from_secs(3));
    btask.abort();
    wtask.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_with_the_wrong_ram_size_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let waddr = free_addr();
    let addrs: BTreeMap<NodeId, SocketAddr> =
        [(NodeId(1), free_addr()), (NodeId(2), free_addr())].into();
    let (store, w) = WitnessStore::open(
        &dir.path().join("witness.json"),
        VmId(7),
        Open::Init { primary: NodeId(1) },
    )
    .unwrap();
    let wtask = tokio::spawn(witness::serve(waddr, store, w, false));
    let p = host(dir.path(), 1, Start::Primary, &addrs, waddr);
    let mut b = host(
        dir.path(),
        2,
        Start::Backup { primary: NodeId(1) },
        &addrs,
        waddr,
    );
    b.cfg.model.ram_pages = PAGES * 2;
    let primary = Agent::new(p.cfg.clone(), launcher(&p)).unwrap();
    let mut bl = launcher(&b);
    bl.ram_bytes *= 2;
    let backup = Agent::new(b.cfg.clone(), bl).unwrap();
    let ptask = tokio::spawn(primary.run(std::future::pending()));
    let err = tokio::time::timeout(Duration::from_secs(10), backup.run(std::future::pending()))
        .await
        .expect("the backup should give up, not retry forever")
        .expect_err("a mismatched backup must fail");
    let msg = err.to_string();
    assert!(msg.contains("RAM size"), "unclear error: {msg}");
    // The primary is unharmed and still waiting for a proper backup.
    assert_eq!(
        status(&p.cfg.status_file.clone().unwrap())["phase"],
        "waiting"
    );
    ptask.abort();
    wtask.abort();
}
