//! Many VMs per host pair (issue 14): two protected VMs whose agents share the same two hosts
//! (here, one loopback), each with its own witness register, ports and state directories. Killing
//! the primary agent of one fails that VM over; the other keeps its primary, generation,
//! register and protection, and its checkpoints keep flowing.

mod mem_cluster;

use std::time::Duration;

use mem_cluster::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_vms_failover_leaves_the_other_untouched() {
    let a = Cluster::protected(Duration::from_secs(5)).await;
    let b = Cluster::protected(Duration::from_secs(5)).await;
    assert_ne!(a.addrs, b.addrs, "each VM has its own ports");
    assert_ne!(a.witness, b.witness, "and its own witness register");
    b.assert_healthy("before").await;

    // VM a's primary agent dies (its task and every socket it held go away).
    a.ptask.abort();
    let a_status = a.b.cfg.status_file.clone().unwrap();
    wait_for("VM a's failover", Duration::from_secs(10), || {
        let s = status(&a_status);
        s["role"] == "Primary" && s["failed_over"] == true
    })
    .await;
    assert_eq!(status(&a_status)["generation"], 2);
    assert_eq!(a.register()["generation"], 2);
    assert_eq!(a.register()["primary"], 2);

    // VM b never noticed: same primary, generation 1, still protected and checkpointing.
    b.assert_healthy("after VM a failed over").await;
    a.btask.abort();
    b.ptask.abort();
    b.btask.abort();
}
