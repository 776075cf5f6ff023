//! `ftvm bench auth`: what protecting checkpoint links costs. The capture benchmark's setup (a
//! witness, a primary and a backup agent in this process over loopback, the in-memory VM
//! writing a fixed number of pages per epoch) runs with links left unprotected after the
//! handshake (the baseline, a benchmark-only mode), with a GMAC tag per frame (the
//! default) and encrypted (`--encrypt`), interleaved over several rounds in one run, and
//! reports the median pause and send-updated-states time of each with its ratio to the
//! baseline.

use std::path::PathBuf;

use anyhow::Context;
use ftvm_real::agent::capture::CaptureMode;
use ftvm_real::agent::link::socket_buffer::DEFAULT_LINK_BUFFER_BYTES;
use ftvm_real::auth::Protection;
use ftvm_real::transport::TransportKind;

use crate::bench_capture::{median, one_case, CaptureArgs, CaseSpec, Layout, Pace};

/// Arguments of `ftvm bench auth`.
#[derive(clap::Args)]
pub struct AuthArgs {
    /// Output directory for `auth.json`, `auth.md` and `auth.png`.
    #[arg(long, default_value = "docs/bench")]
    out: PathBuf,
    /// Pages the guest writes per epoch (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "0,1000,5000")]
    dirty_pages: Vec<u64>,
    /// Epoch length in ms.
    #[arg(long, default_value_t = 25)]
    epoch_ms: u64,
    /// Measured epochs per case and round (after the warm-up).
    #[arg(long, default_value_t = 60)]
    epochs: u64,
    /// Rounds: every protection runs once per round, interleaved.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Capture mode.
    #[arg(long, default_value = "staged")]
    capture: String,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    ram_mb: u64,
    /// Scratch directory (tmpfs, like a real replica).
    #[arg(long, default_value = "/dev/shm/ftvm-bench-auth")]
    work_dir: PathBuf,
}

/// One protection × dirty-set size, over all rounds.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AuthCase {
    /// `none` (baseline), `mac` or `encrypt`.
    pub protection: String,
    /// Pages written per epoch.
    pub target_pages: u64,
    /// Median dirty pages per checkpoint.
    pub dirty_p50: u64,
    /// Median over the rounds of each round's median pause, µs.
    pub pause_p50_us: u64,
    /// Median over the rounds of each round's median send-updated-states time, µs.
    pub send_p50_us: u64,
    /// Median checkpoint sent → acked, µs.
    pub ack_p50_us: u64,
    /// Pause p50 over the baseline's at the same size.
    pub pause_ratio: f64,
    /// Send p50 over the baseline's at the same size.
    pub send_ratio: f64,
}

/// The whole run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AuthReport {
    /// Epoch length, ms.
    pub epoch_ms: u64,
    /// Guest RAM, MiB.
    pub ram_mb: u64,
    /// Capture mode.
    pub capture: String,
    /// Rounds.
    pub rounds: u32,
    /// Cases.
    pub cases: Vec<AuthCase>,
}

/// A case: protection and pages written per epoch.
type Key = (Protection, u64);

const PROTECTIONS: [Protection; 3] = [
    Protection::Unprotected,
    Protection::Mac,
    Protection::Encrypt,
];

/// The Markdown table.
pub fn markdown(r: &AuthReport) -> String {
    let mut s = format!(
        "Link protection: in-memory VM with {} MiB RAM, {} ms epochs, `{}` capture, `copy` \
         transport, primary and backup agents over loopback; medians over {} interleaved rounds. \
         `none` is the benchmark-only baseline (authenticated handshake, frames unprotected).\n\n\
         | protection | pages written/epoch | dirty p50 | pause p50 µs | × none | send p50 µs | \
         × none | ack p50 µs |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
        r.ram_mb, r.epoch_ms, r.capture, r.rounds
    );
    for c in &r.cases {
        s += &format!(
            "| {} | {} | {} | {} | {:.2} | {} | {:.2} | {} |\n",
            c.protection,
            c.target_pages,
            c.dirty_p50,
            c.pause_p50_us,
            c.pause_ratio,
            c.send_p50_us,
            c.send_ratio,
            c.ack_p50_us
        );
    }
    s
}

/// Runs the benchmark.
pub fn run(a: AuthArgs) -> anyhow::Result<i32> {
    if a.rounds == 0 || a.epochs == 0 || a.dirty_pages.is_empty() {
        anyhow::bail!("--rounds, --epochs and --dirty-pages must be non-empty and positive");
    }
    let mode: CaptureMode = a.capture.parse().context("--capture")?;
    let page = ftvm_real::dirty::page_size() as u64;
    let ram_pages = (a.ram_mb << 20) / page;
    if let Some(&d) = a.dirty_pages.iter().find(|&&d| d == 1 || d >= ram_pages) {
        anyhow::bail!("--dirty-pages {d} cannot be produced in {} MiB", a.ram_mb);
    }
    let cargs = CaptureArgs::for_cases(a.epochs, 5, a.epoch_ms, a.ram_mb, a.work_dir.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // (protection, pages) -> per-round (dirty, pause, send, ack) medians.
    let mut rounds: Vec<(Key, Vec<[u64; 4]>)> = Vec::new();
    let total = a.rounds as usize * a.dirty_pages.len() * PROTECTIONS.len();
    let mut done = 0;
    for round in 0..a.rounds {
        for &dirty in &a.dirty_pages {
            for p in PROTECTIONS {
                done += 1;
                eprintln!(
                    "[{done}/{total}] round {round}: {} pages, {}",
                    dirty,
                    p.name()
                );
                let spec = CaseSpec {
                    mode,
                    early_passes: (mode == CaptureMode::Cow).then_some(true),
                    transport: TransportKind::Copy,
                    layout: Layout::Scattered,
                    pace: Pace::Spread,
                    dirty,
                    protection: p,
                    link_buffer: Some(DEFAULT_LINK_BUFFER_BYTES),
                };
                let _ = std::fs::remove_dir_all(&a.work_dir);
                let c = runtime
                    .block_on(one_case(&cargs, spec, ram_pages))
                    .with_context(|| format!("{} pages, {}", dirty, p.name()))?;
                eprintln!(
                    "      pause p50 {} µs, send p50 {} µs",
                    c.pause_p50_us, c.send_p50_us
                );
                let row = [c.dirty_p50, c.pause_p50_us, c.send_p50_us, c.ack_p50_us];
                match rounds.iter_mut().find(|(k, _)| *k == (p, dirty)) {
                    Some((_, v)) => v.push(row),
                    None => rounds.push(((p, dirty), vec![row])),
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&a.work_dir);
    let med = |v: &[[u64; 4]], i: usize| median(&v.iter().map(|r| r[i]).collect::<Vec<_>>());
    let base = |dirty: u64, i: usize| {
        rounds
            .iter()
            .find(|((p, d), _)| *p == Protection::Unprotected && *d == dirty)
            .map(|(_, v)| med(v, i))
            .unwrap_or(0)
    };
    let ratio = |x: u64, b: u64| if b == 0 { 0.0 } else { x as f64 / b as f64 };
    let mut cases = Vec::new();
    for &dirty in &a.dirty_pages {
        for p in PROTECTIONS {
            let Some((_, v)) = rounds.iter().find(|(k, _)| *k == (p, dirty)) else {
                continue;
            };
            let (pause, send) = (med(v, 1), med(v, 2));
            cases.push(AuthCase {
                protection: p.name().into(),
                target_pages: dirty,
                dirty_p50: med(v, 0),
                pause_p50_us: pause,
                send_p50_us: send,
                ack_p50_us: med(v, 3),
                pause_ratio: ratio(pause, base(dirty, 1)),
                send_ratio: ratio(send, base(dirty, 2)),
            });
        }
    }
    let report = AuthReport {
        epoch_ms: a.epoch_ms,
        ram_mb: a.ram_mb,
        capture: mode.name().into(),
        rounds: a.rounds,
        cases,
    };
    crate::bench_cmd::write_results(&a.out, "auth", &report, &markdown(&report), || {
        crate::plot::auth(&report, &a.out)
    })?;
    Ok(0)
}
