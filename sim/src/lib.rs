//! # ftvm-sim: the ftvm protocol under a deterministic network simulator
//!
//! Runs `ftvm_model::Node` and `ftvm_model::Witness` on turmoil hosts — nodes `n1..nN`, a
//! `witness` and a `clients` host — over turmoil's simulated TCP, every message in the
//! model's wire format (checkpoints with their page contents included). Each node host has a
//! simulated VM (pages written by a seeded workload every tick, and a counter service whose
//! state lives in those pages); its replies are the VM's output and wait at the output gate
//! until the model releases their epoch. Clients send requests to whichever node answers and
//! record every reply they get.
//!
//! Faults (crash/restart, partitions, holds, loss, latency, bandwidth, corruption, forged
//! frames and witness replies) fire on a timeline from the [`Scenario`]. A shared observer
//! checks the invariants ([`Invariant`]) on every event; the first violation ends the run.
//!
//! All randomness comes from the run's seed: same scenario + seed ⇒ byte-identical trace.
//!
//! ```no_run
//! use ftvm_sim::{run_scenario, RunOptions, Scenario};
//! let s = Scenario::load("scenarios/steady.toml".as_ref()).unwrap();
//! let report = run_scenario(&s, 7, &RunOptions::default());
//! println!("{}", report.summary());
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod host;
mod invariant;
mod journal_check;
mod net;
mod observer;
mod report;
mod rng;
mod runner;
pub mod scenario;
mod trace;
mod vm;
mod world;

pub use invariant::{Invariant, Violation};
pub use journal_check::{check_journals, HostJournal, JournalReport};
pub use observer::ObservedStats;
pub use report::{RunOptions, RunReport, RunStats, Verdict};
pub use rng::SimRng;
pub use runner::{idle_pct, run_scenario};
pub use scenario::{Fault, FaultAction, ForgedFrame, HostRef, Scenario, ScenarioError, Trigger};
pub use trace::{HostId, TraceEvent, TraceKind};
pub use vm::service::{Reply, Request};
