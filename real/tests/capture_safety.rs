//! Proof of safety of every transport × capture mode (issue 4 item 3): with a guest rewriting
//! pages as fast as it can, the backup's committed replica equals the primary's RAM as it was
//! when the VM was paused, at every checkpoint.
//!
//! Primary and backup agents run over loopback with in-memory VMs whose RAM is a shared mapping
//! (so paused-send really sends from guest RAM). Both record an xxh3 digest of all RAM at every
//! epoch: the primary while paused at the capture, the backup right after committing. Any page
//! sent after it changed shows up as a digest mismatch, or as a frame the backup rejects by its
//! checksum and so never commits — both fail the test.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_model::{Config, NodeId, Start, VmId};
use ftvm_real::agent::capture::CaptureMode;
use ftvm_real::agent::mem_vm::MemLauncher;
use ftvm_real::agent::{witness, Agent, AgentConfig};
use ftvm_real::transport::TransportKind;

/// 8 MiB of guest RAM.
const PAGES: u64 = 2048;
/// How long the VM runs protected.
const PROTECTED: Duration = Duration::from_millis(1200);

/// The combinations share two cores with everything else: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn json_lines(path: &Path) -> Vec<serde_json::Value> {
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

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn config(
    dir: &Path,
    node: u32,
    start: Start,
    addrs: &BTreeMap<NodeId, SocketAddr>,
    witness: SocketAddr,
    transport: TransportKind,
    capture: CaptureMode,
) -> AgentConfig {
    let mut model = Config::new(VmId(7), PAGES, NodeId(0));
    // Generous: the guest burns a core, and heartbeats queue behind checkpoints.
    model.failure_timeout = Duration::from_secs(2);
    let d = dir.join(format!("n{node}"));
    std::fs::create_dir_all(&d).unwrap();
    AgentConfig {
        node: NodeId(node),
        start,
        model,
        listen: addrs[&NodeId(node)],
        peers: addrs.clone(),
        witness,
        replica_dir: d.join("replica"),
        replica_ram: d.join("replica.ram"),
        transport,
        capture,
        metrics: Some(d.join("metrics.jsonl")),
        status_file: Some(d.join("status.json")),
        verbose: false,
        verify_every: Some(1),
    }
}

fn launcher(
    seed: u64,
) -> (
    MemLauncher,
    Arc<Mutex<Vec<ftvm_real::agent::mem_vm::MemRam>>>,
) {
    let launched = Arc::new(Mutex::new(Vec::new()));
    let l = MemLauncher {
        ram_bytes: PAGES as usize * ftvm_real::dirty::page_size(),
        page_size: ftvm_real::dirty::page_size(),
        pages_per_ms: u32::MAX,
        seed,
        launched: launched.clone(),
    };
    (l, launched)
}

async fn replica_matches_paused_ram(transport: TransportKind, capture: CaptureMode) {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let waddr = free_addr();
    let addrs: BTreeMap<NodeId, SocketAddr> =
        [(NodeId(1), free_addr()), (NodeId(2), free_addr())].into();
    let wfile = dir.path().join("witness.json");
    let w = witness::load_state(&wfile, VmId(7), NodeId(1)).unwrap();
    let wtask = tokio::spawn(witness::serve(waddr, wfile, w, false));

    let pcfg = config(
        dir.path(),
        1,
        Start::Primary,
        &addrs,
        waddr,
        transport,
        capture,
    );
    let bcfg = config(
        dir.path(),
        2,
        Start::Backup { primary: NodeId(1) },
        &addrs,
        waddr,
        transport,
        capture,
    );
    let (pl, plaunched) = launcher(3);
    let (bl, _) = launcher(4);
    let primary = Agent::new(pcfg.clone(), pl).unwrap();
    let backup = Agent::new(bcfg.clone(), bl).unwrap();
    let (pstop, prx) = tokio::sync::oneshot::channel::<()>();
    let (bstop, brx) = tokio::sync::oneshot::channel::<()>();
    let ptask = tokio::spawn(primary.run(async {
        let _ = prx.await;
    }));
    let btask = tokio::spawn(backup.run(async {
        let _ = brx.await;
    }));

    let pstatus = pcfg.status_file.clone().unwrap();
    let t0 = Instant::now();
    while status(&pstatus)["phase"] != "protected" {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{transport}/{capture}: never protected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let writes_before = plaunched.lock().unwrap()[0].writes();
    tokio::time::sleep(PROTECTED).await;
    let writes = plaunched.lock().unwrap()[0].writes() - writes_before;
    assert_eq!(
        status(&pstatus)["phase"],
        "protected",
        "{transport}/{capture}: the primary lost its backup"
    );
    let _ = pstop.send(());
    let _ = bstop.send(());
    ptask.await.unwrap().unwrap();
    btask.await.unwrap().unwrap();
    wtask.abort();

    let (pd, bd) = (digests(&pcfg.replica_dir), digests(&bcfg.replica_dir));
    let last_committed = *bd.keys().next_back().expect("nothing committed");
    // Every checkpoint the primary captured up to the backup's last commit was committed (none
    // was rejected as torn) and equals the primary's RAM at its pause.
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
    let metrics = json_lines(pcfg.metrics.as_ref().unwrap());
    let dirty = median(
        metrics
            .iter()
            .map(|m| m["dirty_pages"].as_u64().unwrap())
            .collect(),
    );
    let pause = median(
        metrics
            .iter()
            .map(|m| m["pause_us"].as_u64().unwrap())
            .collect(),
    );
    let send = median(
        metrics
            .iter()
            .map(|m| m["send_us"].as_u64().unwrap())
            .collect(),
    );
    eprintln!(
        "{transport}/{capture}: {} checkpoints verified, {writes} guest writes while protected, \
         median {dirty} dirty pages, pause {pause} us, send {send} us",
        checked.len()
    );
    assert!(
        checked.len() >= 10,
        "{transport}/{capture}: only {} checkpoints verified",
        checked.len()
    );
    assert!(
        writes >= 20_000,
        "{transport}/{capture}: the guest wrote only {writes} pages"
    );
    assert!(
        dirty >= 64,
        "{transport}/{capture}: median only {dirty} dirty pages per checkpoint"
    );
    if capture == CaptureMode::PausedSend {
        // The VM stayed paused while its pages went out.
        for m in &metrics {
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
}

macro_rules! combination {
    ($name:ident, $transport:expr, $capture:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            replica_matches_paused_ram($transport, $capture).await;
        }
    };
}

combination!(
    copy_paused_send,
    TransportKind::Copy,
    CaptureMode::PausedSend
);
combination!(copy_staged, TransportKind::Copy, CaptureMode::Staged);
combination!(
    msg_zerocopy_paused_send,
    TransportKind::MsgZeroCopy,
    CaptureMode::PausedSend
);
combination!(
    msg_zerocopy_staged,
    TransportKind::MsgZeroCopy,
    CaptureMode::Staged
);
combination!(
    uring_zc_paused_send,
    TransportKind::UringZc,
    CaptureMode::PausedSend
);
combination!(uring_zc_staged, TransportKind::UringZc, CaptureMode::Staged);
combination!(
    auto_paused_send,
    TransportKind::Auto,
    CaptureMode::PausedSend
);
combination!(auto_staged, TransportKind::Auto, CaptureMode::Staged);
