//! End-of-run judgement: the invariant verdict from the observer, then the scenario's
//! expectations (failover happened, generation reached, re-protected, replies seen...).

use std::time::Duration;

use ftvm_model::{Phase, Time};

use crate::report::{RunReport, RunStats, Verdict};
use crate::scenario::Scenario;
use crate::world::World;

pub(super) fn judge(s: &Scenario, seed: u64, mut world: World, wall: Duration) -> RunReport {
    world.obs.settle();
    let o = &world.obs.stats;
    let e = &s.expect;
    let mut unmet = Vec::new();
    if let Some(want) = e.failover {
        if want && o.failovers == 0 {
            unmet.push("expected a failover, none happened".to_string());
        }
        if !want && o.failovers > 0 {
            unmet.push(format!("expected no failover, saw {}", o.failovers));
        }
    }
    if let Some(g) = e.min_generation.filter(|g| o.max_generation < *g) {
        unmet.push(format!(
            "expected generation >= {g}, reached {}",
            o.max_generation
        ));
    }
    if e.reprotected == Some(true) {
        let primary = world.obs.active_primary();
        let phase = primary
            .and_then(|(n, _)| world.obs.view(n))
            .and_then(|v| v.status)
            .map(|s| s.phase);
        if phase != Some(Phase::Protected) {
            unmet.push(format!(
                "expected the primary to be protected at the end, it is {}",
                phase.map_or("absent".to_string(), |p| p.to_string())
            ));
        }
    }
    if let Some(n) = e.min_replies.filter(|n| o.replies_seen < *n) {
        unmet.push(format!(
            "expected >= {n} replies, clients saw {}",
            o.replies_seen
        ));
    }
    if let Some(n) = e.max_replies.filter(|n| o.replies_seen > *n) {
        unmet.push(format!(
            "expected <= {n} replies, clients saw {}",
            o.replies_seen
        ));
    }
    if let Some(max) = e.max_outage {
        let max_ms = max.as_millis() as u64;
        if let Some(worst) = o.outages_ms.iter().copied().filter(|m| *m > max_ms).max() {
            unmet.push(format!("an outage lasted {worst} ms (> {max_ms} ms)"));
        }
    }
    if let Some(n) = e.max_fences.filter(|n| o.fences > *n) {
        unmet.push(format!(
            "expected <= {n} primaries to fence themselves, saw {}",
            o.fences
        ));
    }
    if let Some(max) = e.max_response_p50 {
        let p50 = Duration::from_micros(o.response_p50_us);
        if o.replies_seen == 0 || p50 > max {
            unmet.push(format!(
                "expected a median response time <= {} ms, clients saw {:.2} ms",
                max.as_millis(),
                p50.as_secs_f64() * 1e3
            ));
        }
    }
    if let Some(max) = e.max_idle_pct {
        let idle = idle_pct(o.paused_us, world.elapsed);
        if idle > f64::from(max) {
            unmet.push(format!(
                "expected the VM paused at most {max}% of the run, it was {idle:.1}%"
            ));
        }
    }
    if let Some(extra) = e.max_extra_full_syncs {
        let allowed = 1 + o.failovers + extra;
        if o.full_syncs_committed > allowed {
            unmet.push(format!(
                "expected at most {allowed} committed full syncs (first protection, {} \
                 takeovers, {extra} more), saw {} (of {} started; and {} catch-ups)",
                o.failovers, o.full_syncs_committed, o.full_syncs, o.catch_ups
            ));
        }
    }
    if let Some(max) = e.max_response {
        let from = Time::ZERO + e.responses_from;
        match world.obs.longest_response_from(from) {
            Some((sent, us)) if Duration::from_micros(us) > max => unmet.push(format!(
                "expected every reply to a request sent from {} ms on within {} ms, one sent at \
                 {sent} took {:.1} ms",
                e.responses_from.as_millis(),
                max.as_millis(),
                us as f64 / 1e3
            )),
            Some(_) => {}
            None => unmet.push(format!(
                "expected replies to requests sent from {} ms on, clients saw none",
                e.responses_from.as_millis()
            )),
        }
    }
    for f in &world.unfired {
        unmet.push(format!("fault never fired: {f}"));
    }
    let violation = world.obs.violation().cloned();
    let verdict = match (&violation, unmet.is_empty()) {
        (Some(_), _) => Verdict::Violation,
        (None, false) => Verdict::Unmet,
        (None, true) => Verdict::Pass,
    };
    let stats = RunStats {
        sim_ms: world.elapsed.as_millis() as u64,
        wall_s: wall.as_secs_f64(),
        observed: o.clone(),
        bytes_sent: world.bytes_sent,
    };
    RunReport {
        scenario: s.name.clone(),
        seed,
        verdict,
        violation,
        unmet,
        trace: world.trace.into_events(),
        stats,
        journals: world
            .journals
            .map(|j| j.into_values().collect())
            .unwrap_or_default(),
        witness_journal: world.witness_journal.unwrap_or_default(),
    }
}

/// Share of the run's `elapsed` time VMs spent paused, in percent.
pub fn idle_pct(paused_us: u64, elapsed: Duration) -> f64 {
    let total = elapsed.as_micros().max(1) as f64;
    paused_us as f64 * 100.0 / total
}
