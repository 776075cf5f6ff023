//! `ftvm bench capture`: checkpoint pause against the dirty set, per capture mode. A witness, a
//! primary and a backup agent run in this process over loopback with the real transports and a
//! real replica; the protected VM is the in-memory VM, whose guest writes exactly the requested
//! number of distinct pages after each resume, scattered over RAM or as one run of neighbouring
//! pages, written as fast as possible after the resume (`burst`) or evenly over the epoch
//! (`spread`). Every capture mode × transport × layout × pace × dirty-set size runs in one go,
//! interleaved, so the ratios between them are fair. `cow` runs with and without the early
//! write-protect passes that move its protection work out of the pause.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use ftvm_model::{Config, NodeId, Start, VmId};
use ftvm_real::agent::capture::CaptureMode;
use ftvm_real::agent::cow::CowOptions;
use ftvm_real::agent::limits::AgentLimits;
use ftvm_real::agent::link::socket_buffer::DEFAULT_LINK_BUFFER_BYTES;
use ftvm_real::agent::mem_vm::{MemLauncher, MemRam};
use ftvm_real::agent::witness_store::{Open, WitnessStore};
use ftvm_real::agent::{witness, Agent, AgentConfig, AgentError, AgentExit};
use ftvm_real::auth::{Identity, Protection};
use ftvm_real::secure_fs;
use ftvm_real::transport::TransportKind;

const VM: VmId = VmId(41);

/// Arguments of `ftvm bench capture`.
#[derive(clap::Args)]
pub struct CaptureArgs {
    /// Output directory for `capture.json`, `capture.md` and `capture.png`.
    #[arg(long, default_value = "docs/bench")]
    out: PathBuf,
    /// Pages the guest writes per epoch (comma separated; 4 KiB pages, the write counter in
    /// page 0 included).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,1000,2500,5000,10000,20000"
    )]
    dirty_pages: Vec<u64>,
    /// Measured epochs per case (after the warm-up).
    #[arg(long, default_value_t = 30)]
    epochs: u64,
    /// Incremental epochs left out at the start of each case.
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    /// Where the written pages lie (comma separated): `scattered` (no two neighbours) and/or
    /// `runs` (one run of neighbouring pages per epoch).
    #[arg(long, value_delimiter = ',', default_value = "scattered,runs")]
    layout: Vec<Layout>,
    /// When the pages are written (comma separated): `burst` (as fast as possible after each
    /// resume) and/or `spread` (evenly over the epoch, like a steady workload).
    #[arg(long, value_delimiter = ',', default_value = "burst,spread")]
    pace: Vec<Pace>,
    /// For `cow`: with the early write-protect passes (`on`, the default of `ftvm primary`)
    /// and/or without them (`off`), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "on,off")]
    cow_early_passes: Vec<OnOff>,
    /// Transports (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "copy")]
    transport: Vec<String>,
    /// KiB of each kernel buffer of the link sockets (comma separated; 0: the kernel's
    /// autotuning), as `--link-buffer-kib` of the agents [default: the agents' default].
    /// Bytes queued in the sockets when a send ends are bytes the ack waits behind.
    #[arg(long, value_delimiter = ',')]
    link_buffer_kib: Vec<u64>,
    /// Capture modes (comma separated; default: every implemented mode).
    #[arg(long, value_delimiter = ',')]
    capture: Vec<String>,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    ram_mb: u64,
    /// Epoch length in ms. Long enough for the guest to write 20,000 pages between two pauses on
    /// 2 cores even after a long paused-send pause, or under cow, where each of those writes is
    /// a write-protect fault (~10–20 µs here); a pause does not depend on it.
    #[arg(long, default_value_t = 300)]
    epoch_ms: u64,
    /// Scratch directory for the replicas and metrics (on tmpfs, like a real replica).
    #[arg(long, default_value = "/dev/shm/ftvm-bench-capture")]
    work_dir: PathBuf,
}

impl CaptureArgs {
    /// Arguments for another benchmark that runs capture cases of its own.
    pub(crate) fn for_cases(
        epochs: u64,
        warmup: u64,
        epoch_ms: u64,
        ram_mb: u64,
        work_dir: PathBuf,
    ) -> CaptureArgs {
        CaptureArgs {
            out: PathBuf::new(),
            dirty_pages: Vec::new(),
            epochs,
            warmup,
            layout: Vec::new(),
            pace: Vec::new(),
            cow_early_passes: Vec::new(),
            transport: Vec::new(),
            link_buffer_kib: Vec::new(),
            capture: Vec::new(),
            ram_mb,
            epoch_ms,
            work_dir,
        }
    }
}

/// Where the guest's writes of one epoch lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// Spread over RAM, no two neighbours: one run per page.
    Scattered,
    /// One run of neighbouring pages.
    Runs,
}

impl Layout {
    /// The name in arguments, tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Scattered => "scattered",
            Layout::Runs => "runs",
        }
    }
}

/// When the guest writes its pages in an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pace {
    /// As fast as possible right after the resume.
    Burst,
    /// Evenly over the epoch.
    Spread,
}

impl Pace {
    /// The name in arguments, tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Pace::Burst => "burst",
            Pace::Spread => "spread",
        }
    }
}

/// A yes/no argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    /// Yes.
    On,
    /// No.
    Off,
}

fn scattered() -> String {
    Layout::Scattered.name().into()
}

fn burst() -> String {
    Pace::Burst.name().into()
}

/// One capture mode × transport × layout × dirty-set size.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CaptureCase {
    /// Capture mode.
    pub capture: String,
    /// Transport.
    pub transport: String,
    /// Where the written pages lie (`scattered`, `runs`).
    #[serde(default = "scattered")]
    pub layout: String,
    /// When they are written (`burst`, `spread`).
    #[serde(default = "burst")]
    pub pace: String,
    /// cow: whether the early write-protect passes ran.
    #[serde(default)]
    pub early_passes: Option<bool>,
    /// KiB of each link socket buffer; 0: the kernel's autotuning (and runs from before the
    /// cap existed).
    #[serde(default)]
    pub link_buffer_kib: u64,
    /// Pages the guest was asked to write per epoch.
    pub target_pages: u64,
    /// Epochs measured.
    pub epochs: u64,
    /// Median dirty pages per checkpoint, as captured.
    pub dirty_p50: u64,
    /// Median pause (stop → cont), µs.
    pub pause_p50_us: u64,
    /// 99th percentile pause, µs.
    pub pause_p99_us: u64,
    /// Median send-updated-states time, µs.
    pub send_p50_us: u64,
    /// 99th percentile send-updated-states time, µs.
    pub send_p99_us: u64,
    /// Median copy-to-staging time, µs.
    pub copy_p50_us: u64,
    /// Median checkpoint sent → acked, µs.
    pub ack_p50_us: u64,
    /// Median capture done → acked (send plus ack of one epoch), µs: what the sockets'
    /// buffers only move between the two.
    #[serde(default)]
    pub send_ack_p50_us: u64,
    /// cow: median pages per epoch the fault handler copied before they were sent.
    #[serde(default)]
    pub cow_copies_p50: u64,
    /// cow: median guest writes per epoch that waited for a page in flight.
    #[serde(default)]
    pub cow_waits_p50: u64,
    /// cow: median pages write-protected while paused.
    #[serde(default)]
    pub protected_p50: u64,
    /// cow: median pages write-protected early, while the VM ran.
    #[serde(default)]
    pub early_protected_p50: u64,
    /// Share of wall time the VM was paused over the measured epochs.
    pub idle_rate: f64,
}

impl CaptureCase {
    /// The capture mode as tables and plots name it (cow says whether early passes ran).
    pub fn label(&self) -> String {
        mode_label(&self.capture, self.early_passes)
    }
}

/// A capture mode's name, marked when cow ran without its early passes.
fn mode_label(capture: &str, early_passes: Option<bool>) -> String {
    match early_passes {
        Some(false) => format!("{capture} (no early passes)"),
        _ => capture.to_string(),
    }
}

/// The whole run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CaptureReport {
    /// Guest RAM, MiB.
    pub ram_mb: u64,
    /// Epoch length, ms.
    pub epoch_ms: u64,
    /// Incremental epochs skipped per case.
    pub warmup: u64,
    /// Every case, in the order run.
    pub cases: Vec<CaptureCase>,
}

/// The fields of a `metrics.jsonl` line this benchmark reads.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default)]
struct EpochLine {
    full: bool,
    pause_us: u64,
    dirty_pages: u64,
    send_us: u64,
    copy_us: u64,
    ack_us: u64,
    cow_copies: u64,
    cow_waits: u64,
    protected: u64,
    early_protected: u64,
}

/// Median of `v` (the mean of the two middle values for an even count); 0 when empty.
pub fn median(v: &[u64]) -> u64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    match s.len() {
        0 => 0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2,
    }
}

/// The `p`-th percentile of `v` by nearest rank (the smallest value with at least `p`% of the
/// values at or below it); 0 when empty.
pub fn percentile(v: &[u64], p: u32) -> u64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    if s.is_empty() {
        return 0;
    }
    let rank = (s.len() * p.min(100) as usize).div_ceil(100).max(1);
    s[rank - 1]
}

/// Parses metrics lines; the incremental epochs after `warmup` of them, at most `epochs`.
fn measured(text: &str, warmup: u64, epochs: u64) -> anyhow::Result<Vec<EpochLine>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: EpochLine = serde_json::from_str(line)
            .with_context(|| format!("metrics line {}: {line:?}", i + 1))?;
        if !l.full {
            out.push(l);
        }
    }
    Ok(out
        .into_iter()
        .skip(warmup as usize)
        .take(epochs as usize)
        .collect())
}

/// What one case runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CaseSpec {
    pub(crate) mode: CaptureMode,
    /// cow: early write-protect passes on or off (`None` for the other modes).
    pub(crate) early_passes: Option<bool>,
    pub(crate) transport: TransportKind,
    pub(crate) layout: Layout,
    pub(crate) pace: Pace,
    /// Pages written per epoch.
    pub(crate) dirty: u64,
    /// How the link's frames are protected.
    pub(crate) protection: Protection,
    /// Cap on each link socket buffer, bytes (`None`: the kernel's autotuning).
    pub(crate) link_buffer: Option<usize>,
}

impl std::fmt::Display for CaseSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "capture {}, transport {}, {} {} pages per epoch, {}",
            mode_label(self.mode.name(), self.early_passes),
            self.transport,
            self.dirty,
            self.layout.name(),
            self.pace.name()
        )
    }
}

/// Aggregates the measured epochs of one case.
fn aggregate(spec: &CaseSpec, lines: &[EpochLine], wall: Duration) -> CaptureCase {
    let col = |f: fn(&EpochLine) -> u64| lines.iter().map(f).collect::<Vec<u64>>();
    let pauses = col(|l| l.pause_us);
    let sends = col(|l| l.send_us);
    let paused: u64 = pauses.iter().sum();
    CaptureCase {
        capture: spec.mode.name().to_string(),
        transport: spec.transport.name().to_string(),
        layout: spec.layout.name().to_string(),
        pace: spec.pace.name().to_string(),
        early_passes: spec.early_passes,
        link_buffer_kib: spec.link_buffer.map_or(0, |b| (b >> 10) as u64),
        target_pages: spec.dirty,
        epochs: lines.len() as u64,
        dirty_p50: median(&col(|l| l.dirty_pages)),
        pause_p50_us: median(&pauses),
        pause_p99_us: percentile(&pauses, 99),
        send_p50_us: median(&sends),
        send_p99_us: percentile(&sends, 99),
        copy_p50_us: median(&col(|l| l.copy_us)),
        ack_p50_us: median(&col(|l| l.ack_us)),
        send_ack_p50_us: median(&col(|l| l.send_us + l.ack_us)),
        cow_copies_p50: median(&col(|l| l.cow_copies)),
        cow_waits_p50: median(&col(|l| l.cow_waits)),
        protected_p50: median(&col(|l| l.protected)),
        early_protected_p50: median(&col(|l| l.early_protected)),
        idle_rate: if wall.is_zero() {
            0.0
        } else {
            (paused as f64 / wall.as_micros() as f64).min(1.0)
        },
    }
}

/// The Markdown table of a report.
pub fn markdown(r: &CaptureReport) -> String {
    let mut s = format!(
        "Capture benchmark: in-memory VM with {} MiB RAM, {} ms epochs, primary and backup \
         agents over loopback; {} warm-up epochs left out per case.\n\n\
         | capture | transport | link buffer KiB | layout | pace | pages written/epoch | \
         dirty p50 | epochs | pause p50 µs | pause p99 µs | send p50 µs | send p99 µs | \
         copy p50 µs | ack p50 µs | send + ack p50 µs | cow copies p50 | cow waits p50 | \
         protected early p50 | protected paused p50 | VM idle rate |\n\
         |---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        r.ram_mb, r.epoch_ms, r.warmup
    );
    let mut short = false;
    for c in &r.cases {
        // A spread guest stops writing at the pause, so it captures up to pause/epoch less.
        let expected = if c.pace == Pace::Spread.name() {
            c.target_pages * 4 / 5
        } else {
            c.target_pages
        };
        let mark = if c.dirty_p50 < expected {
            short = true;
            " ⚠"
        } else {
            ""
        };
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {}{mark} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.3} |\n",
            c.label(),
            c.transport,
            match c.link_buffer_kib {
                0 => "auto".to_string(),
                k => k.to_string(),
            },
            c.layout,
            c.pace,
            c.target_pages,
            c.dirty_p50,
            c.epochs,
            c.pause_p50_us,
            c.pause_p99_us,
            c.send_p50_us,
            c.send_p99_us,
            c.copy_p50_us,
            c.ack_p50_us,
            c.send_ack_p50_us,
            c.cow_copies_p50,
            c.cow_waits_p50,
            c.early_protected_p50,
            c.protected_p50,
            c.idle_rate
        );
    }
    if short {
        s += "\n⚠ the guest could not write all its pages between two pauses (a long pause ate \
              the epoch; spread: less than 80% of them): compare this case at its measured dirty \
              p50, or raise --epoch-ms.\n";
    }
    s += "\n`burst`: the guest writes its pages as fast as it can right after each resume; \
          `spread`: evenly over the epoch, stopping at the pause. `protected early`: pages the \
          cow engine write-protected while the VM ran, before the capture; `protected paused`: \
          pages it still had to protect with the VM paused. `link buffer`: each link socket's \
          kernel buffer (`auto`: the kernel's autotuning); `send + ack`: capture done → acked.\n";
    s
}

/// Parses the capture-mode list (empty: every implemented mode).
fn capture_modes(names: &[String]) -> anyhow::Result<Vec<CaptureMode>> {
    if names.is_empty() {
        return Ok(CaptureMode::ALL.to_vec());
    }
    names
        .iter()
        .map(|n| {
            n.parse::<CaptureMode>()
                .with_context(|| "--capture".to_string())
        })
        .collect()
}

/// The values of a list argument, repeats next to each other dropped; `empty` when there are none.
fn choices<T: Clone + PartialEq>(values: &[T], empty: &str) -> anyhow::Result<Vec<T>> {
    let mut v = values.to_vec();
    v.dedup();
    if v.is_empty() {
        anyhow::bail!("{empty}");
    }
    Ok(v)
}

/// Runs the capture benchmark.
pub fn run(a: CaptureArgs) -> anyhow::Result<i32> {
    let page = ftvm_real::dirty::page_size() as u64;
    if a.epochs == 0 || a.epoch_ms == 0 || a.ram_mb == 0 {
        anyhow::bail!("--epochs, --epoch-ms and --ram-mb must be positive");
    }
    let ram_pages = (a.ram_mb << 20) / page;
    if a.dirty_pages.is_empty() {
        anyhow::bail!("--dirty-pages needs at least one size");
    }
    for &d in &a.dirty_pages {
        if d == 1 {
            anyhow::bail!(
                "--dirty-pages 1 cannot be produced: every guest write also bumps the counter in \
                 page 0, so an epoch dirties 0 or at least 2 pages"
            );
        }
        if d >= ram_pages {
            anyhow::bail!(
                "--dirty-pages {d} does not fit in {} MiB of RAM ({ram_pages} pages)",
                a.ram_mb
            );
        }
    }
    let modes = capture_modes(&a.capture)?;
    let transports = a
        .transport
        .iter()
        .map(|t| t.parse::<TransportKind>())
        .collect::<Result<Vec<_>, _>>()
        .context("--transport")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let layouts = choices(&a.layout, "--layout needs scattered and/or runs")?;
    let paces = choices(&a.pace, "--pace needs burst and/or spread")?;
    let early = choices(
        &a.cow_early_passes,
        "--cow-early-passes needs on and/or off",
    )?;
    let buffers = match a.link_buffer_kib.as_slice() {
        [] => vec![(DEFAULT_LINK_BUFFER_BYTES >> 10) as u64],
        given => choices(given, "--link-buffer-kib needs a size")?,
    };
    // The agents' own reading of the flag: 0 is autotuning, too large is refused.
    let buffers = buffers
        .into_iter()
        .map(crate::agent_cmd::link_buffer_bytes)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut variants: Vec<(CaptureMode, Option<bool>)> = Vec::new();
    for &m in &modes {
        if m == CaptureMode::Cow {
            variants.extend(early.iter().map(|&e| (m, Some(e == OnOff::On))));
        } else {
            variants.push((m, None));
        }
    }
    let mut specs = Vec::new();
    for &dirty in &a.dirty_pages {
        for &layout in &layouts {
            for &pace in &paces {
                for &transport in &transports {
                    for &link_buffer in &buffers {
                        for &(mode, early_passes) in &variants {
                            specs.push(CaseSpec {
                                mode,
                                early_passes,
                                transport,
                                layout,
                                pace,
                                dirty,
                                protection: Protection::Mac,
                                link_buffer,
                            });
                        }
                    }
                }
            }
        }
    }
    let total = specs.len();
    eprintln!(
        "ftvm bench capture: {total} cases of {} epochs × {} ms; this takes about {} s",
        a.epochs + a.warmup,
        a.epoch_ms,
        total as u64 * ((a.epochs + a.warmup) * a.epoch_ms / 1000 + 2)
    );
    let mut cases = Vec::new();
    for spec in specs {
        eprintln!("[{}/{total}] {spec}", cases.len() + 1);
        // A case whose agents fail is run once more (and the failure said): one broken run
        // should not throw away an hour of results; two in a row end the benchmark.
        let case = match runtime.block_on(one_case(&a, spec, ram_pages)) {
            Ok(case) => case,
            Err(e) => {
                eprintln!("      failed, running it again: {e:#}");
                runtime
                    .block_on(one_case(&a, spec, ram_pages))
                    .with_context(|| spec.to_string())?
            }
        };
        eprintln!(
            "      dirty p50 {}, pause p50 {} µs p99 {} µs, send p50 {} µs, idle {:.3}",
            case.dirty_p50, case.pause_p50_us, case.pause_p99_us, case.send_p50_us, case.idle_rate
        );
        cases.push(case);
    }
    let _ = std::fs::remove_dir_all(&a.work_dir);
    let report = CaptureReport {
        ram_mb: a.ram_mb,
        epoch_ms: a.epoch_ms,
        warmup: a.warmup,
        cases,
    };
    crate::bench_cmd::write_results(&a.out, "capture", &report, &markdown(&report), || {
        crate::plot::capture(&report, &a.out)
    })?;
    Ok(0)
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(l.local_addr()?)
}

/// Where the agents and the witness listen.
struct Net {
    addrs: BTreeMap<NodeId, SocketAddr>,
    witness: SocketAddr,
}

#[allow(clippy::too_many_arguments)]
fn agent_config(
    a: &CaptureArgs,
    node: u32,
    start: Start,
    net: &Net,
    identity: Arc<Identity>,
    ram_pages: u64,
    spec: &CaseSpec,
) -> anyhow::Result<AgentConfig> {
    let (mode, transport) = (spec.mode, spec.transport);
    let mut model = Config::new(VM, ram_pages, NodeId(0));
    model.page_size = ftvm_real::dirty::page_size() as u32;
    model.epoch_interval = Duration::from_millis(a.epoch_ms);
    // Long pauses of a big dirty set must not pass for a dead peer.
    model.failure_timeout = Duration::from_millis(2000);
    model.rejoin_after_fence = None;
    let d = a.work_dir.join(format!("n{node}"));
    secure_fs::private_dir(&d).context("an agent's directory")?;
    Ok(AgentConfig {
        node: NodeId(node),
        start,
        model,
        listen: net.addrs[&NodeId(node)],
        peers: net.addrs.clone(),
        witness: net.witness.into(),
        replica_dir: d.join("replica"),
        replica_ram: d.join("replica.ram"),
        replica_disk: None,
        replica_durable: false,
        resume_replica: false,
        transport,
        capture: mode,
        metrics: Some(d.join("metrics.jsonl")),
        status_file: Some(d.join("status.json")),
        identity,
        protection: spec.protection,
        verbose: false,
        verify_every: None,
        limits: AgentLimits {
            link_buffer_bytes: spec.link_buffer,
            ..AgentLimits::default()
        },
        journal: None,
    })
}

fn count_incremental(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .map(|s| s.lines().filter(|l| l.contains("\"full\":false")).count() as u64)
        .unwrap_or(0)
}

type AgentTask = tokio::task::JoinHandle<Result<AgentExit, AgentError>>;

/// Fails with the agent's own error if its task already ended.
async fn check_alive(name: &str, task: &mut AgentTask) -> anyhow::Result<()> {
    if task.is_finished() {
        let r = task
            .await
            .with_context(|| format!("the {name} agent panicked"))?;
        match r {
            Ok(exit) => anyhow::bail!("the {name} agent stopped early ({exit:?})"),
            Err(e) => return Err(e).with_context(|| format!("the {name} agent failed")),
        }
    }
    Ok(())
}

pub(crate) async fn one_case(
    a: &CaptureArgs,
    spec: CaseSpec,
    ram_pages: u64,
) -> anyhow::Result<CaptureCase> {
    let CaseSpec {
        layout,
        pace,
        dirty,
        ..
    } = spec;
    // Every case is a fresh VM: a fresh directory (0700, never another user's) and register.
    secure_fs::fresh_private_dir(&a.work_dir).context("the work directory")?;
    let wfile = a.work_dir.join("witness.json");
    let net = Net {
        addrs: [(NodeId(1), free_addr()?), (NodeId(2), free_addr()?)].into(),
        witness: free_addr()?,
    };
    let (store, w) = WitnessStore::open(&wfile, VM, Open::Init { primary: NodeId(1) })
        .context("witness state")?;
    let (wid, mut ids) =
        Identity::generate_set(&[NodeId(1), NodeId(2)]).context("generating keys")?;
    let mut id = |n| Arc::new(ids.remove(&NodeId(n)).expect("generated above"));
    let (pid, bid) = (id(1), id(2));
    let limits = witness::ServeLimits::default();
    let serve = witness::serve(net.witness, store, w, Arc::new(wid), limits, false);
    let wtask = tokio::spawn(serve);
    let pcfg = agent_config(a, 1, Start::Primary, &net, pid, ram_pages, &spec)?;
    let bcfg = agent_config(
        a,
        2,
        Start::Backup { primary: NodeId(1) },
        &net,
        bid,
        ram_pages,
        &spec,
    )?;
    let metrics = pcfg.metrics.clone().unwrap_or_default();
    let launched: Arc<Mutex<Vec<MemRam>>> = Arc::default();
    let launcher = |launched: Arc<Mutex<Vec<MemRam>>>| MemLauncher {
        ram_bytes: (ram_pages * u64::from(pcfg.model.page_size)) as usize,
        page_size: pcfg.model.page_size as usize,
        pages_per_ms: u32::MAX,
        seed: 3,
        cow: CowOptions {
            early_passes: spec.early_passes.unwrap_or(true),
            ..CowOptions::default()
        },
        launched,
        failing_restores: 0,
    };
    let primary = Agent::new(pcfg.clone(), launcher(launched.clone())).context("primary")?;
    let backup = Agent::new(bcfg.clone(), launcher(Arc::default())).context("backup")?;
    let (pstop, prx) = tokio::sync::oneshot::channel::<()>();
    let (bstop, brx) = tokio::sync::oneshot::channel::<()>();
    let mut ptask: AgentTask = tokio::spawn(primary.run(async {
        let _ = prx.await;
    }));
    let mut btask: AgentTask = tokio::spawn(backup.run(async {
        let _ = brx.await;
    }));

    let result = async {
        // The guest writes flat out until its VM exists; then exactly `dirty` pages per epoch
        // (page 0, the write counter, is one of them).
        let t0 = Instant::now();
        let ram = loop {
            if let Some(r) = launched.lock().ok().and_then(|l| l.first().cloned()) {
                break r;
            }
            check_alive("primary", &mut ptask).await?;
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(20),
                "the VM never booted"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        ram.set_writes_per_resume(Some(dirty.saturating_sub(1)), layout == Layout::Scattered);
        ram.set_burst_pace((pace == Pace::Spread).then(|| Duration::from_millis(a.epoch_ms)));

        let limit =
            Duration::from_secs(30) + Duration::from_millis(a.epoch_ms * (a.warmup + a.epochs) * 4);
        let t0 = Instant::now();
        let mut started: Option<Instant> = None;
        let ended = loop {
            let n = count_incremental(&metrics);
            if n >= a.warmup && started.is_none() {
                started = Some(Instant::now());
            }
            if n >= a.warmup + a.epochs {
                break Instant::now();
            }
            check_alive("primary", &mut ptask).await?;
            check_alive("backup", &mut btask).await?;
            anyhow::ensure!(
                t0.elapsed() < limit,
                "only {n} of {} epochs acked in {limit:?}",
                a.warmup + a.epochs
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let wall = ended.duration_since(started.unwrap_or(ended));
        let text = std::fs::read_to_string(&metrics)
            .with_context(|| format!("reading {}", metrics.display()))?;
        let lines = measured(&text, a.warmup, a.epochs)?;
        Ok(aggregate(&spec, &lines, wall))
    }
    .await;

    // The backup goes first, so the primary does not ask the witness to fail it over.
    let _ = bstop.send(());
    // (A task that `check_alive` saw end was awaited already: polling it again would panic.)
    if !btask.is_finished() {
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut btask).await;
    }
    let _ = pstop.send(());
    if !ptask.is_finished() {
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut ptask).await;
    }
    btask.abort();
    ptask.abort();
    wtask.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(mode: CaptureMode, layout: Layout, dirty: u64) -> CaseSpec {
        CaseSpec {
            mode,
            early_passes: (mode == CaptureMode::Cow).then_some(true),
            transport: TransportKind::Copy,
            layout,
            pace: Pace::Burst,
            dirty,
            protection: Protection::Mac,
            link_buffer: None,
        }
    }

    #[test]
    fn list_arguments_drop_repeats_and_must_not_be_empty() {
        assert_eq!(choices(&[1, 1, 2], "x").unwrap(), vec![1, 2]);
        let e = choices::<u8>(&[], "--pace needs burst and/or spread").unwrap_err();
        assert_eq!(e.to_string(), "--pace needs burst and/or spread");
    }

    #[test]
    fn median_and_percentile() {
        assert_eq!(median(&[]), 0);
        assert_eq!(median(&[7]), 7);
        assert_eq!(median(&[9, 1, 5]), 5);
        assert_eq!(median(&[4, 1, 3, 2]), 2);
        assert_eq!(median(&[10, 20]), 15);
        let v: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(percentile(&v, 99), 99);
        assert_eq!(percentile(&v, 50), 50);
        assert_eq!(percentile(&v, 100), 100);
        assert_eq!(percentile(&v, 0), 1);
        // Nearest rank: with 10 values the p99 is the largest one, not the 9th.
        let v: Vec<u64> = (1..=10).collect();
        assert_eq!(percentile(&v, 99), 10);
        assert_eq!(percentile(&v, 90), 9);
        assert_eq!(percentile(&[], 99), 0);
    }

    #[test]
    fn measured_skips_full_syncs_and_the_warmup() {
        let text = [
            r#"{"epoch":1,"full":true,"pause_us":90000,"dirty_pages":65536}"#,
            r#"{"epoch":2,"full":false,"pause_us":100,"dirty_pages":10}"#,
            r#"{"epoch":3,"full":false,"pause_us":200,"dirty_pages":20,"send_us":5}"#,
            "",
            r#"{"epoch":4,"full":false,"pause_us":300,"dirty_pages":30,"send_us":7}"#,
            r#"{"epoch":5,"full":false,"pause_us":400,"dirty_pages":40,"send_us":9,"cow_copies":3}"#,
        ]
        .join("\n");
        let m = measured(&text, 1, 2).unwrap();
        assert_eq!(
            m.iter().map(|l| l.pause_us).collect::<Vec<_>>(),
            vec![200, 300]
        );
        let c = aggregate(
            &spec(CaptureMode::Staged, Layout::Runs, 30),
            &m,
            Duration::from_millis(10),
        );
        assert_eq!(c.epochs, 2);
        assert_eq!(c.pause_p50_us, 250);
        assert_eq!(c.pause_p99_us, 300);
        assert_eq!(c.dirty_p50, 25);
        assert_eq!(c.send_p50_us, 6);
        assert_eq!(c.cow_copies_p50, 0);
        let c3 = aggregate(
            &spec(CaptureMode::Cow, Layout::Runs, 30),
            &measured(&text, 2, 9).unwrap(),
            Duration::ZERO,
        );
        assert_eq!((c3.epochs, c3.cow_copies_p50, c3.idle_rate), (2, 1, 0.0));
        assert!((c.idle_rate - 0.05).abs() < 1e-9, "{}", c.idle_rate);
        let e = measured("{\"full\":false}\nnot json", 0, 9).unwrap_err();
        assert!(format!("{e:#}").contains("metrics line 2"), "{e:#}");
    }

    #[test]
    fn markdown_has_a_row_per_case() {
        let c = aggregate(
            &spec(CaptureMode::Cow, Layout::Scattered, 0),
            &[],
            Duration::ZERO,
        );
        let r = CaptureReport {
            ram_mb: 256,
            epoch_ms: 25,
            warmup: 10,
            cases: vec![
                c.clone(),
                CaptureCase {
                    capture: "staged".into(),
                    ..c
                },
            ],
        };
        let md = markdown(&r);
        assert_eq!(md.lines().filter(|l| l.starts_with("| cow ")).count(), 1);
        assert_eq!(md.lines().filter(|l| l.starts_with("| staged ")).count(), 1);
        assert!(md.contains("256 MiB"));
        assert!(!md.contains('⚠'));
        let r = CaptureReport {
            cases: vec![CaptureCase {
                target_pages: 100,
                dirty_p50: 60,
                ..r.cases[0].clone()
            }],
            ..r
        };
        let md = markdown(&r);
        assert!(md.contains("| scattered | burst | 100 | 60 ⚠ |"), "{md}");
        // A spread guest is short by the pause; only a bigger gap is flagged.
        let spread = |dirty_p50| CaptureReport {
            cases: vec![CaptureCase {
                pace: "spread".into(),
                dirty_p50,
                ..r.cases[0].clone()
            }],
            ..r.clone()
        };
        assert!(!markdown(&spread(85)).contains("85 ⚠"));
        assert!(markdown(&spread(75)).contains("| spread | 100 | 75 ⚠ |"));
        // cow without early passes says so.
        let off = CaptureReport {
            cases: vec![CaptureCase {
                early_passes: Some(false),
                ..r.cases[0].clone()
            }],
            ..r.clone()
        };
        assert!(markdown(&off).contains("| cow (no early passes) | copy |"));
        // Files written before the layout column read as scattered.
        let old = r#"{"capture":"staged","transport":"copy","target_pages":2,"epochs":1,
            "dirty_p50":2,"pause_p50_us":1,"pause_p99_us":1,"send_p50_us":1,"send_p99_us":1,
            "copy_p50_us":0,"ack_p50_us":1,"idle_rate":0.0}"#;
        let c: CaptureCase = serde_json::from_str(old).unwrap();
        assert_eq!((c.layout.as_str(), c.cow_waits_p50), ("scattered", 0));
        assert_eq!((c.pace.as_str(), c.early_passes), ("burst", None));
        assert!(md.contains("could not write all its pages"));
        assert!(capture_modes(&["nope".into()]).is_err());
        assert_eq!(capture_modes(&[]).unwrap(), CaptureMode::ALL.to_vec());
    }
}
