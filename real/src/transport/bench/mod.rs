//! The transport micro-benchmark (issue 4, item 4): scattered 4 KiB pages from a large mapped
//! region, sent by every transport at several batch sizes over loopback and over veth between
//! two network namespaces, next to raw bulk TCP on the same path in the same run.
//!
//! One batch is one [`Transport::send`] of `batch_bytes / 4 KiB` pages in random order (so they
//! do not coalesce). A repetition sends `bytes_per_rep` bytes and ends when the receiver has read
//! them all **and** the sender has seen the last batch released — the moment a `paused-send`
//! capture could resume the VM. Each transport/batch pair uses one connection (as the agent
//! would), warmed up by one unmeasured repetition; repetitions are interleaved round by round
//! across all cases of a path, so load from elsewhere on the machine spreads evenly; figures are
//! medians over the repetitions.
//!
//! Medians are the headline; the best repetition is reported too, because on a shared machine
//! load from elsewhere only ever slows a repetition down.
//!
//! CPU is `getrusage`: the sender's and receiver's threads, and the whole process. On loopback
//! and veth much of the receive path runs in the *sender's* context (softirq on transmit), so
//! the split between sender and receiver is not what two hosts would see; the process total is.

mod cpu;
mod netns;
pub mod region;
mod run;

use std::time::Duration;

use super::{TransportError, TransportKind, TransportStats};

pub use region::MappedRegion;

/// A network path the benchmark runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchPath {
    /// 127.0.0.1 in the current namespace.
    Loopback,
    /// A veth pair between two fresh network namespaces (needs root and `ip`).
    Veth,
}

impl BenchPath {
    fn name(self) -> &'static str {
        match self {
            BenchPath::Loopback => "loopback",
            BenchPath::Veth => "veth",
        }
    }
}

/// What to measure.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchOptions {
    /// Pages in the mapped region the pages are drawn from.
    pub region_pages: usize,
    /// Bytes sent per repetition (a multiple of 4 KiB; pages are reused if it exceeds the region).
    pub bytes_per_rep: usize,
    /// Bytes per `send` call (each a multiple of 4 KiB).
    pub batch_bytes: Vec<usize>,
    /// Transports to measure.
    pub transports: Vec<TransportKind>,
    /// Paths to measure on.
    pub paths: Vec<BenchPath>,
    /// Measured repetitions per case (after one warm-up).
    pub repetitions: usize,
    /// Seed of the page order.
    pub seed: u64,
    /// Pin the sender and the receiver thread to one CPU each (the first two this process may
    /// use). Off by default: on a shared 2-CPU machine a pinned thread cannot escape a busy
    /// CPU, and unpinned small sends profit from the scheduler waking the receiver nearby.
    pub pin_threads: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            region_pages: 65_536, // 256 MiB
            bytes_per_rep: 128 << 20,
            batch_bytes: vec![64 << 10, 256 << 10, 1 << 20, 4 << 20],
            transports: TransportKind::ALL.to_vec(),
            paths: vec![BenchPath::Loopback, BenchPath::Veth],
            repetitions: 9,
            seed: 0x5eed,
            pin_threads: false,
        }
    }
}

/// One repetition of one case.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct BenchSample {
    /// Wall time of the repetition.
    pub seconds: f64,
    /// CPU seconds of the sending thread.
    pub sender_cpu_s: f64,
    /// Of `sender_cpu_s`, in the kernel.
    pub sender_sys_s: f64,
    /// CPU seconds of the receiving thread.
    pub receiver_cpu_s: f64,
    /// CPU seconds of the whole process (both threads, io_uring workers, anything else).
    pub process_cpu_s: f64,
}

/// Results of one transport (or raw TCP) at one batch size on one path.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchCase {
    /// Transport name, or `raw-tcp` for the reference.
    pub transport: String,
    /// Bytes per `send` (raw TCP: per `write`).
    pub batch_bytes: usize,
    /// Median throughput, GiB/s.
    pub gib_per_s: f64,
    /// Best repetition's throughput, GiB/s (load from elsewhere only ever slows a repetition
    /// down, so on a shared machine this is the steadier figure).
    pub best_gib_per_s: f64,
    /// Median sender CPU seconds per GiB sent.
    pub sender_cpu_s_per_gib: f64,
    /// Median receiver CPU seconds per GiB.
    pub receiver_cpu_s_per_gib: f64,
    /// Median whole-process CPU seconds per GiB.
    pub process_cpu_s_per_gib: f64,
    /// Median time to send one batch until released, microseconds (wall time / batches).
    pub us_per_batch: f64,
    /// Transport counters at the end (warm-up included); absent for raw TCP.
    pub stats: Option<TransportStats>,
    /// Every measured repetition.
    pub samples: Vec<BenchSample>,
    /// Why the case could not run, if it could not.
    pub error: Option<String>,
}

impl BenchCase {
    /// A case with no results yet.
    pub fn empty(transport: String, batch_bytes: usize) -> BenchCase {
        BenchCase {
            transport,
            batch_bytes,
            gib_per_s: 0.0,
            best_gib_per_s: 0.0,
            sender_cpu_s_per_gib: 0.0,
            receiver_cpu_s_per_gib: 0.0,
            process_cpu_s_per_gib: 0.0,
            us_per_batch: 0.0,
            stats: None,
            samples: Vec::new(),
            error: None,
        }
    }
}

/// Results on one path.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchPathReport {
    /// The path.
    pub path: BenchPath,
    /// Why the path was not measured, if it was not (e.g. not root).
    pub skipped: Option<String>,
    /// Raw bulk TCP from one contiguous buffer: the path's reference.
    pub raw_tcp: Option<BenchCase>,
    /// Every transport × batch size.
    pub cases: Vec<BenchCase>,
}

/// Everything one run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// `uname -r`.
    pub kernel: String,
    /// CPUs online.
    pub cpus: usize,
    /// `net.core.optmem_max` (bounds outstanding MSG_ZEROCOPY notifications).
    pub optmem_max: Option<u64>,
    /// What was asked.
    pub options: BenchOptions,
    /// Per path.
    pub paths: Vec<BenchPathReport>,
}

/// Errors that stop the whole benchmark (a single case's failure is recorded in its row).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Options that cannot work.
    #[error("invalid benchmark options: {0}")]
    BadOptions(String),
    /// The mapped region could not be created.
    #[error("cannot map the benchmark region: {0}")]
    Region(std::io::Error),
    /// A transport failed in a way that is not specific to one case.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// Runs the benchmark. Takes roughly `paths × (transports × batches + 1) × (repetitions + 1) ×
/// bytes_per_rep / throughput`; the defaults take about a minute on a 2-core machine.
pub fn bench_transports(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    validate(opts)?;
    let region = MappedRegion::new(opts.region_pages, opts.seed).map_err(BenchError::Region)?;
    let order = run::page_order(opts);
    let mut paths = Vec::new();
    for &path in &opts.paths {
        paths.push(run::measure_path(path, opts, &region, &order));
    }
    Ok(BenchReport {
        kernel: read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_default(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        optmem_max: read_trimmed("/proc/sys/net/core/optmem_max").and_then(|s| s.parse().ok()),
        options: opts.clone(),
        paths,
    })
}

fn validate(opts: &BenchOptions) -> Result<(), BenchError> {
    let bad = |s: &str| Err(BenchError::BadOptions(s.to_string()));
    if opts.region_pages == 0 {
        return bad("region_pages must be > 0");
    }
    if opts.bytes_per_rep == 0 || !opts.bytes_per_rep.is_multiple_of(region::PAGE) {
        return bad("bytes_per_rep must be a positive multiple of 4096");
    }
    if opts.batch_bytes.is_empty()
        || opts
            .batch_bytes
            .iter()
            .any(|&b| b == 0 || !b.is_multiple_of(region::PAGE) || b > opts.bytes_per_rep)
    {
        return bad("batch sizes must be positive multiples of 4096, at most bytes_per_rep");
    }
    if opts.repetitions == 0 {
        return bad("repetitions must be > 0");
    }
    Ok(())
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl BenchReport {
    /// A Markdown table per path, with ratios to raw TCP and to `copy` at the same batch size.
    pub fn to_markdown(&self) -> String {
        let mut out = format!(
            "Transport micro-benchmark: kernel {}, {} CPUs, optmem_max {}, {} MiB per repetition, \
             median of {} repetitions.\n",
            self.kernel,
            self.cpus,
            self.optmem_max.map_or("?".to_string(), |v| v.to_string()),
            self.options.bytes_per_rep >> 20,
            self.options.repetitions
        );
        for p in &self.paths {
            out += &format!("\n### {}\n\n", p.path.name());
            if let Some(why) = &p.skipped {
                out += &format!("skipped: {why}\n");
                continue;
            }
            out +=
                "| transport | batch | GiB/s | best GiB/s | × raw TCP | × copy | × copy paired | \
                    sender CPU s/GiB | receiver CPU s/GiB | process CPU s/GiB | µs/batch | \
                    copied/zc completions |\n";
            out += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n";
            let raw = p.raw_tcp.as_ref().filter(|r| r.error.is_none());
            for c in p.raw_tcp.iter().chain(&p.cases) {
                if let Some(e) = &c.error {
                    out += &format!(
                        "| {} | {} | error: {e} |{}\n",
                        c.transport,
                        kib(c.batch_bytes),
                        " |".repeat(9)
                    );
                    continue;
                }
                let copy = p.cases.iter().find(|k| {
                    k.transport == "copy" && k.batch_bytes == c.batch_bytes && k.error.is_none()
                });
                let ratio = |base: Option<&BenchCase>| {
                    base.map_or("".to_string(), |b| {
                        format!("{:.2}", c.gib_per_s / b.gib_per_s)
                    })
                };
                let completions = c.stats.map_or("".to_string(), |s| {
                    let mut t = format!("{}/{}", s.copied_completions, s.zerocopy_completions);
                    if s.fallbacks > 0 {
                        t += " (fell back)";
                    }
                    t
                });
                out += &format!(
                    "| {} | {} | {:.2} | {:.2} | {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.0} | {} |\n",
                    c.transport,
                    kib(c.batch_bytes),
                    c.gib_per_s,
                    c.best_gib_per_s,
                    ratio(raw),
                    ratio(copy),
                    copy.and_then(|b| paired_ratio(c, b))
                        .map_or("".to_string(), |r| format!("{r:.2}")),
                    c.sender_cpu_s_per_gib,
                    c.receiver_cpu_s_per_gib,
                    c.process_cpu_s_per_gib,
                    c.us_per_batch,
                    completions
                );
            }
        }
        out
    }
}

/// Throughput of `case` over `base`, judged round by round: the median over repetitions of
/// `base`'s time over `case`'s time in the same round (both send the same bytes). Slow moments
/// of a shared machine hit both sides of a pair alike, so this is steadier than a ratio of
/// medians. `None` when the two do not have the same number of samples.
pub fn paired_ratio(case: &BenchCase, base: &BenchCase) -> Option<f64> {
    if case.samples.len() != base.samples.len() || case.samples.is_empty() {
        return None;
    }
    let mut r: Vec<f64> = case
        .samples
        .iter()
        .zip(&base.samples)
        .filter(|(c, _)| c.seconds > 0.0)
        .map(|(c, b)| b.seconds / c.seconds)
        .collect();
    if r.is_empty() {
        return None;
    }
    r.sort_by(f64::total_cmp);
    Some(r[r.len() / 2])
}

fn kib(b: usize) -> String {
    if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
        format!("{} MiB", b >> 20)
    } else {
        format!("{} KiB", b >> 10)
    }
}

#[cfg(test)]
mod paired_tests {
    use super::*;

    fn case(times: &[f64]) -> BenchCase {
        BenchCase {
            samples: times
                .iter()
                .map(|&seconds| BenchSample {
                    seconds,
                    sender_cpu_s: 0.0,
                    sender_sys_s: 0.0,
                    receiver_cpu_s: 0.0,
                    process_cpu_s: 0.0,
                })
                .collect(),
            ..BenchCase::empty("x".into(), 4096)
        }
    }

    #[test]
    fn paired_ratio_compares_round_by_round() {
        // Round 2 was slow for both: the pairs still say "twice as fast".
        let base = case(&[2.0, 2.0, 20.0]);
        let fast = case(&[1.0, 1.0, 10.0]);
        assert_eq!(paired_ratio(&fast, &base), Some(2.0));
        assert_eq!(paired_ratio(&base, &fast), Some(0.5));
        // Unequal sample counts cannot be paired.
        assert_eq!(paired_ratio(&case(&[1.0]), &base), None);
        assert_eq!(paired_ratio(&case(&[]), &case(&[])), None);
    }
}
