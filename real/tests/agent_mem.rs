//! The agent end to end over real loopback sockets, with an in-memory VM instead of QEMU:
//! witness, primary and backup agents protect the VM, the backup's replica matches the primary's
//! RAM, and when the primary dies the backup takes over from its replica in a new generation.

mod mem_cluster;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ftvm_model::{NodeId, Start};
use ftvm_real::agent::mem_vm::MemLauncher;
use ftvm_real::agent::Agent;

use mem_cluster::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protects_then_fails_over_to_the_replica() {
    let dir = tempfile::tempdir().unwrap();
    let waddr = free_addr();
    let addrs: BTreeMap<NodeId, SocketAddr> =
        [(NodeId(1), free_addr()), (NodeId(2), free_addr())].into();
    let keys = keys();
    let wtask = serve_witness(dir.path(), waddr, &keys, true);

    let p = host(dir.path(), 1, Start::Primary, &addrs, waddr, &keys);
    let b = host(
        dir.path(),
        2,
        Start::Backup { primary: NodeId(1) },
        &addrs,
        waddr,
        &keys,
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
    let keys = keys();
    let wtask = serve_witness(dir.path(), waddr, &keys, false);
    let p = host(dir.path(), 1, Start::Primary, &addrs, waddr, &keys);
    let mut b = host(
        dir.path(),
        2,
        Start::Backup { primary: NodeId(1) },
        &addrs,
        waddr,
        &keys,
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
