//! The agent's Prometheus metrics: one registry per agent, fed from the same two places as the
//! JSON outputs (each acked epoch's [`EpochMetrics`], each status rewrite's [`StatusReport`]),
//! so the per-epoch lines, `status.json` and `/metrics` never disagree about what happened.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::metrics::EpochMetrics;
use super::status::StatusReport;

/// Label set of the role and phase gauges: one series per value, 1 for the current one.
type Label = [(&'static str, &'static str); 1];

/// Every role a node can hold, as its `role` label (so each has a series from the start).
const ROLES: [&str; 4] = ["primary", "backup", "joiner", "fenced"];

/// Largest status document kept for `/status` (a report is a few hundred bytes; the bound only
/// guards against a future field growing without limit).
const MAX_STATUS_BYTES: usize = 64 << 10;

/// An agent's metrics, readable by the HTTP endpoint while the agent loop updates them.
pub struct AgentExporter {
    registry: Registry,
    epochs: Counter,
    syncs: Counter,
    bytes: Counter,
    dirty_pages: Counter,
    pause: Histogram,
    send: Histogram,
    ack: Histogram,
    held_frames: Gauge,
    held_bytes: Gauge,
    role: Family<Label, Gauge>,
    phase: Family<Label, Gauge>,
    generation: Gauge,
    acked: Gauge,
    committed: Gauge,
    lag: Gauge,
    last_failover: Gauge<f64, AtomicU64>,
    failover_duration: Gauge<f64, AtomicU64>,
    /// The previous phase label, zeroed when the phase changes.
    last_phase: Mutex<Option<&'static str>>,
    /// The latest status report as JSON, served at `/status`.
    status_json: Mutex<Vec<u8>>,
}

/// Seconds from microseconds, for the histograms (Prometheus' base unit).
fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

/// Saturating conversion for gauges (i64 in the client library).
fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The static name of a phase (labels must outlive the family); unknown names map to "other".
fn phase_label(name: &str) -> &'static str {
    const PHASES: [&str; 13] = [
        "waiting",
        "syncing",
        "registering",
        "protected",
        "dropping",
        "rejoining",
        "degraded",
        "fenced",
        "locating",
        "joining",
        "protecting",
        "taking-over",
        "restoring",
    ];
    PHASES
        .iter()
        .find(|p| **p == name)
        .copied()
        .unwrap_or("other")
}

impl AgentExporter {
    /// A registry for the agent of node `node` protecting VM `vm`: both are constant labels
    /// on every series, so one Prometheus job can scrape many VMs' agents on one host.
    pub fn new(vm: u64, node: u32) -> AgentExporter {
        let mut registry = Registry::with_prefix_and_labels(
            "ftvm",
            [
                ("vm".into(), vm.to_string().into()),
                ("node".into(), node.to_string().into()),
            ]
            .into_iter(),
        );
        // 100 µs .. ~3.3 s: an incremental pause is around a millisecond, a sync seconds.
        let hist = || Histogram::new(exponential_buckets(1e-4, 2.0, 16));
        let x = AgentExporter {
            registry: Registry::default(),
            epochs: Counter::default(),
            syncs: Counter::default(),
            bytes: Counter::default(),
            dirty_pages: Counter::default(),
            pause: hist(),
            send: hist(),
            ack: hist(),
            held_frames: Gauge::default(),
            held_bytes: Gauge::default(),
            role: Family::default(),
            phase: Family::default(),
            generation: Gauge::default(),
            acked: Gauge::default(),
            committed: Gauge::default(),
            lag: Gauge::default(),
            last_failover: Gauge::default(),
            failover_duration: Gauge::default(),
            last_phase: Mutex::new(None),
            status_json: Mutex::new(b"{}".to_vec()),
        };
        let r = &mut registry;
        r.register(
            "epochs",
            "Checkpoints acked by the backup",
            x.epochs.clone(),
        );
        r.register(
            "syncs",
            "Sync checkpoints (full or catch-up) acked",
            x.syncs.clone(),
        );
        r.register(
            "checkpoint_bytes",
            "Checkpoint bytes sent on the wire",
            x.bytes.clone(),
        );
        r.register(
            "dirty_pages",
            "Dirty pages captured into checkpoints",
            x.dirty_pages.clone(),
        );
        r.register(
            "pause_seconds",
            "VM paused time per checkpoint (stop to cont)",
            x.pause.clone(),
        );
        r.register(
            "send_seconds",
            "Time to send a checkpoint after its capture",
            x.send.clone(),
        );
        r.register(
            "ack_seconds",
            "Time from a checkpoint's send to its ack",
            x.ack.clone(),
        );
        r.register(
            "output_held_frames",
            "Guest frames held at the output gate",
            x.held_frames.clone(),
        );
        r.register(
            "output_held_bytes",
            "Bytes of guest frames held and not yet out of the agent",
            x.held_bytes.clone(),
        );
        r.register("role", "1 for the role this node holds now", x.role.clone());
        r.register(
            "phase",
            "1 for the phase this node is in now",
            x.phase.clone(),
        );
        r.register(
            "generation",
            "Generation this node acts in or follows",
            x.generation.clone(),
        );
        r.register(
            "acked_epoch",
            "Primary: highest epoch acked by its backup",
            x.acked.clone(),
        );
        r.register(
            "committed_epoch",
            "Backup: last epoch committed in its replica",
            x.committed.clone(),
        );
        r.register(
            "replica_lag_epochs",
            "Primary with a backup: epochs captured and not yet acked",
            x.lag.clone(),
        );
        r.register(
            "last_failover_timestamp_seconds",
            "Unix time this node's VM ran after it took over (0: never)",
            x.last_failover.clone(),
        );
        r.register(
            "failover_duration_seconds",
            "Takeover request to VM running, for the last takeover (0: never)",
            x.failover_duration.clone(),
        );
        for role in ROLES {
            x.role.get_or_create(&[("role", role)]).set(0);
        }
        AgentExporter { registry, ..x }
    }

    /// One acked epoch (called where the JSON line is written).
    pub fn observe_epoch(&self, m: &EpochMetrics) {
        if m.is_sync() {
            // A sync's pause is a one-off of seconds: kept out of the histograms as it is out
            // of the run summary's percentiles.
            self.syncs.inc();
        } else {
            self.epochs.inc();
            self.pause.observe(secs(m.pause_us));
            self.send.observe(secs(m.send_us));
            self.ack.observe(secs(m.ack_us));
        }
        self.bytes.inc_by(m.bytes);
        self.dirty_pages.inc_by(m.dirty_pages);
    }

    /// The status as it was just reported (called where `status.json` is rewritten).
    pub fn observe_status(&self, s: &StatusReport) {
        let role = s.role.to_lowercase();
        for r in ROLES {
            self.role
                .get_or_create(&[("role", r)])
                .set(i64::from(r == role));
        }
        let phase = phase_label(&s.phase);
        if let Ok(mut last) = self.last_phase.lock() {
            if let Some(old) = last.replace(phase).filter(|old| *old != phase) {
                self.phase.get_or_create(&[("phase", old)]).set(0);
            }
        }
        self.phase.get_or_create(&[("phase", phase)]).set(1);
        self.generation.set(gauge_value(s.generation));
        self.acked.set(gauge_value(s.acked));
        self.committed.set(gauge_value(s.committed.unwrap_or(0)));
        self.lag.set(gauge_value(s.replica_lag_epochs.unwrap_or(0)));
        self.held_frames.set(gauge_value(s.held_frames));
        self.held_bytes.set(gauge_value(s.output.held_bytes));
        if let Some(ms) = s.last_failover_unix_ms {
            self.last_failover.set(ms as f64 / 1e3);
        }
        if let Some(us) = s.failover_us {
            self.failover_duration.set(secs(us));
        }
        if let Ok(json) = serde_json::to_vec(s) {
            if json.len() <= MAX_STATUS_BYTES {
                if let Ok(mut slot) = self.status_json.lock() {
                    *slot = json;
                }
            }
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would leave a partial page,
        // which is still better than none for a scrape.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// The latest status report (JSON; `{}` before the first).
    pub fn status_json(&self) -> Vec<u8> {
        self.status_json
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|_| b"{}".to_vec())
    }
}
