//! Per-epoch metrics as JSON lines (docs/ARCHITECTURE.md, Metrics), plus a run summary with the VM
//! idle rate.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::Instant;

/// What one epoch cost. Times in microseconds.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct EpochMetrics {
    /// Epoch number.
    pub epoch: u64,
    /// Generation.
    pub generation: u64,
    /// VM paused time: stop → cont.
    pub pause_us: u64,
    /// A full checkpoint (initial sync of a backup), not an incremental one.
    pub full: bool,
    /// A catch-up sync: the backup's replica was at this epoch, and the checkpoint holds
    /// every page and disk block written since (null for a full sync or an ordinary epoch).
    pub catch_up_from: Option<u64>,
    /// Dirty pages captured.
    pub dirty_pages: u64,
    /// Checkpoint bytes on the wire.
    pub bytes: u64,
    /// Finding dirty pages.
    pub scan_us: u64,
    /// Copying them to the staging area.
    pub copy_us: u64,
    /// A full capture's copy of all of RAM made ahead of its pause, while the VM ran
    /// (staged capture; then `copy_us` is just the pages written during it).
    #[serde(default)]
    pub pre_copy_us: u64,
    /// Saving device state.
    pub device_us: u64,
    /// Disk blocks captured (written in the epoch; every block holding data for a full one).
    #[serde(default)]
    pub disk_blocks: u64,
    /// Finding and reading them while paused.
    #[serde(default)]
    pub disk_us: u64,
    /// Copy-on-write engine: pages write-protected by early passes while the VM ran before this
    /// capture, and pages still writable at the capture, protected while paused.
    pub early_protected: u64,
    /// See `early_protected`.
    pub protected: u64,
    /// Send updated states: capture done → checkpoint handed over and buffers released.
    pub send_us: u64,
    /// cow: pages the fault handler copied because the guest wrote them before they were sent.
    pub cow_copies: u64,
    /// cow: guest writes that waited for a page in flight to be released by the transport.
    pub cow_waits: u64,
    /// Checkpoint sent → acked by the backup.
    pub ack_us: u64,
    /// Frames released at the ack.
    pub frames_released: u64,
    /// Longest time a released frame was held.
    pub longest_hold_us: u64,
    /// Bytes of guest frames still held after this epoch's release.
    pub output_held_bytes: u64,
    /// Times the output cap was reached since the previous epoch's line.
    pub output_cap_hits: u64,
    /// Time the VM's network was not read because of the cap since the previous epoch's line.
    pub output_cap_paused_us: u64,
}

impl EpochMetrics {
    /// Whether this epoch's checkpoint started a backup's stream (a full sync or a catch-up).
    pub fn is_sync(&self) -> bool {
        self.full || self.catch_up_from.is_some()
    }

    /// What a sync epoch was, for the status file (None for an ordinary epoch).
    pub fn last_sync(&self) -> Option<LastSync> {
        let kind = match (self.full, self.catch_up_from) {
            (true, _) => SyncKind::Full,
            (false, Some(_)) => SyncKind::CatchUp,
            (false, None) => return None,
        };
        Some(LastSync {
            kind,
            epoch: self.epoch,
            base: self.catch_up_from,
            bytes: self.bytes,
        })
    }
}

/// Which kind of sync started a backup's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncKind {
    /// All of RAM and every data block of the disk.
    Full,
    /// What was written since the backup's replica epoch.
    CatchUp,
}

/// The last sync this primary sent (the status file's `last_sync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LastSync {
    /// Full or catch-up.
    pub kind: SyncKind,
    /// Epoch of the sync checkpoint.
    pub epoch: u64,
    /// A catch-up's base: the replica's epoch it applied on (null for a full sync).
    pub base: Option<u64>,
    /// Checkpoint bytes on the wire (0 until it was sent).
    pub bytes: u64,
}

/// The summary of a run: ordinary incremental checkpoints only (a backup's sync, full or
/// catch-up, is a one-off whose long pause would otherwise pass for the p99), wall time from
/// the first of them.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RunSummary {
    /// Epochs acked.
    pub epochs: u64,
    /// Wall time covered, microseconds.
    pub wall_us: u64,
    /// Sum of pause times, microseconds.
    pub paused_us: u64,
    /// Share of wall time the VM was paused.
    pub idle_rate: f64,
    /// Median and 99th percentile pause.
    pub pause_p50_us: u64,
    /// 99th percentile pause.
    pub pause_p99_us: u64,
    /// Median send-updated-states time.
    pub send_p50_us: u64,
    /// 99th percentile send-updated-states time.
    pub send_p99_us: u64,
    /// Mean send-updated-states time.
    pub send_mean_us: u64,
    /// Median time from a checkpoint's send to its ack.
    pub ack_p50_us: u64,
    /// 99th percentile of the same.
    pub ack_p99_us: u64,
}

/// Writes epoch lines and accumulates the summary.
pub struct MetricsSink {
    out: Option<BufWriter<File>>,
    started: Option<Instant>,
    pauses: Vec<u64>,
    sends: Vec<u64>,
    acks: Vec<u64>,
}

/// The `p`-th percentile of `sorted` (index `len × p / 100`, the summary's and the e2e
/// benchmark's definition); 0 when empty.
pub fn percentile(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

impl MetricsSink {
    /// A sink writing to `path` (or only summarising when `None`).
    pub fn new(path: Option<&Path>) -> Result<MetricsSink, crate::secure_fs::SecureFsError> {
        let out = match path {
            // A fresh file (a stale one of ours replaced, a planted link refused), readable by
            // others but writable only by us.
            Some(p) => Some(BufWriter::new(crate::secure_fs::replace(
                p,
                crate::secure_fs::READABLE_FILE_MODE,
            )?)),
            None => None,
        };
        Ok(MetricsSink {
            out,
            started: None,
            pauses: Vec::new(),
            sends: Vec::new(),
            acks: Vec::new(),
        })
    }

    /// Records one acked epoch.
    pub fn record(&mut self, m: &EpochMetrics) {
        if !m.is_sync() {
            self.started.get_or_insert_with(Instant::now);
            self.pauses.push(m.pause_us);
            self.sends.push(m.send_us);
            self.acks.push(m.ack_us);
        }
        if let Some(out) = self.out.as_mut() {
            if let Ok(line) = serde_json::to_string(m) {
                // Metrics are best effort: a full disk must not stop the protection.
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
        }
    }

    /// The summary so far.
    pub fn summary(&self) -> RunSummary {
        let wall_us = self
            .started
            .map(|t| t.elapsed().as_micros() as u64)
            .unwrap_or(0);
        let paused_us: u64 = self.pauses.iter().sum();
        let mut p = self.pauses.clone();
        p.sort_unstable();
        let mut s = self.sends.clone();
        s.sort_unstable();
        let mut a = self.acks.clone();
        a.sort_unstable();
        RunSummary {
            epochs: p.len() as u64,
            wall_us,
            paused_us,
            idle_rate: if wall_us == 0 {
                0.0
            } else {
                paused_us as f64 / wall_us as f64
            },
            pause_p50_us: percentile(&p, 50),
            pause_p99_us: percentile(&p, 99),
            send_p50_us: percentile(&s, 50),
            send_p99_us: percentile(&s, 99),
            send_mean_us: if s.is_empty() {
                0
            } else {
                s.iter().sum::<u64>() / s.len() as u64
            },
            ack_p50_us: percentile(&a, 50),
            ack_p99_us: percentile(&a, 99),
        }
    }
}
