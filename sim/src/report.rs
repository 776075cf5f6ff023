//! What a run returns: the verdict, the evidence, the trace and the numbers.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::invariant::Violation;
use crate::observer::ObservedStats;
use crate::trace::TraceEvent;

/// Options of one run.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Keep the whole event trace (otherwise only the last few hundred events, enough to
    /// show what led to a violation).
    pub trace: bool,
    /// Plant a protocol bug in every node (test builds only).
    #[cfg(feature = "mutants")]
    pub mutant: Option<ftvm_model::Mutant>,
    /// Record every node's journal (the driver core's, as a real agent writes it) and return
    /// them in [`RunReport::journals`].
    pub journals: bool,
}

impl RunOptions {
    /// Keep the whole trace (`true`) or only its tail.
    pub fn traced(mut self, full: bool) -> RunOptions {
        self.trace = full;
        self
    }

    /// Record every node's journal.
    pub fn with_journals(mut self) -> RunOptions {
        self.journals = true;
        self
    }

    /// Plant `mutant` in every node.
    #[cfg(feature = "mutants")]
    pub fn with_mutant(mut self, mutant: ftvm_model::Mutant) -> RunOptions {
        self.mutant = Some(mutant);
        self
    }
}

/// The outcome of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Every invariant held and every expectation was met.
    Pass,
    /// An invariant broke (see [`RunReport::violation`]).
    Violation,
    /// Invariants held but an expectation was not met (see [`RunReport::unmet`]).
    Unmet,
    /// The simulation itself failed (a host panicked or returned an error).
    Crashed,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Pass => "ok",
            Verdict::Violation => "VIOLATION",
            Verdict::Unmet => "UNMET",
            Verdict::Crashed => "CRASHED",
        })
    }
}

/// Numbers of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RunStats {
    /// Simulated time covered, in milliseconds.
    pub sim_ms: u64,
    /// Wall-clock time of the run, in seconds.
    pub wall_s: f64,
    /// What the observer counted.
    #[serde(flatten)]
    pub observed: ObservedStats,
    /// Bytes handed to the simulated network.
    pub bytes_sent: u64,
}

impl RunStats {
    /// Simulated epochs per wall-clock second.
    pub fn epochs_per_wall_s(&self) -> f64 {
        self.observed.epochs as f64 / self.wall_s.max(1e-9)
    }

    /// Simulated time per wall-clock time.
    pub fn speedup(&self) -> f64 {
        self.sim_ms as f64 / 1000.0 / self.wall_s.max(1e-9)
    }
}

/// Everything a run produced.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// Scenario name.
    pub scenario: String,
    /// Seed.
    pub seed: u64,
    /// Outcome.
    pub verdict: Verdict,
    /// The first broken invariant.
    pub violation: Option<Violation>,
    /// Expectations not met (and why the simulation crashed, if it did).
    pub unmet: Vec<String>,
    /// The event trace (whole, or its tail; see [`RunOptions::trace`]).
    pub trace: Vec<TraceEvent>,
    /// Numbers.
    pub stats: RunStats,
    /// Every node's journal, when [`RunOptions::journals`] asked for them (times are the
    /// simulated clock's).
    pub journals: Vec<crate::HostJournal>,
    /// The witness's decisions, when [`RunOptions::journals`] asked for them.
    pub witness_journal: Vec<ftvm_driver::journal::WitnessEntry>,
}

impl RunReport {
    /// The one-line summary `ftvm sim` prints per seed.
    pub fn summary(&self) -> String {
        let s = &self.stats;
        let o = &s.observed;
        let mut line = format!(
            "seed {}: {} {} (epochs {}, failovers {}, generation {}, syncs {} full ({} \
             committed) + {} catch-up, replies {}, response p50 {:.1} ms, VM paused {:.1}%, {:.0}x real time)",
            self.seed,
            self.verdict,
            self.scenario,
            o.epochs,
            o.failovers,
            o.max_generation,
            o.full_syncs,
            o.full_syncs_committed,
            o.catch_ups,
            o.replies_seen,
            o.response_p50_us as f64 / 1e3,
            crate::runner::idle_pct(o.paused_us, Duration::from_millis(s.sim_ms)),
            s.speedup()
        );
        if let Some(v) = &self.violation {
            line.push_str(&format!(": {v}"));
        } else if !self.unmet.is_empty() {
            line.push_str(&format!(": {}", self.unmet.join("; ")));
        }
        line
    }
}
