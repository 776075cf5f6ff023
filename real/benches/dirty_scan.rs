//! Scan time of the dirty-page trackers against the number of dirty pages, printed as JSON
//! lines (one per configuration), the figures of docs/ARCHITECTURE.md, Dirty pages: a 256 MiB
//! RAM file mapped by a QEMU stand-in with the preload library, N scattered random pages
//! written, then one scan timed (the stand-in is idle during the scan, like a paused VM).
//!
//! `cargo bench -p ftvm-real --bench dirty_scan`. Environment: `FTVM_BENCH_REPS` (scans per
//! configuration, default 30), `FTVM_BENCH_MIB` (RAM size, default 256),
//! `FTVM_BENCH_DIRTY` (e.g. `0,10000,44000`), `FTVM_BENCH_HASH=0` to skip the hash tracker.

#[path = "../tests/dirty_common/mod.rs"]
mod dirty_common;

use std::time::Instant;

use dirty_common::{ram_file, ChildOpts, FakeQemu};
use ftvm_real::dirty::{DirtyTracker, HashTracker, PagemapScanner};
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let reps: usize = env_or("FTVM_BENCH_REPS", 30);
    let mib: u64 = env_or("FTVM_BENCH_MIB", 256);
    let dirty: Vec<usize> = std::env::var("FTVM_BENCH_DIRTY")
        .unwrap_or_else(|_| "0,10000,44000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let bytes = mib << 20;
    let pages = bytes / 4096;
    let f = ram_file(bytes);
    let mut q = FakeQemu::start(f.path(), bytes, ChildOpts::default());
    let mut scanner = PagemapScanner::open(q.pid(), f.path()).expect("open scanner");
    let mut rng = StdRng::seed_from_u64(7);

    // Touch all RAM once so no configuration pays for first allocation, then re-arm.
    let all: Vec<u64> = (0..pages).collect();
    for c in all.chunks(4096) {
        q.write(0, c);
    }
    scanner.scan().expect("first scan");

    for &n in &dirty {
        let mut us = Vec::with_capacity(reps);
        let (mut regions, mut ioctls) = (0u64, 0u32);
        for rep in 0..reps {
            let mut set: Vec<u64> = sample(&mut rng, pages as usize, n.min(pages as usize))
                .into_iter()
                .map(|p| p as u64)
                .collect();
            set.sort_unstable();
            for c in set.chunks(4096) {
                q.write(rep as u64 + 1, c);
            }
            let t = Instant::now();
            let d = scanner.scan().expect("scan");
            us.push(t.elapsed().as_secs_f64() * 1e6);
            assert_eq!(d.count(), set.len() as u64, "scan missed or invented pages");
            regions = scanner.last_stats().regions;
            ioctls = scanner.last_stats().ioctls;
        }
        us.sort_by(f64::total_cmp);
        println!(
            "{{\"tracker\":\"pagemap\",\"ram_mib\":{mib},\"dirty_pages\":{n},\"reps\":{reps},\
             \"median_us\":{:.1},\"p90_us\":{:.1},\"min_us\":{:.1},\"regions\":{regions},\"ioctls\":{ioctls}}}",
            percentile(&us, 0.5),
            percentile(&us, 0.9),
            us[0]
        );
    }

    if env_or("FTVM_BENCH_HASH", 1) != 0 {
        let mut h = HashTracker::open(f.path(), bytes).expect("open hash tracker");
        h.scan().expect("first hash scan");
        let mut us = Vec::new();
        for _ in 0..reps.clamp(1, 5) {
            let t = Instant::now();
            h.scan().expect("hash scan");
            us.push(t.elapsed().as_secs_f64() * 1e6);
        }
        us.sort_by(f64::total_cmp);
        println!(
            "{{\"tracker\":\"hash\",\"ram_mib\":{mib},\"dirty_pages\":0,\"reps\":{},\"median_us\":{:.1},\"min_us\":{:.1}}}",
            us.len(),
            percentile(&us, 0.5),
            us[0]
        );
    }
}
