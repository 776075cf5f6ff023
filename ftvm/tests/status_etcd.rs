//! `ftvm status --witness etcd://...` against a real 3-member etcd cluster that requires client
//! certificates, with its access control on: it shows the VM's register read from etcd with the
//! TLS files it is given (an agent's), and says the register is unreadable without them, or
//! with a certificate whose CN is no etcd user (denied).

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use ftvm_model::{NodeId, VmId};
use ftvm_real::etcd_witness::EtcdTlsFiles;
use ftvm_real::etcd_witness::{EtcdTarget, EtcdTls, EtcdWitness};
use ftvm_real::host::etcd_certs::{cluster_tls, CA_NAME};
use ftvm_real::host::etcd_cluster::{ClusterAccess, ClusterSpec, EtcdCluster};

#[test]
fn status_reads_the_register_from_etcd_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ip: IpAddr = [127, 0, 0, 1].into();
    let (mut tls, ca) = cluster_tls(&dir.path().join("pki"), ip).unwrap();
    tls.access = Some(ClusterAccess {
        prefix: "/ftvm-status".into(),
        users: vec!["node-2".into()],
        ..ClusterAccess::default()
    });
    let admin = tls.admin.clone();
    let mut spec = ClusterSpec::loopback(3, &dir.path().join("etcd")).unwrap();
    spec.tls = Some(tls);
    let agent = ca.client(CA_NAME, "node-2").unwrap();
    let nobody = ca.client(CA_NAME, "ftvm-nobody").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cluster = rt
        .block_on(EtcdCluster::start(spec))
        .unwrap_or_else(|e| panic!("starting a 3-member etcd cluster with TLS: {e}"));
    let url = cluster.url();
    let w = EtcdWitness::with_tls(
        EtcdTarget::parse(&url, "/ftvm-status").unwrap(),
        EtcdTls::load(&admin).unwrap(),
    );
    rt.block_on(w.init(VmId(4), NodeId(2), Duration::from_secs(5)))
        .expect("creating the register");

    let status = |tls: Option<&EtcdTlsFiles>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ftvm"));
        c.args([
            "status",
            "--witness",
            &url,
            "--witness-prefix",
            "/ftvm-status",
            "--vm",
            "4",
        ]);
        if let Some(f) = tls {
            c.arg("--witness-ca")
                .arg(&f.ca)
                .arg("--witness-cert")
                .arg(&f.cert)
                .arg("--witness-key")
                .arg(&f.key);
        }
        let out = c.output().expect("running ftvm status");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let seen = status(Some(&agent));
    assert!(
        seen.contains("/ftvm-status/vm/4") && seen.contains("generation 1 primary 2 backup none"),
        "{seen}"
    );
    let seen = status(None);
    assert!(seen.contains("UNREADABLE"), "without TLS: {seen}");
    let seen = status(Some(&nobody));
    assert!(
        seen.contains("UNREADABLE") && seen.contains("permission denied"),
        "a certificate whose CN is no etcd user: {seen}"
    );
    drop(cluster);
}
