//! The agents' HTTP endpoint over real sockets, with the in-memory VM: `/metrics` counts epochs
//! as they are acked, shows each node's role and generation, and the backup's series move to
//! primary, generation 2 and a failover time when the primary dies; `/status` serves the same
//! report as `status.json`; a hostile request gets an error, not a crash.

mod mem_cluster;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ftvm_model::{NodeId, Start};
use ftvm_real::agent::metrics_http;
use ftvm_real::agent::prom::AgentExporter;
use ftvm_real::agent::Agent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use mem_cluster::*;

/// Sends `request` raw and returns the whole answer.
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8(out).unwrap()
}

async fn get(addr: SocketAddr, path: &str) -> String {
    let a = exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(a.starts_with("HTTP/1.1 200 "), "{path}: {a}");
    a.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// The value of the series `name` whose labels contain `labels` (e.g. `role="primary"`).
fn value(page: &str, name: &str, labels: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split(['{', ' ']).next() == Some(name) && l.contains(labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name}{{{labels}}} in\n{page}"))
}

/// Starts the endpoint for an agent of node `node`; returns its address.
async fn endpoint(node: u32) -> (SocketAddr, Arc<AgentExporter>) {
    let x = Arc::new(AgentExporter::new(7, node));
    let l = metrics_http::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(metrics_http::serve(l, x.clone()));
    (addr, x)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_epochs_and_a_failover() {
    let dir = tempfile::tempdir().unwrap();
    let waddr = free_addr();
    let addrs: BTreeMap<NodeId, SocketAddr> =
        [(NodeId(1), free_addr()), (NodeId(2), free_addr())].into();
    let keys = keys();
    let wtask = serve_witness(dir.path(), waddr, &keys, false);
    let p = host(dir.path(), 1, Start::Primary, &addrs, waddr, &keys);
    let b = host(
        dir.path(),
        2,
        Start::Backup { primary: NodeId(1) },
        &addrs,
        waddr,
        &keys,
    );
    let (pm, px) = endpoint(1).await;
    let (bm, bx) = endpoint(2).await;
    let mut primary = Agent::new(p.cfg.clone(), launcher(&p)).unwrap();
    primary.attach_exporter(px);
    let mut backup = Agent::new(b.cfg.clone(), launcher(&b)).unwrap();
    backup.attach_exporter(bx);
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
    let ptask = tokio::spawn(primary.run(async {
        let _ = kill_rx.await;
    }));
    let btask = tokio::spawn(backup.run(std::future::pending()));
    let p_status = p.cfg.status_file.clone().unwrap();
    wait_for("protection", Duration::from_secs(20), || {
        status(&p_status)["phase"] == "protected"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;

    let first = get(pm, "/metrics").await;
    assert_eq!(value(&first, "ftvm_role", "role=\"primary\""), 1.0);
    assert_eq!(value(&first, "ftvm_role", "role=\"backup\""), 0.0);
    assert_eq!(value(&first, "ftvm_phase", "phase=\"protected\""), 1.0);
    assert_eq!(value(&first, "ftvm_generation", "vm=\"7\""), 1.0);
    let epochs = value(&first, "ftvm_epochs_total", "node=\"1\"");
    assert!(epochs >= 5.0, "{epochs} epochs in /metrics");
    assert!(value(&first, "ftvm_checkpoint_bytes_total", "") > 0.0);
    assert!(value(&first, "ftvm_pause_seconds_count", "") >= epochs);
    assert_eq!(
        value(&first, "ftvm_syncs_total", ""),
        1.0,
        "the one full sync"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let later = get(pm, "/metrics").await;
    let more = value(&later, "ftvm_epochs_total", "");
    assert!(more > epochs, "epochs did not move: {epochs} then {more}");

    let b_page = get(bm, "/metrics").await;
    assert_eq!(value(&b_page, "ftvm_role", "role=\"backup\""), 1.0);
    assert!(value(&b_page, "ftvm_committed_epoch", "") > 0.0);
    assert_eq!(
        value(&b_page, "ftvm_last_failover_timestamp_seconds", ""),
        0.0
    );

    // /status is the status report, the one status.json holds.
    let st: serde_json::Value = serde_json::from_str(&get(pm, "/status").await).unwrap();
    assert_eq!(st["phase"], "protected");
    assert_eq!(st["vm"], 7);
    assert!(st["replica_lag_epochs"].as_u64().is_some(), "{st}");

    // The primary dies: the backup's series turn to a primary of generation 2.
    let _ = kill_tx.send(());
    let _ = ptask.await;
    let b_status = b.cfg.status_file.clone().unwrap();
    wait_for("failover", Duration::from_secs(10), || {
        status(&b_status)["failed_over"] == true
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let after = get(bm, "/metrics").await;
    assert_eq!(value(&after, "ftvm_role", "role=\"primary\""), 1.0);
    assert_eq!(value(&after, "ftvm_role", "role=\"backup\""), 0.0);
    assert_eq!(value(&after, "ftvm_generation", ""), 2.0);
    let at = value(&after, "ftvm_last_failover_timestamp_seconds", "");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - 30.0..=now + 1.0).contains(&at),
        "failover at {at}, now {now}"
    );
    assert!(value(&after, "ftvm_failover_duration_seconds", "") > 0.0);

    // Hostile requests are answered with an error, and the endpoint keeps serving.
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9_000));
    let a = exchange(bm, huge.as_bytes()).await;
    assert!(a.starts_with("HTTP/1.1 431 "), "{a}");
    assert!(exchange(bm, b"DELETE /metrics HTTP/1.1\r\n\r\n")
        .await
        .starts_with("HTTP/1.1 405 "));
    assert!(exchange(bm, b"GET /x HTTP/1.1\r\n\r\n")
        .await
        .starts_with("HTTP/1.1 404 "));
    get(bm, "/metrics").await;
    btask.abort();
    wtask.abort();
}
