//! PAGEMAP_SCAN dirty tracking across processes, for real: a QEMU stand-in with the preload
//! library writes known pages of a /dev/shm RAM file; the scanner must report exactly those.

mod dirty_common;

use std::collections::BTreeSet;

use dirty_common::{ram_file, ChildOpts, FakeQemu};
use ftvm_real::dirty::{DirtyError, DirtyPages, DirtyTracker, HashTracker, PagemapScanner};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const PAGES: u64 = 16 * 1024; // 64 MiB
const BYTES: u64 = PAGES * 4096;

/// A random page set: scattered pages, a few contiguous runs, sometimes the edges.
fn random_pages(rng: &mut StdRng, scattered: usize) -> BTreeSet<u64> {
    let mut s = BTreeSet::new();
    for _ in 0..scattered {
        s.insert(rng.gen_range(0..PAGES));
    }
    for _ in 0..rng.gen_range(0..4) {
        let start = rng.gen_range(0..PAGES - 64);
        s.extend(start..start + rng.gen_range(1..64));
    }
    if rng.gen_bool(0.5) {
        s.insert(0);
    }
    if rng.gen_bool(0.5) {
        s.insert(PAGES - 1);
    }
    s
}

fn set(d: &DirtyPages) -> BTreeSet<u64> {
    d.iter().collect()
}

fn check_rounds(via: &str) {
    let f = ram_file(BYTES);
    let mut q = FakeQemu::start(
        f.path(),
        BYTES,
        ChildOpts {
            via,
            ..Default::default()
        },
    );
    let mut scanner = PagemapScanner::open(q.pid(), f.path()).unwrap();
    let mut hashes = HashTracker::open(f.path(), BYTES).unwrap();
    assert_eq!(scanner.pages(), PAGES);

    // First scan: pages never touched count as written, so all RAM (the full copy).
    assert_eq!(scanner.scan().unwrap().count(), PAGES);
    assert_eq!(hashes.scan().unwrap().count(), PAGES);
    // Nothing happened since.
    assert!(scanner.scan().unwrap().is_empty());

    let mut rng = StdRng::seed_from_u64(0xF7F7 ^ via.len() as u64);
    for round in 1..=10u64 {
        let scattered = [0, 1, 50, 700, 3000][round as usize % 5];
        let written = random_pages(&mut rng, scattered);
        let pages: Vec<u64> = written.iter().copied().collect();
        for chunk in pages.chunks(500) {
            q.write(round, chunk);
        }
        // Reads and same-value rewrites of other pages: reads are not writes, rewrites are.
        let read: Vec<u64> = (0..20).map(|_| rng.gen_range(0..PAGES)).collect();
        q.cmd("read", &read);
        let d = scanner.scan().unwrap();
        assert_eq!(
            set(&d),
            written,
            "round {round}: PAGEMAP_SCAN != pages written"
        );
        assert_eq!(d.count(), written.len() as u64);
        assert_eq!(
            set(&hashes.scan().unwrap()),
            written,
            "round {round}: hash cross-check"
        );
        assert!(
            scanner.scan().unwrap().is_empty(),
            "round {round}: re-scan not empty"
        );
    }

    // Written with the same content: PAGEMAP_SCAN reports it (written, not changed), hashes not.
    q.cmd("same", &[5, 6, 9000]);
    assert_eq!(scanner.scan().unwrap().to_indices(), vec![5, 6, 9000]);
    assert!(hashes.scan().unwrap().is_empty());

    let log = q.stderr();
    assert!(
        log.contains("ftvm-preload: tracking RAM file") && log.contains("WP_ASYNC"),
        "preload log: {log}"
    );
}

#[test]
fn scanner_reports_exactly_the_written_pages_mmap64() {
    check_rounds("mmap64");
}

#[test]
fn scanner_reports_exactly_the_written_pages_mmap() {
    check_rounds("mmap");
}

#[test]
fn more_regions_than_one_ioctl_returns_are_all_found() {
    let f = ram_file(BYTES);
    let mut q = FakeQemu::start(f.path(), BYTES, ChildOpts::default());
    let mut scanner = PagemapScanner::open(q.pid(), f.path()).unwrap();
    scanner.scan().unwrap();
    // Every other page: 8192 separate regions, more than one ioctl's buffer.
    let pages: Vec<u64> = (0..PAGES).step_by(2).collect();
    for chunk in pages.chunks(1000) {
        q.write(1, chunk);
    }
    let d = scanner.scan().unwrap();
    assert!(
        scanner.last_stats().ioctls > 1,
        "{:?}",
        scanner.last_stats()
    );
    assert_eq!(d.ranges().len(), pages.len());
    assert_eq!(d.to_indices(), pages);
}

#[test]
fn untracked_ram_is_an_error_not_a_clean_scan() {
    let f = ram_file(BYTES);
    // No preload library at all.
    let q = FakeQemu::start(
        f.path(),
        BYTES,
        ChildOpts {
            preload: false,
            ..Default::default()
        },
    );
    let mut s = PagemapScanner::open(q.pid(), f.path()).unwrap();
    assert!(matches!(s.scan(), Err(DirtyError::NotTracked { pid }) if pid == q.pid()));
    // The library loaded, but told about another file.
    let mut q2 = FakeQemu::start(
        f.path(),
        BYTES,
        ChildOpts {
            ram_env: Some("/dev/shm/not-the-ram"),
            ..Default::default()
        },
    );
    let mut s2 = PagemapScanner::open(q2.pid(), f.path()).unwrap();
    let e = s2.scan().unwrap_err();
    assert!(matches!(e, DirtyError::NotTracked { .. }), "{e}");
    assert!(e.to_string().contains("LD_PRELOAD"));
    assert!(!q2.stderr().contains("tracking RAM file"));
}

#[test]
fn a_process_without_the_ram_mapped_is_refused() {
    let f = ram_file(BYTES);
    let other = ram_file(BYTES);
    let q = FakeQemu::start(f.path(), BYTES, ChildOpts::default());
    let e = PagemapScanner::open(q.pid(), other.path()).unwrap_err();
    assert!(matches!(e, DirtyError::NoRamMapping { .. }), "{e}");
}
