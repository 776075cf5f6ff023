//! `ftvm demo`: the main job on one machine. Network namespaces stand in for hosts: a witness,
//! a primary and a backup protect the demo VM while a client drives its counter service; then the
//! primary host is killed (SIGKILL of its agent, which takes its QEMU with it) and the client's
//! figures show the service carrying on from the backup.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ftvm_real::host::topology::{Host, Topology};

/// Arguments of `ftvm demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Directory with the guest (`real/guest/build.sh` prints it).
    #[arg(long)]
    guest_dir: PathBuf,
    /// Work directory for state, logs and metrics (recreated).
    #[arg(long, default_value = "/var/tmp/ftvm-demo")]
    work_dir: PathBuf,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    ram_mb: u64,
    /// Epoch length in milliseconds.
    #[arg(long, default_value_t = 25)]
    epoch_ms: u64,
    /// Pages per second the guest rewrites besides serving requests.
    #[arg(long, default_value_t = 1000)]
    dirty_pages: u64,
    /// Seconds the client runs before the primary is killed.
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
    /// Record RAM digests every N epochs on both hosts and check they agree (see `ftvm primary
    /// --help`); costs a pass over guest RAM at those checkpoints.
    #[arg(long)]
    verify_every: Option<u64>,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    summary: Option<PathBuf>,
    /// Leave the namespaces and processes' state behind for inspection.
    #[arg(long)]
    keep: bool,
}

/// A child process that is killed when dropped.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_in(
    topo: &Topology,
    host: Host,
    name: &'static str,
    args: &[String],
    log: &Path,
) -> anyhow::Result<Proc> {
    let exe = std::env::current_exe().context("locating the ftvm binary")?;
    let log_file =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let child = Command::new("ip")
        .args(["netns", "exec", &topo.ns(host)])
        .arg(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting the {name}"))?;
    Ok(Proc { name, child })
}

fn status(dir: &Path) -> serde_json::Value {
    std::fs::read(dir.join("status.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

fn wait_until(
    what: &str,
    timeout: Duration,
    procs: &mut [&mut Proc],
    mut ok: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while !ok() {
        for p in procs.iter_mut() {
            if let Some(st) = p.child.try_wait()? {
                bail!(
                    "the {} exited ({st}) while waiting for {what}; see its log",
                    p.name
                );
            }
        }
        if t0.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Runs the demo; exits 0 when the client lost nothing and the backup took over.
pub fn run(args: Args) -> anyhow::Result<i32> {
    if !is_root() {
        bail!("the demo creates network namespaces and tap devices: run it as root");
    }
    let _ = std::fs::remove_dir_all(&args.work_dir);
    std::fs::create_dir_all(&args.work_dir)
        .with_context(|| format!("creating {}", args.work_dir.display()))?;
    let mut topo = Topology::create(&args.prefix, args.subnet).context("creating the hosts")?;
    if args.keep {
        topo.keep();
    }
    let w = &args.work_dir;
    let port = |h: Host| format!("{}:7000", topo.addr(h));
    let witness_addr = format!("{}:7100", topo.addr(Host::Switch));
    let vm_ip = format!("{}/24", topo.vm_addr());

    println!(
        "== ftvm demo: hosts primary={} backup={} witness={} client={}, VM {}",
        topo.addr(Host::Primary),
        topo.addr(Host::Backup),
        topo.addr(Host::Switch),
        topo.addr(Host::Client),
        topo.vm_addr()
    );
    let mut witness = spawn_in(
        &topo,
        Host::Switch,
        "witness",
        &[
            "witness".into(),
            "--listen".into(),
            witness_addr.clone(),
            "--state".into(),
            w.join("witness.json").display().to_string(),
            "--verbose".into(),
        ],
        &w.join("witness.log"),
    )?;
    let agent_args =
        |node: u32, host: Host, peer: Host, peer_node: u32, dir: &str| -> Vec<String> {
            let mut a = vec![
                "--node".into(),
                node.to_string(),
                "--listen".into(),
                port(host),
                "--peer".into(),
                format!("{peer_node}={}", port(peer)),
                "--witness".into(),
                witness_addr.clone(),
                "--guest-dir".into(),
                args.guest_dir.display().to_string(),
                "--ram-mb".into(),
                args.ram_mb.to_string(),
                "--accel".into(),
                args.accel.clone(),
                "--vm-ip".into(),
                vm_ip.clone(),
                "--dirty-pages".into(),
                args.dirty_pages.to_string(),
                "--state-dir".into(),
                w.join(dir).display().to_string(),
                "--tap".into(),
                topo.tap_name().into(),
                "--epoch-ms".into(),
                args.epoch_ms.to_string(),
                "--transport".into(),
                args.transport.clone(),
                "--failure-timeout-ms".into(),
                args.failure_timeout_ms.to_string(),
                "--verbose".into(),
            ];
            if let Some(k) = args.verify_every {
                a.push("--verify-every".into());
                a.push(k.to_string());
            }
            a
        };
    let mut bargs: Vec<String> = vec!["backup".to_string()];
    bargs.extend(agent_args(2, Host::Backup, Host::Primary, 1, "backup"));
    let mut backup = spawn_in(
        &topo,
        Host::Backup,
        "backup agent",
        &bargs,
        &w.join("backup.log"),
    )?;
    let mut pargs = vec!["primary".to_string()];
    pargs.extend(agent_args(1, Host::Primary, Host::Backup, 2, "primary"));
    let mut primary = spawn_in(
        &topo,
        Host::Primary,
        "primary agent",
        &pargs,
        &w.join("primary.log"),
    )?;

    println!(
        "== booting the VM on the primary and syncing the backup (TCG boot takes a few seconds)"
    );
    let pdir = w.join("primary");
    let bdir = w.join("backup");
    let t0 = Instant::now();
    wait_until(
        "the primary to be protected",
        Duration::from_secs(180),
        &mut [&mut witness, &mut backup, &mut primary],
        || status(&pdir)["phase"] == "protected",
    )?;
    println!("   protected after {:.1} s", t0.elapsed().as_secs_f64());

    let total = args.before_kill + args.after_kill;
    println!(
        "== client: GET /incr on one TCP connection for {total:.0} s; primary killed after {:.0} s",
        args.before_kill
    );
    let client_out = w.join("client.json");
    let mut client = spawn_in(
        &topo,
        Host::Client,
        "client",
        &[
            "client".into(),
            "--addr".into(),
            format!("{}:80", topo.vm_addr()),
            "--seconds".into(),
            total.to_string(),
        ],
        &client_out,
    )?;
    std::thread::sleep(Duration::from_secs_f64(args.before_kill));
    let before = status(&pdir);
    let killed_at = Instant::now();
    let mut takeover_ms = None;
    let mut reprotect_ms = None;
    match args.kill.as_str() {
        "primary" => {
            println!(
                "== kill -9 the primary agent (its QEMU dies with it); acked epochs so far: {}",
                before["acked"]
            );
            primary.child.kill().context("killing the primary")?;
            let _ = primary.child.wait();
            wait_until(
                "the backup to take over",
                Duration::from_secs(30),
                &mut [&mut witness, &mut backup],
                || status(&bdir)["failed_over"] == true,
            )?;
            let t = killed_at.elapsed().as_secs_f64() * 1e3;
            takeover_ms = Some(t);
            println!(
                "   backup runs the VM (generation {}) {t:.0} ms after the kill",
                status(&bdir)["generation"]
            );
        }
        "backup" => {
            println!(
                "== kill -9 the backup agent; acked epochs so far: {}",
                before["acked"]
            );
            backup.child.kill().context("killing the backup")?;
            let _ = backup.child.wait();
            wait_until(
                "the primary to run degraded",
                Duration::from_secs(30),
                &mut [&mut witness, &mut primary],
                || status(&pdir)["phase"] == "degraded",
            )?;
            println!(
                "   primary degraded after {:.0} ms; restarting the backup host",
                killed_at.elapsed().as_secs_f64() * 1e3
            );
            let _ = std::fs::remove_dir_all(&bdir);
            let mut rargs = bargs.clone();
            rargs.push("--rejoin".into());
            backup = spawn_in(
                &topo,
                Host::Backup,
                "backup agent",
                &rargs,
                &w.join("backup-restarted.log"),
            )?;
            let t1 = Instant::now();
            wait_until(
                "the restarted backup to re-protect the primary",
                Duration::from_secs(120),
                &mut [&mut witness, &mut backup, &mut primary],
                || status(&pdir)["phase"] == "protected",
            )?;
            let t = t1.elapsed().as_secs_f64() * 1e3;
            reprotect_ms = Some(t);
            println!("   re-protected {t:.0} ms after the restart (full sync, then epochs)");
        }
        other => bail!("--kill must be primary or backup, not {other:?}"),
    }
    let st = client.child.wait().context("waiting for the client")?;
    let report: serde_json::Value = std::fs::read_to_string(&client_out)
        .ok()
        .and_then(|s| s.lines().last().and_then(|l| serde_json::from_str(l).ok()))
        .unwrap_or(serde_json::Value::Null);
    println!("== client saw: {report}");
    let lost = report["lost"].as_u64().unwrap_or(u64::MAX);
    let replies = report["replies"].as_u64().unwrap_or(0);
    println!(
        "== result: {} replies, {} lost, {} TCP connection(s), longest pause seen by the client {:.0} ms",
        replies,
        lost,
        report["connections"],
        report["longest_gap_us"].as_f64().unwrap_or(0.0) / 1e3,
    );
    println!("   logs, metrics and status files: {}", w.display());
    let verified = match args.verify_every {
        Some(_) => Some(compare_digests(&pdir, &bdir)?),
        None => None,
    };
    if let Some(n) = verified {
        println!("== replica verified equal to the primary's RAM at {n} checkpoints");
    }
    let survivor = if args.kill == "primary" { &bdir } else { &pdir };
    let summary = serde_json::json!({
        "killed": args.kill,
        "verified_checkpoints": verified,
        "client": report,
        "takeover_ms": takeover_ms,
        "reprotect_ms": reprotect_ms,
        "backup_failover_us": status(&bdir)["failover_us"],
        "survivor": status(survivor),
        "primary_before_kill": before,
    });
    if let Some(path) = &args.summary {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !st.success() || lost != 0 || replies == 0 {
        return Ok(1);
    }
    Ok(0)
}

/// Compares the RAM digests both hosts recorded; returns how many checkpoints were compared.
fn compare_digests(pdir: &Path, bdir: &Path) -> anyhow::Result<usize> {
    let read = |dir: &Path| -> std::collections::BTreeMap<(u64, u64), u64> {
        std::fs::read_to_string(dir.join("replica/verify.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| {
                Some((
                    (v["generation"].as_u64()?, v["epoch"].as_u64()?),
                    v["digest"].as_u64()?,
                ))
            })
            .collect()
    };
    let (p, b) = (read(pdir), read(bdir));
    let mut n = 0;
    for (key, d) in &p {
        if let Some(bd) = b.get(key) {
            if bd != d {
                bail!(
                    "replica differs from the primary's RAM at generation {} epoch {}",
                    key.0,
                    key.1
                );
            }
            n += 1;
        }
    }
    Ok(n)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
