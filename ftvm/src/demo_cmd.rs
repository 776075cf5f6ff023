//! `ftvm demo`: the main job on one machine. Network namespaces stand in for hosts: a witness,
//! a primary and a backup protect the demo VM while a client drives its counter service; then a
//! host is killed (SIGKILL of its agent, which takes its QEMU with it) and the client's figures
//! show the service carrying on.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ftvm_model::{NodeId, VmId};
use ftvm_real::host::topology::Host;

use crate::db_workload;
use crate::deploy::{self, client_report, status, wait_until, DeployOpts, Deployment, WitnessKind};

/// Arguments of `ftvm demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Directory with the guest (`real/guest/build.sh` prints it).
    #[arg(long)]
    guest_dir: PathBuf,
    /// Work directory for state, logs and metrics (recreated).
    #[arg(long, default_value = "/var/tmp/ftvm-demo")]
    work_dir: PathBuf,
    /// What the client runs: `http` (the small guest's counter service over one connection) or
    /// `db` (sysbench oltp_read_write plus a commit checker against the database guest of
    /// `real/guest/build-db.sh`, whose disk.raw becomes the VM's disk).
    #[arg(long, default_value = "http", value_parser = ["http", "db"])]
    workload: String,
    /// Guest RAM in MiB [default: 256, 192 with --workload db].
    #[arg(long)]
    ram_mb: Option<u64>,
    /// Epoch length in milliseconds.
    #[arg(long, default_value_t = 25)]
    epoch_ms: u64,
    #[command(flatten)]
    epoch: crate::epoch_policy_args::EpochPolicyArgs,
    #[command(flatten)]
    disk: crate::disk_args::DiskArgs,
    /// Pages per second the guest rewrites besides serving requests [default: 1000, 0 with
    /// --workload db: the database guest has no dirtying workload].
    #[arg(long)]
    dirty_pages: Option<u64>,
    /// sysbench threads (--workload db), each on its own connection.
    #[arg(long, default_value_t = 2)]
    db_threads: u32,
    /// sysbench rows per table (--workload db; one table, small so that prepare is quick
    /// under TCG).
    #[arg(long, default_value_t = 1000)]
    db_table_size: u32,
    /// Seconds the client runs before the host is killed.
    #[arg(long, default_value_t = 8.0)]
    before_kill: f64,
    /// Seconds the client keeps running after the kill.
    #[arg(long, default_value_t = 8.0)]
    after_kill: f64,
    /// QEMU accelerator.
    #[arg(long, default_value = "tcg")]
    accel: String,
    /// Silence after which a peer is presumed dead, in milliseconds.
    #[arg(long, default_value_t = 300)]
    failure_timeout_ms: u64,
    /// Checkpoint transport.
    #[arg(long, default_value = "copy")]
    transport: String,
    /// Capture mode (agent default when absent).
    #[arg(long)]
    capture: Option<String>,
    /// The witness: `ftvm` (one `ftvm witness` process) or `etcd` (a 3-member etcd cluster on
    /// the witness host, which the agents use as the witness; needs Debian's etcd-server).
    #[arg(long, value_enum, default_value_t = WitnessKind::Ftvm)]
    witness: WitnessKind,
    /// Namespace prefix (keeps parallel runs apart).
    #[arg(long, default_value = "ftvmd")]
    prefix: String,
    /// Subnet: the hosts get 10.77.<subnet>.0/24.
    #[arg(long, default_value_t = 1)]
    subnet: u8,
    /// What to kill: `primary` (failover to the backup) or `backup` (the primary carries on
    /// degraded, then a restarted backup re-protects it).
    #[arg(long, default_value = "primary")]
    kill: String,
    /// With `--kill backup`: restart the backup agent on its state directory, so that it
    /// offers its committed replica and is caught up (otherwise its host comes back empty and
    /// is synced in full, with the VM's output flowing meanwhile).
    #[arg(long)]
    keep_replica: bool,
    /// Record RAM digests every N epochs on both hosts and check they agree (see `ftvm primary
    /// --help`); costs a pass over guest RAM at those checkpoints.
    #[arg(long)]
    verify_every: Option<u64>,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    summary: Option<PathBuf>,
    /// Leave the namespaces behind for inspection.
    #[arg(long)]
    keep: bool,
    /// Fail when the client waited longer than this for a reply, in milliseconds: an outage of
    /// seconds is a failure a user sees, even when nothing was lost.
    #[arg(long, default_value_t = 5000)]
    max_pause_ms: u64,
    /// Plant one of the model's protocol bugs in both agents (test builds with the `mutants`
    /// feature only), e.g. `release-before-ack`: the run's invariant check must catch it.
    #[cfg(feature = "mutants")]
    #[arg(long)]
    mutant: Option<String>,
}

/// The client side of a run, started before the kill and finished after it.
enum Running {
    /// The counter client.
    Http { client: deploy::Proc, out: PathBuf },
    /// sysbench and the commit checker.
    Db {
        sysbench: std::process::Child,
        out: PathBuf,
        checker: std::thread::JoinHandle<db_workload::CheckerReport>,
    },
}

/// What the client side saw: its JSON report, whether it passed, the longest wait it had and
/// the result line.
struct Seen {
    report: serde_json::Value,
    ok: bool,
    longest_gap_us: u64,
    line: String,
}

impl Running {
    fn finish(self) -> anyhow::Result<Seen> {
        match self {
            Running::Http { mut client, out } => {
                let st = client.child.wait().context("waiting for the client")?;
                let report = client_report(&out);
                if report.is_null() {
                    bail!(
                        "the client ({st}) wrote no report; {}",
                        deploy::last_words(&out)
                    );
                }
                // The pause list is for the figures below and the summary file, not the screen.
                let mut shown = report.clone();
                if let Some(o) = shown.as_object_mut() {
                    o.remove("pauses");
                }
                println!("== client saw: {shown}");
                let lost = report["lost"].as_u64().unwrap_or(u64::MAX);
                let replies = report["replies"].as_u64().unwrap_or(0);
                let longest_gap_us = report["longest_gap_us"].as_u64().unwrap_or(u64::MAX);
                Ok(Seen {
                    line: format!(
                        "{replies} replies, {lost} lost, {} TCP connection(s), longest pause seen by the client {:.0} ms",
                        report["connections"],
                        longest_gap_us as f64 / 1e3,
                    ),
                    ok: st.success() && lost == 0 && replies > 0,
                    longest_gap_us,
                    report,
                })
            }
            Running::Db {
                sysbench,
                out,
                checker,
            } => {
                let sb = db_workload::finish_sysbench(sysbench, &out)?;
                let ck = checker
                    .join()
                    .map_err(|_| anyhow::anyhow!("the commit checker panicked"))?;
                if !sb.ok {
                    println!(
                        "== sysbench failed ({}); {}",
                        sb.status,
                        deploy::last_words(&out)
                    );
                }
                if let Some(e) = &ck.error {
                    println!("== commit checker: {e}");
                }
                // The checker acknowledges every few ms; sysbench reports only per second.
                let longest_gap_us = ck
                    .longest_gap_us
                    .max(u64::from(sb.longest_zero_tps_s) * 1_000_000);
                let line = format!(
                    "sysbench {:.1} tps, p95 {:.1} ms, {} errors, {} reconnects ({}); commit \
                     checker {} acked ids, {} lost, {} connection(s); longest stall {:.0} ms",
                    sb.tps,
                    sb.p95_ms,
                    sb.errors,
                    sb.reconnects,
                    if sb.ok { "exit 0" } else { sb.status.as_str() },
                    ck.acked,
                    ck.lost,
                    ck.connections,
                    longest_gap_us as f64 / 1e3
                );
                // Ignored errors are sysbench's retried deadlocks, not failures; a lost
                // connection makes it exit non-zero (it is not told to ignore those).
                let ok = sb.ok
                    && sb.reconnects == 0
                    && sb.transactions > 0
                    && ck.error.is_none()
                    && ck.lost == 0
                    && ck.acked > 0
                    && ck.connections == 1;
                Ok(Seen {
                    report: serde_json::json!({ "sysbench": sb, "checker": ck }),
                    ok,
                    longest_gap_us,
                    line,
                })
            }
        }
    }
}

/// Runs the demo; exits 0 when the client lost nothing, never waited longer than
/// `--max-pause-ms`, and the survivor serves.
pub fn run(args: Args) -> anyhow::Result<i32> {
    if args.kill != "primary" && args.kill != "backup" {
        bail!("--kill must be primary or backup, not {:?}", args.kill);
    }
    if !(args.before_kill >= 0.0 && args.after_kill > 0.0) {
        bail!("--before-kill must be ≥ 0 and --after-kill > 0 seconds");
    }
    let db = args.workload == "db";
    let mut disk = args.disk.deploy_disk()?;
    if db {
        db_workload::check_tools()?;
        if args.db_threads == 0 || args.db_table_size == 0 {
            bail!("--db-threads and --db-table-size must be positive");
        }
        // The database lives on the guest's own disk image unless another one is given.
        if disk.is_none() {
            disk = Some(deploy::DeployDisk {
                source: Some(db_workload::guest_disk(&args.guest_dir)?),
                bytes: 0,
                guest_write: None,
            });
        }
    }
    let opts = DeployOpts {
        guest_dir: args.guest_dir.clone(),
        work_dir: args.work_dir.clone(),
        ram_mb: args.ram_mb.unwrap_or(if db { 192 } else { 256 }),
        epoch_ms: args.epoch_ms,
        epoch_policy: args.epoch.policy(),
        dirty_pages: args.dirty_pages.unwrap_or(if db { 0 } else { 1000 }),
        accel: args.accel.clone(),
        transport: args.transport.clone(),
        capture: args.capture.clone(),
        failure_timeout_ms: args.failure_timeout_ms,
        prefix: args.prefix.clone(),
        subnet: args.subnet,
        verify_every: args.verify_every,
        keep: args.keep,
        disk,
        witness: args.witness,
        #[cfg(feature = "mutants")]
        mutant: args.mutant.clone(),
        #[cfg(not(feature = "mutants"))]
        mutant: None,
    };
    let mut d = Deployment::start(opts)?;
    let topo = &d.topo;
    println!(
        "== ftvm demo: hosts primary={} backup={} witness={} client={}, VM {}",
        topo.addr(Host::Primary),
        topo.addr(Host::Backup),
        topo.addr(Host::Switch),
        topo.addr(Host::Client),
        topo.vm_addr()
    );
    if let Some(etcd) = &d.etcd {
        println!(
            "== the witness is a {}-member etcd cluster ({}); the VM's register was created in it",
            etcd.len(),
            etcd.url()
        );
    }
    println!(
        "== booting the VM on the primary and syncing the backup (a TCG boot takes a few seconds)"
    );
    let t0 = Instant::now();
    d.wait_protected(Duration::from_secs(180))?;
    println!("   protected after {:.1} s", t0.elapsed().as_secs_f64());
    let (ns, vm) = (d.topo.ns(Host::Client), d.topo.vm_addr());
    if db {
        // MariaDB answers a moment after the guest reports ready; waited for here so that the
        // isolation probe and prepare meet a server that is up.
        db_workload::wait_ready(&ns, vm, Duration::from_secs(60))?;
    }
    let service_port = if db { db_workload::DB_PORT } else { 80 };
    let isolation = d.check_isolation(service_port)?;
    println!("== from the client: the VM answers, no agent or witness port does: {isolation}");

    let (pdir, bdir, w) = (d.primary_dir(), d.backup_dir(), args.work_dir.clone());
    let total = args.before_kill + args.after_kill;
    let running = if db {
        let sb = db_workload::Sysbench {
            ns: ns.clone(),
            vm,
            tables: 1,
            table_size: args.db_table_size,
            threads: args.db_threads,
            seconds: total.ceil() as u64,
        };
        println!(
            "== sysbench prepare: 1 table of {} rows",
            args.db_table_size
        );
        let t = Instant::now();
        sb.prepare()?;
        println!("   prepared in {:.1} s", t.elapsed().as_secs_f64());
        println!(
            "== client: sysbench oltp_read_write ({} threads) and a commit checker on one \
             connection for {} s; {} killed after {:.0} s",
            args.db_threads, sb.seconds, args.kill, args.before_kill
        );
        let out = w.join("sysbench.log");
        let sysbench = sb.start(&out)?;
        let until = Instant::now() + Duration::from_secs_f64(total);
        let (cns, cvm) = (ns.clone(), vm);
        let checker = std::thread::spawn(move || db_workload::run_checker(&cns, cvm, until));
        Running::Db {
            sysbench,
            out,
            checker,
        }
    } else {
        println!(
            "== client: GET /incr on one TCP connection for {total:.0} s; {} killed after {:.0} s",
            args.kill, args.before_kill
        );
        let out = w.join("client.json");
        Running::Http {
            client: d.client(total, &out)?,
            out,
        }
    };
    std::thread::sleep(Duration::from_secs_f64(args.before_kill));
    let before = status(&pdir);
    // What is killed must be what the demo set up: a protected primary, its backup following.
    // A backup that took over on its own (the primary went silent for longer than the failure
    // timeout) would make the kill below look like a fast takeover that never happened.
    let backup_before = status(&bdir);
    if before["phase"] != "protected" || backup_before["failed_over"] == true {
        bail!(
            "the VM was not protected when the kill was due: primary {} in phase {}, backup {} \
             in phase {} (failed over: {}); see {}",
            before["role"],
            before["phase"],
            backup_before["role"],
            backup_before["phase"],
            backup_before["failed_over"],
            w.display()
        );
    }
    let killed_at = Instant::now();
    let mut takeover_ms = None;
    let mut reprotect_ms = None;
    // Wall-clock window (Unix ms) from the backup's restart to protected again.
    let mut reprotect_window = None;
    if args.kill == "primary" {
        println!(
            "== kill -9 the primary agent (its QEMU dies with it); acked epochs so far: {}",
            before["acked"]
        );
        d.primary.child.kill().context("killing the primary")?;
        let _ = d.primary.child.wait();
        wait_until(
            "the backup to take over",
            Duration::from_secs(30),
            &mut d.watched(false, true),
            || status(&bdir)["failed_over"] == true,
        )?;
        let t = killed_at.elapsed().as_secs_f64() * 1e3;
        takeover_ms = Some(t);
        println!(
            "   backup runs the VM (generation {}) {t:.0} ms after the kill",
            status(&bdir)["generation"]
        );
    } else {
        println!(
            "== kill -9 the backup agent; acked epochs so far: {}",
            before["acked"]
        );
        let r = crate::reprotect::kill_and_restart_backup(
            &mut d,
            args.keep_replica,
            &w.join("backup-restarted.log"),
        )?;
        reprotect_window = Some((r.from_unix_ms, r.to_unix_ms));
        reprotect_ms = Some(r.ms);
    }
    let seen = running.finish()?;
    let survivor = if args.kill == "primary" { &bdir } else { &pdir };
    let (survivor_status, backup_status) = (status(survivor), status(&bdir));
    // Read while both agents run: stopping the backup makes the primary drop it there.
    let register = match args.witness {
        WitnessKind::Etcd => {
            let r = crate::deploy_etcd::read_register(&d.topo, &deploy::etcd_dir(&w), VmId(1))?;
            println!(
                "== the register in etcd: generation {}, primary {}, backup {}",
                r.generation.0,
                r.primary.0,
                r.backup.map_or("none".into(), |b| format!(
                    "{} (synced at epoch {})",
                    b.node.0, b.since.0
                ))
            );
            Some(r)
        }
        WitnessKind::Ftvm => None,
    };
    // The journals are checked once the hosts have stopped, never as a live snapshot (see
    // `stop_agents_replicas_first`; seen after every `--kill backup` run of the database guest,
    // whose longer steps widen the window).
    d.stop_agents_replicas_first();
    // The hosts' journals through the simulator's invariant checkers.
    let all: std::collections::BTreeSet<_> = ftvm_sim::Invariant::ALL.into_iter().collect();
    let check = crate::run_check::check_run(&w, &[1, 2], VmId(1), NodeId(1), &all)
        .context("checking the run's journals")?;
    for line in crate::run_check::verdict_lines("demo", &check) {
        println!("== {line}");
    }
    println!("== result: {}", seen.line);
    let reprotect_pause_us = reprotect_window.map(|(from, to)| {
        let pauses: Vec<ftvm_real::client::Pause> =
            serde_json::from_value(seen.report["pauses"].clone()).unwrap_or_default();
        ftvm_real::client::ClientReport::longest_pause_within(&pauses, from, to).map_or(0, |p| p.us)
    });
    if let Some(us) = reprotect_pause_us {
        println!(
            "   longest client pause from the backup's restart to protected: {:.0} ms \
             (pauses under {} ms are not listed)",
            us as f64 / 1e3,
            ftvm_real::client::PAUSE_REPORTED.as_millis()
        );
    }
    let verified = match args.verify_every {
        Some(_) => Some(deploy::compare_digests(&pdir, &bdir)?),
        None => None,
    };
    if let Some(n) = verified {
        println!(
            "== replica verified equal to the primary's RAM at {} checkpoints, its disk at {}",
            n.ram, n.disk
        );
    }
    println!("   logs, metrics and status files: {}", w.display());
    let summary = serde_json::json!({
        "workload": args.workload,
        "killed": args.kill,
        "verified_checkpoints": verified.map(|n| n.ram),
        "verified_disk_checkpoints": verified.map(|n| n.disk),
        "client": seen.report,
        "longest_gap_us": seen.longest_gap_us,
        "takeover_ms": takeover_ms,
        "reprotect_ms": reprotect_ms,
        "reprotect_pause_us": reprotect_pause_us,
        "backup_failover_us": backup_status["failover_us"],
        "survivor": survivor_status,
        "primary_before_kill": before,
        "isolation": isolation,
        "witness": args.witness,
        "etcd_register": register,
        "invariants": { "passed": check.passed(), "findings": check.findings() },
    });
    if let Some(path) = &args.summary {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let longest_ms = seen.longest_gap_us / 1000;
    if longest_ms > args.max_pause_ms {
        println!(
            "== FAILED: the client waited {longest_ms} ms for a reply (more than --max-pause-ms {})",
            args.max_pause_ms
        );
        return Ok(1);
    }
    if !check.passed() {
        println!("== FAILED: the run broke an invariant (above)");
        return Ok(1);
    }
    if !seen.ok {
        println!("== FAILED: the client lost state, a connection or its run (above)");
        return Ok(1);
    }
    Ok(0)
}
