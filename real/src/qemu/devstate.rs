//! Device and vCPU state as a QEMU migration stream, without the guest RAM.
//!
//! Guest RAM lives in a `share=on` file the agent replicates itself, so QEMU's migration runs
//! with capability `x-ignore-shared`: the shared RAM block is sent as a header only and the
//! stream ("blob", ~60 KB for a microvm) carries devices, vCPUs and small ROM blocks. The stream
//! goes through a socketpair whose one end QEMU receives with `getfd` (`migrate uri=fd:NAME`);
//! `exec:` costs twice as much and a file would need a path.
//!
//! Capture (VM paused): `migrate` → read the blob until EOF → `query-migrate` = completed. QEMU
//! closes its end in its cleanup after setting `completed`, so EOF means the result is final.
//! Restore (QEMU started with `-incoming defer`, RAM file = the replica): `migrate-incoming` from
//! a socket we write the blob into → wait for `completed` → the VM is paused → `cont`.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::error::{QemuError, Result};
use super::qmp::Qmp;

/// Name under which QEMU holds the capture socket.
const CAPTURE_FD: &str = "ftvm-mig-out";
/// Name under which QEMU holds the restore socket.
const RESTORE_FD: &str = "ftvm-mig-in";
/// Limit for one whole capture or restore.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Typical blob size; the buffer starts this large to avoid regrowth.
const BLOB_CAPACITY: usize = 128 * 1024;

/// Enables `x-ignore-shared` on this QEMU (once per connection). Both sides need it: a restore
/// target without it exits with "Capability x-ignore-shared is off, but received capability is
/// on".
pub async fn enable_ignore_shared(qmp: &mut Qmp) -> Result<()> {
    if qmp.ignore_shared_on {
        return Ok(());
    }
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
    )
    .await?;
    qmp.ignore_shared_on = true;
    Ok(())
}

/// Captures the device state of a **paused** VM. Leaves the VM in `postmigrate` (paused); the
/// caller resumes it with `cont`. On a running VM this would be a live migration that ends
/// with the VM stopped.
pub async fn capture_device_state(qmp: &mut Qmp) -> Result<Vec<u8>> {
    enable_ignore_shared(qmp).await?;
    let (mut ours, theirs) = socket_pair()?;
    qmp.getfd(CAPTURE_FD, theirs.as_fd()).await?;
    // QEMU has its own copy now; ours must go or we would never see EOF.
    drop(theirs);
    if let Err(e) = qmp
        .execute("migrate", Some(json!({"uri": format!("fd:{CAPTURE_FD}")})))
        .await
    {
        // A refused migrate leaves the named fd registered in QEMU: release it.
        if !e.is_gone() {
            let _ = qmp
                .execute("closefd", Some(json!({"fdname": CAPTURE_FD})))
                .await;
        }
        return Err(e);
    }
    let start = Instant::now();
    let mut blob = Vec::with_capacity(BLOB_CAPACITY);
    match tokio::time::timeout(MIGRATION_TIMEOUT, ours.read_to_end(&mut blob)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(QemuError::io("read device-state stream", e)),
        Err(_) => {
            let _ = qmp.execute("migrate_cancel", None).await;
            return Err(QemuError::Timeout {
                what: "device-state stream to end".into(),
                after: MIGRATION_TIMEOUT,
            });
        }
    }
    let remaining = MIGRATION_TIMEOUT.saturating_sub(start.elapsed());
    wait_migration_done(qmp, remaining, "capture").await?;
    Ok(blob)
}

/// Loads a captured blob into a QEMU started with `-incoming defer` (same machine, RAM file =
/// the replica at the blob's checkpoint). Returns once the load completed; the VM is paused.
/// A blob QEMU cannot load makes QEMU exit: the caller sees [`QemuError::QmpClosed`] (or, via
/// `Qemu`, [`QemuError::Died`] with QEMU's reason).
pub async fn load_device_state(qmp: &mut Qmp, blob: &[u8]) -> Result<()> {
    enable_ignore_shared(qmp).await?;
    let (ours, theirs) = socket_pair()?;
    qmp.getfd(RESTORE_FD, theirs.as_fd()).await?;
    drop(theirs);
    // Feed the blob concurrently: it may exceed the socket buffer, and QEMU reads it only
    // after `migrate-incoming`. Dropping our end afterwards is QEMU's EOF.
    let data = blob.to_vec();
    let writer = tokio::spawn(async move {
        let mut ours = ours;
        ours.write_all(&data).await?;
        ours.shutdown().await
    });
    let started = qmp
        .execute(
            "migrate-incoming",
            Some(json!({"uri": format!("fd:{RESTORE_FD}")})),
        )
        .await;
    if let Err(e) = started {
        writer.abort();
        return Err(e);
    }
    let waited = wait_migration_done(qmp, MIGRATION_TIMEOUT, "restore").await;
    writer.abort();
    waited?;
    // QEMU sets `completed` before its main loop switches the run state from `inmigrate` to
    // the one the VM had when captured (paused): wait for that switch too.
    let start = Instant::now();
    loop {
        if qmp.query_status().await?.status != "inmigrate" {
            return Ok(());
        }
        if start.elapsed() >= MIGRATION_TIMEOUT {
            return Err(QemuError::MigrationFailed(
                "restore: migration completed but the VM stayed inmigrate".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// [`load_device_state`], then resumes the VM unless it already runs.
pub async fn restore_device_state(qmp: &mut Qmp, blob: &[u8]) -> Result<()> {
    load_device_state(qmp, blob).await?;
    if !qmp.query_status().await?.running {
        qmp.cont().await?;
    }
    Ok(())
}

/// Polls `query-migrate` until `completed` (Ok) or `failed`/`cancelled` (error).
async fn wait_migration_done(qmp: &mut Qmp, timeout: Duration, what: &str) -> Result<()> {
    let start = Instant::now();
    let mut polls = 0u32;
    loop {
        let v = qmp.execute("query-migrate", None).await?;
        let status = v.get("status").and_then(Value::as_str).unwrap_or("none");
        match status {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                let desc = v
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given");
                return Err(QemuError::MigrationFailed(format!(
                    "{what}: {status}: {desc}"
                )));
            }
            _ => {}
        }
        if start.elapsed() >= timeout {
            return Err(QemuError::Timeout {
                what: format!("{what} migration to complete (last status {status})"),
                after: timeout,
            });
        }
        polls += 1;
        // The first polls are back to back (a QMP round trip is ~0.1 ms; completion is
        // usually imminent); after that back off to 1 ms.
        if polls > 20 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
}

/// A connected pair of unix stream sockets: ours (tokio, non-blocking) and QEMU's (blocking,
/// close-on-exec; QEMU gets a duplicate through SCM_RIGHTS).
fn socket_pair() -> Result<(UnixStream, std::os::unix::net::UnixStream)> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| QemuError::io("socketpair for migration stream", e))?;
    ours.set_nonblocking(true)
        .map_err(|e| QemuError::io("set migration socket non-blocking", e))?;
    let ours =
        UnixStream::from_std(ours).map_err(|e| QemuError::io("register migration socket", e))?;
    Ok((ours, theirs))
}
