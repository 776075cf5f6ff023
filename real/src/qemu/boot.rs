//! Booting a guest until it says it is ready, with retries.
//!
//! TCG boots of the Debian cloud kernel hang in a fraction of tries on a loaded host (seen here:
//! the kernel's PIT-based TSC calibration fails and it then waits forever for a timer tick).
//! A boot that does not print the ready marker in time is killed and retried, and each retry's
//! reason is logged and returned — never masked.

use std::time::{Duration, Instant};

use super::config::QemuConfig;
use super::error::{QemuError, Result};
use super::process::Qemu;

/// The line the project's guest prints on its serial console once its service is up.
pub const GUEST_READY_MARKER: &str = "FTVM-GUEST-READY";

/// How to decide a boot worked.
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// Text that must appear on the serial console.
    pub ready_marker: String,
    /// Time allowed per try, from spawn to marker.
    pub timeout: Duration,
    /// Tries before giving up (at least 1).
    pub max_tries: u32,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            ready_marker: GUEST_READY_MARKER.into(),
            timeout: Duration::from_secs(30),
            max_tries: 5,
        }
    }
}

/// A guest that booted.
#[derive(Debug)]
pub struct Booted {
    /// The QEMU running it (VM running).
    pub qemu: Qemu,
    /// Tries it took (1 = first try).
    pub tries: u32,
    /// Why each failed try failed, in order.
    pub retry_reasons: Vec<String>,
    /// Spawn-to-marker time of the successful try.
    pub boot_time: Duration,
}

/// Starts QEMU and waits for the ready marker, retrying hung or failed boots.
/// Configuration errors (missing binary, kernel, bad RAM size) are not retried.
pub async fn boot(config: &QemuConfig, opts: &BootOptions) -> Result<Booted> {
    config.validate()?;
    let max_tries = opts.max_tries.max(1);
    let mut retry_reasons = Vec::new();
    for attempt in 1..=max_tries {
        match try_boot(config, opts).await {
            Ok((qemu, boot_time)) => {
                if attempt > 1 {
                    tracing::info!(attempt, ?boot_time, "guest booted after retries");
                }
                return Ok(Booted {
                    qemu,
                    tries: attempt,
                    retry_reasons,
                    boot_time,
                });
            }
            Err(reason) if attempt < max_tries => {
                tracing::warn!(attempt, max_tries, %reason, "guest boot failed; retrying");
                retry_reasons.push(reason);
            }
            Err(reason) => {
                tracing::error!(attempt, max_tries, %reason, "guest boot failed; giving up");
                retry_reasons.push(reason);
            }
        }
    }
    Err(QemuError::BootFailed {
        tries: max_tries,
        last_reason: retry_reasons.pop().unwrap_or_default(),
    })
}

/// One try; on failure QEMU is killed and the reason returned as text.
async fn try_boot(
    config: &QemuConfig,
    opts: &BootOptions,
) -> std::result::Result<(Qemu, Duration), String> {
    // A fresh log, so the marker cannot come from an earlier try, and fresh RAM: a boot never
    // starts over an old RAM file (or anything planted at its path).
    for (what, path) in [
        ("serial log", &config.serial_log),
        ("RAM file", &config.ram_file),
    ] {
        crate::secure_fs::remove_stale(path).map_err(|e| format!("remove old {what}: {e}"))?;
    }
    let start = Instant::now();
    let mut qemu = Qemu::spawn(config.clone())
        .await
        .map_err(|e| format!("start: {e}"))?;
    let mut serial = qemu.serial();
    let mut exit = qemu.exit_watch();
    let waited = tokio::select! {
        r = serial.wait_for(&opts.ready_marker, opts.timeout) => r,
        _ = exit.ended() => Err(qemu.check_alive().err().unwrap_or(QemuError::QmpClosed)),
    };
    match waited {
        Ok(()) => Ok((qemu, start.elapsed())),
        Err(e) => {
            let reason = match e {
                QemuError::Timeout { after, .. } => format!(
                    "no {:?} within {after:?}; last serial line: {:?}",
                    opts.ready_marker,
                    serial.last_line()
                ),
                other => other.to_string(),
            };
            if let Err(e) = qemu.kill().await {
                tracing::error!(
                    pid = qemu.pid(),
                    error = %e,
                    "killing the QEMU of a failed boot failed"
                );
            }
            Err(reason)
        }
    }
}
