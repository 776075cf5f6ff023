//! Runs the transport micro-benchmark and prints its Markdown table, then its JSON.
//!
//! `cargo bench -p ftvm-real --bench transport` runs the defaults (about a minute). Environment:
//! `FTVM_BENCH_REPS` (repetitions), `FTVM_BENCH_MIB` (MiB per repetition and region size),
//! `FTVM_BENCH_PATHS` (`loopback`, `veth` or `loopback,veth`), `FTVM_BENCH_BATCH_KIB` (e.g.
//! `64,1024`), `FTVM_BENCH_TRANSPORTS` (e.g. `copy,auto`), `FTVM_BENCH_PIN=1` (pin the sender and
//! receiver threads to one CPU each). `ftvm bench transport` calls the
//! same library function.

use ftvm_real::transport::bench::{bench_transports, BenchOptions, BenchPath};

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn main() {
    let mut opts = BenchOptions::default();
    if let Some(r) = env_usize("FTVM_BENCH_REPS") {
        opts.repetitions = r;
    }
    if let Some(m) = env_usize("FTVM_BENCH_MIB") {
        opts.bytes_per_rep = m << 20;
        opts.region_pages = (m << 20) / 4096;
    }
    if let Ok(p) = std::env::var("FTVM_BENCH_PATHS") {
        opts.paths = p
            .split(',')
            .filter_map(|s| match s.trim() {
                "loopback" => Some(BenchPath::Loopback),
                "veth" => Some(BenchPath::Veth),
                _ => None,
            })
            .collect();
    }
    if let Ok(b) = std::env::var("FTVM_BENCH_BATCH_KIB") {
        opts.batch_bytes = b
            .split(',')
            .filter_map(|v| v.trim().parse::<usize>().ok())
            .map(|k| k << 10)
            .collect();
    }
    if let Ok(t) = std::env::var("FTVM_BENCH_TRANSPORTS") {
        opts.transports = t.split(',').filter_map(|v| v.trim().parse().ok()).collect();
    }
    if std::env::var("FTVM_BENCH_PIN").is_ok_and(|v| v == "1") {
        opts.pin_threads = true;
    }
    // `cargo bench` passes `--bench`; nothing else is accepted.
    match bench_transports(&opts) {
        Ok(report) => {
            println!("{}", report.to_markdown());
            match serde_json::to_string_pretty(&report) {
                Ok(j) => println!("{j}"),
                Err(e) => eprintln!("cannot serialize the report: {e}"),
            }
        }
        Err(e) => {
            eprintln!("transport benchmark failed: {e}");
            std::process::exit(1);
        }
    }
}
