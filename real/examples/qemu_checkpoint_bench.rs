//! Measures device-state checkpoints and restores of a real QEMU (TCG) running the test guest.
//!
//! ```text
//! cargo run -p ftvm-real --release --example qemu_checkpoint_bench -- \
//!     [--guest-dir DIR] [--cycles N] [--restores N] [--ram-mib N] [--vmdesc] [--accel tcg|kvm]
//! ```
//! Without `--guest-dir` the guest is built with `real/guest/build.sh`.
//! Capture cycle (every 25 ms, like an epoch): `stop` → capture → `cont`; reports stop→completed,
//! the capture alone, and the whole pause. Restore: a fresh QEMU `-incoming defer` on a copy of
//! the RAM file taken at the checkpoint → load → `cont` → first HTTP reply from the guest.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ftvm_real::client::Connection;
use ftvm_real::qemu::{boot, BootOptions, GuestImage, NetBackend, NetConfig, Qemu, QemuConfig};

struct Args {
    guest_dir: Option<PathBuf>,
    cycles: usize,
    restores: usize,
    ram_mib: u64,
    vmdesc: bool,
    accel: String,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        guest_dir: None,
        cycles: 200,
        restores: 50,
        ram_mib: 256,
        vmdesc: false,
        accel: "tcg".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--guest-dir" => a.guest_dir = Some(val()?.into()),
            "--cycles" => a.cycles = val()?.parse().map_err(|e| format!("--cycles: {e}"))?,
            "--restores" => a.restores = val()?.parse().map_err(|e| format!("--restores: {e}"))?,
            "--ram-mib" => a.ram_mib = val()?.parse().map_err(|e| format!("--ram-mib: {e}"))?,
            "--accel" => a.accel = val()?,
            "--vmdesc" => a.vmdesc = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

/// Median and 99th percentile of durations, in milliseconds.
fn summary(name: &str, xs: &mut [Duration]) {
    if xs.is_empty() {
        return;
    }
    xs.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p = |q: f64| xs[((xs.len() as f64 * q) as usize).min(xs.len() - 1)];
    println!(
        "{name:<28} n={:<4} p50 {:>7.3} ms  p99 {:>7.3} ms  min {:>7.3}  max {:>7.3}",
        xs.len(),
        ms(p(0.5)),
        ms(p(0.99)),
        ms(xs[0]),
        ms(xs[xs.len() - 1])
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let guest = match &args.guest_dir {
        Some(d) => GuestImage::from_dir(d)?,
        None => {
            GuestImage::build(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("guest/build.sh"))
                .await?
        }
    };
    let dir = tempfile::tempdir()?;
    let ram = PathBuf::from(format!("/dev/shm/ftvm-bench-{}-ram", std::process::id()));
    let replica = PathBuf::from(format!(
        "/dev/shm/ftvm-bench-{}-replica",
        std::process::id()
    ));
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let mut cfg = QemuConfig::new(&guest.kernel, &ram, args.ram_mib << 20, dir.path());
    guest.apply(&mut cfg);
    cfg.accel = args.accel.parse()?;
    if args.vmdesc {
        cfg.machine_opts.clear();
    }
    cfg.net = Some(NetConfig {
        mac: "52:54:00:12:34:56".into(),
        backend: NetBackend::User {
            hostfwd: vec![format!("tcp:127.0.0.1:{port}-:80")],
        },
    });
    let result = run(&args, &cfg, &ram, &replica, addr, dir.path()).await;
    let _ = std::fs::remove_file(&ram);
    let _ = std::fs::remove_file(&replica);
    result
}

async fn run(
    args: &Args,
    cfg: &QemuConfig,
    ram: &PathBuf,
    replica: &PathBuf,
    addr: SocketAddr,
    dir: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let booted = boot(cfg, &BootOptions::default()).await?;
    println!(
        "boot: {:?} in {} tries; retries: {:?}",
        booted.boot_time, booted.tries, booted.retry_reasons
    );
    let mut qemu = booted.qemu;
    let mut conn = Connection::open(addr, Duration::from_secs(10)).await?;
    conn.get("/incr", Duration::from_secs(10)).await?;

    let (mut stop_to_done, mut capture, mut pause) = (Vec::new(), Vec::new(), Vec::new());
    let mut blob = Vec::new();
    for i in 0..args.cycles {
        tokio::time::sleep(Duration::from_millis(25)).await;
        let t0 = Instant::now();
        qemu.stop().await?;
        let t1 = Instant::now();
        blob = qemu.capture_device_state().await?;
        let t2 = Instant::now();
        if i + 1 == args.cycles {
            std::fs::copy(ram, replica)?;
        }
        let t3 = Instant::now();
        qemu.cont().await?;
        let t4 = Instant::now();
        stop_to_done.push(t2 - t0);
        capture.push(t2 - t1);
        pause.push((t4 - t3) + (t2 - t0));
    }
    let counter: u64 = conn
        .get("/get", Duration::from_secs(10))
        .await?
        .trim()
        .parse()?;
    drop(conn);
    qemu.kill().await?;
    println!(
        "blob: {} bytes (vmdesc {})",
        blob.len(),
        if args.vmdesc { "kept" } else { "suppressed" }
    );
    summary("stop -> capture completed", &mut stop_to_done);
    summary("capture only", &mut capture);
    summary("pause (stop..cont done)", &mut pause);

    let (mut spawn_t, mut load_t, mut cont_t, mut reply_t, mut total_t) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let work = PathBuf::from(format!("{}-work", replica.display()));
    for i in 0..args.restores {
        // Every restore starts from the checkpoint: the restored guest writes to its RAM file.
        std::fs::copy(replica, &work)?;
        let run = dir.join(format!("restore-{i}"));
        std::fs::create_dir_all(&run)?;
        let t0 = Instant::now();
        let mut q = Qemu::spawn_incoming(cfg.incoming(&work, &run)).await?;
        let t1 = Instant::now();
        q.load_device_state(&blob).await?;
        let t2 = Instant::now();
        q.cont().await?;
        let t3 = Instant::now();
        let mut c = Connection::open(addr, Duration::from_secs(10)).await?;
        let got: u64 = c
            .get("/get", Duration::from_secs(10))
            .await?
            .trim()
            .parse()?;
        let t4 = Instant::now();
        if got != counter {
            return Err(format!("restore {i}: counter {got}, checkpoint had {counter}").into());
        }
        drop(c);
        q.kill().await?;
        spawn_t.push(t1 - t0);
        load_t.push(t2 - t1);
        cont_t.push(t3 - t2);
        reply_t.push(t4 - t3);
        total_t.push(t4 - t0);
    }
    let _ = std::fs::remove_file(&work);
    summary("restore: spawn to QMP ready", &mut spawn_t);
    summary("restore: load device state", &mut load_t);
    summary("restore: cont", &mut cont_t);
    summary("restore: cont to 1st reply", &mut reply_t);
    summary("restore: spawn to 1st reply", &mut total_t);
    Ok(())
}
