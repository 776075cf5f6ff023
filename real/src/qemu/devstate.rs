//! Device and vCPU state as a QEMU migration stream, without the guest RAM.
//!
//! Guest RAM lives in a `share=on` file the agent replicates itself, so QEMU's migration runs
//! with capability `x-ignore-shared`: the shared RAM block is sent as a header only and the
//! stream ("blob", ~60 KB for a microvm) carries devices, vCPUs and small ROM blocks. The stream
//! goes through a socketpair whose one end QEMU receives with `getfd` (`migrate uri=fd:NAME`);
//! `exec:` costs twice as much and a file would need a path.
//!
//! Capture (VM paused): `getfd` + `migrate` → read the blob until EOF → MIGRATION event
//! `completed`. QEMU announces `completed` before it closes its end, so at EOF the event is
//! (almost always) already waiting: no `query-migrate` polling.
//! Restore (QEMU started with `-incoming defer`, RAM file = the replica): `getfd` +
//! `migrate-incoming` from a socket we write the blob into → `completed` → the VM is paused →
//! `cont`.

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
/// QMP event announcing migration status changes (capability `events`).
const MIGRATION_EVENT: &str = "MIGRATION";
/// Typical blob size; the buffer starts this large to avoid regrowth.
const BLOB_CAPACITY: usize = 128 * 1024;

/// Enables the migration capabilities we rely on (once per connection): `x-ignore-shared`
/// (both sides need it: a restore target without it exits with "Capability x-ignore-shared is
/// off, but received capability is on") and `events` (MIGRATION status events, so the end of a
/// migration is known without polling `query-migrate`).
pub async fn enable_ignore_shared(qmp: &mut Qmp) -> Result<()> {
    if qmp.migration_caps_on {
        return Ok(());
    }
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [
            {"capability": "x-ignore-shared", "state": true},
            {"capability": "events", "state": true},
        ]})),
    )
    .await?;
    qmp.migration_caps_on = true;
    Ok(())
}

/// Captures the device state of a **paused** VM. Leaves the VM in `postmigrate` (paused); the
/// caller resumes it with `cont`. On a running VM this would be a live migration that ends
/// with the VM stopped.
pub async fn capture_device_state(qmp: &mut Qmp) -> Result<Vec<u8>> {
    enable_ignore_shared(qmp).await?;
    qmp.discard_events(MIGRATION_EVENT);
    let (mut ours, theirs) = socket_pair()?;
    let uri = format!("fd:{CAPTURE_FD}");
    // getfd and migrate back to back, answers read after: saves a QMP round trip (~0.4 ms
    // here) inside the pause.
    let getfd = qmp
        .send_command(
            "getfd",
            Some(json!({ "fdname": CAPTURE_FD })),
            Some(theirs.as_fd()),
        )
        .await?;
    let migrate = qmp
        .send_command("migrate", Some(json!({ "uri": uri })), None)
        .await?;
    // QEMU has its own copy now; ours must go or we would never see EOF.
    drop(theirs);
    let got_fd = qmp.recv_reply("getfd", getfd).await;
    let started = qmp.recv_reply("migrate", migrate).await;
    if let Err(e) = got_fd.and(started) {
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
            if let Err(e) = qmp.execute("migrate_cancel", None).await {
                tracing::warn!(error = %e, "cancelling a device-state capture that timed out failed");
            }
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
    qmp.discard_events(MIGRATION_EVENT);
    let (ours, theirs) = socket_pair()?;
    // Feed the blob concurrently: it may exceed the socket buffer, and QEMU reads it only
    // after `migrate-incoming`. Dropping our end afterwards is QEMU's EOF.
    let data = blob.to_vec();
    let writer = tokio::spawn(async move {
        let mut ours = ours;
        ours.write_all(&data).await?;
        ours.shutdown().await
    });
    let uri = format!("fd:{RESTORE_FD}");
    let sent = async {
        let getfd = qmp
            .send_command(
                "getfd",
                Some(json!({ "fdname": RESTORE_FD })),
                Some(theirs.as_fd()),
            )
            .await?;
        let incoming = qmp
            .send_command("migrate-incoming", Some(json!({ "uri": uri })), None)
            .await?;
        let got_fd = qmp.recv_reply("getfd", getfd).await;
        let started = qmp.recv_reply("migrate-incoming", incoming).await;
        got_fd.and(started)
    }
    .await;
    drop(theirs);
    if let Err(e) = sent {
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

/// Waits for the MIGRATION event that ends this migration: `completed` (Ok) or
/// `failed`/`cancelled` (error, with QEMU's reason from `query-migrate`).
async fn wait_migration_done(qmp: &mut Qmp, timeout: Duration, what: &str) -> Result<()> {
    let ev = qmp
        .wait_event_where(&format!("{what} migration to end"), timeout, |e| {
            e.name == MIGRATION_EVENT
                && matches!(
                    e.data.get("status").and_then(Value::as_str),
                    Some("completed" | "failed" | "cancelled")
                )
        })
        .await?;
    let status = ev.data.get("status").and_then(Value::as_str).unwrap_or("?");
    if status == "completed" {
        return Ok(());
    }
    let info = qmp.execute("query-migrate", None).await?;
    let desc = info
        .get("error-desc")
        .and_then(Value::as_str)
        .unwrap_or("no reason given");
    Err(QemuError::MigrationFailed(format!(
        "{what}: {status}: {desc}"
    )))
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
