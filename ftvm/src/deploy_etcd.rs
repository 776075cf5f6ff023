//! The etcd witness of a local deployment (`ftvm demo --witness etcd`): a 3-member etcd cluster
//! on the witness host (the switch namespace), where `ftvm witness` would run, and the VM's
//! register created in it once, as `ftvm witness-init` would on real hosts. The agents then
//! decide each witness request as a compare-and-set on that key. Clients reach etcd over TLS
//! and etcd requires their certificates (`--client-cert-auth`): a CA made for the deployment
//! signs the members' server certificate, one client certificate per agent (CN `node-N`) and
//! the administrator's (CN `root`), which this tool uses, all under `<etcd dir>/pki`. etcd's
//! access control is on: each agent's CN is an etcd user whose role may read and write the
//! registers' keys and nothing else, as `ftvm witness-grant` sets up on real hosts.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use ftvm_model::{NodeId, VmId, WitnessState};
use ftvm_real::etcd_witness::{
    EtcdTarget, EtcdTls, EtcdTlsFiles, EtcdWitness, DEFAULT_PREFIX, DEFAULT_ROLE, ROOT,
};
use ftvm_real::host::etcd_certs::{cluster_tls, CA_NAME as CA};
use ftvm_real::host::etcd_cluster::{ClusterAccess, ClusterSpec, EtcdCluster, MemberAddrs};
use ftvm_real::host::topology::{Host, Topology};

/// Members of the cluster: a majority survives the loss of one.
const MEMBERS: u16 = 3;
/// The first member's client port; each member takes two ports (client, peer) from here.
const FIRST_PORT: u16 = 2379;
/// The client certificate this tool uses (access control, register creation, the final read):
/// etcd's administrator.
const ADMIN: &str = ROOT;

fn member_addrs(ip: IpAddr) -> Vec<MemberAddrs> {
    (0..MEMBERS)
        .map(|i| MemberAddrs {
            client: SocketAddr::new(ip, FIRST_PORT + 2 * i),
            peer: SocketAddr::new(ip, FIRST_PORT + 2 * i + 1),
        })
        .collect()
}

/// The `--witness` value agents of a deployment on `topo` use with the etcd witness.
pub fn etcd_url(topo: &Topology) -> String {
    let eps: Vec<String> = etcd_client_addrs(topo)
        .iter()
        .map(SocketAddr::to_string)
        .collect();
    format!("etcd://{}", eps.join(","))
}

/// The client ports of the members (for the isolation check: the VM's clients must not reach
/// them).
pub fn etcd_client_addrs(topo: &Topology) -> Vec<SocketAddr> {
    member_addrs(IpAddr::from(topo.addr(Host::Switch)))
        .iter()
        .map(|m| m.client)
        .collect()
}

fn pki(dir: &Path) -> PathBuf {
    dir.join("pki")
}

/// The TLS files client `name` of the cluster under `dir` connects with.
fn client_files(dir: &Path, name: &str) -> EtcdTlsFiles {
    let pki = pki(dir);
    EtcdTlsFiles {
        ca: pki.join(format!("{CA}.pem")),
        cert: pki.join(format!("{name}.pem")),
        key: pki.join(format!("{name}.key")),
    }
}

/// The CN of node `node`'s agent certificate: its etcd user.
fn agent_user(node: u32) -> String {
    format!("node-{node}")
}

/// The witness flags of node `node`'s agent besides `--witness`: its TLS files.
pub fn agent_tls_args(dir: &Path, node: u32) -> Vec<String> {
    let f = client_files(dir, &agent_user(node));
    vec![
        "--witness-ca".into(),
        f.ca.display().to_string(),
        "--witness-cert".into(),
        f.cert.display().to_string(),
        "--witness-key".into(),
        f.key.display().to_string(),
    ]
}

/// This tool's client of the cluster under `dir` on `topo`.
fn admin(topo: &Topology, dir: &Path) -> anyhow::Result<EtcdWitness> {
    let target =
        EtcdTarget::parse(&etcd_url(topo), DEFAULT_PREFIX).context("the etcd witness's address")?;
    let tls = EtcdTls::load(&client_files(dir, ADMIN))?;
    Ok(EtcdWitness::with_tls(target, tls))
}

/// Starts the cluster on the witness host with its data under `dir`, issues client
/// certificates for agents `nodes`, waits for a leader, turns on its access control (the agents
/// may touch the registers only) and creates the register of `vm` with `primary` as primary of
/// generation 1.
pub fn start(
    topo: &Topology,
    dir: &Path,
    nodes: &[u32],
    vm: VmId,
    primary: NodeId,
) -> anyhow::Result<EtcdCluster> {
    let ip = IpAddr::from(topo.addr(Host::Switch));
    let (mut tls, ca) = cluster_tls(&pki(dir), ip).context("the etcd cluster's certificates")?;
    for n in nodes {
        ca.client(CA, &agent_user(*n))
            .context("an agent's etcd certificate")?;
    }
    tls.access = Some(ClusterAccess {
        prefix: DEFAULT_PREFIX.to_string(),
        role: DEFAULT_ROLE.to_string(),
        users: nodes.iter().map(|n| agent_user(*n)).collect(),
    });
    let spec = ClusterSpec {
        members: member_addrs(ip),
        dir: dir.to_path_buf(),
        wrap: vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            topo.ns(Host::Switch),
        ],
        // Quick elections, as in the tests: a killed leader costs well under a second.
        raft_ms: (50, 500),
        tls: Some(tls),
    };
    let witness = admin(topo, dir)?;
    // The members listen on the witness host's address: wait for them, and write the register,
    // from inside that host.
    on_witness_host(topo, async move {
        let cluster = EtcdCluster::start(spec)
            .await
            .context("starting the etcd cluster")?;
        let key = witness.target().key(vm);
        witness
            .init(vm, primary, Duration::from_secs(10))
            .await
            .with_context(|| format!("creating the register {key}"))?;
        Ok(cluster)
    })
}

/// Reads the register of `vm` (a linearizable read) from the cluster under `dir`, from inside
/// the witness host.
pub fn read_register(topo: &Topology, dir: &Path, vm: VmId) -> anyhow::Result<WitnessState> {
    let witness = admin(topo, dir)?;
    on_witness_host(topo, async move {
        witness
            .query(vm, Duration::from_secs(5))
            .await
            .context("reading the register from etcd")
    })
}

/// Runs `job` to its end on a thread inside the witness host's namespace (its sockets are that
/// host's).
fn on_witness_host<T: Send + 'static>(
    topo: &Topology,
    job: impl std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    topo.in_ns(Host::Switch, move || -> anyhow::Result<T> {
        crate::witness_etcd_cmd::runtime()?.block_on(job)
    })
    .context("entering the witness host")?
}
