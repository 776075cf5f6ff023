//! Scenarios: workload, topology, timing, timed faults and expectations of one simulated run.
//! The file format is documented in scenarios/README.md; [`Scenario::from_toml`] and
//! [`Scenario::load`] parse and check it and never panic.

mod disorder;
mod error;
mod fault;
mod spec;
mod swarm;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use ftvm_model::{Config, EpochPolicy, NodeId, OutputDriven, VmId};

pub use disorder::WitnessDisorder;
pub use error::ScenarioError;
pub use fault::{Fault, FaultAction, ForgedFrame, HostRef, Trigger};

use crate::invariant::Invariant;
use spec::{FaultFile, ScenarioFile};

/// The protocol node id of the witness (nodes are `1..=nodes`).
pub const WITNESS_ID: NodeId = NodeId(100);
/// The protected VM's id.
pub const VM_ID: VmId = VmId(1);
/// Largest simulated disk, in 4 KiB blocks (64 MiB: every host holds a copy or two).
pub const MAX_DISK_BLOCKS: u64 = 1 << 14;

/// The simulated VM and its workload.
#[derive(Clone, Debug, PartialEq)]
pub struct VmSpec {
    /// Guest RAM in pages.
    pub pages: u64,
    /// Page size in bytes (a power of two, at least 64).
    pub page_size: u32,
    /// Pages `0..counters` hold the counter service's state (one counter each); the workload
    /// writes only the others.
    pub counters: u64,
    /// Page writes per workload tick.
    pub writes_per_tick: u32,
    /// Workload tick.
    pub tick: Duration,
    /// How long each capture keeps the simulated VM paused (requests arriving meanwhile wait
    /// for the resume, as a paused guest's packets do). Zero: captures take no time.
    pub capture_pause: Duration,
    /// How long a full sync's copy of RAM aside takes (`Action::PreCopy`), the VM running
    /// meanwhile. Zero: the copy takes no time.
    pub pre_copy: Duration,
    /// Protected disk size in blocks of `DISK_BLOCK_SIZE` (4 KiB); 0: no disk.
    pub disk_blocks: u64,
    /// Disk block writes per workload tick (each writes a value no other write ever wrote).
    pub disk_writes_per_tick: u32,
}

/// Protocol timers (the model's [`Config`]) plus the simulated restore time.
#[derive(Clone, Debug, PartialEq)]
pub struct Timing {
    /// Epoch length.
    pub epoch: Duration,
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// Silence after which a peer is lost.
    pub failure_timeout: Duration,
    /// Witness request resend period.
    pub witness_retry: Duration,
    /// Join retry delay.
    pub join_retry: Duration,
    /// Checkpoints in flight before capturing pauses.
    pub max_unacked: u64,
    /// Time from `StartVm` to the VM running (restoring the replica).
    pub restore: Duration,
    /// Delay before a fenced node rejoins (`None`: stays fenced).
    pub rejoin_after_fence: Option<Duration>,
    /// When epochs end.
    pub epoch_policy: EpochPolicy,
}

/// Hosts of the run: nodes `n1..=nN` (n1 starts as primary, the others as backups/joiners),
/// a witness, and one client host running `clients` clients.
#[derive(Clone, Debug, PartialEq)]
pub struct Topology {
    /// Protocol nodes.
    pub nodes: u32,
    /// Clients (all on the `clients` host).
    pub clients: u32,
}

/// Initial link behaviour for every link.
#[derive(Clone, Debug, PartialEq)]
pub struct Network {
    /// Lowest message latency.
    pub latency_min: Duration,
    /// Highest message latency.
    pub latency_max: Duration,
    /// Bandwidth per link direction in bytes per millisecond (`None`: unlimited).
    pub bytes_per_ms: Option<u64>,
    /// Segment loss probability (each loss delays the stream by `rto`, like TCP).
    pub loss: f64,
    /// Retransmission timeout of a lost segment.
    pub rto: Duration,
    /// Largest write (one simulated TCP segment).
    pub chunk_bytes: usize,
    /// Simulation step. Inside a host, timers fire at their exact simulated time; messages
    /// between hosts are handed over at step boundaries, so a latency is effectively rounded
    /// up to a whole step. Each step costs every host's runtime a turn whatever happens, so the
    /// step sets the simulator's speed: 2 ms runs about twice as fast as 1 ms.
    pub step: Duration,
    /// Duplicated, reordered and lost witness messages.
    pub witness: WitnessDisorder,
}

/// Client behaviour.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientSpec {
    /// Wait for a reply this long before trying the next host.
    pub timeout: Duration,
    /// Pause between two requests.
    pub think: Duration,
    /// Pause after a failed attempt.
    pub backoff: Duration,
}

/// What must hold at the end of the run (in addition to the invariants, checked throughout).
#[derive(Clone, Debug, PartialEq)]
pub struct Expect {
    /// Invariants checked (`Driver` is always checked).
    pub invariants: BTreeSet<Invariant>,
    /// At least one failover happened (`true`) or none (`false`).
    pub failover: Option<bool>,
    /// Highest generation reached is at least this.
    pub min_generation: Option<u64>,
    /// At the end the active primary is protected by a backup.
    pub reprotected: Option<bool>,
    /// Clients saw at least this many replies.
    pub min_replies: Option<u64>,
    /// Clients saw at most this many replies.
    pub max_replies: Option<u64>,
    /// Every failover (primary lost → VM running again) took at most this long.
    pub max_outage: Option<Duration>,
    /// At most this many times a primary stopped its VM (fenced itself).
    pub max_fences: Option<u64>,
    /// Allowance on top of failure timeout + restore for the liveness check (witness round
    /// trips, retransmissions, timer granularity).
    pub liveness_slack: Duration,
    /// The clients' median response time (request sent → reply received) is at most this.
    pub max_response_p50: Option<Duration>,
    /// The VM spent at most this share of the run paused by captures, in percent.
    pub max_idle_pct: Option<u8>,
    /// No client waits longer than this for a reply to a request sent at or after
    /// `responses_from` (e.g. while a backup re-protects the VM).
    pub max_response: Option<Duration>,
    /// Start of the window `max_response` applies to (since the start of the run).
    pub responses_from: Duration,
    /// At most this many committed full syncs beyond the unavoidable ones: the first protection
    /// and one after each takeover (0: every other resync was a catch-up). A full sync cut
    /// short and started again counts once, when a replica commits it.
    pub max_extra_full_syncs: Option<u64>,
}

/// Expectations that differ on real hosts, with the reason: a fault whose effect the
/// simulator lets through to the model (a forged witness reply) may be refused on real hosts
/// before the model sees it, and then its outcome differs by design.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpectReal {
    /// Why real hosts see another outcome.
    pub why: String,
    /// Replaces `failover`.
    pub failover: Option<bool>,
    /// Replaces `min_generation`.
    pub min_generation: Option<u64>,
    /// Replaces `max_fences`.
    pub max_fences: Option<u64>,
}

/// A checked scenario.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    /// Short name.
    pub name: String,
    /// What it exercises.
    pub description: String,
    /// Simulated duration of the run.
    pub duration: Duration,
    /// VM and workload.
    pub vm: VmSpec,
    /// Protocol timing.
    pub timing: Timing,
    /// Hosts.
    pub topology: Topology,
    /// Links.
    pub network: Network,
    /// Clients.
    pub clients: ClientSpec,
    /// Faults in file order.
    pub faults: Vec<Fault>,
    /// Expectations.
    pub expect: Expect,
    /// Where real hosts must see other outcomes than the simulator (see
    /// [`Scenario::on_real_hosts`]).
    pub expect_real: Option<ExpectReal>,
    /// Draw the protocol timings and link latencies of each run from its seed, around the
    /// values above (see [`Scenario::swarmed`]).
    pub swarm: bool,
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl Scenario {
    /// Parse and check a scenario from TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Scenario, ScenarioError> {
        let file: ScenarioFile = toml::from_str(text).map_err(|e| ScenarioError::Parse {
            origin: origin.to_string(),
            message: e.message().replace('\n', " ").trim().to_string()
                + &e.span()
                    .map(|s| format!(" (at {})", line_col(text, s.start)))
                    .unwrap_or_default(),
        })?;
        let s = Scenario::from_file(file).map_err(|what| ScenarioError::Invalid {
            origin: origin.to_string(),
            what,
        })?;
        s.check().map_err(|what| ScenarioError::Invalid {
            origin: origin.to_string(),
            what,
        })?;
        Ok(s)
    }

    /// Read, parse and check a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ScenarioError::Io {
            path: path.to_path_buf(),
            cause,
        })?;
        Scenario::from_toml(&text, &path.display().to_string())
    }

    fn from_file(f: ScenarioFile) -> Result<Scenario, String> {
        let invariants = match f.expect.invariants {
            None => Invariant::ALL.into_iter().collect(),
            Some(names) => names
                .iter()
                .map(|n| {
                    Invariant::from_name(n).ok_or_else(|| {
                        format!(
                            "expect.invariants: unknown invariant `{n}` (known: {})",
                            Invariant::ALL.map(|i| i.name()).join(", ")
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let faults = f
            .faults
            .iter()
            .enumerate()
            .map(|(i, ff)| {
                fault_from_file(ff).map_err(|e| format!("fault #{} ({}): {e}", i + 1, ff.kind))
            })
            .collect::<Result<Vec<Vec<Fault>>, String>>()?
            .into_iter()
            .flatten()
            .collect();
        let t = f.timing;
        let rejoin_after_fence = if t.stay_fenced {
            None
        } else {
            Some(ms(t.rejoin_after_fence_ms.unwrap_or(t.failure_timeout_ms)))
        };
        Ok(Scenario {
            name: f.name,
            description: f.description,
            duration: ms(f.duration_ms),
            vm: VmSpec {
                pages: f.vm.pages,
                page_size: f.vm.page_size,
                counters: f.vm.counters,
                writes_per_tick: f.vm.writes_per_tick,
                tick: ms(f.vm.tick_ms),
                capture_pause: Duration::from_micros(f.vm.capture_pause_us),
                pre_copy: Duration::from_micros(f.vm.pre_copy_us),
                disk_blocks: f.vm.disk_blocks,
                disk_writes_per_tick: f.vm.disk_writes_per_tick,
            },
            timing: Timing {
                epoch: ms(t.epoch_ms),
                heartbeat: ms(t.heartbeat_ms),
                failure_timeout: ms(t.failure_timeout_ms),
                witness_retry: ms(t.witness_retry_ms),
                join_retry: ms(t.join_retry_ms),
                max_unacked: t.max_unacked,
                restore: ms(t.restore_ms),
                rejoin_after_fence,
                epoch_policy: epoch_policy(&t.epoch_policy, t.min_gap_us, t.max_idle_pct)?,
            },
            topology: Topology {
                nodes: f.topology.nodes,
                clients: f.topology.clients,
            },
            network: Network {
                latency_min: ms(f.network.latency_min_ms),
                latency_max: ms(f.network.latency_max_ms),
                bytes_per_ms: (f.network.bytes_per_ms > 0).then_some(f.network.bytes_per_ms),
                loss: f.network.loss,
                rto: ms(f.network.rto_ms),
                chunk_bytes: usize::try_from(f.network.chunk_bytes).unwrap_or(usize::MAX),
                step: ms(f.network.step_ms),
                witness: WitnessDisorder {
                    duplicate: f.network.witness_duplicate,
                    reorder: f.network.witness_reorder,
                    reply_loss: f.network.witness_reply_loss,
                    max_delay: ms(f.network.witness_delay_max_ms),
                },
            },
            clients: ClientSpec {
                timeout: ms(f.clients.timeout_ms),
                think: ms(f.clients.think_ms),
                backoff: ms(f.clients.backoff_ms),
            },
            faults,
            expect: Expect {
                invariants,
                failover: f.expect.failover,
                min_generation: f.expect.min_generation,
                reprotected: f.expect.reprotected,
                min_replies: f.expect.min_replies,
                max_replies: f.expect.max_replies,
                max_outage: f.expect.max_outage_ms.map(ms),
                max_fences: f.expect.max_fences,
                liveness_slack: ms(f.expect.liveness_slack_ms),
                max_response_p50: f.expect.max_response_p50_ms.map(ms),
                max_idle_pct: f.expect.max_idle_pct,
                max_extra_full_syncs: f.expect.max_extra_full_syncs,
                max_response: f.expect.max_response_ms.map(ms),
                responses_from: ms(f.expect.responses_from_ms),
            },
            expect_real: f.expect_real.map(|r| ExpectReal {
                why: r.why,
                failover: r.failover,
                min_generation: r.min_generation,
                max_fences: r.max_fences,
            }),
            swarm: f.swarm,
        })
    }

    /// The scenario with the expectations real hosts must meet (`[expect_real]` replaces what
    /// it names); the reason, if any differ.
    pub fn on_real_hosts(&self) -> (Scenario, Option<String>) {
        let mut s = self.clone();
        let Some(r) = &self.expect_real else {
            return (s, None);
        };
        if r.failover.is_some() {
            s.expect.failover = r.failover;
        }
        if r.min_generation.is_some() {
            s.expect.min_generation = r.min_generation;
        }
        if r.max_fences.is_some() {
            s.expect.max_fences = r.max_fences;
        }
        (s, Some(r.why.clone()))
    }

    /// Checks everything a programmatically built scenario could get wrong too.
    pub fn check(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("name must not be empty".into());
        }
        if self
            .expect_real
            .as_ref()
            .is_some_and(|r| r.why.trim().is_empty())
        {
            return Err("expect_real.why must say why real hosts see another outcome".into());
        }
        if self.duration.is_zero() || self.duration > Duration::from_secs(3600) {
            return Err("duration_ms must be in 1..=3600000".into());
        }
        let vm = &self.vm;
        if vm.pages == 0 || vm.pages > 1 << 20 {
            return Err("vm.pages must be in 1..=1048576".into());
        }
        if !vm.page_size.is_power_of_two() || !(64..=1 << 16).contains(&vm.page_size) {
            return Err("vm.page_size must be a power of two in 64..=65536".into());
        }
        if vm.counters == 0 || vm.counters >= vm.pages {
            return Err("vm.counters must be at least 1 and below vm.pages".into());
        }
        if vm.disk_blocks > MAX_DISK_BLOCKS {
            return Err(format!(
                "vm.disk_blocks must be at most {MAX_DISK_BLOCKS} (4 KiB blocks)"
            ));
        }
        if vm.disk_writes_per_tick > 0 && vm.disk_blocks == 0 {
            return Err("vm.disk_writes_per_tick needs a disk (vm.disk_blocks > 0)".into());
        }
        if vm.tick.is_zero() {
            return Err("vm.tick_ms must be at least 1".into());
        }
        self.model_config()
            .validate()
            .map_err(|e| format!("timing: {e}"))?;
        let topo = &self.topology;
        if !(1..=9).contains(&topo.nodes) {
            return Err("topology.nodes must be in 1..=9".into());
        }
        if topo.clients > 64 {
            return Err("topology.clients must be at most 64".into());
        }
        let net = &self.network;
        if net.latency_min > net.latency_max {
            return Err("network.latency_min_ms exceeds latency_max_ms".into());
        }
        if !(0.0..1.0).contains(&net.loss) {
            return Err("network.loss must be in 0 <= loss < 1".into());
        }
        if net.step.is_zero() || net.step > Duration::from_millis(10) {
            return Err("network.step_ms must be in 1..=10".into());
        }
        if net.step > self.timing.epoch / 5 {
            return Err(format!(
                "network.step_ms ({} ms) must be at most a fifth of timing.epoch_ms ({} ms)",
                net.step.as_millis(),
                self.timing.epoch.as_millis()
            ));
        }
        net.witness.check("network.witness_*")?;
        if net.chunk_bytes < 64 {
            return Err("network.chunk_bytes must be at least 64".into());
        }
        if self.clients.timeout.is_zero() {
            return Err("clients.timeout_ms must be at least 1".into());
        }
        for (i, f) in self.faults.iter().enumerate() {
            self.check_fault(f)
                .map_err(|e| format!("fault #{} ({}): {e}", i + 1, f.action))?;
        }
        Ok(())
    }

    fn check_fault(&self, f: &Fault) -> Result<(), String> {
        let host = |h: &HostRef| match *h {
            HostRef::Node(k) if k > self.topology.nodes => Err(format!(
                "host n{k} does not exist (topology.nodes = {})",
                self.topology.nodes
            )),
            _ => Ok(()),
        };
        let node = |h: &HostRef| match *h {
            HostRef::Witness | HostRef::Clients => Err(format!(
                "{h} is not a node (forged frames travel between nodes)"
            )),
            _ => Ok(()),
        };
        let link = |a: &HostRef, b: &HostRef| {
            host(a)?;
            host(b)?;
            if a == b {
                Err(format!("a link needs two different hosts, got {a} twice"))
            } else {
                Ok(())
            }
        };
        match &f.action {
            FaultAction::Crash { host: h, .. } | FaultAction::Restart { host: h, .. } => {
                host(h)?;
                if *h == HostRef::Clients {
                    return Err("the clients host cannot crash (partition it instead)".into());
                }
                Ok(())
            }
            FaultAction::Isolate { host: h } => host(h),
            FaultAction::Partition { a, b, .. }
            | FaultAction::Repair { a, b, .. }
            | FaultAction::Hold { a, b }
            | FaultAction::Release { a, b }
            | FaultAction::Bandwidth { a, b, .. } => link(a, b),
            FaultAction::Latency { a, b, min, max } => {
                link(a, b)?;
                if min > max {
                    return Err("min_ms exceeds max_ms".into());
                }
                Ok(())
            }
            FaultAction::Corrupt { from, to } => link(from, to),
            FaultAction::ForgeGeneration { from, to, .. } => {
                link(from, to)?;
                node(from)?;
                node(to)
            }
            FaultAction::ForgeWitnessReply { host: h } => {
                host(h)?;
                node(h)
            }
            FaultAction::Loss { link: l, rate } => {
                if let Some((a, b)) = l {
                    link(a, b)?;
                }
                if !(0.0..1.0).contains(rate) {
                    return Err("rate must be in 0 <= rate < 1".into());
                }
                Ok(())
            }
            FaultAction::WitnessDisorder(d) => d.check("witness-disorder"),
            FaultAction::Heal => Ok(()),
        }
    }

    /// The model configuration every node of this scenario runs with.
    pub fn model_config(&self) -> Config {
        let mut c = Config::new(VM_ID, self.vm.pages, WITNESS_ID);
        c.page_size = self.vm.page_size;
        c.disk_blocks = self.vm.disk_blocks;
        c.epoch_interval = self.timing.epoch;
        c.heartbeat_interval = self.timing.heartbeat;
        c.failure_timeout = self.timing.failure_timeout;
        c.witness_retry = self.timing.witness_retry;
        c.join_retry = self.timing.join_retry;
        c.max_unacked = self.timing.max_unacked;
        c.rejoin_after_fence = self.timing.rejoin_after_fence;
        c.epoch_policy = self.timing.epoch_policy;
        c
    }

    /// The scenario run under another epoch policy (what `--epoch-policy` does to a file, and
    /// how the suites run every file under both policies).
    pub fn with_epoch_policy(&self, policy: EpochPolicy) -> Scenario {
        let mut s = self.clone();
        s.timing.epoch_policy = policy;
        s
    }

    /// The scenario under the policy named `name` (`fixed`, `output`); `output` keeps the
    /// file's bounds when it has them, the defaults otherwise.
    pub fn with_epoch_policy_named(&self, name: &str) -> Result<Scenario, String> {
        let bounds = match self.timing.epoch_policy {
            EpochPolicy::Output(b) => b,
            EpochPolicy::Fixed => OutputDriven::default(),
        };
        EpochPolicy::named(name, bounds)
            .map(|p| self.with_epoch_policy(p))
            .ok_or_else(|| format!("unknown epoch policy \"{name}\" (fixed, output)"))
    }
}

/// `timing.epoch_policy` with its bounds: `fixed` or `output`.
pub fn epoch_policy(name: &str, min_gap_us: u64, max_idle_pct: u8) -> Result<EpochPolicy, String> {
    let bounds = OutputDriven {
        min_gap: Duration::from_micros(min_gap_us),
        max_idle_pct,
    };
    EpochPolicy::named(name, bounds).ok_or_else(|| {
        format!("timing.epoch_policy is \"{name}\"; it must be \"fixed\" or \"output\"")
    })
}

fn line_col(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {col}")
}

fn need<T: Clone>(v: &Option<T>, field: &str) -> Result<T, String> {
    v.clone().ok_or_else(|| format!("missing field `{field}`"))
}

fn host_field(v: &Option<String>, field: &str) -> Result<HostRef, String> {
    let s = need(v, field)?;
    HostRef::parse(&s).ok_or_else(|| {
        format!(
            "`{field}`: unknown host `{s}` (use n1..n9, witness, clients, primary, backup, spare)"
        )
    })
}

/// Which optional fields each fault kind accepts (anything else set is an error).
fn allowed(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "crash" => &["host", "silent"],
        "restart" => &["host", "keep_replica"],
        "isolate" => &["host"],
        "partition" | "repair" => &["a", "b", "oneway"],
        "heal" => &[],
        "hold" | "release" | "corrupt" => &["a", "b"],
        "loss" => &["a", "b", "rate"],
        "latency" => &["a", "b", "min_ms", "max_ms"],
        "bandwidth" => &["a", "b", "bytes_per_ms"],
        "flap" => &["a", "b", "period_ms", "count"],
        "forge-generation" => &["a", "b", "frame", "generation"],
        "forge-witness-reply" => &["host"],
        "witness-disorder" => &["duplicate", "reorder", "reply_loss", "max_ms"],
        _ => return None,
    })
}

fn fault_from_file(f: &FaultFile) -> Result<Vec<Fault>, String> {
    let allowed = allowed(&f.kind).ok_or_else(|| {
        "unknown kind (use crash, restart, partition, repair, isolate, heal, hold, release, \
         loss, latency, bandwidth, corrupt, flap, forge-generation, forge-witness-reply, \
         witness-disorder)"
            .to_string()
    })?;
    let set: [(&str, bool); 17] = [
        ("host", f.host.is_some()),
        ("a", f.a.is_some()),
        ("b", f.b.is_some()),
        ("oneway", f.oneway.is_some()),
        ("silent", f.silent.is_some()),
        ("keep_replica", f.keep_replica.is_some()),
        ("rate", f.rate.is_some()),
        ("min_ms", f.min_ms.is_some()),
        ("max_ms", f.max_ms.is_some()),
        ("bytes_per_ms", f.bytes_per_ms.is_some()),
        ("period_ms", f.period_ms.is_some()),
        ("count", f.count.is_some()),
        ("frame", f.frame.is_some()),
        ("generation", f.generation.is_some()),
        ("duplicate", f.duplicate.is_some()),
        ("reorder", f.reorder.is_some()),
        ("reply_loss", f.reply_loss.is_some()),
    ];
    if let Some((name, _)) = set.iter().find(|(n, s)| *s && !allowed.contains(n)) {
        return Err(format!("field `{name}` does not apply to this kind"));
    }
    let at = ms(need(&f.at_ms, "at_ms")?);
    let when = match &f.when {
        None => Trigger::At,
        Some(w) => Trigger::parse(w).ok_or_else(|| {
            format!(
                "`when`: unknown trigger `{w}` (use at, sending, between_checkpoints, syncing, \
                 registering, protected, catching_up)"
            )
        })?,
    };
    let jitter = ms(f.jitter_ms);
    let one = |action| {
        Ok(vec![Fault {
            at,
            jitter,
            when,
            action,
        }])
    };
    let oneway = f.oneway.unwrap_or(false);
    match f.kind.as_str() {
        "crash" => one(FaultAction::Crash {
            host: host_field(&f.host, "host")?,
            silent: f.silent.unwrap_or(true),
        }),
        "restart" => one(FaultAction::Restart {
            host: host_field(&f.host, "host")?,
            keep_replica: f.keep_replica.unwrap_or(false),
        }),
        "isolate" => one(FaultAction::Isolate {
            host: host_field(&f.host, "host")?,
        }),
        "heal" => one(FaultAction::Heal),
        "partition" => one(FaultAction::Partition {
            a: host_field(&f.a, "a")?,
            b: host_field(&f.b, "b")?,
            oneway,
        }),
        "repair" => one(FaultAction::Repair {
            a: host_field(&f.a, "a")?,
            b: host_field(&f.b, "b")?,
            oneway,
        }),
        "hold" => one(FaultAction::Hold {
            a: host_field(&f.a, "a")?,
            b: host_field(&f.b, "b")?,
        }),
        "release" => one(FaultAction::Release {
            a: host_field(&f.a, "a")?,
            b: host_field(&f.b, "b")?,
        }),
        "corrupt" => one(FaultAction::Corrupt {
            from: host_field(&f.a, "a")?,
            to: host_field(&f.b, "b")?,
        }),
        "forge-generation" => {
            let frame = match &f.frame {
                None => ForgedFrame::Join,
                Some(s) => ForgedFrame::parse(s).ok_or_else(|| {
                    format!("`frame`: unknown frame `{s}` (use join, heartbeat, ack, reject)")
                })?,
            };
            let generation = f.generation.unwrap_or(u64::MAX);
            if generation < 2 {
                return Err("`generation` must be at least 2 (newer than the first)".into());
            }
            one(FaultAction::ForgeGeneration {
                from: host_field(&f.a, "a")?,
                to: host_field(&f.b, "b")?,
                frame,
                generation,
            })
        }
        "forge-witness-reply" => one(FaultAction::ForgeWitnessReply {
            host: host_field(&f.host, "host")?,
        }),
        "witness-disorder" => one(FaultAction::WitnessDisorder(WitnessDisorder {
            duplicate: f.duplicate.unwrap_or(0.0),
            reorder: f.reorder.unwrap_or(0.0),
            reply_loss: f.reply_loss.unwrap_or(0.0),
            max_delay: ms(f.max_ms.unwrap_or(0)),
        })),
        "loss" => {
            let link = match (&f.a, &f.b) {
                (None, None) => None,
                _ => Some((host_field(&f.a, "a")?, host_field(&f.b, "b")?)),
            };
            one(FaultAction::Loss {
                link,
                rate: need(&f.rate, "rate")?,
            })
        }
        "latency" => one(FaultAction::Latency {
            a: host_field(&f.a, "a")?,
            b: host_field(&f.b, "b")?,
            min: ms(need(&f.min_ms, "min_ms")?),
            max: ms(need(&f.max_ms, "max_ms")?),
        }),
        "bandwidth" => one(FaultAction::Bandwidth {
            a: host_field(&f.a, "a")?,
            b: host_field(&f.b, "b")?,
            bytes_per_ms: need(&f.bytes_per_ms, "bytes_per_ms").map(|b| (b > 0).then_some(b))?,
        }),
        "flap" => {
            let (a, b) = (host_field(&f.a, "a")?, host_field(&f.b, "b")?);
            let period = need(&f.period_ms, "period_ms")?;
            let count = need(&f.count, "count")?;
            if period == 0 || count == 0 || count > 1000 {
                return Err("period_ms must be > 0 and count in 1..=1000".into());
            }
            if f.when.is_some() || f.jitter_ms > 0 {
                return Err("flap takes no `when` or `jitter_ms`".into());
            }
            // Down for `period`, up for `period`, `count` times.
            let mut out = Vec::new();
            for i in 0..u64::from(count) {
                let down = at + ms(2 * i * period);
                out.push(Fault::at_ms(
                    down.as_millis() as u64,
                    FaultAction::Partition {
                        a,
                        b,
                        oneway: false,
                    },
                ));
                out.push(Fault::at_ms(
                    (down + ms(period)).as_millis() as u64,
                    FaultAction::Repair {
                        a,
                        b,
                        oneway: false,
                    },
                ));
            }
            Ok(out)
        }
        _ => Err("unknown kind".into()),
    }
}

#[cfg(test)]
mod tests;
