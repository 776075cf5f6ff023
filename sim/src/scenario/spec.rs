//! The scenario file as written (TOML, see scenarios/README.md). Every table and field is
//! optional except `name` and `duration_ms`; unknown fields are errors so a typo never turns
//! into a silently ignored setting. [`super::Scenario`] is the checked, typed form.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ScenarioFile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub duration_ms: u64,
    #[serde(default)]
    pub vm: VmFile,
    #[serde(default)]
    pub timing: TimingFile,
    #[serde(default)]
    pub topology: TopologyFile,
    #[serde(default)]
    pub network: NetworkFile,
    #[serde(default)]
    pub clients: ClientsFile,
    #[serde(default, rename = "fault")]
    pub faults: Vec<FaultFile>,
    #[serde(default)]
    pub expect: ExpectFile,
    pub expect_real: Option<ExpectRealFile>,
    #[serde(default)]
    pub swarm: bool,
}

/// `[expect_real]`: what differs on real hosts, and why.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ExpectRealFile {
    pub why: String,
    pub failover: Option<bool>,
    pub min_generation: Option<u64>,
    pub max_fences: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct VmFile {
    pub pages: u64,
    pub page_size: u32,
    pub counters: u64,
    pub writes_per_tick: u32,
    pub tick_ms: u64,
    pub capture_pause_us: u64,
    pub pre_copy_us: u64,
    pub disk_blocks: u64,
    pub disk_writes_per_tick: u32,
}

impl Default for VmFile {
    fn default() -> Self {
        VmFile {
            pages: 128,
            page_size: 512,
            counters: 8,
            writes_per_tick: 2,
            tick_ms: 1,
            capture_pause_us: 0,
            pre_copy_us: 0,
            disk_blocks: 0,
            disk_writes_per_tick: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct TimingFile {
    pub epoch_ms: u64,
    pub heartbeat_ms: u64,
    pub failure_timeout_ms: u64,
    pub witness_retry_ms: u64,
    pub join_retry_ms: u64,
    pub max_unacked: u64,
    pub restore_ms: u64,
    pub rejoin_after_fence_ms: Option<u64>,
    pub stay_fenced: bool,
    pub epoch_policy: String,
    pub min_gap_us: u64,
    pub max_idle_pct: u8,
}

impl Default for TimingFile {
    fn default() -> Self {
        TimingFile {
            epoch_ms: 25,
            heartbeat_ms: 10,
            failure_timeout_ms: 150,
            witness_retry_ms: 50,
            join_retry_ms: 100,
            max_unacked: 2,
            restore_ms: 20,
            rejoin_after_fence_ms: None,
            stay_fenced: false,
            epoch_policy: "fixed".into(),
            min_gap_us: 1000,
            max_idle_pct: 50,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct TopologyFile {
    pub nodes: u32,
    pub clients: u32,
}

impl Default for TopologyFile {
    fn default() -> Self {
        TopologyFile {
            nodes: 2,
            clients: 2,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct NetworkFile {
    pub latency_min_ms: u64,
    pub latency_max_ms: u64,
    pub bytes_per_ms: u64,
    pub loss: f64,
    pub rto_ms: u64,
    pub chunk_bytes: u64,
    pub step_ms: u64,
    pub witness_duplicate: f64,
    pub witness_reorder: f64,
    pub witness_reply_loss: f64,
    pub witness_delay_max_ms: u64,
}

impl Default for NetworkFile {
    fn default() -> Self {
        NetworkFile {
            latency_min_ms: 1,
            latency_max_ms: 3,
            bytes_per_ms: 0,
            loss: 0.0,
            rto_ms: 40,
            chunk_bytes: 4096,
            step_ms: 2,
            witness_duplicate: 0.0,
            witness_reorder: 0.0,
            witness_reply_loss: 0.0,
            witness_delay_max_ms: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct ClientsFile {
    pub timeout_ms: u64,
    pub think_ms: u64,
    pub backoff_ms: u64,
}

impl Default for ClientsFile {
    fn default() -> Self {
        ClientsFile {
            timeout_ms: 300,
            think_ms: 5,
            backoff_ms: 20,
        }
    }
}

/// One `[[fault]]`: a flat table whose meaningful fields depend on `kind` (checked later, with
/// an error naming the fault and the field).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FaultFile {
    pub kind: String,
    pub at_ms: Option<u64>,
    #[serde(default)]
    pub jitter_ms: u64,
    pub when: Option<String>,
    pub host: Option<String>,
    pub a: Option<String>,
    pub b: Option<String>,
    pub oneway: Option<bool>,
    pub silent: Option<bool>,
    pub keep_replica: Option<bool>,
    pub rate: Option<f64>,
    pub min_ms: Option<u64>,
    pub max_ms: Option<u64>,
    pub bytes_per_ms: Option<u64>,
    pub period_ms: Option<u64>,
    pub count: Option<u32>,
    pub frame: Option<String>,
    pub generation: Option<u64>,
    pub duplicate: Option<f64>,
    pub reorder: Option<f64>,
    pub reply_loss: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct ExpectFile {
    pub invariants: Option<Vec<String>>,
    pub failover: Option<bool>,
    pub min_generation: Option<u64>,
    pub reprotected: Option<bool>,
    pub min_replies: Option<u64>,
    pub max_replies: Option<u64>,
    pub max_outage_ms: Option<u64>,
    pub max_fences: Option<u64>,
    pub liveness_slack_ms: u64,
    pub max_response_p50_ms: Option<u64>,
    pub max_idle_pct: Option<u8>,
    pub max_extra_full_syncs: Option<u64>,
    pub max_response_ms: Option<u64>,
    pub responses_from_ms: u64,
}

impl Default for ExpectFile {
    fn default() -> Self {
        ExpectFile {
            invariants: None,
            failover: None,
            min_generation: None,
            reprotected: None,
            min_replies: None,
            max_replies: None,
            max_outage_ms: None,
            max_fences: None,
            max_response_p50_ms: None,
            max_idle_pct: None,
            max_extra_full_syncs: None,
            max_response_ms: None,
            responses_from_ms: 0,
            liveness_slack_ms: 100,
        }
    }
}
