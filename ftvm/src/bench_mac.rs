//! `ftvm bench mac`: throughput of the MAC and AEAD candidates for authenticated checkpoint
//! frames, on one core, over checkpoint-like messages (scattered 4 KiB pages of a large region,
//! each after its record header, see `mac_candidates`). Every candidate and message size runs
//! in each repetition, in a shuffled order, so they are measured side by side under the same
//! conditions; medians, minimums and maximums over the repetitions are reported, with the ratio
//! to the CRC-32 the frames carry today. Throughput per core is counted in the thread's CPU
//! time, so that other work on the machine taking the core away does not count against a
//! candidate; the wall-clock figure is reported beside it.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use ftvm_model::wire::{CheckpointEncoder, CheckpointMeta};
use ftvm_model::{Epoch, Generation, VmId};
use rand::seq::SliceRandom;
use rand::{RngCore, SeedableRng};

use crate::mac_candidates::{self as mac, Candidate, Keys, Message};

/// Arguments of `ftvm bench mac`.
#[derive(clap::Args)]
pub struct MacArgs {
    /// Output directory for `mac.json`, `mac.md` and `mac.png`.
    #[arg(long, default_value = "docs/bench")]
    out: PathBuf,
    /// Measured repetitions of every candidate × message size (medians are reported).
    #[arg(long, default_value_t = 9)]
    repetitions: usize,
    /// Pages per message (comma separated); they are distinct pages of the region.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    pages: Vec<usize>,
    /// Size of the region the pages are taken from, MiB (it must hold the largest message;
    /// larger than the CPU caches so pages come from memory, as guest RAM does).
    #[arg(long, default_value_t = 1024)]
    region_mib: usize,
    /// Candidates (comma separated; default: all).
    #[arg(long, value_delimiter = ',')]
    candidates: Vec<String>,
    /// Seed of the page choice, the region's contents, the keys and the run order.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Bytes per page.
const PAGE: usize = 4096;

/// One candidate × message size.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MacCase {
    /// Candidate name.
    pub candidate: String,
    /// `reference`, `mac` or `aead`.
    pub role: String,
    /// Pages per message.
    pub pages: u64,
    /// Page bytes per message (what the throughput counts; headers are fed but not counted).
    pub page_bytes: u64,
    /// Median throughput, GiB of pages per second of the thread's CPU time (one core).
    pub gib_per_s_median: f64,
    /// Slowest repetition.
    pub gib_per_s_min: f64,
    /// Fastest repetition.
    pub gib_per_s_max: f64,
    /// Median divided by crc32's median at the same size (when crc32 ran).
    pub ratio_to_crc32: Option<f64>,
    /// Median throughput by the wall clock (lower when the core was shared).
    pub wall_gib_per_s_median: f64,
    /// Every repetition's throughput (CPU time), in the order run.
    pub samples: Vec<f64>,
}

/// The whole run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MacReport {
    /// CPU model, from /proc/cpuinfo.
    pub cpu: String,
    /// Instruction set extensions the crates pick up at run time, as detected here.
    pub cpu_features: Vec<String>,
    /// Load average (1 min) before and after the run.
    pub load_before: f64,
    /// See `load_before`.
    pub load_after: f64,
    /// Region size, MiB.
    pub region_mib: u64,
    /// Bytes per page.
    pub page_size: u64,
    /// Repetitions per case.
    pub repetitions: u64,
    /// Every case, candidates in `Candidate::ALL` order within each message size.
    pub cases: Vec<MacCase>,
}

/// Median of `v` (mean of the middle two for an even count); 0 when empty.
pub fn median_f64(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Aggregates one case's samples (CPU time) and wall-clock throughputs.
fn case(c: Candidate, pages: usize, samples: Vec<f64>, wall: &[f64]) -> MacCase {
    let (lo, hi) = samples
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    MacCase {
        candidate: c.name().to_string(),
        role: c.role().to_string(),
        pages: pages as u64,
        page_bytes: (pages * PAGE) as u64,
        gib_per_s_median: median_f64(&samples),
        gib_per_s_min: if samples.is_empty() { 0.0 } else { lo },
        gib_per_s_max: hi,
        ratio_to_crc32: None,
        wall_gib_per_s_median: median_f64(wall),
        samples,
    }
}

/// Fills in every case's ratio to crc32 at the same message size.
fn set_ratios(cases: &mut [MacCase]) {
    let crc: Vec<(u64, f64)> = cases
        .iter()
        .filter(|c| c.candidate == Candidate::Crc32.name())
        .map(|c| (c.pages, c.gib_per_s_median))
        .collect();
    for c in cases.iter_mut() {
        c.ratio_to_crc32 = crc
            .iter()
            .find(|(p, v)| *p == c.pages && *v > 0.0)
            .map(|(_, v)| c.gib_per_s_median / v);
    }
}

/// The instruction set extensions that decide which code paths the crates take.
fn cpu_features() -> Vec<String> {
    #[allow(unused_mut)]
    let mut v: Vec<&str> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => {
                $(if std::arch::is_x86_feature_detected!($f) { v.push($f); })*
            };
        }
        probe!(
            "aes",
            "pclmulqdq",
            "sha",
            "avx2",
            "avx512f",
            "vaes",
            "vpclmulqdq"
        );
    }
    v.into_iter().map(String::from).collect()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Whether `report` ran on a CPU with `feature`.
fn has(report: &MacReport, feature: &str) -> bool {
    report.cpu_features.iter().any(|f| f == feature)
}

/// The Markdown table of a report.
pub fn markdown(r: &MacReport) -> String {
    let yes = |f| if has(r, f) { "yes" } else { "no" };
    let mut s = format!(
        "MAC benchmark: one core, {} repetitions of every candidate × message size, shuffled \
         side by side; messages of distinct {} KiB pages scattered over a {} MiB region, each \
         page after its 8-byte record header, fed to one incremental state per message \
         (AEADs: each page encrypted into an output buffer). GiB/s counts page bytes per second \
         of the thread's CPU time (wall: by the clock, lower when the core was shared). CPU: {}; \
         SHA extensions {} (sha2 uses them when present), CLMUL {}, AES-NI {}, AVX2 {}, \
         AVX-512 {}. Load average {:.2} before, {:.2} after.\n\n\
         | candidate | role | pages/message | MiB/message | GiB/s median | GiB/s min | \
         GiB/s max | × crc32 | wall GiB/s median |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|\n",
        r.repetitions,
        r.page_size / 1024,
        r.region_mib,
        r.cpu,
        yes("sha"),
        yes("pclmulqdq"),
        yes("aes"),
        yes("avx2"),
        yes("avx512f"),
        r.load_before,
        r.load_after,
    );
    for c in &r.cases {
        s += &format!(
            "| {} | {} | {} | {:.1} | {:.2} | {:.2} | {:.2} | {} | {:.2} |\n",
            c.candidate,
            c.role,
            c.pages,
            c.page_bytes as f64 / (1u64 << 20) as f64,
            c.gib_per_s_median,
            c.gib_per_s_min,
            c.gib_per_s_max,
            c.ratio_to_crc32
                .map_or_else(|| "–".to_string(), |x| format!("{x:.2}")),
            c.wall_gib_per_s_median,
        );
    }
    s += "\n`copy`: the pages copied into the output buffer, the floor of any sender that \
          encrypts. `blake3-keyed-contiguous`: keyed BLAKE3 over as many contiguous bytes, one \
          update, the bound of the per-page `blake3-keyed`. `blake3-keyed-aligned`: the record \
          headers first (an index table padded to BLAKE3's 1 KiB chunk), then the pages, each \
          starting on a chunk boundary. `poly1305`: one-time key derived \
          per message with BLAKE3. `gmac`: GHASH over the message as associated data, masked \
          with AES-256 (AES-GCM without plaintext). AEADs: one AEAD message per page, the \
          record header as associated data, a 16-byte tag per page.\n";
    s
}

/// CPU time this thread has used.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec passed, which outlives the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Fills `buf` with cheap pseudo-random bytes (xorshift64*), so no candidate sees zero pages.
fn fill(buf: &mut [u8], mut x: u64) {
    x |= 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// The frame prefix (header and checkpoint meta) of a message of `pages` pages.
fn prefix(pages: usize) -> anyhow::Result<Vec<u8>> {
    let meta = CheckpointMeta {
        epoch: Epoch(7),
        full: false,
        page_size: PAGE as u32,
        page_count: pages as u64,
        device_len: 0,
        disk_blocks: 0,
    };
    let (_, prefix) = CheckpointEncoder::new(VmId(1), Generation(1), meta)
        .context("encoding a checkpoint prefix")?;
    Ok(prefix.to_vec())
}

/// Runs the MAC benchmark.
pub fn run(a: MacArgs) -> anyhow::Result<i32> {
    if a.repetitions == 0 || a.pages.is_empty() || a.pages.contains(&0) {
        anyhow::bail!("--repetitions must be positive and --pages a list of positive counts");
    }
    let region_pages = (a.region_mib << 20) / PAGE;
    let most = a.pages.iter().copied().max().unwrap_or(0);
    if most > region_pages {
        anyhow::bail!(
            "--region-mib {} holds {region_pages} pages, fewer than the {most} a message asks for",
            a.region_mib
        );
    }
    let candidates: Vec<Candidate> = if a.candidates.is_empty() {
        Candidate::ALL.to_vec()
    } else {
        a.candidates
            .iter()
            .map(|s| s.parse::<Candidate>().map_err(anyhow::Error::msg))
            .collect::<Result<_, _>>()
            .context("--candidates")?
    };
    let load_before = load_average();
    eprintln!(
        "ftvm bench mac: filling a {} MiB region; {} candidates × {} message sizes × {} \
         repetitions",
        a.region_mib,
        candidates.len(),
        a.pages.len(),
        a.repetitions
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    let mut region = vec![0u8; region_pages * PAGE];
    fill(&mut region, rng.next_u64());
    let mut key = [0u8; mac::KEY_LEN];
    rng.fill_bytes(&mut key);
    let keys = Keys::new(&key);
    // Distinct pages in ascending order, as a sender walks the dirty bitmap.
    let mut messages = Vec::new();
    for &n in &a.pages {
        let mut pages: Vec<u64> = rand::seq::index::sample(&mut rng, region_pages, n)
            .into_iter()
            .map(|i| i as u64)
            .collect();
        pages.sort_unstable();
        messages.push((prefix(n)?, pages));
    }
    let slot = candidates
        .iter()
        .map(|&c| mac::slot_len(c, PAGE))
        .max()
        .unwrap_or(PAGE);
    let mut out = vec![0u8; most * slot];
    let mut runs: Vec<(usize, Candidate)> = (0..messages.len())
        .flat_map(|m| candidates.iter().map(move |&c| (m, c)))
        .collect();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); runs.len()];
    let mut wall: Vec<Vec<f64>> = vec![Vec::new(); runs.len()];
    let mut nonce = 0u64;
    // Round 0 warms up (faults in the output buffer, detects CPU features); not measured.
    for round in 0..=a.repetitions {
        runs.shuffle(&mut rng);
        for &(m, c) in &runs {
            nonce += 1;
            let msg = Message {
                prefix: &messages[m].0,
                region: &region,
                page_size: PAGE,
                pages: &messages[m].1,
                nonce,
            };
            let (t, cpu) = (Instant::now(), thread_cpu_time());
            black_box(mac::run(c, &keys, black_box(&msg), &mut out));
            let cpu = (thread_cpu_time() - cpu).as_secs_f64();
            let secs = t.elapsed().as_secs_f64();
            if round > 0 {
                let i = m * candidates.len() + candidates.iter().position(|&x| x == c).unwrap_or(0);
                let gib = msg.page_bytes() as f64 / (1u64 << 30) as f64;
                // A clock too coarse to see the run would divide by zero: take the wall time.
                samples[i].push(gib / if cpu > 0.0 { cpu } else { secs });
                wall[i].push(gib / secs);
            }
        }
        if round > 0 {
            eprintln!("  repetition {round}/{} done", a.repetitions);
        }
    }
    let mut cases: Vec<MacCase> = Vec::new();
    let mut samples = samples.into_iter().zip(wall);
    for &n in &a.pages {
        for &c in &candidates {
            let (s, w) = samples.next().unwrap_or_default();
            cases.push(case(c, n, s, &w));
        }
    }
    set_ratios(&mut cases);
    let report = MacReport {
        cpu: cpu_model(),
        cpu_features: cpu_features(),
        load_before,
        load_after: load_average(),
        region_mib: a.region_mib as u64,
        page_size: PAGE as u64,
        repetitions: a.repetitions as u64,
        cases,
    };
    crate::bench_cmd::write_results(&a.out, "mac", &report, &markdown(&report), || {
        crate::plot::mac(&report, &a.out)
    })?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small region, a few scattered pages and the keys of a fixed seed.
    struct Fixture {
        region: Vec<u8>,
        pages: Vec<u64>,
        prefix: Vec<u8>,
    }

    fn fixture() -> Fixture {
        let mut region = vec![0u8; 64 * PAGE];
        fill(&mut region, 99);
        Fixture {
            region,
            pages: vec![3, 10, 11, 40, 63],
            prefix: prefix(5).unwrap(),
        }
    }

    fn message<'a>(f: &'a Fixture, region: &'a [u8], nonce: u64) -> Message<'a> {
        Message {
            prefix: &f.prefix,
            region,
            page_size: PAGE,
            pages: &f.pages,
            nonce,
        }
    }

    fn tag(c: Candidate, keys: &Keys, msg: &Message<'_>) -> (mac::Tag, Vec<u8>) {
        let mut out = vec![0u8; msg.pages.len() * mac::slot_len(c, PAGE)];
        let t = mac::run(c, keys, msg, &mut out);
        (t, out)
    }

    #[test]
    fn every_mac_is_stable_and_sees_every_page_byte() {
        let f = fixture();
        let keys = Keys::new(&[7; mac::KEY_LEN]);
        for c in Candidate::ALL.into_iter().filter(|&c| c != Candidate::Copy) {
            let base = tag(c, &keys, &message(&f, &f.region, 1));
            assert_eq!(base, tag(c, &keys, &message(&f, &f.region, 1)), "{c:?}");
            assert_ne!(base.0, [0u8; 32], "{c:?} gave no tag");
            // One byte of one page (the last byte of the fourth page; for the contiguous
            // reference a byte inside the bytes it hashes).
            let at = if c == Candidate::Blake3Contiguous {
                3 * PAGE + 17
            } else {
                f.pages[3] as usize * PAGE + PAGE - 1
            };
            let mut region = f.region.clone();
            region[at] ^= 0x01;
            let changed = tag(c, &keys, &message(&f, &region, 1));
            assert_ne!(base.0, changed.0, "{c:?} missed a changed page byte");
            // A byte outside every sent page changes nothing.
            if c != Candidate::Blake3Contiguous {
                let mut region = f.region.clone();
                region[20 * PAGE] ^= 0xff;
                assert_eq!(base, tag(c, &keys, &message(&f, &region, 1)), "{c:?}");
            }
            // The keyed ones depend on the key.
            if matches!(c.role(), "mac" | "aead") {
                let other = Keys::new(&[8; mac::KEY_LEN]);
                assert_ne!(
                    base.0,
                    tag(c, &other, &message(&f, &f.region, 1)).0,
                    "{c:?}"
                );
            }
        }
    }

    #[test]
    fn nonce_bound_candidates_change_with_the_nonce() {
        let f = fixture();
        let keys = Keys::new(&[7; mac::KEY_LEN]);
        for c in [
            Candidate::Blake3,
            Candidate::Blake3Aligned,
            Candidate::HmacSha256,
            Candidate::Poly1305,
            Candidate::Gmac,
            Candidate::ChaCha20Poly1305,
            Candidate::Aes256Gcm,
        ] {
            let a = tag(c, &keys, &message(&f, &f.region, 1));
            let b = tag(c, &keys, &message(&f, &f.region, 2));
            assert_ne!(a.0, b.0, "{c:?}");
        }
    }

    #[test]
    fn copy_and_aeads_fill_the_output_and_the_aeads_really_encrypt() {
        let f = fixture();
        let keys = Keys::new(&[7; mac::KEY_LEN]);
        let (_, copied) = tag(Candidate::Copy, &keys, &message(&f, &f.region, 1));
        for (n, &p) in f.pages.iter().enumerate() {
            let page = &f.region[p as usize * PAGE..][..PAGE];
            assert_eq!(&copied[n * PAGE..][..PAGE], page);
        }
        for c in [Candidate::ChaCha20Poly1305, Candidate::Aes256Gcm] {
            let (_, out) = tag(c, &keys, &message(&f, &f.region, 5));
            let slot = mac::slot_len(c, PAGE);
            for (n, &p) in f.pages.iter().enumerate() {
                let page = &f.region[p as usize * PAGE..][..PAGE];
                let sealed = &out[n * slot..][..slot];
                assert_ne!(&sealed[..PAGE], page, "{c:?} left page {p} in the clear");
                let opened = mac::open_page(c, &keys, 5, n as u32, p, sealed);
                assert_eq!(opened.as_deref(), Some(page), "{c:?} page {p}");
                // A flipped ciphertext bit, or the wrong record header, fails the tag.
                let mut bad = sealed.to_vec();
                bad[100] ^= 4;
                assert_eq!(mac::open_page(c, &keys, 5, n as u32, p, &bad), None);
                assert_eq!(mac::open_page(c, &keys, 5, n as u32, p + 1, sealed), None);
            }
        }
    }

    #[test]
    fn thread_cpu_time_counts_this_threads_work() {
        let before = thread_cpu_time();
        let mut x = 1u64;
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(30) {
            x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let used = thread_cpu_time() - before;
        assert!(used >= Duration::from_millis(1), "{used:?}");
        assert!(used <= t.elapsed() + Duration::from_millis(5), "{used:?}");
    }

    #[test]
    fn names_parse_back() {
        for c in Candidate::ALL {
            assert_eq!(c.name().parse::<Candidate>(), Ok(c));
        }
        let e = "md5".parse::<Candidate>().unwrap_err();
        assert!(e.contains("blake3-keyed"), "{e}");
    }

    fn report() -> MacReport {
        let mut cases = vec![
            case(Candidate::Crc32, 10, vec![8.0, 10.0, 9.0], &[7.0, 6.0, 8.0]),
            case(Candidate::Blake3, 10, vec![3.0, 4.5, 4.0, 5.0], &[2.0]),
            case(Candidate::Blake3, 20, vec![1.0], &[]),
        ];
        set_ratios(&mut cases);
        MacReport {
            cpu: "test CPU".into(),
            cpu_features: vec!["sha".into(), "aes".into()],
            load_before: 0.5,
            load_after: 1.25,
            region_mib: 1,
            page_size: PAGE as u64,
            repetitions: 3,
            cases,
        }
    }

    #[test]
    fn cases_aggregate_and_compare_with_crc32() {
        let r = report();
        let [crc, b10, b20] = &r.cases[..] else {
            panic!("three cases")
        };
        assert_eq!(
            (crc.gib_per_s_median, crc.gib_per_s_min, crc.gib_per_s_max),
            (9.0, 8.0, 10.0)
        );
        assert_eq!(b10.gib_per_s_median, 4.25);
        assert_eq!(crc.ratio_to_crc32, Some(1.0));
        assert_eq!(b10.ratio_to_crc32, Some(4.25 / 9.0));
        // No crc32 at 20 pages: no ratio.
        assert_eq!(b20.ratio_to_crc32, None);
        assert_eq!(median_f64(&[]), 0.0);
        let md = markdown(&r);
        assert_eq!(crc.wall_gib_per_s_median, 7.0);
        assert!(md.contains("| blake3-keyed | mac | 10 | 0.0 | 4.25 | 3.00 | 5.00 | 0.47 | 2.00 |"));
        assert!(md.contains("| blake3-keyed | mac | 20 | 0.1 | 1.00 | 1.00 | 1.00 | – | 0.00 |"));
        assert!(md.contains("SHA extensions yes"), "{md}");
        assert!(md.contains("CLMUL no"), "{md}");
    }

    #[test]
    fn the_json_writer_round_trips() {
        let r = report();
        let dir = std::env::temp_dir().join(format!("ftvm-bench-mac-test-{}", std::process::id()));
        let png = dir.join("mac.png");
        crate::bench_cmd::write_results(&dir, "mac", &r, &markdown(&r), || Ok(png.clone()))
            .unwrap();
        let back: MacReport =
            serde_json::from_slice(&std::fs::read(dir.join("mac.json")).unwrap()).unwrap();
        assert_eq!(back, r);
        let md = std::fs::read_to_string(dir.join("mac.md")).unwrap();
        assert_eq!(md, markdown(&r));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
