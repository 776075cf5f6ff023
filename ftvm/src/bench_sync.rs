//! `ftvm bench sync`: how long a backup takes to re-protect the primary after it lost its
//! replica (full sync) or kept it (catch-up), against QEMU's own live migration of the same
//! guest on the same machine (issue 12: full sync within 2× the migration).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use ftvm_model::{NodeId, VmId};

use crate::bench_sync_migrate::{self, MigrateOpts};
use crate::bench_sync_report::{CaseResult, RunFigures, SyncReport};
use crate::deploy::{self, client_report, DeployOpts, Deployment, WitnessKind};
use crate::reprotect::{self, Reprotection};

/// The cases (qemu-migrate first; the ftvm ones run in the order `--cases` gives them).
const CASES: [&str; 4] = [
    "qemu-migrate",
    "ftvm-link-cut",
    "ftvm-catch-up",
    "ftvm-full",
];

/// Arguments of `ftvm bench sync`.
#[derive(clap::Args)]
pub struct SyncArgs {
    /// Directory with the guest (`real/guest/build.sh` prints it).
    #[arg(long)]
    guest_dir: PathBuf,
    /// Output directory for `<name>.json` and `<name>.md`.
    #[arg(long, default_value = "docs/bench")]
    out: PathBuf,
    /// Name of the output files.
    #[arg(long, default_value = "sync")]
    name: String,
    /// Work directory for state, logs and metrics (recreated for each deployment).
    #[arg(long, default_value = "/var/tmp/ftvm-bench-sync")]
    work_dir: PathBuf,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 1024)]
    ram_mb: u64,
    /// Pages per second the guest rewrites (the demo's `--dirty-pages`).
    #[arg(long, default_value_t = 5000)]
    dirty_pages: u64,
    /// Capture modes of the ftvm cases (comma separated; one deployment each).
    #[arg(long, value_delimiter = ',', default_value = "staged,cow")]
    capture: Vec<String>,
    /// Cases (comma separated): qemu-migrate, ftvm-link-cut (a cut of the replication link,
    /// then catch-up), ftvm-catch-up (SIGKILL of the backup agent, restarted on its replica),
    /// ftvm-full (SIGKILL, restarted empty). The ftvm cases run in this order, each run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "qemu-migrate,ftvm-catch-up,ftvm-full"
    )]
    cases: Vec<String>,
    /// Runs per case (medians are reported, and each run).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// How long ftvm-link-cut cuts the link, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    cut_ms: u64,
    /// Seconds the client runs around each ftvm measurement (it must cover the re-protection).
    #[arg(long, default_value_t = 20.0)]
    window_s: f64,
    /// Epoch length in milliseconds.
    #[arg(long, default_value_t = 25)]
    epoch_ms: u64,
    /// QEMU accelerator.
    #[arg(long, default_value = "tcg")]
    accel: String,
    /// Checkpoint transport.
    #[arg(long, default_value = "copy")]
    transport: String,
    /// Silence after which a peer is presumed dead, in milliseconds.
    #[arg(long, default_value_t = 300)]
    failure_timeout_ms: u64,
    /// Namespace prefix.
    #[arg(long, default_value = "ftvmsb")]
    prefix: String,
    /// Subnet: the hosts get 10.77.<subnet>.0/24.
    #[arg(long, default_value_t = 7)]
    subnet: u8,
    /// Measure nothing: rewrite `<name>.md` from the `<name>.json` in `--out`.
    #[arg(long)]
    render_only: bool,
}

/// Seconds the client runs before the measured action.
const LEAD_IN: Duration = Duration::from_secs(1);

/// Runs the benchmark.
pub fn run(a: SyncArgs) -> anyhow::Result<i32> {
    if a.render_only {
        let json = a.out.join(format!("{}.json", a.name));
        let bytes = std::fs::read(&json).with_context(|| format!("reading {}", json.display()))?;
        let report: SyncReport = serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing {}", json.display()))?;
        write(&a, &report)?;
        return Ok(0);
    }
    if a.runs == 0 || a.ram_mb == 0 || a.window_s.is_nan() || a.window_s <= LEAD_IN.as_secs_f64() {
        bail!("--runs and --ram-mb must be positive, --window-s above 1");
    }
    if let Some(c) = a.cases.iter().find(|c| !CASES.contains(&c.as_str())) {
        bail!("unknown case {c:?} (cases: {})", CASES.join(", "));
    }
    let wants = |c: &str| a.cases.iter().any(|x| x == c);
    let mut cases = Vec::new();
    if wants("qemu-migrate") {
        let mut runs = Vec::new();
        for i in 0..a.runs {
            println!("== qemu-migrate run {}/{}", i + 1, a.runs);
            let r = bench_sync_migrate::run(&MigrateOpts {
                guest_dir: a.guest_dir.clone(),
                ram_mb: a.ram_mb,
                dirty_pages: a.dirty_pages,
                accel: a.accel.clone(),
                prefix: a.prefix.clone(),
                subnet: a.subnet,
                work_dir: a.work_dir.join("qemu-migrate"),
                warm_up: Duration::from_secs(2),
            })
            .context("qemu-migrate")?;
            println!(
                "   {:.0} ms (QEMU: total {:?} ms, downtime {:?} ms), {:.1} MiB",
                r.time_ms,
                r.qemu_total_ms,
                r.downtime_ms,
                r.bytes as f64 / f64::from(1u32 << 20)
            );
            runs.push(r);
        }
        cases.push(CaseResult::new("qemu-migrate", None, runs));
    }
    // In the order given: a link cut may end in a takeover, after which the deployment's
    // remaining runs are skipped, so a caller may want it last.
    let ftvm: Vec<&str> = a
        .cases
        .iter()
        .map(String::as_str)
        .filter(|c| *c != "qemu-migrate")
        .collect();
    let mut failed = Vec::new();
    if !ftvm.is_empty() {
        for capture in &a.capture {
            let (results, invariants_ok) = ftvm_cases(&a, capture, &ftvm)?;
            if !invariants_ok {
                failed.push(format!(
                    "{capture}: a measurement failed or the run broke an invariant (above)"
                ));
            }
            cases.extend(results);
        }
    }
    let report = SyncReport::new(
        a.ram_mb,
        a.dirty_pages,
        a.runs,
        bench_sync_migrate::settings(),
        cases,
    );
    for c in &report.cases {
        if c.median.client_lost.unwrap_or(0) > 0 {
            failed.push(format!(
                "{} ({}): the client lost replies",
                c.case,
                c.capture.as_deref().unwrap_or("-")
            ));
        }
    }
    write(&a, &report)?;
    for f in &failed {
        println!("== FAILED: {f}");
    }
    Ok(i32::from(!failed.is_empty()))
}

/// Writes `<name>.json` and `<name>.md` (no plot: the table says it all).
fn write(a: &SyncArgs, report: &SyncReport) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let json = a.out.join(format!("{}.json", a.name));
    std::fs::write(&json, serde_json::to_vec_pretty(report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let md = a.out.join(format!("{}.md", a.name));
    let table = report.to_markdown();
    std::fs::write(&md, &table).with_context(|| format!("writing {}", md.display()))?;
    println!("{table}");
    eprintln!("wrote {} and {}", json.display(), md.display());
    Ok(())
}

/// One deployment with `capture`: each run does each of `cases` in turn. Returns the cases'
/// results and whether the hosts' journals passed the invariant check.
fn ftvm_cases(
    a: &SyncArgs,
    capture: &str,
    cases: &[&str],
) -> anyhow::Result<(Vec<CaseResult>, bool)> {
    let w = a.work_dir.join(format!("ftvm-{capture}"));
    let opts = DeployOpts {
        guest_dir: a.guest_dir.clone(),
        work_dir: w.clone(),
        ram_mb: a.ram_mb,
        epoch_ms: a.epoch_ms,
        epoch_policy: ftvm_model::EpochPolicy::Fixed,
        dirty_pages: a.dirty_pages,
        accel: a.accel.clone(),
        transport: a.transport.clone(),
        capture: Some(capture.to_string()),
        failure_timeout_ms: a.failure_timeout_ms,
        prefix: a.prefix.clone(),
        subnet: a.subnet,
        verify_every: None,
        keep: false,
        disk: None,
        witness: WitnessKind::Ftvm,
        mutant: None,
    };
    println!("== ftvm, capture {capture}: booting and protecting the VM");
    let mut d = Deployment::start(opts)?;
    d.wait_protected(Duration::from_secs(300))?;
    let mut runs: Vec<Vec<RunFigures>> = vec![Vec::new(); cases.len()];
    // A failed measurement, or a takeover (the hosts swapped roles, and the cases kill the
    // backup host's agent), ends this deployment's runs; what was measured is kept.
    let mut stopped: Option<String> = None;
    let mut failed = false;
    'runs: for i in 0..a.runs {
        for (k, case) in cases.iter().enumerate() {
            println!("== {case} ({capture}) run {}/{}", i + 1, a.runs);
            let out = w.join(format!("client-{case}-{i}.json"));
            let log = w.join(format!("backup-{case}-{i}.log"));
            match measure(&mut d, a, case, &out, &log) {
                Ok(r) => {
                    let took_over = r.took_over;
                    runs[k].push(r);
                    if took_over {
                        stopped = Some(format!(
                            "the backup host took over in {case} run {}: later runs skipped",
                            i + 1
                        ));
                        break 'runs;
                    }
                }
                Err(e) => {
                    failed = true;
                    stopped = Some(format!("{case} run {} failed: {e:#}", i + 1));
                    break 'runs;
                }
            }
        }
    }
    if let Some(why) = &stopped {
        println!("== {why}");
    }
    d.stop_agents_replicas_first();
    let all: std::collections::BTreeSet<_> = ftvm_sim::Invariant::ALL.into_iter().collect();
    let check = crate::run_check::check_run(&w, &[1, 2], VmId(1), NodeId(1), &all)
        .context("checking the run's journals")?;
    for line in crate::run_check::verdict_lines("bench sync", &check) {
        println!("== {line}");
    }
    let results = cases
        .iter()
        .zip(runs)
        .map(|(c, r)| {
            let mut res = CaseResult::new(c, Some(capture), r);
            if res.runs.len() < a.runs {
                res.errors.extend(stopped.clone());
            }
            res
        })
        .collect();
    // A takeover is not a failure: the pair was protected again, by the other host.
    Ok((results, check.passed() && !failed))
}

/// One measurement: a client on the VM's service for `--window-s`, the case's action a second
/// in, then the client's longest pause between the restart (or repair) and protected.
fn measure(
    d: &mut Deployment,
    a: &SyncArgs,
    case: &str,
    out: &std::path::Path,
    log: &std::path::Path,
) -> anyhow::Result<RunFigures> {
    let mut client = d.client(a.window_s, out)?;
    std::thread::sleep(LEAD_IN);
    let r: Reprotection = match case {
        "ftvm-link-cut" => reprotect::cut_replication_link(d, Duration::from_millis(a.cut_ms))?,
        "ftvm-catch-up" => reprotect::kill_and_restart_backup(d, true, log)?,
        _ => reprotect::kill_and_restart_backup(d, false, log)?,
    };
    // A client that ended before protected did not see the whole re-protection.
    if client.child.try_wait()?.is_some() {
        bail!("the client stopped before the primary was protected again: raise --window-s");
    }
    let st = client.child.wait().context("waiting for the client")?;
    let report = client_report(out);
    if report.is_null() || !st.success() {
        bail!(
            "the client ({st}) failed or wrote no report; {}",
            deploy::last_words(out)
        );
    }
    let pauses: Vec<ftvm_real::client::Pause> =
        serde_json::from_value(report["pauses"].clone()).unwrap_or_default();
    let pause_us = ftvm_real::client::ClientReport::longest_pause_within(
        &pauses,
        r.from_unix_ms,
        r.to_unix_ms,
    )
    .map_or(0, |p| p.us);
    let lost = report["lost"].as_u64().unwrap_or(u64::MAX);
    println!(
        "   client: {} replies, {lost} lost, longest pause in the re-protection {:.0} ms",
        report["replies"],
        pause_us as f64 / 1e3
    );
    Ok(RunFigures {
        time_ms: r.ms,
        bytes: r.bytes,
        client_pause_ms: Some(pause_us as f64 / 1e3),
        client_lost: Some(lost),
        sync_kind: Some(r.kind),
        took_over: r.took_over,
        ..RunFigures::default()
    })
}
