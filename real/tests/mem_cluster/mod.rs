//! An in-memory protected pair for tests: a witness, a primary and a backup agent over real
//! loopback sockets, with authenticated links, protecting the in-memory VM instead of QEMU.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_model::{Config, NodeId, Start, VmId};
use ftvm_real::agent::capture::CaptureMode;
use ftvm_real::agent::mem_vm::{MemLauncher, MemRam};
use ftvm_real::agent::witness_client::WitnessClient;
use ftvm_real::agent::witness_store::{Open, WitnessStore};
use ftvm_real::agent::{witness, AgentConfig};
use ftvm_real::auth::Identity;
use ftvm_real::transport::TransportKind;

pub const PAGE: usize = 4096;
pub const PAGES: u64 = 256;

pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

pub fn status(path: &Path) -> serde_json::Value {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

pub async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Key pairs for the witness and nodes 1 and 2, all trusting each other.
pub struct Keys {
    pub witness: Arc<Identity>,
    pub nodes: BTreeMap<NodeId, Arc<Identity>>,
}

pub fn keys() -> Keys {
    let (w, nodes) = Identity::generate_set(&[NodeId(1), NodeId(2)]).unwrap();
    Keys {
        witness: Arc::new(w),
        nodes: nodes.into_iter().map(|(n, i)| (n, Arc::new(i))).collect(),
    }
}

pub fn serve_witness(
    dir: &Path,
    addr: SocketAddr,
    keys: &Keys,
    log: bool,
) -> tokio::task::JoinHandle<Result<(), witness::WitnessError>> {
    let (store, w) = open_witness(dir);
    let limits = witness::ServeLimits::default();
    tokio::spawn(witness::serve(
        addr,
        store,
        w,
        keys.witness.clone(),
        limits,
        log,
    ))
}

/// A fresh witness register for VM 7 with node 1 as its first primary.
pub fn open_witness(dir: &Path) -> (WitnessStore, ftvm_model::Witness) {
    let init = Open::Init { primary: NodeId(1) };
    WitnessStore::open(&dir.join("witness.json"), VmId(7), init).unwrap()
}

pub struct Host {
    pub cfg: AgentConfig,
    pub launched: Arc<Mutex<Vec<MemRam>>>,
}

pub fn host(
    dir: &Path,
    node: u32,
    start: Start,
    addrs: &BTreeMap<NodeId, SocketAddr>,
    witness: impl Into<WitnessClient>,
    keys: &Keys,
) -> Host {
    let mut model = Config::new(VmId(7), PAGES, NodeId(0));
    model.failure_timeout = Duration::from_millis(300);
    let d = dir.join(format!("n{node}"));
    std::fs::create_dir_all(&d).unwrap();
    Host {
        cfg: AgentConfig {
            node: NodeId(node),
            start,
            model,
            listen: addrs[&NodeId(node)],
            peers: addrs.clone(),
            witness: witness.into(),
            replica_dir: d.join("replica"),
            replica_ram: d.join("replica.ram"),
            replica_disk: None,
            replica_durable: false,
            transport: TransportKind::Copy,
            capture: CaptureMode::Staged,
            metrics: Some(d.join("metrics.jsonl")),
            status_file: Some(d.join("status.json")),
            identity: keys.nodes[&NodeId(node)].clone(),
            protection: ftvm_real::auth::Protection::Mac,
            verbose: true,
            verify_every: Some(5),
            limits: Default::default(),
            journal: None,
            resume_replica: true,
        },
        launched: Arc::new(Mutex::new(Vec::new())),
    }
}

pub fn launcher(h: &Host) -> MemLauncher {
    MemLauncher {
        ram_bytes: PAGES as usize * PAGE,
        page_size: PAGE,
        pages_per_ms: 2,
        seed: 11,
        cow: Default::default(),
        launched: h.launched.clone(),
        failing_restores: 0,
    }
}

/// RAM digests a node recorded (`verify_every`), by epoch.
pub fn digests(dir: &Path, node: &str) -> BTreeMap<u64, u64> {
    std::fs::read_to_string(dir.join(node).join("replica/verify.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| (v["epoch"].as_u64().unwrap(), v["digest"].as_u64().unwrap()))
        .collect()
}

type AgentTask =
    tokio::task::JoinHandle<Result<ftvm_real::agent::AgentExit, ftvm_real::agent::AgentError>>;

/// A protected pair running in this process.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub keys: Keys,
    pub addrs: BTreeMap<NodeId, SocketAddr>,
    pub witness: SocketAddr,
    pub p: Host,
    pub b: Host,
    pub ptask: AgentTask,
    pub btask: AgentTask,
    pub wtask: tokio::task::JoinHandle<Result<(), witness::WitnessError>>,
}

impl Cluster {
    /// Starts witness, primary (node 1) and backup (node 2) with `deadline` for handshakes
    /// (agents and witness), and waits until the primary is protected.
    pub async fn protected(deadline: Duration) -> Cluster {
        Cluster::protected_with(deadline, ftvm_real::auth::Protection::Mac).await
    }

    /// [`Cluster::protected`] with links protected by `protection`.
    pub async fn protected_with(
        deadline: Duration,
        protection: ftvm_real::auth::Protection,
    ) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let waddr = free_addr();
        let addrs: BTreeMap<NodeId, SocketAddr> =
            [(NodeId(1), free_addr()), (NodeId(2), free_addr())].into();
        let keys = keys();
        let (store, w) = open_witness(dir.path());
        let limits = witness::ServeLimits {
            deadline,
            ..witness::ServeLimits::default()
        };
        let wtask = tokio::spawn(witness::serve(
            waddr,
            store,
            w,
            keys.witness.clone(),
            limits,
            true,
        ));
        let mut p = host(dir.path(), 1, Start::Primary, &addrs, waddr, &keys);
        let mut b = host(
            dir.path(),
            2,
            Start::Backup { primary: NodeId(1) },
            &addrs,
            waddr,
            &keys,
        );
        p.cfg.limits.conn.handshake_deadline = deadline;
        b.cfg.limits.conn.handshake_deadline = deadline;
        p.cfg.protection = protection;
        b.cfg.protection = protection;
        let primary = ftvm_real::agent::Agent::new(p.cfg.clone(), launcher(&p)).unwrap();
        let backup = ftvm_real::agent::Agent::new(b.cfg.clone(), launcher(&b)).unwrap();
        let ptask = tokio::spawn(primary.run(std::future::pending()));
        let btask = tokio::spawn(backup.run(std::future::pending()));
        let pstatus = p.cfg.status_file.clone().unwrap();
        wait_for("protection", Duration::from_secs(20), || {
            status(&pstatus)["phase"] == "protected"
        })
        .await;
        Cluster {
            dir,
            keys,
            addrs,
            witness: waddr,
            p,
            b,
            ptask,
            btask,
            wtask,
        }
    }

    /// Epochs the primary has seen acked.
    pub fn acked(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("n1/metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .count()
    }

    /// The backup's last committed epoch.
    pub fn committed(&self) -> u64 {
        status(self.b.cfg.status_file.as_ref().unwrap())["committed"]
            .as_u64()
            .unwrap_or(0)
    }

    /// The witness's register as persisted.
    pub fn register(&self) -> serde_json::Value {
        status(&self.dir.path().join("witness.json"))
    }

    /// What a user would check after an attack: both agents still run, the primary is still
    /// protected in generation 1 with its first VM, which keeps running; checkpoints keep being
    /// committed and acked; the replica equals the primary at every verified checkpoint; the
    /// witness still names this primary and backup.
    pub async fn assert_healthy(&self, after: &str) {
        let (acked, committed) = (self.acked(), self.committed());
        let writes = self.p.launched.lock().unwrap()[0].writes();
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            !self.ptask.is_finished(),
            "{after}: the primary agent stopped"
        );
        assert!(
            !self.btask.is_finished(),
            "{after}: the backup agent stopped"
        );
        let ps = status(self.p.cfg.status_file.as_ref().unwrap());
        assert_eq!(ps["phase"], "protected", "{after}: primary {ps}");
        assert_eq!(ps["generation"], 1, "{after}: primary {ps}");
        assert_eq!(
            self.p.launched.lock().unwrap().len(),
            1,
            "{after}: VM relaunched"
        );
        let vm = self.p.launched.lock().unwrap()[0].clone();
        assert!(vm.writes() > writes, "{after}: the VM stopped running");
        assert!(self.acked() > acked + 5, "{after}: acks stalled at {acked}");
        assert!(
            self.committed() > committed,
            "{after}: commits stalled at {committed}"
        );
        assert!(
            self.b.launched.lock().unwrap().is_empty(),
            "{after}: the backup took over"
        );
        let (pd, bd) = (
            digests(self.dir.path(), "n1"),
            digests(self.dir.path(), "n2"),
        );
        let common: Vec<u64> = pd.keys().filter(|e| bd.contains_key(e)).copied().collect();
        assert!(!common.is_empty(), "{after}: no verified checkpoint");
        for e in common {
            assert_eq!(pd[&e], bd[&e], "{after}: replica differs at epoch {e}");
        }
        let reg = self.register();
        assert_eq!(reg["generation"], 1, "{after}: register {reg}");
        assert_eq!(reg["primary"], 1, "{after}: register {reg}");
        assert_eq!(reg["backup"]["node"], 2, "{after}: register {reg}");
    }
}
