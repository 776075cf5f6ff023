//! The etcd witness over TLS with client certificates, against a real 3-member cluster run
//! with `--client-cert-auth` and etcd's access control on (users named after the certificates'
//! CN): an agent whose CN is a user of the agents' role reads and writes the registers; a client
//! without a certificate, or with one of another CA, gets nothing (an error after its timeout,
//! never an answer); a certificate of the CA whose CN is no user, or a user without the role, is
//! denied at once with a typed, permanent error, as is an agent writing outside the registers'
//! keys; and none of them changes the register.

mod etcd_common;

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, UserAddOptions};
use ftvm_model::{Generation, VmId, WitnessRequest, WitnessState};
use ftvm_real::etcd_witness::{
    AccessError, EtcdTls, EtcdTlsFiles, EtcdWitness, EtcdWitnessError, DEFAULT_ROLE,
};
use ftvm_real::host::etcd_certs::LocalCa;
use ftvm_real::host::etcd_cluster::EtcdCluster;

use etcd_common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_clients_with_a_certificate_of_the_clusters_ca_reach_the_register() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, ca, _admin) = tls_cluster(dir.path(), &["node-1"]).await;
    let vm = VmId(7);

    let agent = cert(&ca, "node-1");
    let w = tls_witness(&cluster, PREFIX, &agent);
    let state = w.init(vm, P, T).await.expect("init over TLS");
    assert_eq!(state.generation, Generation(1));
    assert_eq!(w.query(vm, T).await.expect("query over TLS").primary, P);

    let short = Duration::from_secs(2);
    let plain = etcd_common::witness(&cluster);
    assert!(
        plain.query(vm, short).await.is_err(),
        "a client without TLS got an answer"
    );

    let other = LocalCa::create(&dir.path().join("other-pki"), "other-ca").unwrap();
    let mut stranger = other.client("other-ca", "node-1").unwrap();
    // It trusts the cluster's server, and has an agent's CN, but its certificate is another CA's.
    stranger.ca = agent.ca.clone();
    let w9 = tls_witness(&cluster, PREFIX, &stranger);
    let e = w9.query(vm, short).await.unwrap_err();
    assert!(
        matches!(e, EtcdWitnessError::Timeout { .. }),
        "a client certificate of another CA was not refused: {e}"
    );
    drop(cluster);
}

/// A raw etcd client showing `files`.
async fn raw(cluster: &EtcdCluster, files: &EtcdTlsFiles) -> Client {
    let opts = ConnectOptions::new()
        .with_timeout(Duration::from_secs(2))
        .with_tls(EtcdTls::load(files).unwrap().options());
    Client::connect(cluster.endpoints(), Some(opts))
        .await
        .unwrap()
}

/// The register's value and mod revision, read by the administrator.
async fn raw_register(root: &mut Client, vm: VmId) -> Option<(Vec<u8>, i64)> {
    let key = format!("{PREFIX}/vm/{}", vm.0);
    let got = root.get(key, None).await.expect("root reads any key");
    got.kvs()
        .first()
        .map(|kv| (kv.value().to_vec(), kv.mod_revision()))
}

/// `e` is etcd's permission refusal, permanent, with a one-line reason naming the key.
fn assert_denied(e: &EtcdWitnessError, key: &str, who: &str) {
    assert!(
        matches!(e, EtcdWitnessError::Denied { key: k, .. } if k == key),
        "{who}: {e}"
    );
    assert!(e.is_permanent(), "{who}: {e}");
    let reason = e.to_string();
    assert!(!reason.contains('\n'), "{who}: {reason}");
    assert!(reason.contains("permission denied"), "{who}: {reason}");
}

/// Whether an etcd call was refused for lack of permission.
fn refused(r: Result<impl std::fmt::Debug, etcd_client::Error>) -> bool {
    match r {
        Err(etcd_client::Error::GRpcStatus(s)) => s.message().contains("permission denied"),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_certificate_may_do_only_what_its_etcd_user_may() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, ca, admin) = tls_cluster(dir.path(), &["node-1"]).await;
    let vm = VmId(7);
    let key = format!("{PREFIX}/vm/7");
    let mut root = raw(&cluster, &admin).await;

    // The agent: init, read and compare-and-set its registers.
    let node1 = cert(&ca, "node-1");
    let w1 = tls_witness(&cluster, PREFIX, &node1);
    w1.init(vm, P, T)
        .await
        .expect("the agent creates a register");
    let r = w1.request(P, vm, register(1, reg(B, 5)), T).await.unwrap();
    assert!(r.reply.granted && r.wrote, "{r:?}");
    let s = w1.query(vm, T).await.unwrap();
    assert_eq!(s.backup, Some(reg(B, 5)));
    let before = raw_register(&mut root, vm).await.unwrap();

    // A certificate of the CA whose CN is no etcd user; then a user without the role.
    let mut no_role = root.auth_client();
    no_role
        .user_add("node-5", "", Some(UserAddOptions::new().with_no_pwd()))
        .await
        .expect("root adds a user");
    for cn in ["node-9", "node-5"] {
        let w = tls_witness(&cluster, PREFIX, &cert(&ca, cn));
        let e = w.query(vm, T).await.unwrap_err();
        assert_denied(&e, &key, cn);
        let e = w
            .request(B, vm, WitnessRequest::Query, T)
            .await
            .unwrap_err();
        assert_denied(&e, &key, cn);
        let e = w
            .request(B, vm, takeover(1, reg(B, 5)), T)
            .await
            .unwrap_err();
        assert_denied(&e, &key, cn);
        let e = w.init(VmId(8), C, T).await.unwrap_err();
        assert_denied(&e, &format!("{PREFIX}/vm/8"), cn);
        // Nor can it write the key directly.
        let mut c = raw(&cluster, &cert(&ca, cn)).await;
        assert!(refused(c.put(key.clone(), "x", None).await), "{cn}");
    }

    // The agent outside the registers' keys: another prefix through the witness, and keys
    // next to the registers directly.
    let elsewhere = tls_witness(&cluster, "/elsewhere", &node1);
    let e = elsewhere.init(VmId(7), P, T).await.unwrap_err();
    assert_denied(&e, "/elsewhere/vm/7", "node-1 outside its prefix");
    let mut c1 = raw(&cluster, &node1).await;
    for outside in [
        format!("{PREFIX}/other"),
        format!("{PREFIX}/vm"),
        format!("{PREFIX}-x/vm/7"),
        "/ftvm/witness/vm/7".to_string(),
    ] {
        assert!(
            refused(c1.put(outside.clone(), "x", None).await),
            "node-1 wrote {outside}"
        );
        assert!(
            refused(c1.get(outside.clone(), None).await),
            "node-1 read {outside}"
        );
    }
    // Nor may it manage etcd: granting itself more is refused.
    let e = w1
        .grant_access("ftvm-agent", &["node-9".into()], T)
        .await
        .unwrap_err();
    assert!(matches!(e, AccessError::Denied { .. }), "{e}");

    // None of it changed the register, or made another one.
    assert_eq!(raw_register(&mut root, vm).await.unwrap(), before);
    assert_eq!(raw_register(&mut root, VmId(8)).await, None);
    let got = root.get("/elsewhere/vm/7", None).await.unwrap();
    assert!(got.kvs().is_empty());
    let after: WitnessState = w1.query(vm, T).await.unwrap();
    assert_eq!(after, s);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_grants_and_revokes_an_agent_once_auth_is_on() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, ca, admin) = tls_cluster(dir.path(), &["node-1"]).await;
    let vm = VmId(3);
    let w1 = tls_witness(&cluster, PREFIX, &cert(&ca, "node-1"));
    w1.init(vm, P, T).await.unwrap();
    let w2: EtcdWitness = tls_witness(&cluster, PREFIX, &cert(&ca, "node-2"));
    let e = w2.query(vm, T).await.unwrap_err();
    assert!(matches!(e, EtcdWitnessError::Denied { .. }), "{e}");

    // Again with the same agent and a new one: the setup runs again, adding only node-2.
    let granted = cluster
        .grant_access(&["node-1".into(), "node-2".into()])
        .await
        .expect("root grants again");
    assert_eq!(granted.role, DEFAULT_ROLE);
    assert_eq!(granted.key_prefix, format!("{PREFIX}/vm/"));
    assert_eq!(granted.created, ["node-2"]);
    assert!(granted.other_permissions.is_empty(), "{granted:?}");
    assert_eq!(w2.query(vm, T).await.expect("node-2 reads now").primary, P);

    // Root cuts an agent off by deleting its user: denied from the next request on.
    let mut root = raw(&cluster, &admin).await;
    root.user_delete("node-2")
        .await
        .expect("root deletes a user");
    let e = w2.query(vm, T).await.unwrap_err();
    assert!(matches!(e, EtcdWitnessError::Denied { .. }), "{e}");
    assert_eq!(w1.query(vm, T).await.unwrap().primary, P);

    // The cluster's health certificate (a CN that is no user) still sees the members' status
    // with auth on: a killed leader is replaced and the agents carry on.
    let mut cluster = cluster;
    let leader = cluster.leader(T).await.expect("status with auth on");
    cluster.kill(leader).unwrap();
    cluster.wait_leader(Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        w1.query(vm, T).await.expect("after a new leader").primary,
        P
    );
    drop(cluster);
}
