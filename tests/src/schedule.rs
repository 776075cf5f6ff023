//! Random fault schedules for the property tests: a list of timed faults drawn from the
//! simulator's whole fault vocabulary, each disturbance paired with its undo (restart, repair,
//! heal, release) so runs alternate between trouble and recovery.

use std::time::Duration;

use ftvm_sim::scenario::WitnessDisorder;
use ftvm_sim::{Fault, FaultAction, HostRef, Scenario, Trigger};
use proptest::prelude::*;

/// One disturbance and, for most, its undo after `lasts_ms`.
#[derive(Clone, Debug)]
pub enum Disturbance {
    /// Crash a node (by name or by role at fire time) and, if `restart_after_ms`, start it again.
    Crash {
        /// Node.
        host: HostRef,
        /// Power cut rather than process death.
        silent: bool,
        /// Restart after this long (never when `None`).
        restart_after_ms: Option<u64>,
    },
    /// Crash the witness and restart it.
    WitnessOutage {
        /// Down for this long.
        lasts_ms: u64,
    },
    /// Partition two hosts (maybe one way) and repair.
    Partition {
        /// One side.
        a: HostRef,
        /// Other side.
        b: HostRef,
        /// Only `a → b`.
        oneway: bool,
        /// Repair after this long.
        lasts_ms: u64,
    },
    /// Isolate a host, then heal everything.
    Isolate {
        /// Host.
        host: HostRef,
        /// Heal after this long.
        lasts_ms: u64,
    },
    /// Hold the messages of a link, then deliver them.
    Hold {
        /// One side.
        a: HostRef,
        /// Other side.
        b: HostRef,
        /// Release after this long.
        lasts_ms: u64,
    },
    /// Segment loss on a link (or everywhere) for a while.
    Loss {
        /// Link, or all links.
        link: Option<(HostRef, HostRef)>,
        /// Loss rate.
        rate: f64,
        /// Back to no loss after this long.
        lasts_ms: u64,
    },
    /// A slow link: latency up to `max_ms` and a bandwidth cap, for a while.
    Slow {
        /// One side.
        a: HostRef,
        /// Other side.
        b: HostRef,
        /// Highest latency.
        max_ms: u64,
        /// Bandwidth cap.
        bytes_per_ms: u64,
        /// Back to normal after this long.
        lasts_ms: u64,
    },
    /// Damage the next checkpoint from the primary to its backup.
    Corrupt,
    /// Witness requests and replies duplicated, reordered and lost for a while.
    WitnessDisorder {
        /// How.
        disorder: WitnessDisorder,
        /// Back to in-order traffic after this long.
        lasts_ms: u64,
    },
    /// The primary's witness link stalls (its messages held) as it loses its backup, so the
    /// backup's takeover may overtake what the primary asked the witness; every link heals
    /// after `heal_ms` from the start of the run.
    WitnessStall {
        /// When everything heals (an absolute time: stalls start at the first registration).
        heal_ms: u64,
    },
}

/// A disturbance placed in time.
#[derive(Clone, Debug)]
pub struct Timed {
    /// When it starts, from the beginning of the run.
    pub at_ms: u64,
    /// What the fault waits for once its time has come.
    pub when: Trigger,
    /// What happens.
    pub what: Disturbance,
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl Timed {
    /// The scenario faults of this disturbance (start, and undo if any).
    pub fn faults(&self) -> Vec<Fault> {
        let start = |action| Fault {
            at: ms(self.at_ms),
            jitter: Duration::ZERO,
            when: self.when,
            action,
        };
        // Undos fire at a time, not on a condition: a condition that never comes would hold
        // back every later fault.
        let undo = |after: u64, action| Fault::at_ms(self.at_ms + after, action);
        match self.what.clone() {
            Disturbance::Crash {
                host,
                silent,
                restart_after_ms,
            } => {
                let mut v = vec![start(FaultAction::Crash { host, silent })];
                if let Some(after) = restart_after_ms {
                    v.push(undo(
                        after,
                        FaultAction::Restart {
                            host,
                            keep_replica: false,
                        },
                    ));
                }
                v
            }
            Disturbance::WitnessOutage { lasts_ms } => vec![
                start(FaultAction::Crash {
                    host: HostRef::Witness,
                    silent: true,
                }),
                undo(
                    lasts_ms,
                    FaultAction::Restart {
                        host: HostRef::Witness,
                        keep_replica: false,
                    },
                ),
            ],
            Disturbance::Partition {
                a,
                b,
                oneway,
                lasts_ms,
            } => vec![
                start(FaultAction::Partition { a, b, oneway }),
                undo(lasts_ms, FaultAction::Repair { a, b, oneway }),
            ],
            Disturbance::Isolate { host, lasts_ms } => vec![
                start(FaultAction::Isolate { host }),
                undo(lasts_ms, FaultAction::Heal),
            ],
            Disturbance::Hold { a, b, lasts_ms } => vec![
                start(FaultAction::Hold { a, b }),
                undo(lasts_ms, FaultAction::Release { a, b }),
            ],
            Disturbance::Loss {
                link,
                rate,
                lasts_ms,
            } => vec![
                start(FaultAction::Loss { link, rate }),
                undo(lasts_ms, FaultAction::Loss { link, rate: 0.0 }),
            ],
            Disturbance::Slow {
                a,
                b,
                max_ms,
                bytes_per_ms,
                lasts_ms,
            } => vec![
                start(FaultAction::Latency {
                    a,
                    b,
                    min: ms(1),
                    max: ms(max_ms),
                }),
                start(FaultAction::Bandwidth {
                    a,
                    b,
                    bytes_per_ms: Some(bytes_per_ms),
                }),
                undo(
                    lasts_ms,
                    FaultAction::Latency {
                        a,
                        b,
                        min: ms(1),
                        max: ms(3),
                    },
                ),
                undo(
                    lasts_ms,
                    FaultAction::Bandwidth {
                        a,
                        b,
                        bytes_per_ms: None,
                    },
                ),
            ],
            Disturbance::Corrupt => vec![start(FaultAction::Corrupt {
                from: HostRef::Primary,
                to: HostRef::Backup,
            })],
            Disturbance::WitnessDisorder { disorder, lasts_ms } => vec![
                start(FaultAction::WitnessDisorder(disorder)),
                undo(
                    lasts_ms,
                    FaultAction::WitnessDisorder(WitnessDisorder::default()),
                ),
            ],
            Disturbance::WitnessStall { heal_ms } => vec![
                start(FaultAction::Hold {
                    a: HostRef::Primary,
                    b: HostRef::Witness,
                }),
                start(FaultAction::Partition {
                    a: HostRef::Primary,
                    b: HostRef::Backup,
                    oneway: false,
                }),
                Fault::at_ms(heal_ms, FaultAction::Heal),
            ],
        }
    }
}

/// A whole schedule with the simulator seed that runs it.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// Nodes in the cluster (`n1..nN`).
    pub nodes: u32,
    /// The disturbances, in any order (the scenario sorts faults by time).
    pub steps: Vec<Timed>,
    /// Seed of the simulation (network timings, workload, client choices).
    pub seed: u64,
}

impl Schedule {
    /// `base` with this schedule's nodes and faults (sorted by time, as the file loader does).
    pub fn apply(&self, base: &Scenario) -> Scenario {
        let mut s = base.clone();
        s.topology.nodes = self.nodes;
        s.name = format!("random-{}-nodes", self.nodes);
        let mut faults: Vec<Fault> = self.steps.iter().flat_map(Timed::faults).collect();
        faults.sort_by_key(|f| f.at);
        s.faults = faults;
        s.expect.failover = None;
        s.expect.min_generation = None;
        s.expect.reprotected = None;
        s.expect.min_replies = None;
        s.expect.max_replies = None;
        s.expect.max_outage = None;
        s
    }
}

fn node(nodes: u32) -> impl Strategy<Value = HostRef> {
    prop_oneof![
        (1..=nodes).prop_map(HostRef::Node),
        Just(HostRef::Primary),
        Just(HostRef::Backup),
    ]
}

fn any_host(nodes: u32) -> impl Strategy<Value = HostRef> {
    prop_oneof![
        3 => node(nodes),
        1 => Just(HostRef::Witness),
        1 => Just(HostRef::Clients),
    ]
}

fn link(nodes: u32) -> impl Strategy<Value = (HostRef, HostRef)> {
    (any_host(nodes), any_host(nodes)).prop_filter("a link has two ends", |(a, b)| a != b)
}

fn trigger() -> impl Strategy<Value = Trigger> {
    prop_oneof![
        4 => Just(Trigger::At),
        1 => Just(Trigger::Sending),
        1 => Just(Trigger::BetweenCheckpoints),
    ]
}

/// Host crashes and restarts only (nodes and the witness).
pub fn crash_disturbance(nodes: u32) -> impl Strategy<Value = Disturbance> {
    prop_oneof![
        4 => (node(nodes), any::<bool>(), proptest::option::weighted(0.8, 50u64..1500))
            .prop_map(|(host, silent, restart_after_ms)| Disturbance::Crash {
                host,
                silent,
                restart_after_ms,
            }),
        1 => (50u64..1000).prop_map(|lasts_ms| Disturbance::WitnessOutage { lasts_ms }),
    ]
}

/// Network faults only: every host stays up.
pub fn network_disturbance(nodes: u32) -> impl Strategy<Value = Disturbance> {
    prop_oneof![
        3 => (link(nodes), any::<bool>(), 20u64..1000).prop_map(|((a, b), oneway, lasts_ms)| {
            Disturbance::Partition { a, b, oneway, lasts_ms }
        }),
        2 => (any_host(nodes), 20u64..1000)
            .prop_map(|(host, lasts_ms)| Disturbance::Isolate { host, lasts_ms }),
        1 => (link(nodes), 5u64..400)
            .prop_map(|((a, b), lasts_ms)| Disturbance::Hold { a, b, lasts_ms }),
        2 => (proptest::option::of(link(nodes)), 0.01f64..0.2, 50u64..1500)
            .prop_map(|(link, rate, lasts_ms)| Disturbance::Loss { link, rate, lasts_ms }),
        2 => (link(nodes), 3u64..60, 200u64..5000, 50u64..1500).prop_map(
            |((a, b), max_ms, bytes_per_ms, lasts_ms)| Disturbance::Slow {
                a,
                b,
                max_ms,
                bytes_per_ms,
                lasts_ms,
            }
        ),
        1 => Just(Disturbance::Corrupt),
        2 => (witness_disorder(), 50u64..2000)
            .prop_map(|(disorder, lasts_ms)| Disturbance::WitnessDisorder { disorder, lasts_ms }),
    ]
}

/// Some disorder of witness traffic (duplicates, reordering, lost replies, late by up to 2 s).
pub fn witness_disorder() -> impl Strategy<Value = WitnessDisorder> {
    (0.0f64..0.6, 0.0f64..0.4, 0.0f64..0.3, 1u64..2000).prop_map(
        |(duplicate, reorder, reply_loss, max_ms)| WitnessDisorder {
            duplicate,
            reorder,
            reply_loss,
            max_delay: ms(max_ms),
        },
    )
}

/// The races of witness requests: disordered witness traffic from the start, maybe a stall of
/// the primary's witness link at the first registration (as it loses its backup), then crashes
/// and network faults, some waiting for the primary to be protected (a registration was just
/// granted, copies of it may still travel) or to be registering.
pub fn witness_schedule() -> impl Strategy<Value = Schedule> {
    (2..=3u32).prop_flat_map(|n| {
        let step = (
            40u64..2500,
            prop_oneof![
                2 => Just(Trigger::At),
                1 => Just(Trigger::Protected),
                1 => Just(Trigger::Registering),
            ],
            mixed_disturbance(n),
        )
            .prop_map(|(at_ms, when, what)| Timed { at_ms, when, what });
        (
            Just(n),
            witness_disorder(),
            proptest::option::of(165u64..=195),
            proptest::collection::vec(step, 1..=5),
            any::<u64>(),
        )
            .prop_map(|(nodes, disorder, stall, mut steps, seed)| {
                steps.push(Timed {
                    at_ms: 0,
                    when: Trigger::At,
                    what: Disturbance::WitnessDisorder {
                        disorder,
                        lasts_ms: 3000,
                    },
                });
                if let Some(heal_ms) = stall {
                    steps.push(Timed {
                        at_ms: 0,
                        when: Trigger::Registering,
                        what: Disturbance::WitnessStall { heal_ms },
                    });
                }
                Schedule { nodes, steps, seed }
            })
    })
}

/// Crashes and network faults alike.
pub fn mixed_disturbance(nodes: u32) -> BoxedStrategy<Disturbance> {
    prop_oneof![crash_disturbance(nodes), network_disturbance(nodes)].boxed()
}

/// The scenario every random schedule is planted into: a short, busy run with two clients,
/// its protocol timings and latencies drawn from each run's seed (`swarm`).
pub fn base_scenario() -> Scenario {
    Scenario::from_toml(
        r#"
name = "random"
description = "base of the random fault schedules"
duration_ms = 3000
swarm = true

[vm]
pages = 64
writes_per_tick = 3
disk_blocks = 32
disk_writes_per_tick = 1

[topology]
clients = 2
"#,
        "schedule.rs",
    )
    .expect("base scenario")
}

/// `count` disturbances from `what`, starting in `40..horizon_ms`.
pub fn schedule<S>(
    nodes: std::ops::RangeInclusive<u32>,
    count: std::ops::RangeInclusive<usize>,
    horizon_ms: u64,
    what: fn(u32) -> S,
) -> impl Strategy<Value = Schedule>
where
    S: Strategy<Value = Disturbance> + 'static,
{
    nodes.prop_flat_map(move |n| {
        // From 40 ms on: the initial sync has committed, so every run has checkpoints to check.
        let step = (40..horizon_ms, trigger(), what(n)).prop_map(|(at_ms, when, what)| Timed {
            at_ms,
            when,
            what,
        });
        (
            Just(n),
            proptest::collection::vec(step, count.clone()),
            any::<u64>(),
        )
            .prop_map(|(nodes, steps, seed)| Schedule { nodes, steps, seed })
    })
}
