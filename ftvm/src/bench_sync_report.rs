//! `ftvm bench sync`'s results: the figures of each run, their medians, the ratio of ftvm's
//! full sync to QEMU's own live migration of the same guest, and the Markdown table.

use serde::{Deserialize, Serialize};

/// Issue 12's target: restart → protected within this many times QEMU's migration time.
pub const TARGET_RATIO: f64 = 2.0;

/// What one run of one case measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunFigures {
    /// qemu-migrate: `migrate` command to `completed`, as we saw it. ftvm: the backup agent's
    /// restart (or the link's repair) to the primary's `protected`. Milliseconds.
    pub time_ms: f64,
    /// Bytes the migration or sync moved (QEMU's `ram.transferred`; the sync checkpoint's bytes
    /// on the wire).
    pub bytes: u64,
    /// qemu-migrate: QEMU's own `total-time`, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_total_ms: Option<f64>,
    /// qemu-migrate: QEMU's `downtime` (the final stop-and-copy), milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    /// ftvm: the client's longest pause in the time measured, milliseconds (pauses under the
    /// client's reporting threshold count as 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_pause_ms: Option<f64>,
    /// ftvm: replies the client lost in the run (must be 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_lost: Option<u64>,
    /// ftvm: what the primary said the sync was (`full` or `catch-up`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_kind: Option<String>,
    /// ftvm: the backup host took over during the measurement (a link cut whose takeover
    /// request reached the witness before the primary's drop) and was protected by the other.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub took_over: bool,
}

/// One case (with one capture mode, for the ftvm cases): every run and the medians.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseResult {
    /// `qemu-migrate`, `ftvm-full`, `ftvm-catch-up` or `ftvm-link-cut`.
    pub case: String,
    /// The agents' capture mode (None for qemu-migrate).
    pub capture: Option<String>,
    /// Each run, in order.
    pub runs: Vec<RunFigures>,
    /// Field-wise medians of the runs.
    pub median: RunFigures,
    /// Why runs are missing, if they are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl CaseResult {
    /// A case from its runs, with their medians.
    pub fn new(case: &str, capture: Option<&str>, runs: Vec<RunFigures>) -> CaseResult {
        CaseResult {
            case: case.into(),
            capture: capture.map(str::to_string),
            median: median_figures(&runs),
            runs,
            errors: Vec::new(),
        }
    }
}

/// ftvm's full sync against QEMU's migration, per capture mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ratio {
    /// Capture mode of the ftvm case.
    pub capture: String,
    /// Median ftvm-full time / median qemu-migrate time.
    pub full_over_migrate: f64,
    /// Whether that is at most [`TARGET_RATIO`].
    pub target_met: bool,
}

/// The whole benchmark.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncReport {
    /// Guest RAM, MiB.
    pub ram_mb: u64,
    /// Pages per second the guest's workload rewrites.
    pub dirty_pages: u64,
    /// Runs per case.
    pub runs: usize,
    /// The migration settings qemu-migrate used.
    pub migration_settings: String,
    /// The cases, in the order they ran.
    pub cases: Vec<CaseResult>,
    /// ftvm-full / qemu-migrate per capture mode (when both ran).
    pub ratios: Vec<Ratio>,
}

impl SyncReport {
    /// A report over `cases`, with the ratios computed from them.
    pub fn new(
        ram_mb: u64,
        dirty_pages: u64,
        runs: usize,
        migration_settings: String,
        cases: Vec<CaseResult>,
    ) -> SyncReport {
        let ratios = ratios(&cases);
        SyncReport {
            ram_mb,
            dirty_pages,
            runs,
            migration_settings,
            cases,
            ratios,
        }
    }

    /// The Markdown page: medians, each run, the ratios and the verdict.
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "# sync: re-protection against QEMU's live migration\n\n{} MiB guest rewriting {} \
             pages/s; {} run(s) per case, medians (each run in brackets). qemu-migrate: {}.\n\n\
             | case | capture | time (ms) | bytes (MiB) | QEMU downtime (ms) | client's longest \
             pause (ms) | sync |\n|---|---|---:|---:|---:|---:|---|\n",
            self.ram_mb, self.dirty_pages, self.runs, self.migration_settings
        );
        for c in &self.cases {
            let each = |f: &dyn Fn(&RunFigures) -> Option<f64>, digits: usize| {
                let Some(m) = f(&c.median).map(|v| format!("{v:.digits$}")) else {
                    return "–".to_string();
                };
                if c.runs.len() < 2 {
                    return m;
                }
                let all: Vec<String> = c
                    .runs
                    .iter()
                    .map(|r| f(r).map_or("–".into(), |v| format!("{v:.digits$}")))
                    .collect();
                format!("{m} [{}]", all.join(", "))
            };
            // Each run's kind only when they differ.
            let kinds: Vec<&str> = match c.median.sync_kind.as_deref() {
                Some("mixed") => c
                    .runs
                    .iter()
                    .filter_map(|r| r.sync_kind.as_deref())
                    .collect(),
                Some(k) => vec![k],
                None => Vec::new(),
            };
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                c.case,
                c.capture.as_deref().unwrap_or("–"),
                each(&|r| Some(r.time_ms), 0),
                each(&|r| Some(r.bytes as f64 / f64::from(1u32 << 20)), 1),
                each(&|r| r.downtime_ms, 0),
                each(&|r| r.client_pause_ms, 0),
                if kinds.is_empty() {
                    "–".into()
                } else {
                    kinds.join(", ")
                },
            ));
        }
        for c in &self.cases {
            let capture = c.capture.as_deref().unwrap_or("–");
            for (i, r) in c.runs.iter().enumerate() {
                if r.took_over {
                    s.push_str(&format!(
                        "\n{} ({capture}) run {}: the backup host took over during the cut; \
                         the time is the takeover and a full sync of the old primary.\n",
                        c.case,
                        i + 1
                    ));
                }
            }
            for e in &c.errors {
                s.push_str(&format!("\n{} ({capture}): {e}\n", c.case));
            }
        }
        if !self.ratios.is_empty() {
            s.push_str("\nftvm-full / qemu-migrate (medians; target ≤ 2×, issue 12):\n\n");
            for r in &self.ratios {
                s.push_str(&format!(
                    "- {}: {:.2}× — target {}\n",
                    r.capture,
                    r.full_over_migrate,
                    if r.target_met { "met" } else { "NOT met" }
                ));
            }
        }
        s
    }
}

/// The median of `v` (the mean of the middle two for an even count); None when empty.
pub fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Field-wise medians (an optional field's median over the runs that have it).
pub fn median_figures(runs: &[RunFigures]) -> RunFigures {
    let of = |f: &dyn Fn(&RunFigures) -> Option<f64>| {
        median(&runs.iter().filter_map(f).collect::<Vec<_>>())
    };
    let kinds: Vec<&str> = runs.iter().filter_map(|r| r.sync_kind.as_deref()).collect();
    RunFigures {
        time_ms: of(&|r| Some(r.time_ms)).unwrap_or(0.0),
        bytes: of(&|r| Some(r.bytes as f64)).unwrap_or(0.0).round() as u64,
        qemu_total_ms: of(&|r| r.qemu_total_ms),
        downtime_ms: of(&|r| r.downtime_ms),
        client_pause_ms: of(&|r| r.client_pause_ms),
        // Lost replies are summed, not averaged away: one lost reply is a failure.
        client_lost: runs
            .iter()
            .filter_map(|r| r.client_lost)
            .reduce(|a, b| a + b),
        took_over: runs.iter().any(|r| r.took_over),
        // The kind when all runs agree, else `mixed`.
        sync_kind: match kinds.first() {
            Some(k) if kinds.iter().all(|x| x == k) => Some((*k).to_string()),
            Some(_) => Some("mixed".into()),
            None => None,
        },
    }
}

/// ftvm-full / qemu-migrate for each capture mode that has a full-sync case.
fn ratios(cases: &[CaseResult]) -> Vec<Ratio> {
    let Some(migrate) = cases.iter().find(|c| c.case == "qemu-migrate") else {
        return Vec::new();
    };
    if migrate.median.time_ms <= 0.0 {
        return Vec::new();
    }
    cases
        .iter()
        .filter(|c| c.case == "ftvm-full")
        .map(|c| {
            let r = c.median.time_ms / migrate.median.time_ms;
            Ratio {
                capture: c.capture.clone().unwrap_or_default(),
                full_over_migrate: r,
                target_met: r <= TARGET_RATIO,
            }
        })
        .collect()
}

/// What `query-migrate` says about a finished migration.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationInfo {
    /// `status`.
    pub status: String,
    /// `total-time`, ms.
    pub total_ms: Option<f64>,
    /// `downtime`, ms.
    pub downtime_ms: Option<f64>,
    /// `ram.transferred`, bytes.
    pub transferred: Option<u64>,
    /// `error-desc`, if it failed.
    pub error: Option<String>,
}

/// Reads `query-migrate`'s answer (missing fields are None: QEMU leaves them out until the
/// migration has them).
pub fn parse_query_migrate(v: &serde_json::Value) -> MigrationInfo {
    MigrationInfo {
        status: v["status"].as_str().unwrap_or("none").to_string(),
        total_ms: v["total-time"].as_f64(),
        downtime_ms: v["downtime"].as_f64(),
        transferred: v["ram"]["transferred"].as_u64(),
        error: v["error-desc"].as_str().map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(ms: f64, bytes: u64) -> RunFigures {
        RunFigures {
            time_ms: ms,
            bytes,
            ..RunFigures::default()
        }
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
    }

    #[test]
    fn medians_are_field_wise_and_lost_replies_add_up() {
        let mut a = run(100.0, 10);
        a.client_pause_ms = Some(30.0);
        a.client_lost = Some(0);
        a.sync_kind = Some("full".into());
        let mut b = run(300.0, 30);
        b.client_lost = Some(1);
        b.sync_kind = Some("full".into());
        let mut c = run(200.0, 20);
        c.client_pause_ms = Some(50.0);
        c.client_lost = Some(0);
        c.sync_kind = Some("catch-up".into());
        let m = median_figures(&[a, b, c]);
        assert_eq!(m.time_ms, 200.0);
        assert_eq!(m.bytes, 20);
        assert_eq!(m.client_pause_ms, Some(40.0));
        assert_eq!(m.client_lost, Some(1));
        assert_eq!(m.sync_kind.as_deref(), Some("mixed"));
        assert_eq!(m.downtime_ms, None);
    }

    #[test]
    fn ratio_per_capture_and_target() {
        let cases = vec![
            CaseResult::new("qemu-migrate", None, vec![run(400.0, 1), run(500.0, 1)]),
            CaseResult::new("ftvm-full", Some("staged"), vec![run(1200.0, 1)]),
            CaseResult::new("ftvm-full", Some("cow"), vec![run(800.0, 1)]),
            CaseResult::new("ftvm-catch-up", Some("cow"), vec![run(100.0, 1)]),
        ];
        let r = SyncReport::new(1024, 5000, 1, "x".into(), cases);
        assert_eq!(r.ratios.len(), 2);
        assert_eq!(r.ratios[0].capture, "staged");
        assert!((r.ratios[0].full_over_migrate - 1200.0 / 450.0).abs() < 1e-9);
        assert!(!r.ratios[0].target_met);
        assert!(r.ratios[1].target_met);
        let md = r.to_markdown();
        assert!(md.contains("| qemu-migrate | – | 450 [400, 500] |"), "{md}");
        assert!(md.contains("- staged: 2.67× — target NOT met"), "{md}");
        assert!(md.contains("- cow: 1.78× — target met"), "{md}");
        // Without a migration case there is nothing to compare with.
        let only = SyncReport::new(1, 0, 1, String::new(), vec![r.cases[1].clone()]);
        assert!(only.ratios.is_empty());
    }

    #[test]
    fn report_round_trips_through_json() {
        let r = SyncReport::new(
            128,
            0,
            1,
            "s".into(),
            vec![CaseResult::new("ftvm-full", Some("cow"), vec![run(5.0, 7)])],
        );
        let back: SyncReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn query_migrate_is_read_with_missing_fields() {
        let done = serde_json::json!({
            "status": "completed", "total-time": 412, "downtime": 9, "setup-time": 1,
            "ram": {"transferred": 1_100_000_000u64, "total": 1_073_741_824u64}
        });
        let i = parse_query_migrate(&done);
        assert_eq!(i.status, "completed");
        assert_eq!(i.total_ms, Some(412.0));
        assert_eq!(i.downtime_ms, Some(9.0));
        assert_eq!(i.transferred, Some(1_100_000_000));
        let failed = serde_json::json!({"status": "failed", "error-desc": "boom"});
        let i = parse_query_migrate(&failed);
        assert_eq!((i.total_ms, i.transferred), (None, None));
        assert_eq!(i.error.as_deref(), Some("boom"));
        assert_eq!(parse_query_migrate(&serde_json::json!({})).status, "none");
    }
}
