//! `ftvm sim`: run a scenario in the deterministic simulator over one seed or a range of
//! seeds, print a one-line verdict per seed, and on a violation the seed, the invariant and
//! the event trace. `--bench` measures simulated epochs per wall-clock second.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::Context;
use ftvm_sim::{run_scenario, RunOptions, RunReport, Scenario, Verdict};
use serde::Serialize;

/// Arguments of `ftvm sim`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Scenario file (TOML; the format is described in scenarios/README.md).
    pub scenario: PathBuf,
    /// Run this one seed (default 0).
    #[arg(long, conflicts_with = "seeds")]
    pub seed: Option<u64>,
    /// Run every seed of a range, e.g. `0..200` (end excluded).
    #[arg(long, value_name = "A..B", value_parser = parse_range)]
    pub seeds: Option<Range<u64>>,
    /// Print the whole event trace of every run (a failing run's trace is always printed).
    #[arg(long)]
    pub trace: bool,
    /// Report simulated epochs per wall-clock second over all runs (also as JSON).
    #[arg(long)]
    pub bench: bool,
    /// With --bench: also write the JSON figures to this file.
    #[arg(long, value_name = "FILE", requires = "bench")]
    pub json: Option<PathBuf>,
    /// Seeds run in parallel (runs are independent; output stays in seed order). Default 1, so
    /// `--bench` reports single-threaded speed unless asked otherwise.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub jobs: u32,
    /// Run under this epoch policy instead of the file's (`fixed` or `output`).
    #[arg(long, value_parser = ["fixed", "output"])]
    pub epoch_policy: Option<String>,
}

fn parse_range(s: &str) -> Result<Range<u64>, String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("`{s}` is not a range like 0..200"))?;
    let a: u64 = a
        .trim()
        .parse()
        .map_err(|_| format!("bad range start `{a}`"))?;
    let b: u64 = b
        .trim()
        .parse()
        .map_err(|_| format!("bad range end `{b}`"))?;
    if a >= b {
        return Err(format!("empty range {a}..{b}"));
    }
    Ok(a..b)
}

/// Benchmark figures written by `--bench`.
#[derive(Serialize)]
struct Bench {
    scenario: String,
    seeds: [u64; 2],
    runs: u64,
    passed: u64,
    epoch_ms: u64,
    epochs: u64,
    sim_s: f64,
    wall_s: f64,
    epochs_per_wall_s: f64,
    speedup: f64,
    /// Seeds run at once.
    jobs: u32,
    /// Elapsed wall time of the whole sweep.
    elapsed_s: f64,
    /// Simulated epochs per elapsed second (all jobs together).
    throughput_epochs_per_s: f64,
}

/// Run the command; returns the process exit code (0: every seed passed).
pub fn run(args: Args) -> anyhow::Result<i32> {
    let mut scenario = Scenario::load(&args.scenario)?;
    if let Some(p) = &args.epoch_policy {
        scenario = scenario
            .with_epoch_policy_named(p)
            .map_err(anyhow::Error::msg)?;
    }
    let seeds = match (args.seed, &args.seeds) {
        (_, Some(r)) => r.clone(),
        (Some(s), None) => s..s.saturating_add(1),
        (None, None) => 0..1,
    };
    let opts = RunOptions::default().traced(args.trace && !args.bench);
    let (mut epochs, mut sim_ms, mut wall_s, mut passed, mut failed) =
        (0u64, 0u64, 0f64, 0u64, 0u64);
    let started = Instant::now();
    for_each_report(&scenario, seeds.clone(), &opts, args.jobs, |report| {
        epochs += report.stats.observed.epochs;
        sim_ms += report.stats.sim_ms;
        wall_s += report.stats.wall_s;
        println!("{}", report.summary());
        if args.trace && !args.bench {
            print_trace(&report);
        }
        if report.verdict == Verdict::Pass {
            passed += 1;
        } else {
            failed += 1;
            explain(&scenario, &report, args.trace && !args.bench);
        }
    });
    let n = seeds.end - seeds.start;
    if n > 1 {
        println!(
            "{}: {passed}/{n} seeds passed in {:.1} s",
            scenario.name,
            started.elapsed().as_secs_f64()
        );
    }
    if args.bench {
        let b = Bench {
            scenario: scenario.name.clone(),
            seeds: [seeds.start, seeds.end],
            runs: n,
            passed,
            epoch_ms: scenario.timing.epoch.as_millis() as u64,
            epochs,
            sim_s: sim_ms as f64 / 1000.0,
            wall_s,
            epochs_per_wall_s: epochs as f64 / wall_s.max(1e-9),
            speedup: sim_ms as f64 / 1000.0 / wall_s.max(1e-9),
            jobs: args.jobs,
            elapsed_s: started.elapsed().as_secs_f64(),
            throughput_epochs_per_s: epochs as f64 / started.elapsed().as_secs_f64().max(1e-9),
        };
        println!(
            "bench: {} epochs ({:.1} s simulated) in {:.3} s of run time: {:.0} epochs/s, {:.0}x \
             real time per run",
            b.epochs, b.sim_s, b.wall_s, b.epochs_per_wall_s, b.speedup
        );
        if args.jobs > 1 {
            println!(
                "bench: {} jobs: {:.0} epochs per elapsed second ({:.0}x real time together)",
                b.jobs,
                b.throughput_epochs_per_s,
                b.sim_s / b.elapsed_s.max(1e-9)
            );
        }
        let json = serde_json::to_string(&b)?;
        println!("{json}");
        if let Some(path) = &args.json {
            std::fs::write(path, json + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(if failed == 0 { 0 } else { 1 })
}

/// Runs every seed of `seeds`, `jobs` at a time, and hands the reports to `each` in seed order
/// as soon as each one's predecessors are done (so long sweeps show progress).
fn for_each_report(
    scenario: &Scenario,
    seeds: Range<u64>,
    opts: &RunOptions,
    jobs: u32,
    mut each: impl FnMut(RunReport),
) {
    if jobs <= 1 {
        seeds.for_each(|seed| each(run_scenario(scenario, seed, opts)));
        return;
    }
    let next = AtomicU64::new(seeds.start);
    let (tx, rx) = mpsc::channel::<RunReport>();
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            let (tx, next, end) = (tx.clone(), &next, seeds.end);
            scope.spawn(move || loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= end || tx.send(run_scenario(scenario, seed, opts)).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let mut waiting = BTreeMap::new();
        let mut want = seeds.start;
        for report in rx {
            waiting.insert(report.seed, report);
            while let Some(r) = waiting.remove(&want) {
                each(r);
                want += 1;
            }
        }
    });
}

fn print_trace(report: &RunReport) {
    for e in &report.trace {
        println!("  {e}");
    }
}

/// A failing run: the seed, the broken invariant, and the trace (replayed in full: the run
/// is deterministic, so the same seed gives the same events).
fn explain(scenario: &Scenario, report: &RunReport, already_printed: bool) {
    println!(
        "--- seed {} of {} failed: {}",
        report.seed, scenario.name, report.verdict
    );
    if let Some(v) = &report.violation {
        println!("invariant: {}", v.invariant);
        println!("violation: {v}");
    }
    for u in &report.unmet {
        println!("unmet: {u}");
    }
    if report.verdict == Verdict::Unmet || already_printed {
        return;
    }
    let full = run_scenario(scenario, report.seed, &RunOptions::default().traced(true));
    println!(
        "trace of seed {} ({} events):",
        report.seed,
        full.trace.len()
    );
    print_trace(&full);
    println!("--- end of seed {}", report.seed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("0..200"), Ok(0..200));
        assert_eq!(parse_range(" 5 .. 7"), Ok(5..7));
        assert!(parse_range("7..7").is_err());
        assert!(parse_range("7").is_err());
        assert!(parse_range("a..3").is_err());
    }
}
