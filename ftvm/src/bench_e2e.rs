//! `ftvm bench e2e`: the thesis's figures end to end. For each configuration a fresh local
//! deployment protects the demo guest while the client drives it for a fixed time; the primary's
//! epoch metrics give the pause and send-updated-states times and the VM idle rate, the client
//! gives response times. An unprotected VM (straight on the tap) is the baseline, measured in the
//! same run so the ratios are fair.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use ftvm_real::host::topology::{Host, Topology};

use crate::deploy::{self, client_report, status, DeployOpts, Deployment};

/// Arguments of `ftvm bench e2e`.
#[derive(clap::Args)]
pub struct E2eArgs {
    /// Directory with the guest (`real/guest/build.sh` prints it).
    #[arg(long)]
    guest_dir: PathBuf,
    /// Output directory for `e2e.json` and `e2e.md`.
    #[arg(long, default_value = "docs/bench")]
    out: PathBuf,
    /// Epoch lengths in ms (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "10,25,50,100")]
    epochs: Vec<u64>,
    /// Guest dirtying rates in pages/s (comma separated; 0 = idle).
    #[arg(long, value_delimiter = ',', default_value = "0,5000")]
    dirty: Vec<u64>,
    /// Transports (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "copy,auto")]
    transports: Vec<String>,
    /// Capture modes (comma separated; empty: the agent's default).
    #[arg(long, value_delimiter = ',', default_value = "staged,paused-send")]
    captures: Vec<String>,
    /// Seconds of client load per configuration.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 128)]
    ram_mb: u64,
    /// QEMU accelerator.
    #[arg(long, default_value = "tcg")]
    accel: String,
}

#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    config: String,
    epoch_ms: Option<u64>,
    dirty_pages_per_s: u64,
    transport: Option<String>,
    capture: Option<String>,
    replies: u64,
    resp_mean_us: u64,
    resp_p50_us: u64,
    resp_p99_us: u64,
    pause_p50_us: u64,
    pause_p99_us: u64,
    send_mean_us: u64,
    send_p50_us: u64,
    send_p99_us: u64,
    idle_rate: f64,
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Runs the end-to-end benchmark.
pub fn run(a: E2eArgs) -> anyhow::Result<i32> {
    if a.seconds.is_nan() || a.seconds <= 0.0 || a.epochs.contains(&0) {
        anyhow::bail!("--seconds and every epoch must be positive");
    }
    let work = std::env::temp_dir().join("ftvm-bench-e2e");
    let mut rows = Vec::new();
    for &dirty in &a.dirty {
        eprintln!("== unprotected, dirty {dirty} pages/s");
        rows.push(baseline(&a, dirty, &work).context("unprotected baseline")?);
        for &epoch in &a.epochs {
            for t in &a.transports {
                for c in &a.captures {
                    let capture = (!c.is_empty()).then(|| c.clone());
                    eprintln!("== epoch {epoch} ms, dirty {dirty}, transport {t}, capture {c}");
                    let opts = DeployOpts {
                        guest_dir: a.guest_dir.clone(),
                        work_dir: work.clone(),
                        ram_mb: a.ram_mb,
                        epoch_ms: epoch,
                        dirty_pages: dirty,
                        accel: a.accel.clone(),
                        transport: t.clone(),
                        capture: capture.clone(),
                        failure_timeout_ms: 1000,
                        prefix: "ftvmb".into(),
                        subnet: 60,
                        verify_every: None,
                        keep: false,
                        mutant: None,
                    };
                    let mut d = Deployment::start(opts)?;
                    d.wait_protected(Duration::from_secs(180))?;
                    let out = work.join("client.json");
                    let mut client = d.client(a.seconds, &out)?;
                    client.child.wait().context("waiting for the client")?;
                    let r = client_report(&out);
                    let s = &status(&d.primary_dir())["summary"];
                    rows.push(Row {
                        config: "protected".into(),
                        epoch_ms: Some(epoch),
                        dirty_pages_per_s: dirty,
                        transport: Some(t.clone()),
                        capture: capture.clone(),
                        replies: u(&r["replies"]),
                        resp_mean_us: u(&r["mean_us"]),
                        resp_p50_us: u(&r["p50_us"]),
                        resp_p99_us: u(&r["p99_us"]),
                        pause_p50_us: u(&s["pause_p50_us"]),
                        pause_p99_us: u(&s["pause_p99_us"]),
                        send_mean_us: u(&s["send_mean_us"]),
                        send_p50_us: u(&s["send_p50_us"]),
                        send_p99_us: u(&s["send_p99_us"]),
                        idle_rate: s["idle_rate"].as_f64().unwrap_or(0.0),
                    });
                    drop(d);
                }
            }
        }
    }
    crate::bench_cmd::write_results(&a.out, "e2e", &rows, &markdown(&rows), || {
        crate::plot::e2e(&a.out)
    })?;
    Ok(0)
}

fn baseline(a: &E2eArgs, dirty: u64, work: &std::path::Path) -> anyhow::Result<Row> {
    ftvm_real::secure_fs::fresh_private_dir(work).context("the work directory")?;
    let topo = Topology::create("ftvmb", 60).context("creating the hosts")?;
    let mut vm = deploy::spawn_in(
        &topo,
        Host::Primary,
        "unprotected VM",
        &[
            "vm".into(),
            "--guest-dir".into(),
            a.guest_dir.display().to_string(),
            "--ram-mb".into(),
            a.ram_mb.to_string(),
            "--accel".into(),
            a.accel.clone(),
            "--vm-ip".into(),
            format!("{}/24", topo.vm_addr()),
            "--dirty-pages".into(),
            dirty.to_string(),
            "--tap".into(),
            topo.tap_name().into(),
            "--state-dir".into(),
            work.join("vm").display().to_string(),
        ],
        &work.join("vm.log"),
    )?;
    let log = work.join("vm.log");
    deploy::wait_until(
        "the unprotected VM to boot",
        Duration::from_secs(120),
        &mut [&mut vm],
        || std::fs::read_to_string(&log).is_ok_and(|s| s.contains("guest ready")),
    )?;
    let out = work.join("client.json");
    let mut client = deploy::spawn_in(
        &topo,
        Host::Client,
        "client",
        &[
            "client".into(),
            "--addr".into(),
            format!("{}:80", topo.vm_addr()),
            "--seconds".into(),
            a.seconds.to_string(),
        ],
        &out,
    )?;
    client.child.wait().context("waiting for the client")?;
    let r = client_report(&out);
    Ok(Row {
        config: "unprotected".into(),
        epoch_ms: None,
        dirty_pages_per_s: dirty,
        transport: None,
        capture: None,
        replies: u(&r["replies"]),
        resp_mean_us: u(&r["mean_us"]),
        resp_p50_us: u(&r["p50_us"]),
        resp_p99_us: u(&r["p99_us"]),
        pause_p50_us: 0,
        pause_p99_us: 0,
        send_mean_us: 0,
        send_p50_us: 0,
        send_p99_us: 0,
        idle_rate: 0.0,
    })
}

fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| config | epoch ms | dirty pages/s | transport | capture | replies | resp mean µs | resp p50 µs | resp p99 µs | pause p50 µs | pause p99 µs | send mean µs | send p99 µs | VM idle rate |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.3} |\n",
            r.config,
            r.epoch_ms
                .map(|e| e.to_string())
                .unwrap_or_else(|| "-".into()),
            r.dirty_pages_per_s,
            opt(&r.transport),
            opt(&r.capture),
            r.replies,
            r.resp_mean_us,
            r.resp_p50_us,
            r.resp_p99_us,
            r.pause_p50_us,
            r.pause_p99_us,
            r.send_mean_us,
            r.send_p99_us,
            r.idle_rate
        ));
    }
    s
}
