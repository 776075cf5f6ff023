//! Shared harness of the capture-safety tests: a witness, a primary and a backup agent over
//! loopback, run protected for a while, then the RAM digests both recorded (the primary while
//! paused at each capture, the backup right after each commit) are compared.

#![allow(dead_code)] // each test file uses a different subset

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftvm_model::{Config, NodeId, Start, VmId};
use ftvm_real::agent::capture::CaptureMode;
use ftvm_real::agent::vm::VmLauncher;
use ftvm_real::agent::witness_store::{Open, WitnessStore};
use ftvm_real::agent::{witness, Agent, AgentConfig};
use ftvm_real::auth::Identity;
use ftvm_real::transport::TransportKind;

pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

pub fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn status(path: &Path) -> serde_json::Value {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// (generation, epoch) → digest.
fn digests(replica_dir: &Path) -> BTreeMap<(u64, u64), u64> {
    json_lines(&replica_dir.join("verify.jsonl"))
        .iter()
        .map(|v| {
            (
                (
                    v["generation"].as_u64().unwrap(),
                    v["epoch"].as_u64().unwrap(),
                ),
                v["digest"].as_u64().unwrap(),
            )
        })
        .collect()
}

pub fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// One run's parameters.
pub struct Run {
    pub transport: TransportKind,
    pub capture: CaptureMode,
    /// Guest RAM in pages.
    pub pages: u64,
    /// Digest every this many epochs.
    pub verify_every: u64,
    /// How long to stay protected once the backup is in sync.
    pub protected: Duration,
    /// Time allowed to boot and reach protection.
    pub protect_timeout: Duration,
}

/// What a run showed.
pub struct Outcome {
    /// Checkpoints whose replica digest was compared with the primary's.
    pub verified: usize,
    /// The primary's per-epoch metrics.
    pub metrics: Vec<serde_json::Value>,
}

impl Outcome {
    pub fn median_of(&self, field: &str) -> u64 {
        median(
            self.metrics
                .iter()
                .map(|m| m[field].as_u64().unwrap())
                .collect(),
        )
    }
}

fn config(dir: &Path, node: u32, start: Start, run: &Run, addrs: &Addrs) -> AgentConfig {
    let mut model = Config::new(VmId(7), run.pages, NodeId(0));
    // Generous: the guest burns a core, and heartbeats queue behind checkpoints.
    model.failure_timeout = Duration::from_secs(2);
    let d = dir.join(format!("n{node}"));
    std::fs::create_dir_all(&d).unwrap();
    AgentConfig {
        node: NodeId(node),
        start,
        model,
        listen: addrs.peers[&NodeId(node)],
        peers: addrs.peers.clone(),
        witness: addrs.witness.into(),
        replica_dir: d.join("replica"),
        replica_ram: d.join("replica.ram"),
        replica_disk: None,
        replica_durable: false,
        transport: run.transport,
        capture: run.capture,
        metrics: Some(d.join("metrics.jsonl")),
        status_file: Some(d.join("status.json")),
        identity: addrs.keys[&NodeId(node)].clone(),
        protection: ftvm_real::auth::Protection::Mac,
        verbose: false,
        verify_every: Some(run.verify_every),
        limits: Default::default(),
        journal: None,
        resume_replica: true,
    }
}

struct Addrs {
    witness: SocketAddr,
    peers: BTreeMap<NodeId, SocketAddr>,
    /// Each node's keys (all trusting each other and the witness).
    keys: BTreeMap<NodeId, Arc<Identity>>,
}

/// Protects a VM booted by `primary` with a backup (whose launcher is never used unless it
/// fails over), for `run.protected`, then checks every checkpoint up to the backup's last
/// commit: committed (no frame rejected as torn) and equal to the primary's RAM at its pause.
pub async fn protect_and_verify<L: VmLauncher>(
    dir: &Path,
    run: &Run,
    primary: L,
    backup: L,
) -> Outcome {
    let (transport, capture) = (run.transport, run.capture);
    let (wkeys, keys) = Identity::generate_set(&[NodeId(1), NodeId(2)]).unwrap();
    let addrs = Addrs {
        witness: free_addr(),
        peers: [(NodeId(1), free_addr()), (NodeId(2), free_addr())].into(),
        keys: keys.into_iter().map(|(n, i)| (n, Arc::new(i))).collect(),
    };
    let wfile = dir.join("witness.json");
    let (store, w) =
        WitnessStore::open(&wfile, VmId(7), Open::Init { primary: NodeId(1) }).unwrap();
    let limits = witness::ServeLimits::default();
    let serve = witness::serve(addrs.witness, store, w, Arc::new(wkeys), limits, false);
    let wtask = tokio::spawn(serve);
    let pcfg = config(dir, 1, Start::Primary, run, &addrs);
    let bcfg = config(dir, 2, Start::Backup { primary: NodeId(1) }, run, &addrs);
    let pagent = Agent::new(pcfg.clone(), primary).unwrap();
    let bagent = Agent::new(bcfg.clone(), backup).unwrap();
    let (pstop, prx) = tokio::sync::oneshot::channel::<()>();
    let (bstop, brx) = tokio::sync::oneshot::channel::<()>();
    let pstatus = pcfg.status_file.clone().unwrap();
    let control = async {
        let t0 = Instant::now();
        while status(&pstatus)["phase"] != "protected" {
            if t0.elapsed() > run.protect_timeout {
                let _ = (pstop.send(()), bstop.send(()));
                return Err(format!("{transport}/{capture}: never protected"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(run.protected).await;
        let phase = status(&pstatus)["phase"].clone();
        let _ = (pstop.send(()), bstop.send(()));
        if phase == "protected" {
            Ok(())
        } else {
            Err(format!(
                "{transport}/{capture}: the primary lost its backup ({phase})"
            ))
        }
    };
    // One task runs both agents: neither needs to be `Send` (QEMU-backed ones are not).
    let (pexit, bexit, controlled) = tokio::join!(
        pagent.run(async {
            let _ = prx.await;
        }),
        bagent.run(async {
            let _ = brx.await;
        }),
        control
    );
    wtask.abort();
    pexit.expect("primary agent failed");
    bexit.expect("backup agent failed");
    controlled.unwrap();

    let (pd, bd) = (digests(&pcfg.replica_dir), digests(&bcfg.replica_dir));
    let last_committed = *bd.keys().next_back().expect("nothing committed");
    let checked: Vec<_> = pd.range(..=last_committed).collect();
    for (key, digest) in &checked {
        match bd.get(key) {
            Some(b) => assert_eq!(
                b, *digest,
                "{transport}/{capture}: replica differs from the paused primary at {key:?}"
            ),
            None => panic!("{transport}/{capture}: checkpoint {key:?} was never committed"),
        }
    }
    let out = Outcome {
        verified: checked.len(),
        metrics: json_lines(pcfg.metrics.as_ref().unwrap()),
    };
    if capture == CaptureMode::PausedSend {
        // The VM stayed paused while its pages went out.
        for m in &out.metrics {
            let (p, s) = (
                m["pause_us"].as_u64().unwrap(),
                m["send_us"].as_u64().unwrap(),
            );
            assert!(
                p >= s,
                "{transport}/{capture}: resumed before the send ended: {m}"
            );
        }
    }
    eprintln!(
        "{transport}/{capture}: {} checkpoints verified; medians: {} dirty pages, pause {} us, \
         send {} us",
        out.verified,
        out.median_of("dirty_pages"),
        out.median_of("pause_us"),
        out.median_of("send_us")
    );
    out
}
