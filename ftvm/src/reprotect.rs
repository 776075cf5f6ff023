//! Taking a deployment's backup away and timing how it re-protects the primary: a SIGKILL of
//! the backup agent and a restart (on its replica, or empty), or a cut of the replication link.
//! `ftvm demo --kill backup` and `ftvm bench sync` both go through here, so the figures they
//! print are measured the same way.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ftvm_real::host::topology::Host;

use crate::deploy::{self, status, wait_until, Deployment};

/// How long a re-protection may take before the run is given up.
pub const REPROTECT_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the primary's `last_sync` may take to name the sync after `protected`.
const LAST_SYNC_WAIT: Duration = Duration::from_secs(15);

/// One re-protection: from the moment the backup could come back (its agent restarted, or the
/// link repaired) to the primary's `protected`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Reprotection {
    /// The primary's `last_sync.kind`: `full` or `catch-up`.
    pub kind: String,
    /// Restart (or repair) to protected, milliseconds.
    pub ms: f64,
    /// Bytes of the sync checkpoint on the wire (the primary's `last_sync.bytes`).
    pub bytes: u64,
    /// Wall-clock window (Unix ms) the time covers, to find the client's pauses in it.
    pub from_unix_ms: u64,
    /// End of that window.
    pub to_unix_ms: u64,
    /// The backup host took over meanwhile and is protected by the other host now.
    pub took_over: bool,
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// SIGKILLs the backup agent, waits for the primary to run degraded, then restarts the agent
/// with `--rejoin`: on its state directory (`keep_replica`: it offers its committed replica and
/// is caught up) or on an emptied one with `--discard-replica` (a full sync). Its output goes
/// to `log`. Returns once the primary is protected again.
pub fn kill_and_restart_backup(
    d: &mut Deployment,
    keep_replica: bool,
    log: &Path,
) -> anyhow::Result<Reprotection> {
    let (pdir, bdir) = (d.primary_dir(), d.backup_dir());
    let killed_at = Instant::now();
    d.backup.child.kill().context("killing the backup")?;
    let _ = d.backup.child.wait();
    wait_until(
        "the primary to run degraded",
        Duration::from_secs(30),
        &mut d.watched(true, false),
        || status(&pdir)["phase"] == "degraded",
    )?;
    let mut rargs = d.backup_args.clone();
    rargs.push("--rejoin".into());
    if keep_replica {
        println!(
            "   primary lost its backup after {:.0} ms; restarting the backup agent on its \
             replica",
            killed_at.elapsed().as_secs_f64() * 1e3
        );
        // A new agent starts its metrics afresh: keep the old ones aside.
        let _ = std::fs::rename(
            bdir.join("metrics.jsonl"),
            bdir.join("metrics-before-restart.jsonl"),
        );
    } else {
        println!(
            "   primary degraded after {:.0} ms; restarting the backup host empty",
            killed_at.elapsed().as_secs_f64() * 1e3
        );
        let _ = std::fs::remove_dir_all(&bdir);
        rargs.push("--discard-replica".into());
    }
    d.backup = deploy::spawn_in(&d.topo, Host::Backup, "backup agent", &rargs, log)?;
    wait_reprotected(d, "the restarted backup to re-protect the primary")
}

/// Cuts the replication link between primary and backup (both still reach the witness) for
/// `cut`, repairs it, and returns once the primary is protected again, timed from the repair.
pub fn cut_replication_link(d: &mut Deployment, cut: Duration) -> anyhow::Result<Reprotection> {
    d.topo
        .set_pair_link(false)
        .context("cutting the replication link")?;
    std::thread::sleep(cut);
    // Re-protection is timed as the wait for `protected`: a cut the primary has not noticed
    // (still `protected` from before) would time nothing.
    let phase = status(&d.primary_dir())["phase"].clone();
    if phase == "protected" {
        let _ = d.topo.set_pair_link(true);
        bail!("the primary did not notice the {cut:?} cut of the replication link");
    }
    d.topo
        .set_pair_link(true)
        .context("repairing the replication link")?;
    println!(
        "   replication link cut for {:.1} s (primary {phase} at the repair)",
        cut.as_secs_f64()
    );
    wait_reprotected(d, "the backup to re-protect the primary after the link cut")
}

/// Waits (printing progress once a second) until a primary is protected by a backup whose
/// sync started after this call, and says what that sync was. The primary may be the other
/// host by then: a backup that reached the witness first during a link cut takes over (the
/// primary is deposed and rejoins as its backup), which [`Reprotection::took_over`] records.
fn wait_reprotected(d: &mut Deployment, what: &str) -> anyhow::Result<Reprotection> {
    let dirs = [d.primary_dir(), d.backup_dir()];
    let sync_of = |st: &serde_json::Value| {
        (
            st["node"].as_u64(),
            st["generation"].as_u64(),
            st["last_sync"]["epoch"].as_u64(),
        )
    };
    let before = sync_of(&status(&dirs[0]));
    let t1 = Instant::now();
    let from_unix_ms = unix_ms();
    let mut progress = SyncProgress::default();
    let mut protected_by = None;
    wait_until(what, REPROTECT_TIMEOUT, &mut d.watched(true, true), || {
        let sts = dirs.each_ref().map(|dir| status(dir));
        let primary = sts.iter().position(|st| st["role"] == "Primary");
        progress.show(&sts[primary.unwrap_or(0)], t1.elapsed());
        protected_by = primary.filter(|&i| sts[i]["phase"] == "protected");
        protected_by.is_some()
    })?;
    let ms = t1.elapsed().as_secs_f64() * 1e3;
    let to_unix_ms = unix_ms();
    let host = protected_by.unwrap_or(0);
    // The status file's `last_sync` can follow the phase by seconds (seen on a deployment's
    // first re-protection): it is waited for apart from the time measured.
    let _ = wait_until(
        "the primary to report its sync",
        LAST_SYNC_WAIT,
        &mut [],
        || sync_of(&status(&dirs[host])) != before,
    );
    let last = status(&dirs[host])["last_sync"].clone();
    let kind = last["kind"].as_str().unwrap_or("?").to_string();
    let bytes = last["bytes"].as_u64().unwrap_or(0);
    let took_over = host == 1;
    println!(
        "   re-protected {ms:.0} ms after the restart ({kind} sync of {:.1} MiB, then epochs){}",
        bytes as f64 / f64::from(1u32 << 20),
        if took_over {
            "; the backup host had taken over: it is the primary now"
        } else {
            ""
        }
    );
    Ok(Reprotection {
        kind,
        ms,
        bytes,
        from_unix_ms,
        to_unix_ms,
        took_over,
    })
}

/// One line a second on the terminal while a backup re-protects the primary: the primary's
/// phase, and the sync's bytes, rate and time left while it goes out (from its status file).
#[derive(Default)]
struct SyncProgress {
    shown: Option<Duration>,
}

impl SyncProgress {
    fn show(&mut self, st: &serde_json::Value, elapsed: Duration) {
        if self
            .shown
            .is_some_and(|t| elapsed < t + Duration::from_secs(1))
        {
            return;
        }
        self.shown = Some(elapsed);
        let what = deploy::sync_progress_line(&st["sync"]).unwrap_or_else(|| {
            match st["last_sync"]["kind"].as_str() {
                Some(kind) => format!("{kind} sync sent, backup catching up"),
                None => "no sync yet".into(),
            }
        });
        println!(
            "   {:>5.1} s  primary {}: {what}",
            elapsed.as_secs_f64(),
            st["phase"].as_str().unwrap_or("?"),
        );
    }
}
