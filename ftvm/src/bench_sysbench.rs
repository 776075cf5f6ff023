//! `ftvm bench e2e --workload sysbench`: the thesis's database workload. For each configuration
//! a fresh VM runs the database guest (its disk a fresh copy of the guest's disk.raw): first
//! unprotected (plain QEMU on the tap, no agents), then protected at each epoch length × transport
//! × capture × policy. sysbench prepares one small table, then runs `oltp_read_write` for
//! `--seconds`. What is reported:
//!
//! - transactions per second: sysbench's own figure over the timed run;
//! - transaction latency p50/p95/p99: computed from sysbench's `--histogram` (the bucket the
//!   percentile's transaction falls in; buckets are ~1.5% wide), with sysbench's own
//!   `95th percentile` line kept beside it as a cross-check;
//! - from the primary's metrics.jsonl, the incremental checkpoints acked during the timed run:
//!   pause p50/p99 (`pause_us`), send-updated-states time p50/mean (`send_us`), disk blocks per
//!   epoch (mean of `disk_blocks`) and the disk share of the send (`disk_us` p50), checkpoints
//!   per second and the VM idle rate (time paused / run time).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use ftvm_real::host::topology::{Host, Topology};

use crate::bench_e2e::{epoch_lines, E2eArgs};
use crate::db_workload::{self, Sysbench, SysbenchReport};
use crate::deploy::{self, DeployDisk, DeployOpts, Deployment, WitnessKind};
use crate::epoch_policy_args::EpochPolicyArgs;

/// Namespace prefix and subnet of the benchmark's hosts (those of the http benchmark: the two
/// never run at once).
const PREFIX: &str = "ftvmb";
const SUBNET: u8 = 60;

/// One configuration's figures.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SysRow {
    config: String,
    epoch_ms: Option<u64>,
    policy: Option<String>,
    transport: Option<String>,
    capture: Option<String>,
    threads: u32,
    seconds: u64,
    transactions: u64,
    tps: f64,
    resp_p50_ms: f64,
    resp_p95_ms: f64,
    resp_p99_ms: f64,
    /// sysbench's own `95th percentile` line.
    sysbench_p95_ms: f64,
    resp_max_ms: f64,
    /// Errors sysbench retried (deadlocks).
    errors: u64,
    pause_p50_us: u64,
    pause_p99_us: u64,
    send_p50_us: u64,
    send_mean_us: u64,
    disk_blocks_per_epoch: f64,
    disk_p50_us: u64,
    checkpoints_per_s: f64,
    idle_rate: f64,
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

impl SysRow {
    fn new(config: &str, threads: u32, seconds: u64, r: &SysbenchReport) -> SysRow {
        SysRow {
            config: config.into(),
            threads,
            seconds,
            transactions: r.transactions,
            tps: r.tps,
            resp_p50_ms: r.hist_p50_ms,
            resp_p95_ms: r.hist_p95_ms,
            resp_p99_ms: r.hist_p99_ms,
            sysbench_p95_ms: r.p95_ms,
            resp_max_ms: r.max_ms,
            errors: r.errors,
            ..SysRow::default()
        }
    }

    /// Fills in the checkpoints' figures from the primary's metrics lines of the run.
    fn epochs(&mut self, lines: &[serde_json::Value]) {
        let col = |k: &str| {
            let mut v: Vec<u64> = lines.iter().map(|l| u(&l[k])).collect();
            v.sort_unstable();
            v
        };
        let pct = ftvm_real::agent::metrics::percentile;
        let (pause, send, blocks, disk) = (
            col("pause_us"),
            col("send_us"),
            col("disk_blocks"),
            col("disk_us"),
        );
        let n = lines.len().max(1) as f64;
        let secs = self.seconds.max(1) as f64;
        self.pause_p50_us = pct(&pause, 50);
        self.pause_p99_us = pct(&pause, 99);
        self.send_p50_us = pct(&send, 50);
        self.send_mean_us = (send.iter().sum::<u64>() as f64 / n) as u64;
        self.disk_blocks_per_epoch = blocks.iter().sum::<u64>() as f64 / n;
        self.disk_p50_us = pct(&disk, 50);
        self.checkpoints_per_s = lines.len() as f64 / secs;
        self.idle_rate = pause.iter().sum::<u64>() as f64 / (secs * 1e6);
    }
}

/// Prepares and runs sysbench against the VM at `vm` from the client namespace `ns`.
fn sysbench(
    a: &E2eArgs,
    ns: String,
    vm: std::net::Ipv4Addr,
    work: &Path,
) -> anyhow::Result<SysbenchReport> {
    let sb = Sysbench {
        ns: ns.clone(),
        vm,
        tables: 1,
        table_size: a.db_table_size,
        threads: a.db_threads,
        seconds: a.seconds.ceil() as u64,
    };
    db_workload::wait_ready(&ns, vm, Duration::from_secs(60))?;
    sb.prepare()?;
    let out = work.join("sysbench.log");
    let r = db_workload::finish_sysbench(sb.start(&out)?, &out)?;
    if !r.ok {
        anyhow::bail!(
            "sysbench failed ({}); {}",
            r.status,
            deploy::last_words(&out)
        );
    }
    Ok(r)
}

/// Runs the sysbench benchmark.
pub fn run(a: &E2eArgs, policies: &[(String, EpochPolicyArgs)]) -> anyhow::Result<i32> {
    db_workload::check_tools()?;
    if a.db_threads == 0 || a.db_table_size == 0 {
        anyhow::bail!("--db-threads and --db-table-size must be positive");
    }
    let disk = DeployDisk {
        source: Some(db_workload::guest_disk(&a.guest_dir)?),
        bytes: 0,
        guest_write: None,
    };
    let ram_mb = a.ram_mb.unwrap_or(192);
    let seconds = a.seconds.ceil() as u64;
    let work = std::env::temp_dir().join("ftvm-bench-e2e");
    let mut rows = Vec::new();
    eprintln!("== unprotected");
    rows.push(baseline(a, &disk, ram_mb, &work).context("unprotected baseline")?);
    for &epoch in &a.epochs {
        for t in &a.transports {
            for c in &a.captures {
                for policy in policies {
                    let capture = (!c.is_empty()).then(|| c.clone());
                    eprintln!(
                        "== epoch {epoch} ms ({} policy), transport {t}, capture {c}",
                        policy.0
                    );
                    let opts = DeployOpts {
                        guest_dir: a.guest_dir.clone(),
                        work_dir: work.clone(),
                        ram_mb,
                        epoch_ms: epoch,
                        epoch_policy: policy.1.policy(),
                        dirty_pages: 0,
                        accel: a.accel.clone(),
                        transport: t.clone(),
                        capture: capture.clone(),
                        failure_timeout_ms: 1000,
                        prefix: PREFIX.into(),
                        subnet: SUBNET,
                        verify_every: None,
                        keep: false,
                        disk: Some(disk.clone()),
                        witness: WitnessKind::Ftvm,
                        mutant: None,
                    };
                    let mut d = Deployment::start(opts)?;
                    d.wait_protected(Duration::from_secs(180))?;
                    let metrics = d.primary_dir().join("metrics.jsonl");
                    let (ns, vm) = (d.topo.ns(Host::Client), d.topo.vm_addr());
                    // Checkpoints from before the timed run (boot, prepare) are left out: the
                    // metrics lines are counted once prepare is done.
                    db_workload::wait_ready(&ns, vm, Duration::from_secs(60))?;
                    let sb = Sysbench {
                        ns,
                        vm,
                        tables: 1,
                        table_size: a.db_table_size,
                        threads: a.db_threads,
                        seconds,
                    };
                    sb.prepare()?;
                    let seen = epoch_lines(&metrics).len();
                    let out = work.join("sysbench.log");
                    let r = db_workload::finish_sysbench(sb.start(&out)?, &out)?;
                    if !r.ok {
                        anyhow::bail!(
                            "sysbench failed ({}); {}",
                            r.status,
                            deploy::last_words(&out)
                        );
                    }
                    let lines = epoch_lines(&metrics);
                    let mut row = SysRow::new("protected", a.db_threads, seconds, &r);
                    row.epoch_ms = Some(epoch);
                    row.policy = Some(policy.0.clone());
                    row.transport = Some(t.clone());
                    row.capture = capture;
                    row.epochs(lines.get(seen..).unwrap_or_default());
                    rows.push(row);
                    drop(d);
                }
            }
        }
    }
    let name = if a.name == "e2e" {
        "e2e-sysbench".to_string()
    } else {
        a.name.clone()
    };
    crate::bench_cmd::write_results(&a.out, &name, &rows, &markdown(&rows), || {
        crate::plot::e2e_sysbench(&a.out, &name)
    })?;
    Ok(0)
}

/// The unprotected VM: plain QEMU (`ftvm vm`) on the tap with its own copy of the disk.
fn baseline(a: &E2eArgs, disk: &DeployDisk, ram_mb: u64, work: &Path) -> anyhow::Result<SysRow> {
    ftvm_real::secure_fs::fresh_private_dir(work).context("the work directory")?;
    disk.create(work, 1)?;
    let topo = Topology::create(PREFIX, SUBNET).context("creating the hosts")?;
    let mut vm = deploy::spawn_in(
        &topo,
        Host::Primary,
        "unprotected VM",
        &[
            "vm".into(),
            "--guest-dir".into(),
            a.guest_dir.display().to_string(),
            "--ram-mb".into(),
            ram_mb.to_string(),
            "--accel".into(),
            a.accel.clone(),
            "--vm-ip".into(),
            format!("{}/24", topo.vm_addr()),
            "--tap".into(),
            topo.tap_name().into(),
            "--state-dir".into(),
            work.join("vm").display().to_string(),
            "--disk".into(),
            DeployDisk::image(work, 1).display().to_string(),
        ],
        &work.join("vm.log"),
    )?;
    let log = work.join("vm.log");
    deploy::wait_until(
        "the unprotected VM to boot",
        Duration::from_secs(180),
        &mut [&mut vm],
        || std::fs::read_to_string(&log).is_ok_and(|s| s.contains("guest ready")),
    )?;
    let r = sysbench(a, topo.ns(Host::Client), topo.vm_addr(), work)?;
    Ok(SysRow::new(
        "unprotected",
        a.db_threads,
        a.seconds.ceil() as u64,
        &r,
    ))
}

fn markdown(rows: &[SysRow]) -> String {
    let mut s = String::from(
        "| config | policy | epoch ms | transport | capture | threads | tps | p50 ms | p95 ms | p99 ms | pause p50 µs | pause p99 µs | send p50 µs | send mean µs | disk blocks/epoch | disk p50 µs | checkpoints/s | VM idle rate |\n|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    for r in rows {
        let protected = r.epoch_ms.is_some();
        let e = |v: String| if protected { v } else { "-".into() };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.config,
            opt(&r.policy),
            r.epoch_ms.map(|e| e.to_string()).unwrap_or_else(|| "-".into()),
            opt(&r.transport),
            opt(&r.capture),
            r.threads,
            r.tps,
            r.resp_p50_ms,
            r.resp_p95_ms,
            r.resp_p99_ms,
            e(r.pause_p50_us.to_string()),
            e(r.pause_p99_us.to_string()),
            e(r.send_p50_us.to_string()),
            e(r.send_mean_us.to_string()),
            e(format!("{:.1}", r.disk_blocks_per_epoch)),
            e(r.disk_p50_us.to_string()),
            e(format!("{:.1}", r.checkpoints_per_s)),
            e(format!("{:.3}", r.idle_rate)),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_summarised_from_its_checkpoints() {
        let line = |pause: u64, send: u64, blocks: u64| serde_json::json!({"full": false, "pause_us": pause, "send_us": send, "disk_blocks": blocks, "disk_us": blocks * 10});
        let lines: Vec<_> = (1..=100).map(|i| line(i * 10, i, i % 4)).collect();
        let mut r = SysRow {
            seconds: 2,
            ..SysRow::default()
        };
        r.epochs(&lines);
        assert_eq!(r.pause_p50_us, 510);
        assert_eq!(r.send_p50_us, 51);
        assert_eq!(r.checkpoints_per_s, 50.0);
        // 0+1+2+3 per four epochs.
        assert_eq!(r.disk_blocks_per_epoch, 1.5);
        assert!((r.idle_rate - 0.02525).abs() < 1e-9, "{}", r.idle_rate);
        let md = markdown(&[r, SysRow::default()]);
        assert_eq!(md.lines().count(), 4, "{md}");
    }
}
