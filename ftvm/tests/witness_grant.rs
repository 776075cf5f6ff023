//! `ftvm witness-grant` against a real 3-member etcd cluster that requires client certificates
//! but has its access control still off, where any certificate of the CA may write any key. Run
//! with the root certificate, it creates root, the agents' role and users and turns auth on;
//! then the agents named reach the registers, other certificates of the same CA are denied, an
//! agent's certificate may not run it, and root's may run it again to add an agent.

use std::net::IpAddr;
use std::process::{Command, Output};
use std::time::Duration;

use ftvm_model::{NodeId, VmId};
use ftvm_real::etcd_witness::{EtcdTarget, EtcdTls, EtcdTlsFiles, EtcdWitness, EtcdWitnessError};
use ftvm_real::host::etcd_certs::{cluster_tls, CA_NAME};
use ftvm_real::host::etcd_cluster::{ClusterSpec, EtcdCluster};

const PREFIX: &str = "/ftvm-grant";

fn grant(url: &str, files: &EtcdTlsFiles, agents: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .args([
            "witness-grant",
            "--witness",
            url,
            "--witness-prefix",
            PREFIX,
        ])
        .args(["--grant", agents])
        .arg("--witness-ca")
        .arg(&files.ca)
        .arg("--witness-cert")
        .arg(&files.cert)
        .arg("--witness-key")
        .arg(&files.key)
        .output()
        .expect("running ftvm witness-grant")
}

fn denied(r: Result<impl std::fmt::Debug, EtcdWitnessError>) -> bool {
    matches!(r, Err(EtcdWitnessError::Denied { .. }))
}

#[test]
fn witness_grant_turns_on_access_control_for_the_agents_named() {
    let dir = tempfile::tempdir().unwrap();
    let ip: IpAddr = [127, 0, 0, 1].into();
    let (mut tls, ca) = cluster_tls(&dir.path().join("pki"), ip).unwrap();
    tls.access = None;
    let admin = tls.admin.clone();
    let mut spec = ClusterSpec::loopback(3, &dir.path().join("etcd")).unwrap();
    spec.tls = Some(tls);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cluster = rt
        .block_on(EtcdCluster::start(spec))
        .unwrap_or_else(|e| panic!("starting a 3-member etcd cluster with TLS: {e}"));
    let url = cluster.url();
    let witness = |cn: &str| {
        let files = ca.client(CA_NAME, cn).unwrap();
        EtcdWitness::with_tls(
            EtcdTarget::parse(&url, PREFIX).unwrap(),
            EtcdTls::load(&files).unwrap(),
        )
    };
    let t = Duration::from_secs(5);
    let (w1, w2, w3) = (witness("node-1"), witness("node-2"), witness("node-3"));

    // Auth off: any certificate of the CA writes any register.
    rt.block_on(w3.init(VmId(9), NodeId(3), t))
        .expect("auth off: anyone may write");

    let out = grant(&url, &admin, "node-1,node-2");
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("root's witness-grant: {err}");
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("/ftvm-grant/vm/") && err.contains("node-1,node-2"),
        "{err}"
    );
    rt.block_on(w1.init(VmId(2), NodeId(1), t))
        .expect("node-1 creates a register");
    let s = rt.block_on(w2.query(VmId(2), t)).expect("node-2 reads it");
    assert_eq!(s.primary, NodeId(1));
    assert!(denied(rt.block_on(w3.query(VmId(9), t))));
    assert!(denied(rt.block_on(w3.query(VmId(2), t))));

    // An agent's certificate may not grant anything.
    let node1 = ca.client(CA_NAME, "node-1").unwrap();
    let out = grant(&url, &node1, "node-3");
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("an agent's witness-grant: {err}");
    assert!(!out.status.success(), "an agent granted another: {err}");
    assert!(err.contains("permission denied"), "{err}");
    assert!(denied(rt.block_on(w3.query(VmId(2), t))));

    // Root's may, again.
    let out = grant(&url, &admin, "node-3");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let s = rt.block_on(w3.query(VmId(2), t)).expect("node-3 reads now");
    assert_eq!(s.primary, NodeId(1));
    drop(cluster);
}
