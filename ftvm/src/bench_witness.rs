//! `ftvm bench witness`: takeover time with the standalone `ftvm witness` against an etcd witness
//! (a local 3-member cluster, run as deployed: TLS, client certificates, access control with one
//! user per agent), and with the etcd leader SIGKILLed at the moment the primary dies;
//! the in-memory VM and real agents over loopback, the backends interleaved round by round in
//! one run. Writes `witness.json`.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use ftvm_model::{Config, NodeId, Start, VmId};
use ftvm_real::agent::capture::CaptureMode;
use ftvm_real::agent::mem_vm::{MemLauncher, MemRam};
use ftvm_real::agent::witness;
use ftvm_real::agent::witness_client::WitnessClient;
use ftvm_real::agent::witness_store::{Open, WitnessStore};
use ftvm_real::agent::{Agent, AgentConfig};
use ftvm_real::auth::{Identity, Protection};
use ftvm_real::etcd_witness::{EtcdTarget, EtcdTls, EtcdWitness, DEFAULT_PREFIX};
use ftvm_real::host::etcd_certs::{cluster_tls, CA_NAME};
use ftvm_real::host::etcd_cluster::{ClusterAccess, ClusterSpec, EtcdCluster};
use ftvm_real::secure_fs;
use ftvm_real::transport::TransportKind;

/// Arguments of `ftvm bench witness`.
#[derive(clap::Args, Debug)]
pub struct WitnessArgs {
    /// Output directory for `witness.json`.
    #[arg(long, default_value = "docs/bench")]
    out: PathBuf,
    /// Failovers per backend (the median is reported).
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Scratch directory (replaced).
    #[arg(long, default_value = "/tmp/ftvm-bench-witness")]
    work_dir: PathBuf,
    /// The agents' failure timeout in ms (part of every takeover, whatever the witness).
    #[arg(long, default_value_t = 300)]
    failure_timeout_ms: u64,
}

const PAGES: u64 = 256;
const PAGE: usize = 4096;

#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
enum Backend {
    /// `ftvm witness` (in process: the same service the command runs).
    Service,
    /// A 3-member etcd cluster.
    Etcd,
    /// The same, with its leader SIGKILLed when the primary dies.
    EtcdLeaderKilled,
}

#[derive(Debug, serde::Serialize)]
struct Round {
    backend: Backend,
    /// From the primary's death to the backup running the VM as primary.
    kill_to_primary_us: u64,
    /// The agent's own figure: from its takeover request to its VM running.
    takeover_us: Option<u64>,
}

#[derive(Debug, serde::Serialize)]
struct Summary {
    backend: Backend,
    rounds: usize,
    median_kill_to_primary_ms: f64,
    median_takeover_ms: Option<f64>,
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("a free loopback port")?;
    Ok(l.local_addr()?)
}

fn status(path: &Path) -> serde_json::Value {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Runs the benchmark.
pub fn run(a: WitnessArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(a.rounds > 0, "--rounds must be positive");
    secure_fs::fresh_private_dir(&a.work_dir).context("the work directory")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let rounds = rt.block_on(all_rounds(&a))?;
    let mut summaries = Vec::new();
    for backend in [Backend::Service, Backend::Etcd, Backend::EtcdLeaderKilled] {
        let of: Vec<&Round> = rounds.iter().filter(|r| r.backend == backend).collect();
        let kill: Vec<u64> = of.iter().map(|r| r.kill_to_primary_us).collect();
        let take: Vec<u64> = of.iter().filter_map(|r| r.takeover_us).collect();
        let s = Summary {
            backend,
            rounds: of.len(),
            median_kill_to_primary_ms: crate::bench_capture::median(&kill) as f64 / 1000.0,
            median_takeover_ms: (!take.is_empty())
                .then(|| crate::bench_capture::median(&take) as f64 / 1000.0),
        };
        println!(
            "{:?}: median kill->primary {:.1} ms, takeover request->VM running {} ({} rounds)",
            s.backend,
            s.median_kill_to_primary_ms,
            s.median_takeover_ms
                .map_or("n/a".into(), |m| format!("{m:.1} ms")),
            s.rounds
        );
        summaries.push(s);
    }
    std::fs::create_dir_all(&a.out)?;
    let json = serde_json::json!({
        "failure_timeout_ms": a.failure_timeout_ms,
        "summary": summaries,
        "rounds": rounds,
    });
    let path = a.out.join("witness.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(0)
}

async fn all_rounds(a: &WitnessArgs) -> anyhow::Result<Vec<Round>> {
    // As deployed: each agent shows its own certificate, whose CN is its etcd user.
    let agents = ["node-1", "node-2"];
    let (mut tls, ca) = cluster_tls(&a.work_dir.join("pki"), [127, 0, 0, 1].into())
        .context("the etcd cluster's certificates")?;
    tls.access = Some(ClusterAccess {
        users: agents.iter().map(|n| n.to_string()).collect(),
        ..ClusterAccess::default()
    });
    let mut spec = ClusterSpec::loopback(3, &a.work_dir.join("etcd"))?;
    spec.tls = Some(tls);
    let mut etcd = EtcdCluster::start(spec).await.context("the etcd cluster")?;
    let mut etcd_witness = Vec::new();
    for name in agents {
        let files = ca.client(CA_NAME, name)?;
        let target = EtcdTarget::parse(&etcd.url(), DEFAULT_PREFIX)?;
        etcd_witness.push(EtcdWitness::with_tls(target, EtcdTls::load(&files)?));
    }
    let mut rounds = Vec::new();
    for i in 0..a.rounds {
        for backend in [Backend::Service, Backend::Etcd, Backend::EtcdLeaderKilled] {
            let vm = VmId(1000 + u64::from(i) * 3 + backend as u64);
            let dir = a.work_dir.join(format!("r{i}-{backend:?}"));
            secure_fs::fresh_private_dir(&dir)?;
            let r = one_round(a, &dir, vm, backend, &mut etcd, &etcd_witness)
                .await
                .with_context(|| format!("round {i} with {backend:?}"))?;
            eprintln!(
                "round {i} {backend:?}: kill->primary {} us, takeover {:?} us",
                r.kill_to_primary_us, r.takeover_us
            );
            rounds.push(r);
        }
    }
    Ok(rounds)
}

async fn one_round(
    a: &WitnessArgs,
    dir: &Path,
    vm: VmId,
    backend: Backend,
    etcd: &mut EtcdCluster,
    // The agents' clients, node 1's first.
    etcd_witness: &[EtcdWitness],
) -> anyhow::Result<Round> {
    let (wid, mut ids) = Identity::generate_set(&[NodeId(1), NodeId(2)])?;
    let mut id = |n| Arc::new(ids.remove(&NodeId(n)).expect("generated above"));
    let (pid, bid) = (id(1), id(2));
    let mut wtask = None;
    let clients: Vec<WitnessClient> = match backend {
        Backend::Service => {
            let addr = free_addr()?;
            let init = Open::Init { primary: NodeId(1) };
            let (store, w) = WitnessStore::open(&dir.join("witness.json"), vm, init)?;
            let limits = witness::ServeLimits::default();
            let serve = witness::serve(addr, store, w, Arc::new(wid), limits, false);
            wtask = Some(tokio::spawn(serve));
            vec![WitnessClient::Service(addr); 2]
        }
        Backend::Etcd | Backend::EtcdLeaderKilled => {
            etcd_witness[0]
                .init(vm, NodeId(1), Duration::from_secs(5))
                .await?;
            etcd_witness
                .iter()
                .map(|w| WitnessClient::Etcd(w.clone()))
                .collect()
        }
    };
    let addrs: BTreeMap<NodeId, SocketAddr> =
        [(NodeId(1), free_addr()?), (NodeId(2), free_addr()?)].into();
    let cfg = |node: u32, start, identity| -> anyhow::Result<AgentConfig> {
        let mut model = Config::new(vm, PAGES, NodeId(0));
        model.failure_timeout = Duration::from_millis(a.failure_timeout_ms);
        model.rejoin_after_fence = None;
        let d = dir.join(format!("n{node}"));
        secure_fs::private_dir(&d)?;
        Ok(AgentConfig {
            node: NodeId(node),
            start,
            model,
            listen: addrs[&NodeId(node)],
            peers: addrs.clone(),
            witness: clients[node as usize - 1].clone(),
            replica_dir: d.join("replica"),
            replica_ram: d.join("replica.ram"),
            replica_disk: None,
            replica_durable: false,
            resume_replica: false,
            transport: TransportKind::Copy,
            capture: CaptureMode::Staged,
            metrics: None,
            status_file: Some(d.join("status.json")),
            identity,
            protection: Protection::Mac,
            verbose: false,
            verify_every: None,
            limits: Default::default(),
            journal: None,
        })
    };
    let pcfg = cfg(1, Start::Primary, pid)?;
    let bcfg = cfg(2, Start::Backup { primary: NodeId(1) }, bid)?;
    let (p_status, b_status) = (
        pcfg.status_file.clone().unwrap_or_default(),
        bcfg.status_file.clone().unwrap_or_default(),
    );
    let launcher = || MemLauncher {
        ram_bytes: PAGES as usize * PAGE,
        page_size: PAGE,
        pages_per_ms: 2,
        seed: 5,
        cow: Default::default(),
        launched: Arc::<Mutex<Vec<MemRam>>>::default(),
        failing_restores: 0,
    };
    let primary = Agent::new(pcfg, launcher())?;
    let backup = Agent::new(bcfg, launcher())?;
    let (kill, rx) = tokio::sync::oneshot::channel::<()>();
    let ptask = tokio::spawn(primary.run(async {
        let _ = rx.await;
    }));
    let btask = tokio::spawn(backup.run(std::future::pending()));
    let result = async {
        let t0 = Instant::now();
        while status(&p_status)["phase"] != "protected" {
            anyhow::ensure!(t0.elapsed() < Duration::from_secs(20), "never protected");
            anyhow::ensure!(!btask.is_finished(), "the backup stopped");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let leader = match backend {
            Backend::EtcdLeaderKilled => Some(etcd.leader(Duration::from_secs(10)).await?),
            _ => None,
        };
        let _ = kill.send(());
        let killed = Instant::now();
        if let Some(l) = leader {
            etcd.kill(l)?;
        }
        let _ = ptask.await;
        loop {
            let s = status(&b_status);
            if s["role"] == "Primary" && s["failed_over"] == true {
                let takeover_us = s["failover_us"].as_u64();
                return Ok(Round {
                    backend,
                    kill_to_primary_us: killed.elapsed().as_micros() as u64,
                    takeover_us,
                });
            }
            anyhow::ensure!(
                killed.elapsed() < Duration::from_secs(30),
                "no takeover in 30 s: {s}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    .await;
    btask.abort();
    if let Some(w) = wtask {
        w.abort();
    }
    for i in 0..etcd.len() {
        if !etcd.is_running(i) {
            etcd.restart(i)?;
        }
    }
    etcd.wait_leader(Duration::from_secs(20)).await?;
    result
}
