//! What the agent reports about itself: the status file (rewritten at every phase change and
//! twice a second) and the phase-change lines in the log.

use std::time::{Duration, Instant};

use super::metrics::RunSummary;
use super::vm::VmLauncher;
use super::Agent;
use crate::net::backpressure::CapStats;

/// A status line for files and logs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatusReport {
    /// Node id.
    pub node: u32,
    /// Role and phase.
    pub role: String,
    /// Phase name.
    pub phase: String,
    /// Generation.
    pub generation: u64,
    /// True after this node took over.
    pub failed_over: bool,
    /// Last committed epoch (backup).
    pub committed: Option<u64>,
    /// Last acked epoch (primary).
    pub acked: u64,
    /// Microseconds from this node's takeover request to its VM running, if it failed over.
    pub failover_us: Option<u64>,
    /// Metrics summary so far.
    pub summary: RunSummary,
    /// The output gate's byte cap: held bytes, the cap, how often and how long it was hit.
    pub output: CapStats,
    /// A backup's sync under way: bytes of the full checkpoint sent so far, rate, time left.
    pub sync: Option<super::link::SyncReport>,
    /// The last sync this node sent as primary: full or catch-up, its epoch, a catch-up's base
    /// and its bytes.
    pub last_sync: Option<super::metrics::LastSync>,
    /// The protected VM's id.
    pub vm: u64,
    /// Primary: last epoch captured.
    pub captured: u64,
    /// Primary with a backup: epochs captured and not yet acked (how far the replica trails).
    /// None without a backup (no replica to trail) and on a backup (which does not know the
    /// primary's epoch; see `committed`).
    pub replica_lag_epochs: Option<u64>,
    /// Guest frames held at the output gate.
    pub held_frames: u64,
    /// Unix time (milliseconds) this node's VM ran after it took over, if it did.
    pub last_failover_unix_ms: Option<u64>,
}

impl<L: VmLauncher> Agent<L> {
    pub(super) fn note_status(&mut self) {
        let st = self.driver.status();
        let changed = self
            .last_status
            .map(|l| l.phase != st.phase || l.generation != st.generation || l.role != st.role)
            .unwrap_or(true);
        // Rewrite the status file on every change, and twice a second for the counters.
        if !changed {
            if self.status_written.elapsed() >= Duration::from_millis(500) {
                self.write_status();
            }
            return;
        }
        self.last_status = Some(st);
        tracing::info!(
            node = st.node.0,
            role = ?st.role,
            phase = %st.phase,
            generation = st.generation.0,
            "status"
        );
        self.write_status();
    }

    /// The current status report.
    pub fn status_report(&self) -> StatusReport {
        let st = self.driver.status();
        StatusReport {
            node: st.node.0,
            role: format!("{:?}", st.role),
            phase: st.phase.name().to_string(),
            generation: st.generation.0,
            failed_over: st.failed_over,
            committed: st.committed.map(|e| e.0),
            acked: st.acked.0,
            failover_us: self.failover_us,
            summary: self.metrics.summary(),
            output: self.output_cap.stats(Instant::now()),
            sync: self.sync_progress.report(),
            last_sync: self.last_sync,
            vm: self.cfg.model.vm.0,
            captured: st.captured.0,
            replica_lag_epochs: (st.role == ftvm_model::RoleKind::Primary && st.peer.is_some())
                .then(|| st.captured.0.saturating_sub(st.acked.0)),
            held_frames: self.driver.gate().held() as u64,
            last_failover_unix_ms: self.failover_at.and_then(|t| {
                let since = t.duration_since(std::time::UNIX_EPOCH).ok()?;
                u64::try_from(since.as_millis()).ok()
            }),
        }
    }

    pub(super) fn write_status(&mut self) {
        self.status_written = Instant::now();
        if self.cfg.status_file.is_none() && self.exporter.is_none() {
            return;
        }
        let report = self.status_report();
        if let Some(exporter) = &self.exporter {
            exporter.observe_status(&report);
        }
        let Some(path) = &self.cfg.status_file else {
            return;
        };
        if let Ok(json) = serde_json::to_vec(&report) {
            // Best effort, as the report is rewritten often; readable, never writable, by others.
            let _ = crate::secure_fs::write_replace(
                path,
                &json,
                crate::secure_fs::READABLE_FILE_MODE,
                crate::secure_fs::Durability::Atomic,
            );
        }
    }
}
