//! A real 3-member etcd cluster on loopback for the etcd witness's tests. The `etcd` binary
//! (Debian's etcd-server, installed by real/host/install-deps.sh) is required: without it these
//! tests fail with that message instead of passing without testing anything.

#![allow(dead_code)]

use std::time::Duration;

use ftvm_model::{Epoch, Generation, NodeId, Registration, VmId, WitnessRequest};
use ftvm_real::etcd_witness::{EtcdTarget, EtcdTls, EtcdTlsFiles, EtcdWitness};
use ftvm_real::host::etcd_certs::{cluster_tls, LocalCa, CA_NAME};
use ftvm_real::host::etcd_cluster::{ClusterAccess, ClusterSpec, EtcdCluster};

pub const P: NodeId = NodeId(1);
pub const B: NodeId = NodeId(2);
pub const C: NodeId = NodeId(3);
pub const PREFIX: &str = "/ftvm-test/witness";
pub const T: Duration = Duration::from_secs(5);

/// Three members under `dir`, with a leader.
pub async fn cluster(dir: &std::path::Path) -> EtcdCluster {
    EtcdCluster::start_loopback(3, dir)
        .await
        .unwrap_or_else(|e| panic!("starting a 3-member etcd cluster: {e}"))
}

/// A TLS cluster of three members under `dir` that requires client certificates, with etcd's
/// access control on: the users `agents` (certificate CNs) may touch the registers under
/// [`PREFIX`]. Returns it, its CA (to issue certificates with) and the administrator's files.
pub async fn tls_cluster(
    dir: &std::path::Path,
    agents: &[&str],
) -> (EtcdCluster, LocalCa, EtcdTlsFiles) {
    let (mut tls, ca) = cluster_tls(&dir.join("pki"), [127, 0, 0, 1].into()).unwrap();
    tls.access = Some(ClusterAccess {
        prefix: PREFIX.to_string(),
        users: agents.iter().map(|a| a.to_string()).collect(),
        ..ClusterAccess::default()
    });
    let admin = tls.admin.clone();
    let mut spec = ClusterSpec::loopback(3, &dir.join("etcd")).unwrap();
    spec.tls = Some(tls);
    let cluster = EtcdCluster::start(spec)
        .await
        .unwrap_or_else(|e| panic!("starting a 3-member etcd cluster with TLS and RBAC: {e}"));
    (cluster, ca, admin)
}

/// A witness client on `cluster` under `prefix` showing `files`.
pub fn tls_witness(cluster: &EtcdCluster, prefix: &str, files: &EtcdTlsFiles) -> EtcdWitness {
    EtcdWitness::with_tls(
        EtcdTarget::parse(&cluster.url(), prefix).unwrap(),
        EtcdTls::load(files).unwrap(),
    )
}

/// A certificate of `ca` with CN `cn`.
pub fn cert(ca: &LocalCa, cn: &str) -> EtcdTlsFiles {
    ca.client(CA_NAME, cn).unwrap()
}

/// A witness client on `cluster`.
pub fn witness(cluster: &EtcdCluster) -> EtcdWitness {
    EtcdWitness::new(EtcdTarget::parse(&cluster.url(), PREFIX).unwrap())
}

pub fn reg(node: NodeId, since: u64) -> Registration {
    Registration {
        node,
        since: Epoch(since),
    }
}

pub fn register(g: u64, backup: Registration) -> WitnessRequest {
    WitnessRequest::RegisterBackup {
        generation: Generation(g),
        primary: P,
        backup,
    }
}

pub fn drop_(g: u64, backup: Registration) -> WitnessRequest {
    WitnessRequest::DropBackup {
        generation: Generation(g),
        primary: P,
        backup,
    }
}

pub fn takeover(g: u64, backup: Registration) -> WitnessRequest {
    WitnessRequest::Takeover {
        generation: Generation(g),
        backup,
    }
}

/// A register for `vm` with P primary and B registered since epoch 5.
pub async fn protected(w: &EtcdWitness, vm: VmId) {
    w.init(vm, P, T).await.expect("init");
    let r = w.request(P, vm, register(1, reg(B, 5)), T).await.unwrap();
    assert!(r.reply.granted, "{r:?}");
}
