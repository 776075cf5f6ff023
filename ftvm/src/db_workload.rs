//! The database workload (`ftvm demo --workload db`, `ftvm bench e2e --workload sysbench`):
//! sysbench's `oltp_read_write` against the database guest's MariaDB, and a commit checker that
//! records which of its INSERTs were acknowledged and later looks every one of them up again.
//!
//! Both run in the client's namespace through the host's own `sysbench` and `mariadb` client
//! (`real/host/install-deps.sh`). The checker drives the `mariadb` CLI over a pipe instead of
//! linking a MySQL client crate: the CLI is installed anyway for sysbench's sake, and a Rust
//! client (mysql, with its TLS and async stack) would add a minute of compile time to every
//! build of ftvm for what is a dozen lines of protocol here.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// MariaDB's port in the database guest.
pub const DB_PORT: u16 = 3306;
/// The database guest's user (real/guest/db/setup.sql).
pub const DB_USER: &str = "sbtest";
/// Its password (a fixed test credential of the guest image, not a secret).
pub const DB_PASSWORD: &str = "ftvm-sbtest";
/// The checker's table, as real/guest/boot-test-db.sh creates it (setup.sql creates only the
/// database, so the checker creates the table when it is missing).
const COMMITS_TABLE: &str = "CREATE TABLE IF NOT EXISTS commits (id BIGINT PRIMARY KEY, \
     at TIMESTAMP(6) DEFAULT CURRENT_TIMESTAMP(6)) ENGINE=InnoDB;";

/// The database guest's disk image in its guest directory.
pub fn guest_disk(guest_dir: &Path) -> anyhow::Result<PathBuf> {
    let disk = guest_dir.join("disk.raw");
    if !disk.is_file() {
        bail!(
            "{} has no disk.raw: the db workload needs the database guest \
             (dir=$(bash real/guest/build-db.sh | tail -n 1); --guest-dir \"$dir\")",
            guest_dir.display()
        );
    }
    Ok(disk)
}

/// Checks that the host has the workload's tools.
pub fn check_tools() -> anyhow::Result<()> {
    for tool in ["sysbench", "mariadb"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        if !found {
            bail!("{tool} is not installed (bash real/host/install-deps.sh)");
        }
    }
    Ok(())
}

/// `prog` run inside network namespace `ns`.
fn in_ns(ns: &str, prog: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, prog]);
    c
}

/// The `mariadb` CLI in namespace `ns`, logged in to the guest's database `db`. The password
/// goes through MYSQL_PWD, which the CLI reads, rather than onto its command line.
fn mariadb(ns: &str, vm: Ipv4Addr, db: &str) -> Command {
    let mut c = in_ns(ns, "mariadb");
    c.env("MYSQL_PWD", DB_PASSWORD)
        .args(["--batch", "--skip-column-names", "--skip-reconnect"])
        .args(["--connect-timeout", "5"])
        .args(["-h", &vm.to_string(), "-P", &DB_PORT.to_string()])
        .args(["-u", DB_USER, db]);
    c
}

/// Runs `sql` in database `db` on a fresh connection; its output.
fn query(ns: &str, vm: Ipv4Addr, db: &str, sql: &str) -> anyhow::Result<String> {
    let out = mariadb(ns, vm, db)
        .args(["-e", sql])
        .output()
        .context("running mariadb")?;
    if !out.status.success() {
        bail!(
            "mariadb -e {sql:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits until MariaDB in the VM answers a query (the guest reports ready once it does, but the
/// first connection after a boot can still be refused for a moment).
pub fn wait_ready(ns: &str, vm: Ipv4Addr, timeout: Duration) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        match query(ns, vm, "ftvm", "SELECT 1") {
            Ok(_) => return Ok(()),
            Err(e) if t0.elapsed() > timeout => {
                return Err(e.context(format!("MariaDB at {vm} did not answer in {timeout:?}")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// A sysbench `oltp_read_write` run.
#[derive(Debug, Clone)]
pub struct Sysbench {
    /// Client namespace.
    pub ns: String,
    /// The VM's address.
    pub vm: Ipv4Addr,
    /// Tables (`--tables`).
    pub tables: u32,
    /// Rows per table (`--table-size`); small, so that prepare is quick under TCG.
    pub table_size: u32,
    /// Client threads, each on its own connection.
    pub threads: u32,
    /// Length of the timed run in whole seconds (sysbench's `--time`).
    pub seconds: u64,
}

impl Sysbench {
    fn command(&self, phase: &str) -> Command {
        let mut c = in_ns(&self.ns, "sysbench");
        c.arg("oltp_read_write")
            .arg("--db-driver=mysql")
            .arg(format!("--mysql-host={}", self.vm))
            .arg(format!("--mysql-port={DB_PORT}"))
            .arg(format!("--mysql-user={DB_USER}"))
            .arg(format!("--mysql-password={DB_PASSWORD}"))
            .arg("--mysql-db=sbtest")
            .arg(format!("--tables={}", self.tables))
            .arg(format!("--table-size={}", self.table_size))
            .arg(format!("--threads={}", self.threads));
        if phase == "run" {
            // No --mysql-ignore-errors beyond sysbench's default (deadlocks and lock waits,
            // which it retries): a lost connection must end the run with an error.
            c.arg(format!("--time={}", self.seconds))
                .arg("--report-interval=1")
                .arg("--percentile=95")
                .arg("--histogram=on");
        }
        c.arg(phase);
        c
    }

    /// Creates and fills the tables.
    pub fn prepare(&self) -> anyhow::Result<()> {
        let out = self
            .command("prepare")
            .output()
            .context("running sysbench prepare")?;
        if !out.status.success() {
            bail!(
                "sysbench prepare failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Starts the timed run, its output (stdout and stderr) to `out`.
    pub fn start(&self, out: &Path) -> anyhow::Result<Child> {
        let f = ftvm_real::secure_fs::replace(out, ftvm_real::secure_fs::PRIVATE_FILE_MODE)
            .with_context(|| format!("creating {}", out.display()))?;
        self.command("run")
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .context("starting sysbench")
    }
}

/// What a sysbench run printed, and how it ended.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct SysbenchReport {
    /// It exited 0.
    pub ok: bool,
    /// Its exit status, as text.
    pub status: String,
    /// Transactions completed.
    pub transactions: u64,
    /// Transactions per second over the whole run (sysbench's own figure).
    pub tps: f64,
    /// Errors sysbench ignored and retried (deadlocks, lock wait timeouts; its defaults).
    pub errors: u64,
    /// Reconnects (sysbench reconnects only when told to ignore connection errors; it is not).
    pub reconnects: u64,
    /// Its `95th percentile` latency line (`--percentile=95`), ms.
    pub p95_ms: f64,
    /// Transaction latency percentiles from its `--histogram` (the bucket holding the
    /// percentile's transaction; sysbench's buckets are ~1.5% wide), ms.
    pub hist_p50_ms: f64,
    /// As above, 95th percentile.
    pub hist_p95_ms: f64,
    /// As above, 99th percentile.
    pub hist_p99_ms: f64,
    /// Largest latency, ms.
    pub max_ms: f64,
    /// Transactions per second in each 1 s report interval.
    pub interval_tps: Vec<f64>,
    /// The longest run of consecutive 1 s intervals with no transaction.
    pub longest_zero_tps_s: u32,
    /// Its FATAL / error lines, if any.
    pub error_lines: Vec<String>,
}

/// The first number in `s` (sysbench pads its figures with spaces and units).
fn first_number(s: &str) -> Option<f64> {
    let start = s.find(|c: char| c.is_ascii_digit())?;
    let rest = &s[start..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Parses a sysbench 1.0 `run` output.
pub fn parse_sysbench(text: &str) -> SysbenchReport {
    let mut r = SysbenchReport::default();
    let mut hist: Vec<(f64, u64)> = Vec::new();
    let mut in_hist = false;
    let mut zero_run = 0u32;
    for line in text.lines() {
        let t = line.trim();
        let after = |key: &str| t.strip_prefix(key).and_then(first_number);
        if t.starts_with("Latency histogram") {
            in_hist = true;
            continue;
        }
        if in_hist {
            // "   5.185 |****          12"
            if let Some((v, rest)) = t.split_once('|') {
                let count = rest.split_whitespace().last().and_then(|c| c.parse().ok());
                if let (Ok(v), Some(c)) = (v.trim().parse::<f64>(), count) {
                    hist.push((v, c));
                }
                continue;
            }
            if t.starts_with("value") {
                continue;
            }
            in_hist = false;
        }
        if t.starts_with('[') && t.contains(" tps: ") {
            let tps = t
                .split_once(" tps: ")
                .and_then(|(_, s)| first_number(s))
                .unwrap_or(0.0);
            r.interval_tps.push(tps);
            zero_run = if tps == 0.0 { zero_run + 1 } else { 0 };
            r.longest_zero_tps_s = r.longest_zero_tps_s.max(zero_run);
        } else if let Some(n) = after("transactions:") {
            r.transactions = n as u64;
            r.tps = t
                .split_once('(')
                .and_then(|(_, s)| first_number(s))
                .unwrap_or(0.0);
        } else if let Some(n) = after("ignored errors:") {
            r.errors = n as u64;
        } else if let Some(n) = after("reconnects:") {
            r.reconnects = n as u64;
        } else if let Some(n) = after("95th percentile:") {
            r.p95_ms = n;
        } else if let Some(n) = after("max:") {
            r.max_ms = n;
        } else if t.starts_with("FATAL") || (t.contains("error") && t.contains("mysql")) {
            r.error_lines.push(t.to_string());
        }
    }
    let pct = |p: u64| -> f64 {
        let total: u64 = hist.iter().map(|h| h.1).sum();
        if total == 0 {
            return 0.0;
        }
        // The smallest bucket with at least p% of the transactions at or below it.
        let want = (total * p).div_ceil(100).max(1);
        let mut seen = 0;
        for &(v, c) in &hist {
            seen += c;
            if seen >= want {
                return v;
            }
        }
        hist.last().map(|h| h.0).unwrap_or(0.0)
    };
    r.hist_p50_ms = pct(50);
    r.hist_p95_ms = pct(95);
    r.hist_p99_ms = pct(99);
    r
}

/// Waits for a started sysbench run and reads its report from `out`.
pub fn finish_sysbench(mut child: Child, out: &Path) -> anyhow::Result<SysbenchReport> {
    let st = child.wait().context("waiting for sysbench")?;
    let text =
        std::fs::read_to_string(out).with_context(|| format!("reading {}", out.display()))?;
    let mut r = parse_sysbench(&text);
    r.ok = st.success();
    r.status = st.to_string();
    Ok(r)
}

/// What the commit checker saw.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct CheckerReport {
    /// INSERTs sent.
    pub sent: u64,
    /// INSERTs whose OK came back (their ids).
    pub acked: u64,
    /// Acknowledged ids missing when read back after the run.
    pub lost: u64,
    /// The first few of those.
    pub lost_ids: Vec<u64>,
    /// Ids read back that were never acknowledged (sent, and committed, but the OK was not seen
    /// before the run ended; harmless).
    pub unacked_present: u64,
    /// TCP connections the checker used for its INSERTs (1: the connection survived).
    pub connections: u32,
    /// Longest wait for an acknowledgement (or between two), µs.
    pub longest_gap_us: u64,
    /// Why the checker stopped early, if it did.
    pub error: Option<String>,
}

/// How long the checker waits for one acknowledgement before it gives up: far beyond any
/// failover, so a hang is reported as such rather than waited out forever.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the commit checker until `until`: one `mariadb` process, so one connection, in batch
/// mode with autocommit; for each id `INSERT INTO commits (id) VALUES (id); SELECT id;` — the
/// echoed id arrives only after the INSERT's OK, so it is the commit's acknowledgement. Then
/// reads every id back over a fresh connection.
pub fn run_checker(ns: &str, vm: Ipv4Addr, until: Instant) -> CheckerReport {
    let mut r = CheckerReport::default();
    if let Err(e) = query(ns, vm, "ftvm", COMMITS_TABLE) {
        r.error = Some(format!("creating the commits table: {e:#}"));
        return r;
    }
    let mut acked: Vec<u64> = Vec::new();
    let mut child = match mariadb(ns, vm, "ftvm")
        .arg("--unbuffered")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            r.error = Some(format!("starting mariadb: {e}"));
            return r;
        }
    };
    r.connections = 1;
    let (Some(mut stdin), Some(stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        r.error = Some("mariadb's pipes are missing".into());
        return r;
    };
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut last = Instant::now();
    let mut id = 0u64;
    while Instant::now() < until {
        id += 1;
        if writeln!(
            stdin,
            "INSERT INTO commits (id) VALUES ({id}); SELECT {id};"
        )
        .is_err()
        {
            r.error = Some("mariadb stopped reading (its connection ended)".into());
            break;
        }
        let _ = stdin.flush();
        r.sent = id;
        match rx.recv_timeout(ACK_TIMEOUT) {
            Ok(line) if line.trim() == id.to_string() => {
                let now = Instant::now();
                r.longest_gap_us = r
                    .longest_gap_us
                    .max(now.duration_since(last).as_micros() as u64);
                last = now;
                acked.push(id);
            }
            Ok(line) => {
                r.error = Some(format!("expected the ack {id}, mariadb printed {line:?}"));
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                r.error = Some(format!("no acknowledgement of id {id} in {ACK_TIMEOUT:?}"));
                r.longest_gap_us = r.longest_gap_us.max(last.elapsed().as_micros() as u64);
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                r.error = Some("mariadb exited (its connection was lost)".into());
                break;
            }
        }
    }
    drop(stdin);
    if r.error.is_some() {
        let _ = child.kill();
    }
    let st = child.wait();
    let mut err_text = String::new();
    let _ = stderr.read_to_string(&mut err_text);
    let _ = reader.join();
    if r.error.is_none() && !st.as_ref().is_ok_and(|s| s.success()) {
        r.error = Some(format!("mariadb ended with {st:?}"));
    }
    if let (Some(e), false) = (&mut r.error, err_text.trim().is_empty()) {
        e.push_str(&format!("; mariadb said: {}", err_text.trim()));
    }
    r.acked = acked.len() as u64;
    match query(ns, vm, "ftvm", "SELECT id FROM commits") {
        Ok(out) => {
            let present: BTreeSet<u64> =
                out.lines().filter_map(|l| l.trim().parse().ok()).collect();
            let lost: Vec<u64> = acked
                .iter()
                .copied()
                .filter(|i| !present.contains(i))
                .collect();
            r.lost = lost.len() as u64;
            r.lost_ids = lost.into_iter().take(20).collect();
            let acked: BTreeSet<u64> = acked.into_iter().collect();
            r.unacked_present = present.difference(&acked).count() as u64;
        }
        Err(e) => {
            // Nothing can be verified: every acknowledged id counts as lost.
            r.lost = r.acked;
            let msg = format!("reading the ids back: {e:#}");
            r.error = Some(match r.error.take() {
                Some(prev) => format!("{prev}; {msg}"),
                None => msg,
            });
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "sysbench 1.0.20 (using system LuaJIT 2.1.0-beta3)

Running the test with following options:
Number of threads: 2
Report intermediate results every 1 second(s)

[ 1s ] thds: 2 tps: 9.99 qps: 199.80 (r/w/o: 139.86/39.96/19.98) lat (ms,95%): 227.40 err/s: 0.00 reconn/s: 0.00
[ 2s ] thds: 2 tps: 0.00 qps: 0.00 (r/w/o: 0.00/0.00/0.00) lat (ms,95%): 0.00 err/s: 0.00 reconn/s: 0.00
[ 3s ] thds: 2 tps: 0.00 qps: 0.00 (r/w/o: 0.00/0.00/0.00) lat (ms,95%): 0.00 err/s: 0.00 reconn/s: 0.00
[ 4s ] thds: 2 tps: 12.00 qps: 240.00 (r/w/o: 168.00/48.00/24.00) lat (ms,95%): 200.00 err/s: 0.00 reconn/s: 0.00
Latency histogram (values are in milliseconds)
       value  ------------- distribution ------------- count
      10.000 |****************************************  50
      20.000 |********************************          40
      90.000 |*******                                   9
    1500.000 |*                                         1

SQL statistics:
    queries performed:
        read:                            1400
        write:                           400
        other:                           200
        total:                           2000
    transactions:                        100    (9.95 per sec.)
    queries:                             2000   (199.00 per sec.)
    ignored errors:                      3      (0.00 per sec.)
    reconnects:                          0      (0.00 per sec.)

General statistics:
    total time:                          10.0479s

Latency (ms):
         min:                                    5.18
         avg:                                  100.46
         max:                                 1500.15
         95th percentile:                      200.47
         sum:                                10046.03
";

    #[test]
    fn a_sysbench_report_is_read_from_its_output() {
        let r = parse_sysbench(OUT);
        assert_eq!(r.transactions, 100);
        assert_eq!(r.tps, 9.95);
        assert_eq!(r.errors, 3);
        assert_eq!(r.reconnects, 0);
        assert_eq!(r.p95_ms, 200.47);
        assert_eq!(r.max_ms, 1500.15);
        assert_eq!(r.interval_tps, vec![9.99, 0.0, 0.0, 12.0]);
        assert_eq!(r.longest_zero_tps_s, 2);
        // 100 transactions: the 50th is in the first bucket, the 95th and 99th in the third.
        assert_eq!(
            (r.hist_p50_ms, r.hist_p95_ms, r.hist_p99_ms),
            (10.0, 90.0, 90.0)
        );
        assert!(r.error_lines.is_empty());
        let fatal = parse_sysbench("FATAL: mysql_drv_query() returned error 2013 (Lost connection to MySQL server during query)");
        assert_eq!(fatal.error_lines.len(), 1);
        assert_eq!(parse_sysbench("").hist_p99_ms, 0.0);
    }

    #[test]
    fn a_guest_without_a_disk_is_refused_with_a_pointer_to_the_db_guest() {
        let e = guest_disk(Path::new("/nonexistent-guest")).unwrap_err();
        assert!(format!("{e}").contains("build-db.sh"), "{e}");
    }
}
