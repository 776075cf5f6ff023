//! The transport micro-benchmark runs end to end on a small scale, on loopback and on a veth
//! pair between namespaces (CI runs as root with iproute2), and cleans its namespaces up.

use std::process::Command;

use ftvm_real::transport::bench::{bench_transports, BenchOptions, BenchPath};
use ftvm_real::transport::TransportKind;

fn namespaces() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn small_benchmark_reports_every_case_on_both_paths() {
    let opts = BenchOptions {
        region_pages: 512,
        bytes_per_rep: 2 << 20,
        batch_bytes: vec![64 << 10, 1 << 20],
        repetitions: 2,
        ..BenchOptions::default()
    };
    let report = bench_transports(&opts).unwrap();
    assert_eq!(report.paths.len(), 2);
    for p in &report.paths {
        assert_eq!(p.skipped, None, "{:?} was not measured", p.path);
        let raw = p.raw_tcp.as_ref().unwrap();
        assert_eq!(raw.error, None);
        assert!(raw.gib_per_s > 0.0);
        assert_eq!(p.cases.len(), TransportKind::ALL.len() * 2);
        for c in &p.cases {
            assert_eq!(
                c.error, None,
                "{:?} {} {}",
                p.path, c.transport, c.batch_bytes
            );
            assert_eq!(c.samples.len(), 2);
            assert!(c.gib_per_s > 0.0 && c.sender_cpu_s_per_gib > 0.0);
            let s = c.stats.unwrap();
            // Warm-up plus two measured repetitions of 2 MiB each.
            assert_eq!(s.bytes, 3 * (2 << 20), "{} {}", c.transport, c.batch_bytes);
            assert_eq!(s.sends, 3 * (2 << 20) / c.batch_bytes as u64);
            assert_eq!(
                s.zerocopy_completions + s.copied_completions,
                s.zerocopy_calls
            );
            if c.transport == "auto" {
                // Loopback and veth both copy: auto must have noticed.
                assert_eq!(s.fallbacks, 1, "{:?}: {s:?}", p.path);
            }
        }
    }
    let md = report.to_markdown();
    assert!(
        md.contains("### loopback")
            && md.contains("### veth")
            && md.contains("| uring-zc | 1 MiB |")
    );
    assert!(serde_json::to_string(&report)
        .unwrap()
        .contains("\"path\":\"veth\""));
    let pid = std::process::id().to_string();
    assert!(
        !namespaces().contains(&pid),
        "namespaces left behind: {}",
        namespaces()
    );
}

#[test]
fn bad_options_are_rejected() {
    for opts in [
        BenchOptions {
            batch_bytes: vec![1000],
            ..BenchOptions::default()
        },
        BenchOptions {
            repetitions: 0,
            ..BenchOptions::default()
        },
        BenchOptions {
            paths: vec![BenchPath::Loopback],
            bytes_per_rep: 0,
            ..BenchOptions::default()
        },
    ] {
        assert!(bench_transports(&opts).is_err());
    }
}
