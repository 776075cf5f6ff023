//! `ftvm bench e2e`: the thesis's figures end to end. For each configuration a fresh local
//! deployment protects the demo guest while clients drive it for a fixed time, once per client
//! count; the primary's epoch metrics written during that time give the pause, send and ack
//! times, the checkpoints per second and the VM idle rate, the clients give response times and
//! replies per second. An unprotected VM (straight on the tap) is the baseline, measured in the
//! same run so the ratios are fair.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use ftvm_real::host::topology::{Host, Topology};

use crate::deploy::{self, client_report, DeployOpts, Deployment, WitnessKind};
use crate::epoch_policy_args::EpochPolicyArgs;

/// Arguments of `ftvm bench e2e`.
#[derive(clap::Args)]
pub struct E2eArgs {
    /// Directory with the guest (`real/guest/build.sh` prints it).
    #[arg(long)]
    pub(crate) guest_dir: PathBuf,
    /// Output directory for `<name>.json`, `.md` and `.png`.
    #[arg(long, default_value = "docs/bench")]
    pub(crate) out: PathBuf,
    /// Name of the output files (`e2e-policy` for the epoch-policy comparison in the README).
    #[arg(long, default_value = "e2e")]
    pub(crate) name: String,
    /// Epoch policies (comma separated): `fixed`, `output` (the agent's default bounds) or
    /// `output:PCT` (the output policy with `--max-idle-pct PCT`), e.g. `fixed,output:25,output:50`
    /// for the trade-off between response time and VM idle rate.
    #[arg(long, value_delimiter = ',', default_value = "fixed")]
    pub(crate) policies: Vec<String>,
    /// Concurrent clients (comma separated), each on its own connection, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub(crate) clients: Vec<u32>,
    /// Epoch lengths in ms (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "10,25,50,100")]
    pub(crate) epochs: Vec<u64>,
    /// Guest dirtying rates in pages/s (comma separated; 0 = idle).
    #[arg(long, value_delimiter = ',', default_value = "0,5000")]
    pub(crate) dirty: Vec<u64>,
    /// Transports (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "copy,auto")]
    pub(crate) transports: Vec<String>,
    /// Capture modes (comma separated; empty: the agent's default).
    #[arg(long, value_delimiter = ',', default_value = "staged,paused-send")]
    pub(crate) captures: Vec<String>,
    /// Seconds of client load per configuration.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) seconds: f64,
    /// Guest RAM in MiB [default: 128, 192 with --workload sysbench].
    #[arg(long)]
    pub(crate) ram_mb: Option<u64>,
    /// What the clients run: `http` (the small guest's counter service, `--clients` of them) or
    /// `sysbench` (oltp_read_write against the database guest of `real/guest/build-db.sh`, its
    /// disk.raw the VM's disk; `--dirty` and `--clients` do not apply, output name
    /// `e2e-sysbench` unless `--name` is given).
    #[arg(long, default_value = "http", value_parser = ["http", "sysbench"])]
    pub(crate) workload: String,
    /// sysbench threads (`--workload sysbench`).
    #[arg(long, default_value_t = 2)]
    pub(crate) db_threads: u32,
    /// sysbench rows in its one table (`--workload sysbench`).
    #[arg(long, default_value_t = 1000)]
    pub(crate) db_table_size: u32,
    /// QEMU accelerator.
    #[arg(long, default_value = "tcg")]
    pub(crate) accel: String,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
struct Row {
    config: String,
    epoch_ms: Option<u64>,
    /// Epoch policy (`None`: unprotected).
    policy: Option<String>,
    clients: u32,
    replies_per_s: f64,
    dirty_pages_per_s: u64,
    transport: Option<String>,
    capture: Option<String>,
    replies: u64,
    resp_mean_us: u64,
    resp_p50_us: u64,
    resp_p99_us: u64,
    /// The primary's checkpoints during the client run (zero unprotected).
    #[serde(flatten)]
    epochs: Epochs,
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Runs the end-to-end benchmark.
pub fn run(a: E2eArgs) -> anyhow::Result<i32> {
    if a.seconds.is_nan() || a.seconds <= 0.0 || a.epochs.contains(&0) {
        anyhow::bail!("--seconds and every epoch must be positive");
    }
    if a.clients.is_empty() || a.clients.contains(&0) {
        anyhow::bail!("--clients must list positive client counts");
    }
    let policies = a
        .policies
        .iter()
        .map(|p| policy_spec(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if a.workload == "sysbench" {
        return crate::bench_sysbench::run(&a, &policies);
    }
    let ram_mb = a.ram_mb.unwrap_or(128);
    let work = std::env::temp_dir().join("ftvm-bench-e2e");
    let mut rows = Vec::new();
    for &dirty in &a.dirty {
        eprintln!("== unprotected, dirty {dirty} pages/s");
        rows.extend(baseline(&a, dirty, &work).context("unprotected baseline")?);
        for &epoch in &a.epochs {
            for t in &a.transports {
                for c in &a.captures {
                    for policy in &policies {
                        let capture = (!c.is_empty()).then(|| c.clone());
                        eprintln!(
                            "== epoch {epoch} ms ({} policy), dirty {dirty}, transport {t}, \
                             capture {c}",
                            policy.0
                        );
                        let opts = DeployOpts {
                            guest_dir: a.guest_dir.clone(),
                            work_dir: work.clone(),
                            ram_mb,
                            epoch_ms: epoch,
                            epoch_policy: policy.1.policy(),
                            dirty_pages: dirty,
                            accel: a.accel.clone(),
                            transport: t.clone(),
                            capture: capture.clone(),
                            failure_timeout_ms: 1000,
                            prefix: "ftvmb".into(),
                            subnet: 60,
                            verify_every: None,
                            keep: false,
                            disk: None,
                            witness: WitnessKind::Ftvm,
                            mutant: None,
                        };
                        let mut d = Deployment::start(opts)?;
                        d.wait_protected(Duration::from_secs(180))?;
                        let metrics = d.primary_dir().join("metrics.jsonl");
                        for &n in &a.clients {
                            let seen = epoch_lines(&metrics).len();
                            let out = work.join("client.json");
                            let mut client = d.clients(n, a.seconds, &out)?;
                            client.child.wait().context("waiting for the clients")?;
                            let r = client_report(&out);
                            let lines = epoch_lines(&metrics);
                            let e = Epochs::of(lines.get(seen..).unwrap_or_default(), a.seconds);
                            rows.push(Row {
                                config: "protected".into(),
                                epoch_ms: Some(epoch),
                                policy: Some(policy.0.clone()),
                                clients: n,
                                replies_per_s: u(&r["replies"]) as f64 / a.seconds,
                                dirty_pages_per_s: dirty,
                                transport: Some(t.clone()),
                                capture: capture.clone(),
                                replies: u(&r["replies"]),
                                resp_mean_us: u(&r["mean_us"]),
                                resp_p50_us: u(&r["p50_us"]),
                                resp_p99_us: u(&r["p99_us"]),
                                epochs: e,
                            });
                        }
                        drop(d);
                    }
                }
            }
        }
    }
    let name = a.name.clone();
    crate::bench_cmd::write_results(&a.out, &name, &rows, &markdown(&rows), || {
        crate::plot::e2e(&a.out, &name)
    })?;
    Ok(0)
}

/// A `--policies` entry: its label and the agent flags it stands for.
pub(crate) fn policy_spec(spec: &str) -> anyhow::Result<(String, EpochPolicyArgs)> {
    let (name, pct) = match spec.split_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (spec, None),
    };
    let mut args = EpochPolicyArgs {
        epoch_policy: name.to_string(),
        ..EpochPolicyArgs::default()
    };
    match (name, pct) {
        ("fixed", None) | ("output", None) => {}
        ("output", Some(p)) => {
            args.max_idle_pct = p
                .parse()
                .ok()
                .filter(|v| (1..=100).contains(v))
                .ok_or_else(|| anyhow::anyhow!("--policies {spec}: PCT must be 1 to 100"))?;
        }
        _ => anyhow::bail!("--policies: unknown epoch policy {spec:?} (fixed, output, output:PCT)"),
    }
    Ok((spec.to_string(), args))
}

/// The incremental checkpoints' lines of a primary's metrics file (acked epochs, in order).
pub(crate) fn epoch_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["full"].as_bool() == Some(false))
        .collect()
}

/// What the checkpoints acked during one client run cost.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
struct Epochs {
    pause_p50_us: u64,
    pause_p99_us: u64,
    send_mean_us: u64,
    send_p50_us: u64,
    send_p99_us: u64,
    ack_p50_us: u64,
    ack_p99_us: u64,
    checkpoints_per_s: f64,
    idle_rate: f64,
}

impl Epochs {
    fn of(lines: &[serde_json::Value], seconds: f64) -> Epochs {
        let col = |k: &str| {
            let mut v: Vec<u64> = lines.iter().map(|l| u(&l[k])).collect();
            v.sort_unstable();
            v
        };
        let pct = ftvm_real::agent::metrics::percentile;
        let (pause, send, ack) = (col("pause_us"), col("send_us"), col("ack_us"));
        Epochs {
            pause_p50_us: pct(&pause, 50),
            pause_p99_us: pct(&pause, 99),
            send_mean_us: send.iter().sum::<u64>() / (send.len().max(1) as u64),
            send_p50_us: pct(&send, 50),
            send_p99_us: pct(&send, 99),
            ack_p50_us: pct(&ack, 50),
            ack_p99_us: pct(&ack, 99),
            checkpoints_per_s: lines.len() as f64 / seconds,
            idle_rate: pause.iter().sum::<u64>() as f64 / (seconds * 1e6),
        }
    }
}

/// The unprotected VM, straight on the tap: one row per client count.
fn baseline(a: &E2eArgs, dirty: u64, work: &std::path::Path) -> anyhow::Result<Vec<Row>> {
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
            a.ram_mb.unwrap_or(128).to_string(),
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
    let mut rows = Vec::new();
    for &n in &a.clients {
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
                "--clients".into(),
                n.to_string(),
            ],
            &out,
        )?;
        client.child.wait().context("waiting for the clients")?;
        let r = client_report(&out);
        rows.push(Row {
            config: "unprotected".into(),
            epoch_ms: None,
            policy: None,
            clients: n,
            replies_per_s: u(&r["replies"]) as f64 / a.seconds,
            dirty_pages_per_s: dirty,
            transport: None,
            capture: None,
            replies: u(&r["replies"]),
            resp_mean_us: u(&r["mean_us"]),
            resp_p50_us: u(&r["p50_us"]),
            resp_p99_us: u(&r["p99_us"]),
            ..Row::default()
        });
    }
    Ok(rows)
}

fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| config | policy | epoch ms | clients | dirty pages/s | transport | capture | replies/s | resp p50 µs | resp p99 µs | pause p50 µs | pause p99 µs | send p50 µs | ack p50 µs | checkpoints/s | VM idle rate |\n|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {:.1} | {:.3} |\n",
            r.config,
            opt(&r.policy),
            r.epoch_ms
                .map(|e| e.to_string())
                .unwrap_or_else(|| "-".into()),
            r.clients,
            r.dirty_pages_per_s,
            opt(&r.transport),
            opt(&r.capture),
            r.replies_per_s,
            r.resp_p50_us,
            r.resp_p99_us,
            r.epochs.pause_p50_us,
            r.epochs.pause_p99_us,
            r.epochs.send_p50_us,
            r.epochs.ack_p50_us,
            r.epochs.checkpoints_per_s,
            r.epochs.idle_rate
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_run_is_summarised_from_its_own_epochs() {
        let line = |pause: u64, send: u64, ack: u64| serde_json::json!({"full": false, "pause_us": pause, "send_us": send, "ack_us": ack});
        let lines: Vec<_> = (1..=100).map(|i| line(i * 10, i, 1000 + i)).collect();
        let e = Epochs::of(&lines, 2.0);
        assert_eq!(e.pause_p50_us, 510);
        assert_eq!(e.pause_p99_us, 1000);
        assert_eq!(e.ack_p50_us, 1051);
        assert_eq!(e.checkpoints_per_s, 50.0);
        // 50,500 µs paused in 2 s.
        assert!((e.idle_rate - 0.02525).abs() < 1e-9, "{}", e.idle_rate);
        assert_eq!(Epochs::of(&[], 1.0), Epochs::default());
    }

    #[test]
    fn policy_specs_name_a_policy_and_its_idle_bound() {
        let (label, a) = policy_spec("output:50").unwrap();
        assert_eq!(
            (label.as_str(), a.epoch_policy.as_str(), a.max_idle_pct),
            ("output:50", "output", 50)
        );
        assert_eq!(policy_spec("fixed").unwrap().1, EpochPolicyArgs::default());
        for bad in ["eager", "output:0", "output:101", "output:x", "fixed:10"] {
            assert!(policy_spec(bad).is_err(), "{bad}");
        }
    }
}
