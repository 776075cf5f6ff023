//! The etcd witness of a local deployment (`ftvm demo --witness etcd`): a 3-member etcd cluster
//! on the witness host (the switch namespace), where `ftvm witness` would run, and the VM's
//! register created in it once, as `ftvm witness-init` would on real hosts. The agents then
//! decide each witness request as a compare-and-set on that key.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use ftvm_model::{NodeId, VmId, WitnessState};
use ftvm_real::etcd_witness::{EtcdTarget, EtcdWitness, DEFAULT_PREFIX};
use ftvm_real::host::etcd_cluster::{ClusterSpec, EtcdCluster, MemberAddrs};
use ftvm_real::host::topology::{Host, Topology};

/// Members of the cluster: a majority survives the loss of one.
const MEMBERS: u16 = 3;
/// The first member's client port; each member takes two ports (client, peer) from here.
const FIRST_PORT: u16 = 2379;

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
    let ip = IpAddr::from(topo.addr(Host::Switch));
    let eps: Vec<String> = member_addrs(ip)
        .iter()
        .map(|m| m.client.to_string())
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

/// Starts the cluster on the witness host with its data under `dir`, waits for a leader and
/// creates the register of `vm` with `primary` as primary of generation 1.
pub fn start(
    topo: &Topology,
    dir: &Path,
    vm: VmId,
    primary: NodeId,
) -> anyhow::Result<EtcdCluster> {
    let spec = ClusterSpec {
        members: member_addrs(IpAddr::from(topo.addr(Host::Switch))),
        dir: dir.to_path_buf(),
        wrap: vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            topo.ns(Host::Switch),
        ],
        // Quick elections, as in the tests: a killed leader costs well under a second.
        raft_ms: (50, 500),
    };
    let url = etcd_url(topo);
    let target = EtcdTarget::parse(&url, DEFAULT_PREFIX).context("the etcd witness's address")?;
    // The members listen on the witness host's address: wait for them, and write the register,
    // from inside that host.
    on_witness_host(topo, async move {
        let cluster = EtcdCluster::start(spec)
            .await
            .context("starting the etcd cluster")?;
        let witness = EtcdWitness::new(target);
        let key = witness.target().key(vm);
        witness
            .init(vm, primary, Duration::from_secs(10))
            .await
            .with_context(|| format!("creating the register {key}"))?;
        Ok(cluster)
    })
}

/// Reads the register of `vm` (a linearizable read) from inside the witness host.
pub fn read_register(topo: &Topology, vm: VmId) -> anyhow::Result<WitnessState> {
    let url = etcd_url(topo);
    let target = EtcdTarget::parse(&url, DEFAULT_PREFIX).context("the etcd witness's address")?;
    on_witness_host(topo, async move {
        EtcdWitness::new(target)
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
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(job)
    })
    .context("entering the witness host")?
}
