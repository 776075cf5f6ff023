//! How `ftvm scenario run --real` produces each fault of a scenario file on real hosts, and
//! what it says it did. Crashes kill processes (a silent one takes the host's links down
//! first), restarts start them again, partitions and isolation change routes and links; loss is nftables drop rules and latency, bandwidth,
//! holds and corruption are done by the link relays (`ftvm_real::host::fault_net`). Forged
//! frames are slipped in by the relays too, but real links authenticate every frame: the
//! receiver refuses them, which is what a real run shows.

use ftvm_real::host::fault_net::{self, Side};
use ftvm_real::host::relay::{ExchangeDisorder, LinkEnd, Shape};
use ftvm_real::host::topology::Host;
use std::time::{Duration, Instant};

use ftvm_model::{Epoch, Generation, NodeId, PeerMsg, RejectReason, VmId};
use ftvm_sim::scenario::WitnessDisorder;
use ftvm_sim::{FaultAction, ForgedFrame, HostRef, Scenario, Trigger};

use crate::deploy::{self, status, Deployment, Proc};

/// What became of one fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Produced; how.
    Applied(String),
    /// Not produced; why.
    Skipped(String),
}

/// The VM id of deployments (the agents' default `--vm`).
const DEPLOYED_VM: u64 = 1;

/// The real guest's page size: what a dirty page costs on the wire.
const REAL_PAGE_BYTES: u64 = 4096;

/// A scenario's bandwidth on real hosts: scaled by the ratio of the real guest's page size to
/// the scenario's `vm.page_size`, so that a checkpoint of as many dirty pages takes as long on
/// the wire as in the simulator (the simulated VM has 128 pages of 512 bytes; the real guest's
/// pages are 4 KiB).
pub fn real_bandwidth(s: &Scenario, bytes_per_ms: Option<u64>) -> Option<u64> {
    let scale = (REAL_PAGE_BYTES / u64::from(s.vm.page_size.max(1))).max(1);
    bytes_per_ms
        .filter(|&b| b > 0)
        .map(|b| b.saturating_mul(scale))
}

fn describe_bandwidth(bytes_per_ms: Option<u64>) -> String {
    bytes_per_ms.map_or("unlimited".to_string(), |b| format!("{b} B/ms"))
}

/// The relayed links' starting shape from a scenario's `[network]` table.
pub fn network_shape(s: &Scenario) -> Shape {
    Shape {
        latency_min: s.network.latency_min,
        latency_max: s.network.latency_max,
        bytes_per_ms: real_bandwidth(s, s.network.bytes_per_ms),
    }
}

/// How long the deployed agents wait for a witness reply (their model's default resend
/// interval, as the agent turns it into an exchange timeout).
fn agent_witness_timeout() -> Duration {
    let cfg = ftvm_model::Config::new(VmId(DEPLOYED_VM), 1, NodeId(0));
    ftvm_real::agent::witness_exchange_timeout(cfg.witness_retry)
}

/// Switches the witness relays' exchange disorder to `w` (off when it is inactive); returns
/// how it is produced.
fn set_witness_disorder(
    s: &Scenario,
    d: &mut Deployment,
    w: &WitnessDisorder,
) -> anyhow::Result<String> {
    let agent_timeout = agent_witness_timeout();
    let cfg = w.active().then_some(ExchangeDisorder {
        duplicate: w.duplicate,
        reorder: w.reorder,
        reply_loss: w.reply_loss,
        max_delay: w.max_delay,
        agent_timeout,
    });
    let seed = s.name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    fault_net(d)?.links().set_witness_disorder(cfg, seed);
    Ok(if w.active() {
        format!(
            "{w} (witness relays, per exchange, each its own authenticated connection: a late \
             exchange's request is held 1..={max} ms, and later exchanges overtake it; a \
             duplicate is a request held past the agents' {t} ms timeout, so the agent resends \
             over a new connection and the witness sees the request twice (a replayed \
             connection would fail its Noise handshake); a lost reply is dropped after the \
             witness answered, and the agent times out and resends)",
            max = w.max_delay.as_millis(),
            t = agent_timeout.as_millis(),
        )
    } else {
        "witness traffic in order again (witness relays)".to_string()
    })
}

/// Applies the scenario's `[network]` loss and witness disorder (latency and bandwidth are
/// the relays' starting shape); returns what was done, and what of it could not be produced.
pub fn apply_network(
    s: &Scenario,
    d: &mut Deployment,
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let n = &s.network;
    let skipped = Vec::new();
    let links = if d.etcd.is_some() {
        "the replication links (relays; the agents reach the etcd witness directly)"
    } else {
        "the replication and witness links (relays)"
    };
    let mut done = vec![format!(
        "network: latency {}..{} ms and bandwidth {} on {links}",
        n.latency_min.as_millis(),
        n.latency_max.as_millis(),
        describe_bandwidth(real_bandwidth(s, n.bytes_per_ms)),
    )];
    if n.witness.active() {
        let how = set_witness_disorder(s, d, &n.witness)?;
        done.push(format!("network: {how}"));
    }
    if n.loss > 0.0 {
        fault_net(d)?.set_loss_everywhere(n.loss)?;
        done.push(format!(
            "network: loss {} on every link (nftables drop rules; TCP resends)",
            n.loss
        ));
    }
    Ok((done, skipped))
}

/// What the witness disorder did to the exchanges so far, if it was ever switched on.
pub fn witness_disorder_summary(d: &Deployment) -> Option<String> {
    d.faults.as_ref()?.links().witness_disorder_summary()
}

fn fault_net(d: &mut Deployment) -> anyhow::Result<&mut ftvm_real::host::fault_net::FaultNet> {
    d.faults
        .as_mut()
        .ok_or_else(|| anyhow::anyhow!("the deployment has no link relays"))
}

/// Which agent process a scenario host names, at this moment (node 1 runs on the primary
/// host, node 2 on the backup host, node 3 on the spare host, whatever their roles): `primary`
/// is the unfenced primary of the highest generation, `backup` the node following it, `spare`
/// the lowest-numbered node that is neither.
pub fn node_of(d: &Deployment, h: HostRef) -> Option<u32> {
    let nodes: Vec<u32> = (1..=node_count(d)).collect();
    let st = |n: u32| status(&d.node_dir(n));
    let primary = || {
        nodes
            .iter()
            .copied()
            .filter(|&n| st(n)["role"] == "Primary" && st(n)["phase"] != "fenced")
            .max_by_key(|&n| st(n)["generation"].as_u64().unwrap_or(0))
    };
    let backup = |p: Option<u32>| {
        let others = nodes.iter().copied().filter(|&n| Some(n) != p);
        if nodes.len() == 2 {
            return others.into_iter().next();
        }
        let following = |n: u32| {
            let s = st(n);
            s["role"] == "Backup"
                && ["protecting", "syncing", "taking-over", "restoring"]
                    .iter()
                    .any(|ph| s["phase"] == *ph)
        };
        others.into_iter().find(|&n| following(n))
    };
    match h {
        HostRef::Node(n) if nodes.contains(&n) => Some(n),
        HostRef::Primary => primary(),
        HostRef::Backup => backup(primary()),
        HostRef::Spare => {
            let (p, b) = (primary(), backup(primary()));
            nodes
                .iter()
                .copied()
                .find(|&n| Some(n) != p && Some(n) != b)
        }
        _ => None,
    }
}

/// How many agent hosts the deployment has.
fn node_count(d: &Deployment) -> u32 {
    if d.spare.is_some() {
        3
    } else {
        2
    }
}

fn node_host(n: u32) -> Host {
    fault_net::host_of(n).unwrap_or(Host::Spare)
}

/// The agent process of node `n`.
fn proc_of(d: &mut Deployment, n: u32) -> Option<&mut Proc> {
    match n {
        1 => Some(&mut d.primary),
        2 => Some(&mut d.backup),
        3 => d.spare.as_mut(),
        _ => None,
    }
}

fn host_of(h: HostRef, d: &Deployment) -> Option<Host> {
    match h {
        HostRef::Witness => Some(Host::Switch),
        HostRef::Clients => Some(Host::Client),
        _ => node_of(d, h).map(node_host),
    }
}

fn side_of(h: HostRef, d: &Deployment) -> Option<Side> {
    match h {
        HostRef::Witness => Some(Side::Witness),
        HostRef::Clients => Some(Side::Clients),
        _ => node_of(d, h).map(Side::Node),
    }
}

/// Waits until `when` holds for the active primary. `protected` and `syncing` are phases its
/// status file reports; `sending` (at least half of a checkpoint written to its backup's link,
/// not all) and `between_checkpoints` (none being written) are read from the relay, which
/// follows the checkpoint link's frames. Returns a note on what was waited for.
pub fn wait_for(
    d: &Deployment,
    when: Trigger,
    timeout: Duration,
) -> anyhow::Result<Option<String>> {
    let primary_in = |phase: &str| {
        (1..=node_count(d)).find(|&n| {
            let st = status(&d.node_dir(n));
            st["role"] == "Primary" && (phase.is_empty() || st["phase"] == phase)
        })
    };
    let progress = || {
        let p = node_of(d, HostRef::Primary)?;
        let b = node_of(d, HostRef::Backup)?;
        let links = d.faults.as_ref()?.links();
        Some(links.checkpoint_progress(LinkEnd::Node(p), LinkEnd::Node(b)))
    };
    let (what, holds): (&str, Box<dyn Fn() -> bool + '_>) = match when {
        Trigger::At => return Ok(None),
        Trigger::Protected => (
            "the primary reported protected",
            Box::new(|| primary_in("protected").is_some()),
        ),
        Trigger::Syncing => (
            "the primary reported syncing",
            Box::new(|| primary_in("syncing").is_some()),
        ),
        Trigger::Sending => (
            "the primary had written half of a checkpoint, not all",
            Box::new(
                || matches!(progress(), Some(Some((passed, total))) if passed * 2 >= total && passed < total),
            ),
        ),
        // A fresh primary asks the witness nothing before its first `RegisterBackup` (it
        // queries only when a peer claims a newer generation): with the primary's witness link
        // held from the hosts' start, the first bytes the relay holds on it are that
        // registration's exchange.
        Trigger::Registering => (
            "the relay held the primary's first witness exchange (its RegisterBackup)",
            Box::new(|| {
                let p = primary_in("").unwrap_or(1);
                d.faults
                    .as_ref()
                    .is_some_and(|f| f.links().held_chunks(LinkEnd::Node(p), LinkEnd::Witness) > 0)
            }),
        ),
        Trigger::BetweenCheckpoints => (
            "the primary was writing no checkpoint",
            Box::new(|| matches!(progress(), Some(None))),
        ),
        Trigger::CatchingUp => (
            "the primary had captured a catch-up its backup had not acked",
            Box::new(|| {
                (1..=node_count(d)).any(|n| {
                    let st = status(&d.node_dir(n));
                    let sync = &st["last_sync"];
                    st["role"] == "Primary"
                        && sync["kind"] == "catch-up"
                        && sync["epoch"].as_u64() > st["acked"].as_u64()
                })
            }),
        ),
    };
    let t0 = Instant::now();
    while !holds() {
        if t0.elapsed() > timeout {
            anyhow::bail!("waited {timeout:?} in vain for the moment when {what}");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(Some(format!("when {what}")))
}

/// Both ends of a relayed link, or why the link is not relayed.
fn relayed(a: HostRef, b: HostRef, d: &Deployment) -> Result<(LinkEnd, LinkEnd), String> {
    let end = |h| {
        side_of(h, d)
            .ok_or_else(|| format!("{h} names no host now"))?
            .link_end()
            .ok_or_else(|| {
                "the clients' link carries the VM's bridged traffic, not relayed".to_string()
            })
    };
    let (x, y) = (end(a)?, end(b)?);
    if x == y {
        return Err(format!("{a} and {b} are the same host"));
    }
    Ok((x, y))
}

/// What a run's faults left behind that later faults undo.
#[derive(Debug, Default)]
pub struct RunState {
    /// Processes restarted so far (numbers their logs).
    restarts: u32,
    /// Hosts whose links were taken down by a silent crash, until they restart.
    dark: Vec<Host>,
}

/// Produces `action` of scenario `s` on the deployment.
pub fn apply(
    s: &Scenario,
    d: &mut Deployment,
    action: &FaultAction,
    st: &mut RunState,
) -> anyhow::Result<Outcome> {
    use Outcome::{Applied, Skipped};
    Ok(match action {
        FaultAction::Crash { host, silent } => match (host, node_of(d, *host)) {
            (HostRef::Witness, _) => {
                // The witness shares the switch's namespace with the bridges: its silence is
                // made with routes on the nodes' side, which its relayed links cross.
                if *silent {
                    for h in [Host::Primary, Host::Backup] {
                        d.topo.set_route(h, Host::Switch, false)?;
                    }
                    st.dark.push(Host::Switch);
                }
                let killed = if d.etcd.is_some() {
                    crate::real_faults_etcd::crash(d)?
                } else {
                    let w = d.witness_proc()?;
                    w.child.kill()?;
                    let _ = w.child.wait();
                    "SIGKILL to the witness".to_string()
                };
                Applied(if *silent {
                    format!("nodes' routes to the witness blackholed, then {killed}")
                } else {
                    killed
                })
            }
            (_, Some(n)) => {
                let h = node_host(n);
                // A power cut: the links go dark first, so no FIN or RST of the dying process
                // (nor any later one) reaches a peer; they notice by silence.
                if *silent {
                    d.topo.set_host_link(h, false)?;
                    st.dark.push(h);
                }
                if let Some(p) = proc_of(d, n) {
                    p.child.kill()?;
                    let _ = p.child.wait();
                }
                Applied(format!(
                    "{}SIGKILL to node n{n}'s agent (and its QEMU)",
                    if *silent {
                        "host's links down, then "
                    } else {
                        ""
                    }
                ))
            }
            (_, None) => Skipped(format!("{host} names no agent host now")),
        },
        FaultAction::Restart { host, keep_replica } => {
            // Only a crashed host can be started again, as in the simulator: bouncing a running
            // one would wipe its replica (a crash nobody scheduled).
            let running = match (host, node_of(d, *host)) {
                (HostRef::Witness, _) if d.etcd.is_some() => crate::real_faults_etcd::running(d)?,
                (HostRef::Witness, _) => d.witness_proc()?.child.try_wait()?.is_none(),
                (_, Some(n)) => match proc_of(d, n) {
                    Some(p) => p.child.try_wait()?.is_none(),
                    None => false,
                },
                (_, None) => false,
            };
            if running {
                return Ok(Applied(format!(
                    "nothing to do: {host} is running (a restart starts only a crashed host, \
                     as in the simulator)"
                )));
            }
            st.restarts += 1;
            match (host, node_of(d, *host)) {
                (HostRef::Witness, _) => {
                    if st.dark.contains(&Host::Switch) {
                        st.dark.retain(|&h| h != Host::Switch);
                        for h in [Host::Primary, Host::Backup] {
                            d.topo.set_route(h, Host::Switch, true)?;
                        }
                    }
                    if d.etcd.is_some() {
                        Applied(crate::real_faults_etcd::restart(d)?)
                    } else {
                        d.witness = Some(restart_witness(d, st.restarts)?);
                        Applied("witness started again on its register".into())
                    }
                }
                (_, Some(n)) => {
                    let h = node_host(n);
                    if st.dark.contains(&h) {
                        st.dark.retain(|&x| x != h);
                        d.topo.set_host_link(h, true)?;
                    }
                    let p = restart_agent(d, n, st.restarts, *keep_replica)?;
                    match n {
                        1 => d.primary = p,
                        2 => d.backup = p,
                        _ => d.spare = Some(p),
                    }
                    Applied(match keep_replica {
                        true => {
                            format!("node n{n}'s agent started again on its replica, rejoining")
                        }
                        false => format!("node n{n}'s agent started again, empty, rejoining"),
                    })
                }
                (_, None) => Skipped(format!("{host} names no agent host now")),
            }
        }
        FaultAction::Partition { a, b, oneway } | FaultAction::Repair { a, b, oneway } => {
            let up = matches!(action, FaultAction::Repair { .. });
            match (host_of(*a, d), host_of(*b, d)) {
                (Some(hx), Some(hy)) if hx != Host::Client && hy != Host::Client => {
                    d.topo.set_route(hx, hy, up)?;
                    if !oneway {
                        d.topo.set_route(hy, hx, up)?;
                    }
                    Applied(format!(
                        "blackhole routes {}",
                        if up { "removed" } else { "added" }
                    ))
                }
                _ => Skipped(
                    "the clients' link carries the VM's bridged traffic: not cut by routes".into(),
                ),
            }
        }
        FaultAction::Isolate { host } => match host_of(*host, d) {
            Some(h) if h != Host::Client && h != Host::Switch => {
                d.topo.set_host_link(h, false)?;
                Applied(format!("{h:?} host's links to the switch down"))
            }
            _ => Skipped(format!("{host}: only an agent host can be isolated here")),
        },
        FaultAction::Heal => {
            for h in [Host::Primary, Host::Backup, Host::Client] {
                d.topo.set_host_link(h, true)?;
            }
            d.topo.clear_routes()?;
            fault_net(d)?.links().release_all();
            Applied("links up, blackhole routes removed, holds released".into())
        }
        FaultAction::Loss { link, rate } => {
            let net = fault_net(d)?;
            match link {
                None => {
                    net.set_loss_everywhere(*rate)?;
                    Applied("nftables drop rules on every link (TCP resends)".into())
                }
                Some((a, b)) => match (side_of(*a, d), side_of(*b, d)) {
                    (Some(x), Some(y)) => {
                        if fault_net(d)?.set_loss(x, y, *rate)? {
                            Applied("nftables drop rules on the link (TCP resends)".into())
                        } else {
                            Skipped("no traffic ever crosses that link here".into())
                        }
                    }
                    _ => Skipped("a host of the link names nobody now".into()),
                },
            }
        }
        FaultAction::Latency { a, b, min, max } => match relayed(*a, *b, d) {
            Ok((x, y)) => {
                fault_net(d)?.links().set_latency(x, y, *min, *max);
                Applied("the relay delays each chunk both ways".into())
            }
            Err(why) => Skipped(why),
        },
        FaultAction::Bandwidth { a, b, bytes_per_ms } => match relayed(*a, *b, d) {
            Ok((x, y)) => {
                let real = real_bandwidth(s, *bytes_per_ms);
                fault_net(d)?.links().set_bandwidth(x, y, real);
                Applied(format!(
                    "the relay paces both directions at {} (scaled to 4 KiB pages)",
                    describe_bandwidth(real)
                ))
            }
            Err(why) => Skipped(why),
        },
        FaultAction::Hold { a, b } | FaultAction::Release { a, b } => {
            let hold = matches!(action, FaultAction::Hold { .. });
            match relayed(*a, *b, d) {
                Ok((x, y)) => {
                    fault_net(d)?.links().set_hold(x, y, hold);
                    Applied(format!(
                        "the relay {} the link's bytes",
                        if hold { "holds" } else { "delivers" }
                    ))
                }
                Err(why) => Skipped(why),
            }
        }
        FaultAction::Corrupt { from, to } => match relayed(*from, *to, d) {
            Ok((x @ LinkEnd::Node(_), y @ LinkEnd::Node(_))) => {
                fault_net(d)?.links().arm_corruption(x, y);
                Applied(format!(
                    "the relay flips a page byte of the next checkpoint {x} -> {y}"
                ))
            }
            Ok(_) => Skipped("only checkpoint links carry checkpoints".into()),
            Err(why) => Skipped(why),
        },
        // Real links authenticate every frame and witness exchanges are sealed: the relay,
        // holding no key, slips the forged frame in with a tag it cannot compute (or damages
        // the sealed reply), and the receiver must refuse it (the relay reports the
        // connection's end).
        FaultAction::ForgeGeneration {
            from,
            to,
            frame,
            generation,
        } => match relayed(*from, *to, d) {
            Ok((x @ LinkEnd::Node(sender), y @ LinkEnd::Node(_))) => {
                let msg = forged_msg(d, sender, *frame, *generation);
                fault_net(d)?.links().arm_forgery(x, y, msg);
                Applied(format!(
                    "the relay slips the forged frame into the link {x} -> {y} at its next \
                     frame boundary, with a tag it cannot compute"
                ))
            }
            Ok(_) => Skipped("only checkpoint links carry peer frames".into()),
            Err(why) => Skipped(why),
        },
        FaultAction::WitnessDisorder(w) => Applied(set_witness_disorder(s, d, w)?),
        FaultAction::ForgeWitnessReply { host } => match side_of(*host, d) {
            Some(Side::Node(n)) => {
                fault_net(d)?.links().arm_reply_damage(LinkEnd::Node(n));
                Applied(format!(
                    "the relay damages the next witness reply to n{n} (a forged reply cannot \
                     be sealed without the witness's keys)"
                ))
            }
            _ => Skipped(format!("{host} names no node now")),
        },
    })
}

/// The message a `forge-generation` fault slips in, as the simulator builds it (a `Join`
/// names the sender and claims the real guest's RAM).
fn forged_msg(d: &Deployment, sender: u32, frame: ForgedFrame, generation: u64) -> PeerMsg {
    let generation = Generation(generation);
    match frame {
        ForgedFrame::Join => PeerMsg::Join {
            vm: VmId(DEPLOYED_VM),
            node: NodeId(sender),
            ram_pages: d.opts.ram_mb * (1 << 20) / REAL_PAGE_BYTES,
            page_size: REAL_PAGE_BYTES as u32,
            known: generation,
            disk_blocks: 0,
            replica: None,
        },
        ForgedFrame::Heartbeat => PeerMsg::Heartbeat {
            generation,
            epoch: Epoch(1),
        },
        ForgedFrame::Ack => PeerMsg::Ack {
            generation,
            epoch: Epoch(1),
        },
        ForgedFrame::Reject => PeerMsg::Reject {
            generation,
            reason: RejectReason::Busy,
        },
    }
}

fn restart_agent(d: &Deployment, node: u32, n: u32, keep: bool) -> anyhow::Result<Proc> {
    let host = node_host(node);
    let dir = d.node_dir(node);
    let mut args: Vec<String> = vec!["backup".into()];
    args.extend(d.node_args(node));
    args.push("--rejoin".into());
    if keep {
        // The same state directory: the agent finds its committed replica and offers it.
        // Its earlier metrics are kept aside first (a new agent starts the file afresh).
        let metrics = dir.join("metrics.jsonl");
        std::fs::rename(
            &metrics,
            dir.join(format!("metrics-before-restart{n}.jsonl")),
        )
        .ok();
    } else {
        // A restarted host comes back empty and rejoins as a backup. Its old state directory
        // is kept aside (its metrics count in the run's report).
        let mut old = dir.as_os_str().to_owned();
        old.push(format!("-before-restart{n}"));
        std::fs::rename(&dir, &old)
            .or_else(|_| std::fs::remove_dir_all(&dir))
            .ok();
        args.push("--discard-replica".into());
    }
    let log = d.opts.work_dir.join(format!("n{node}-restart{n}.log"));
    deploy::spawn_in(&d.topo, host, "restarted agent", &args, &log)
}

fn restart_witness(d: &Deployment, n: u32) -> anyhow::Result<Proc> {
    let w = &d.opts.work_dir;
    deploy::spawn_in(
        &d.topo,
        Host::Switch,
        "witness",
        &deploy::witness_args(&d.topo, w, false),
        &w.join(format!("witness-restart{n}.log")),
    )
}
