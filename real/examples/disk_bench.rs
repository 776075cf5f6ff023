//! Measures the agent's NBD disk against QEMU opening the same kind of raw file itself, and the
//! checkpoint-side cost of collecting dirty blocks.
//!
//! ```text
//! cargo run -p ftvm-real --release --example disk_bench -- \
//!     [--guest-dir DIR] [--reps N] [--seconds S] [--capture-blocks N]
//! ```
//! Without `--guest-dir` the guest is built with `real/guest/build.sh`.
//!
//! Guest side (TCG, one vCPU): the guest's `ftvm-diskwriter -r max` writes 4 KiB blocks
//! sequentially with O_DIRECT over its 64 MiB disk; the rate it prints each second is averaged
//! over `--seconds` (first line dropped). Backends alternate, `--reps` times each:
//! `nbd` (QEMU's NBD client → `DiskServer`) and `file` (`-blockdev driver=file`).
//! Capture: `--capture-blocks` scattered blocks of a 1 GiB image written through the server,
//! then `take_dirty()` + `read_blocks()` timed. One JSON object per line on stdout.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ftvm_real::disk::nbd::NbdClient;
use ftvm_real::disk::{DiskImage, DiskServer, DiskServerConfig, BLOCK_SIZE};
use ftvm_real::qemu::{boot, BootOptions, DiskConfig, GuestImage, QemuConfig};

const RAM: u64 = 256 << 20;
const DISK: u64 = 64 << 20;

struct Args {
    guest_dir: Option<PathBuf>,
    reps: usize,
    seconds: u64,
    capture_blocks: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        guest_dir: None,
        reps: 3,
        seconds: 8,
        capture_blocks: 10_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--guest-dir" => a.guest_dir = Some(value()?.into()),
            "--reps" => a.reps = value()?.parse().map_err(|e| format!("--reps: {e}"))?,
            "--seconds" => a.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--capture-blocks" => {
                a.capture_blocks = value()?
                    .parse()
                    .map_err(|e| format!("--capture-blocks: {e}"))?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

/// Mean of the rates (B/s) the guest's writer printed, dropping the first (start-up) line.
fn guest_rates(serial: &str) -> Vec<f64> {
    serial
        .lines()
        .filter_map(|l| l.split("rate ").nth(1))
        .filter_map(|r| r.trim_end_matches(" B/s").trim().parse::<f64>().ok())
        .skip(1)
        .collect()
}

async fn guest_run(guest: &GuestImage, nbd: bool, seconds: u64) -> serde_json::Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let ram = PathBuf::from(format!("/dev/shm/ftvm-disk-bench-{}", std::process::id()));
    let image = dir.path().join("disk.img");
    let mut cfg = QemuConfig::new(&guest.kernel, &ram, RAM, dir.path());
    guest.apply(&mut cfg);
    cfg.append.push_str(" ftvm.diskwrite=max");
    let server = if nbd {
        let socket = dir.path().join("disk.sock");
        let s = DiskServer::start(
            DiskImage::create(&image, DISK).expect("image"),
            &socket,
            DiskServerConfig::new("vda"),
        )
        .expect("server");
        cfg.disk = Some(DiskConfig {
            socket,
            export: "vda".into(),
        });
        Some(s)
    } else {
        drop(DiskImage::create(&image, DISK).expect("image"));
        cfg.extra_args = vec![
            "-blockdev".into(),
            format!(
                "driver=file,filename={},node-name=disk0,cache.direct=off,cache.no-flush=off",
                image.display()
            ),
            "-device".into(),
            "virtio-blk-device,drive=disk0".into(),
        ];
        None
    };
    let booted = boot(&cfg, &BootOptions::default()).await.expect("boot");
    let mut qemu = booted.qemu;
    let mut serial = qemu.serial();
    serial
        .wait_for("ftvm-diskwriter: writing", Duration::from_secs(30))
        .await
        .expect("writer starts");
    let w0 = server.as_ref().map(|s| s.stats().writes);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let host_iops = server
        .as_ref()
        .zip(w0)
        .map(|(s, w0)| (s.stats().writes - w0) as f64 / t0.elapsed().as_secs_f64());
    let rates = guest_rates(&serial.read_all().expect("serial"));
    qemu.kill().await.expect("kill");
    let _ = std::fs::remove_file(&ram);
    let mean = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
    serde_json::json!({
        "bench": "guest_seq_4k_odirect_write",
        "backend": if nbd { "nbd" } else { "file" },
        "seconds": seconds,
        "guest_mib_per_s": mean / (1 << 20) as f64,
        "guest_iops": mean / BLOCK_SIZE as f64,
        "server_writes_per_s": host_iops,
        "samples": rates.len(),
    })
}

fn capture_run(dir: &Path, blocks: u64, reps: usize) -> serde_json::Value {
    let image_blocks: u64 = (1 << 30) / BLOCK_SIZE;
    let server = DiskServer::start(
        DiskImage::create(dir.join("capture.img"), image_blocks * BLOCK_SIZE).expect("image"),
        dir.join("capture.sock"),
        DiskServerConfig::new("vda"),
    )
    .expect("server");
    let mut client = NbdClient::connect(server.socket(), "vda").expect("connect");
    let mut take_us = Vec::new();
    let mut read_us = Vec::new();
    let mut write_us_per_block = Vec::new();
    let mut out = Vec::new();
    let block = vec![0xa5u8; BLOCK_SIZE as usize];
    for rep in 0..reps as u64 {
        // Scattered: a stride coprime with the image size, shifted every rep.
        let t = Instant::now();
        for i in 0..blocks {
            let index = (rep * 7919 + i * 104_729) % image_blocks;
            client.write(index * BLOCK_SIZE, &block).expect("write");
        }
        write_us_per_block.push(t.elapsed().as_secs_f64() * 1e6 / blocks as f64);
        let t = Instant::now();
        let dirty = server.take_dirty();
        take_us.push(t.elapsed().as_secs_f64() * 1e6);
        assert_eq!(dirty.len() as u64, blocks);
        out.clear();
        let t = Instant::now();
        server.read_blocks(&dirty, &mut out).expect("read");
        read_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    serde_json::json!({
        "bench": "capture_scattered_dirty_blocks",
        "image_gib": 1,
        "blocks": blocks,
        "reps": reps,
        "take_dirty_us_median": median(&mut take_us),
        "read_blocks_us_median": median(&mut read_us),
        "read_blocks_mib_per_s": blocks as f64 * BLOCK_SIZE as f64 / (1 << 20) as f64
            / (read_us[read_us.len() / 2] / 1e6),
        "host_client_write_us_per_4k_block_median": median(&mut write_us_per_block),
    })
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("disk_bench: {e}");
            std::process::exit(2);
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    println!("{}", capture_run(dir.path(), args.capture_blocks, 5));
    let guest = match &args.guest_dir {
        Some(d) => GuestImage::from_dir(d).expect("guest dir"),
        None => GuestImage::build(Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build.sh"))
            .await
            .expect("building the guest"),
    };
    for _ in 0..args.reps {
        for nbd in [true, false] {
            println!("{}", guest_run(&guest, nbd, args.seconds).await);
        }
    }
}
