//! Typed faults: what happens, to which hosts or links, and when.

use std::fmt;
use std::time::Duration;

use super::WitnessDisorder;

/// A host named in a fault. `Primary`/`Backup` are resolved when the fault fires (the active
/// primary, and the backup following it), so "crash the new primary" needs no node name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostRef {
    /// Node `n<k>` (protocol node id `k`, 1-based).
    Node(u32),
    /// The witness host.
    Witness,
    /// The host running every client.
    Clients,
    /// The active primary when the fault fires.
    Primary,
    /// The backup following the active primary when the fault fires.
    Backup,
    /// The lowest-numbered up node that is neither the active primary nor its backup (a
    /// joiner waiting for room) when the fault fires.
    Spare,
}

impl HostRef {
    /// Parse `n1`, `witness`, `clients`, `primary`, `backup`.
    pub fn parse(s: &str) -> Option<HostRef> {
        match s {
            "witness" => Some(HostRef::Witness),
            "clients" => Some(HostRef::Clients),
            "primary" => Some(HostRef::Primary),
            "backup" => Some(HostRef::Backup),
            "spare" => Some(HostRef::Spare),
            _ => {
                let k: u32 = s.strip_prefix('n')?.parse().ok()?;
                (k >= 1).then_some(HostRef::Node(k))
            }
        }
    }
}

impl fmt::Display for HostRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostRef::Node(k) => write!(f, "n{k}"),
            HostRef::Witness => f.write_str("witness"),
            HostRef::Clients => f.write_str("clients"),
            HostRef::Primary => f.write_str("primary"),
            HostRef::Backup => f.write_str("backup"),
            HostRef::Spare => f.write_str("spare"),
        }
    }
}

/// Extra condition a fault waits for once its time has come.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// Fire at the time.
    At,
    /// Wait until the active primary is in the middle of writing a checkpoint (at least
    /// half of it handed to the network, not all).
    Sending,
    /// Wait until the active primary has no checkpoint in flight (mid-epoch).
    BetweenCheckpoints,
    /// Wait until the active primary is fully syncing a joiner.
    Syncing,
    /// Wait until the active primary has asked the witness to register its backup and has no
    /// answer yet.
    Registering,
    /// Wait until the active primary is protected by a registered backup.
    Protected,
    /// Wait until the active primary has captured a catch-up sync its backup has not acked.
    CatchingUp,
}

impl Trigger {
    pub(crate) fn parse(s: &str) -> Option<Trigger> {
        Some(match s {
            "at" => Trigger::At,
            "sending" => Trigger::Sending,
            "between_checkpoints" => Trigger::BetweenCheckpoints,
            "syncing" => Trigger::Syncing,
            "registering" => Trigger::Registering,
            "protected" => Trigger::Protected,
            "catching_up" => Trigger::CatchingUp,
            _ => return None,
        })
    }
}

/// The peer frame a [`FaultAction::ForgeGeneration`] fault injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ForgedFrame {
    /// A `Join` naming the sender, with the forged generation as its known generation.
    Join,
    /// A `Heartbeat` of the forged generation.
    Heartbeat,
    /// An `Ack` of epoch 1 in the forged generation.
    Ack,
    /// A `Reject { Busy }` of the forged generation.
    Reject,
}

impl ForgedFrame {
    pub(crate) fn parse(s: &str) -> Option<ForgedFrame> {
        Some(match s {
            "join" => ForgedFrame::Join,
            "heartbeat" => ForgedFrame::Heartbeat,
            "ack" => ForgedFrame::Ack,
            "reject" => ForgedFrame::Reject,
            _ => return None,
        })
    }
}

impl fmt::Display for ForgedFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ForgedFrame::Join => "join",
            ForgedFrame::Heartbeat => "heartbeat",
            ForgedFrame::Ack => "ack",
            ForgedFrame::Reject => "reject",
        })
    }
}

/// What a fault does.
#[derive(Clone, Debug, PartialEq)]
pub enum FaultAction {
    /// Kill the host's software. `silent`: its links go dark first (a power cut: peers hear
    /// nothing, not even a FIN); otherwise the process dies and its sockets close.
    Crash {
        /// Host.
        host: HostRef,
        /// Power cut rather than process death.
        silent: bool,
    },
    /// Start a crashed host again. A node comes back as `Start::Rejoin` with an empty replica,
    /// or with `keep_replica` as `Start::Resume` with the replica it last committed (a backup
    /// process restarted on the same host); the witness comes back with its persisted register.
    Restart {
        /// Host.
        host: HostRef,
        /// A node keeps its committed replica.
        keep_replica: bool,
    },
    /// Drop every message from `a` to `b` (and `b` to `a` unless `oneway`).
    Partition {
        /// One side.
        a: HostRef,
        /// Other side.
        b: HostRef,
        /// Only `a → b`.
        oneway: bool,
    },
    /// Undo a partition (`a → b` only if `oneway`).
    Repair {
        /// One side.
        a: HostRef,
        /// Other side.
        b: HostRef,
        /// Only `a → b`.
        oneway: bool,
    },
    /// Partition `host` from every other host.
    Isolate {
        /// Host.
        host: HostRef,
    },
    /// Repair every partition and release every hold.
    Heal,
    /// Hold messages between `a` and `b` (delivered at `Release`).
    Hold {
        /// One side.
        a: HostRef,
        /// Other side.
        b: HostRef,
    },
    /// Deliver held messages and stop holding.
    Release {
        /// One side.
        a: HostRef,
        /// Other side.
        b: HostRef,
    },
    /// Segment loss with TCP retransmission on the link (every link when `None`).
    Loss {
        /// Link, or all links.
        link: Option<(HostRef, HostRef)>,
        /// Probability that a segment is lost (and resent after the RTO).
        rate: f64,
    },
    /// Message latency range on a link.
    Latency {
        /// One side.
        a: HostRef,
        /// Other side.
        b: HostRef,
        /// Lowest latency.
        min: Duration,
        /// Highest latency.
        max: Duration,
    },
    /// Bandwidth of a link in bytes per millisecond (`None`: unlimited).
    Bandwidth {
        /// One side.
        a: HostRef,
        /// Other side.
        b: HostRef,
        /// Bytes per millisecond.
        bytes_per_ms: Option<u64>,
    },
    /// Flip one byte of page data in the next checkpoint sent from `from` to `to`.
    Corrupt {
        /// Sender.
        from: HostRef,
        /// Receiver.
        to: HostRef,
    },
    /// Slip one well-formed peer frame of generation `generation` into the next write on the
    /// checkpoint link `from → to`, ahead of what `from` sends (a forged or stale frame).
    ForgeGeneration {
        /// The node whose link carries it (the frame names it as sender).
        from: HostRef,
        /// Receiver.
        to: HostRef,
        /// Which message.
        frame: ForgedFrame,
        /// The generation it claims.
        generation: u64,
    },
    /// The next witness reply `host` receives shows the register one generation ahead of the
    /// witness's (a forged reply).
    ForgeWitnessReply {
        /// The node.
        host: HostRef,
    },
    /// From now on, witness requests and replies are duplicated, reordered and lost as this
    /// says (all zero: in order again).
    WitnessDisorder(WitnessDisorder),
}

impl fmt::Display for FaultAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = |oneway: bool| if oneway { "->" } else { "<->" };
        match self {
            FaultAction::Crash { host, silent } => {
                write!(f, "crash {host}{}", if *silent { " (silent)" } else { "" })
            }
            FaultAction::Restart {
                host,
                keep_replica: false,
            } => write!(f, "restart {host}"),
            FaultAction::Restart {
                host,
                keep_replica: true,
            } => write!(f, "restart {host} keeping its replica"),
            FaultAction::Partition { a, b, oneway } => {
                write!(f, "partition {a} {} {b}", dir(*oneway))
            }
            FaultAction::Repair { a, b, oneway } => write!(f, "repair {a} {} {b}", dir(*oneway)),
            FaultAction::Isolate { host } => write!(f, "isolate {host}"),
            FaultAction::Heal => f.write_str("heal"),
            FaultAction::Hold { a, b } => write!(f, "hold {a} <-> {b}"),
            FaultAction::Release { a, b } => write!(f, "release {a} <-> {b}"),
            FaultAction::Loss { link: None, rate } => write!(f, "loss {rate} on every link"),
            FaultAction::Loss {
                link: Some((a, b)),
                rate,
            } => write!(f, "loss {rate} on {a} <-> {b}"),
            FaultAction::Latency { a, b, min, max } => {
                write!(
                    f,
                    "latency {a} <-> {b} {}..{} ms",
                    min.as_millis(),
                    max.as_millis()
                )
            }
            FaultAction::Bandwidth {
                a,
                b,
                bytes_per_ms: Some(bw),
            } => write!(f, "bandwidth {a} <-> {b} {bw} B/ms"),
            FaultAction::Bandwidth { a, b, .. } => write!(f, "bandwidth {a} <-> {b} unlimited"),
            FaultAction::Corrupt { from, to } => {
                write!(f, "corrupt next checkpoint {from} -> {to}")
            }
            FaultAction::ForgeGeneration {
                from,
                to,
                frame,
                generation,
            } => write!(
                f,
                "forge a {frame} of generation {generation} {from} -> {to}"
            ),
            FaultAction::ForgeWitnessReply { host } => {
                write!(f, "forge the next witness reply to {host}")
            }
            FaultAction::WitnessDisorder(d) => write!(f, "{d}"),
        }
    }
}

/// One timed fault.
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    /// Earliest time (simulated, from the start of the run).
    pub at: Duration,
    /// A per-seed random delay in `0..=jitter` added to `at`, so seeds explore timings.
    pub jitter: Duration,
    /// Condition waited for after `at`.
    pub when: Trigger,
    /// What happens.
    pub action: FaultAction,
}

impl Fault {
    /// A fault firing exactly at `at_ms`.
    pub fn at_ms(at_ms: u64, action: FaultAction) -> Fault {
        Fault {
            at: Duration::from_millis(at_ms),
            jitter: Duration::ZERO,
            when: Trigger::At,
            action,
        }
    }
}
