//! The etcd witness over TLS with client certificates, against a real 3-member cluster run
//! with `--client-cert-auth`: a client showing a certificate of the cluster's CA reads and
//! writes the register; one without a certificate, or with one of another CA, gets nothing
//! (an error after its timeout, never an answer).

mod etcd_common;

use std::net::IpAddr;
use std::time::Duration;

use etcd_common::{P, PREFIX, T};
use ftvm_model::{Generation, VmId};
use ftvm_real::etcd_witness::{EtcdTarget, EtcdTls, EtcdWitness};
use ftvm_real::host::etcd_certs::{cluster_tls, LocalCa};
use ftvm_real::host::etcd_cluster::{ClusterSpec, EtcdCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_clients_with_a_certificate_of_the_clusters_ca_reach_the_register() {
    let dir = tempfile::tempdir().unwrap();
    let ip: IpAddr = [127, 0, 0, 1].into();
    let (tls, ca) = cluster_tls(&dir.path().join("pki"), ip).unwrap();
    let mut spec = ClusterSpec::loopback(3, &dir.path().join("etcd")).unwrap();
    spec.tls = Some(tls);
    let cluster = EtcdCluster::start(spec)
        .await
        .unwrap_or_else(|e| panic!("starting a 3-member etcd cluster with TLS: {e}"));
    let target = EtcdTarget::parse(&cluster.url(), PREFIX).unwrap();
    let vm = VmId(7);

    let agent = ca.client("etcd-ca", "node-1").unwrap();
    let w = EtcdWitness::with_tls(target.clone(), EtcdTls::load(&agent).unwrap());
    let state = w.init(vm, P, T).await.expect("init over TLS");
    assert_eq!(state.generation, Generation(1));
    assert_eq!(w.query(vm, T).await.expect("query over TLS").primary, P);

    let short = Duration::from_secs(2);
    let plain = EtcdWitness::new(target.clone());
    assert!(
        plain.query(vm, short).await.is_err(),
        "a client without TLS got an answer"
    );

    let other = LocalCa::create(&dir.path().join("other-pki"), "other-ca").unwrap();
    let mut stranger = other.client("other-ca", "node-9").unwrap();
    // It trusts the cluster's server, but its own certificate is another CA's.
    stranger.ca = agent.ca.clone();
    let w9 = EtcdWitness::with_tls(target, EtcdTls::load(&stranger).unwrap());
    assert!(
        w9.query(vm, short).await.is_err(),
        "a client certificate of another CA was accepted"
    );
    drop(cluster);
}
