//! Catch-up resync end to end, with the in-memory VM: a backup agent that goes away and comes
//! back on the same replica directory offers its committed replica, and the primary sends one
//! checkpoint with what was written since instead of a full sync. The replica then matches the
//! primary at every verified checkpoint, before and after.

mod mem_cluster;

use std::time::Duration;

use ftvm_real::agent::Agent;

use mem_cluster::*;

/// The primary's metrics lines (one per acked epoch).
fn metrics(c: &Cluster) -> Vec<serde_json::Value> {
    std::fs::read_to_string(c.dir.path().join("n1/metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_backup_is_caught_up_not_fully_synced() {
    let mut c = Cluster::protected(Duration::from_secs(5)).await;
    wait_for(
        "commits before the restart",
        Duration::from_secs(10),
        || c.committed() >= 10,
    )
    .await;
    // The backup's agent goes away (its links close with it); the primary runs on, degraded,
    // and its guest keeps writing.
    c.btask.abort();
    let _ = (&mut c.btask).await;
    let pstatus = c.p.cfg.status_file.clone().unwrap();
    wait_for("the primary to notice", Duration::from_secs(10), || {
        status(&pstatus)["phase"] != "protected"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fulls = |c: &Cluster| metrics(c).iter().filter(|m| m["full"] == true).count();
    assert_eq!(fulls(&c), 1, "only the first sync was full");

    // It comes back on the same replica (a new listening port: the old agent's listener
    // thread still holds its own in this process).
    let mut cfg = c.b.cfg.clone();
    cfg.listen = free_addr();
    let backup = Agent::new(cfg, launcher(&c.b)).unwrap();
    c.btask = tokio::spawn(backup.run(std::future::pending()));
    wait_for("a catch-up acked", Duration::from_secs(20), || {
        metrics(&c).iter().any(|m| m["catch_up_from"].is_u64())
    })
    .await;
    wait_for("protection again", Duration::from_secs(10), || {
        status(&pstatus)["phase"] == "protected"
    })
    .await;
    let lines = metrics(&c);
    let catch_up = lines
        .iter()
        .find(|m| m["catch_up_from"].is_u64())
        .unwrap()
        .clone();
    assert_eq!(catch_up["full"], false, "{catch_up}");
    assert!(
        catch_up["catch_up_from"].as_u64() < catch_up["epoch"].as_u64(),
        "{catch_up}"
    );
    assert_eq!(fulls(&c), 1, "the restart took a full sync: {catch_up}");
    let last = status(&pstatus)["last_sync"].clone();
    assert_eq!(last["kind"], "catch-up", "{last}");
    assert_eq!(last["base"], catch_up["catch_up_from"], "{last}");
    assert!(last["bytes"].as_u64() > Some(0), "{last}");
    // Checkpoints go on, and the replica equals the primary at every verified one (the
    // catch-up gave it exactly the writes it had missed).
    let after = catch_up["epoch"].as_u64().unwrap();
    wait_for(
        "verified checkpoints after the catch-up",
        Duration::from_secs(10),
        || {
            let (pd, bd) = (digests(c.dir.path(), "n1"), digests(c.dir.path(), "n2"));
            pd.keys()
                .filter(|&&e| e > after && bd.contains_key(&e))
                .count()
                >= 2
        },
    )
    .await;
    c.assert_healthy("after the catch-up").await;
    c.ptask.abort();
    c.btask.abort();
    c.wtask.abort();
}
