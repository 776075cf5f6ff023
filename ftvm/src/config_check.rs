//! `ftvm check-config FILE`: everything about a config file that can be known before starting
//! (addresses, key directory and keys, contradictory options, the protocol's own parameter
//! checks), reported as one line per problem so an operator fixes them all in one go.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ftvm_model::{Config, NodeId, VmId};
use ftvm_real::agent::capture::CaptureMode;
use ftvm_real::agent::qemu_vm::Tracking;
use ftvm_real::auth::Identity;
use ftvm_real::transport::TransportKind;

use crate::config_file::{AgentSection, ConfigFile, WitnessSection};

/// Arguments of `ftvm check-config`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The config file to check.
    file: PathBuf,
}

/// Prints every problem of the file (one a line, on stderr) and exits 1 if there is any.
pub fn run(args: Args) -> anyhow::Result<i32> {
    let name = args.file.display().to_string();
    let problems = match crate::config_file::load(&args.file) {
        Ok(file) => check(&file),
        Err(e) => vec![format!("{e:#}")],
    };
    for p in &problems {
        eprintln!("{name}: {p}");
    }
    if problems.is_empty() {
        println!("{name}: ok");
        Ok(0)
    } else {
        Ok(1)
    }
}

/// Every problem of a parsed file (empty: good to start).
pub fn check(file: &ConfigFile) -> Vec<String> {
    let mut out = Vec::new();
    if file.agent.is_none() && file.witness.is_none() {
        out.push("neither an [agent] nor a [witness] section".into());
    }
    if let Some(a) = &file.agent {
        check_agent(a, &mut out);
    }
    if let Some(w) = &file.witness {
        check_witness(w, &mut out);
    }
    out
}

/// A required key's value, or a problem.
fn required<'a, T>(v: &'a Option<T>, key: &str, out: &mut Vec<String>) -> Option<&'a T> {
    if v.is_none() {
        out.push(format!("{key}: missing (required)"));
    }
    v.as_ref()
}

/// An `IP:PORT` address with a port other than 0, or a problem.
fn address(v: Option<&String>, key: &str, out: &mut Vec<String>) -> Option<SocketAddr> {
    let s = v?;
    match s.parse::<SocketAddr>() {
        Ok(a) if a.port() == 0 => {
            out.push(format!("{key}: {s:?} has port 0 (give a fixed port)"));
            None
        }
        Ok(a) => Some(a),
        Err(_) => {
            out.push(format!(
                "{key}: {s:?} is not IP:PORT (e.g. 10.0.0.1:7001 or [fd00::1]:7001)"
            ));
            None
        }
    }
}

fn existing_dir(v: Option<&PathBuf>, key: &str, out: &mut Vec<String>) {
    if let Some(p) = v {
        if !p.is_dir() {
            out.push(format!("{key}: {} is not a directory", p.display()));
        }
    }
}

fn check_agent(a: &AgentSection, out: &mut Vec<String>) {
    let role = required(&a.role, "agent.role", out).map(String::as_str);
    if let Some(r) = role.filter(|r| !["primary", "backup"].contains(r)) {
        out.push(format!(
            "agent.role: {r:?} is neither \"primary\" nor \"backup\""
        ));
    }
    let node = required(&a.node, "agent.node", out).copied();
    let listen = address(
        required(&a.listen, "agent.listen", out),
        "agent.listen",
        out,
    );
    address(
        required(&a.witness, "agent.witness", out),
        "agent.witness",
        out,
    );
    let metrics = address(a.metrics_listen.as_ref(), "agent.metrics_listen", out);
    if metrics.is_some() && metrics == listen {
        out.push("agent.metrics_listen: the same address as agent.listen".into());
    }
    required(&a.state_dir, "agent.state_dir", out);
    existing_dir(
        required(&a.guest_dir, "agent.guest_dir", out),
        "agent.guest_dir",
        out,
    );
    existing_dir(a.ram_dir.as_ref(), "agent.ram_dir", out);
    if let Some(d) = a.disk.as_ref().filter(|d| !d.is_file()) {
        out.push(format!("agent.disk: {} is not a file", d.display()));
    }
    let peers = check_peers(a, node, listen, out);
    if let (Some(keys), Some(node)) = (required(&a.keys, "agent.keys", out), node) {
        check_node_keys(keys, node, &peers, out);
    }
    check_roles(a, role, &peers, out);
    check_choices(a, out);
    check_protocol(a, out);
}

/// The peer table, with every bad entry reported.
fn check_peers(
    a: &AgentSection,
    node: Option<u32>,
    listen: Option<SocketAddr>,
    out: &mut Vec<String>,
) -> BTreeMap<u32, SocketAddr> {
    let mut peers = BTreeMap::new();
    let Some(table) = required(&a.peers, "agent.peers", out) else {
        return peers;
    };
    if table.is_empty() {
        out.push("agent.peers: empty (name the other agent: { 2 = \"IP:PORT\" })".into());
    }
    for (id, addr) in table {
        let key = format!("agent.peers.{id}");
        let Ok(n) = id.parse::<u32>() else {
            out.push(format!("{key}: {id:?} is not a node id (a number)"));
            continue;
        };
        if Some(n) == node {
            out.push(format!("{key}: lists this node itself (agent.node = {n})"));
        }
        if let Some(addr) = address(Some(addr), &key, out) {
            if Some(addr) == listen {
                out.push(format!("{key}: the same address as agent.listen"));
            }
            peers.insert(n, addr);
        }
    }
    peers
}

fn check_node_keys(
    keys: &Path,
    node: u32,
    peers: &BTreeMap<u32, SocketAddr>,
    out: &mut Vec<String>,
) {
    if !keys.is_dir() {
        out.push(format!(
            "agent.keys: {} is not a directory (make it with `ftvm keygen`)",
            keys.display()
        ));
        return;
    }
    match Identity::load_node(keys, NodeId(node)) {
        Err(e) => out.push(format!("agent.keys: {}: {e}", keys.display())),
        Ok(id) => {
            for p in peers.keys() {
                if !id.trust.nodes.contains_key(&NodeId(*p)) {
                    out.push(format!(
                        "agent.keys: no public key for node {p} in {} (copy its node-{p}.pub there)",
                        keys.display()
                    ));
                }
            }
        }
    }
}

/// Options that contradict the role or each other.
fn check_roles(
    a: &AgentSection,
    role: Option<&str>,
    peers: &BTreeMap<u32, SocketAddr>,
    out: &mut Vec<String>,
) {
    if role == Some("primary") {
        for (set, key) in [
            (a.rejoin == Some(true), "rejoin"),
            (a.primary.is_some(), "primary"),
            (a.discard_replica == Some(true), "discard_replica"),
        ] {
            if set {
                out.push(format!(
                    "agent.{key}: only for a backup, but agent.role is \"primary\""
                ));
            }
        }
    }
    if let Some(p) = a.primary {
        if !peers.is_empty() && !peers.contains_key(&p) {
            out.push(format!("agent.primary: node {p} is not in agent.peers"));
        }
    }
    if role == Some("backup") && a.rejoin != Some(true) && a.primary.is_none() && peers.len() > 1 {
        out.push("agent.primary: missing: a backup with several peers must name its primary (or set rejoin = true)".into());
    }
    if a.capture.as_deref() == Some("cow") && a.tracking.as_deref() == Some("hash") {
        out.push("agent.capture: \"cow\" takes its dirty log from write faults; it cannot use tracking = \"hash\"".into());
    }
}

/// Values that must be one of a set, parsed by the same code the agent uses.
fn check_choices(a: &AgentSection, out: &mut Vec<String>) {
    if let Some(t) = &a.transport {
        if let Err(e) = t.parse::<TransportKind>() {
            out.push(format!("agent.transport: {e}"));
        }
    }
    if let Some(c) = &a.capture {
        if let Err(e) = c.parse::<CaptureMode>() {
            out.push(format!("agent.capture: {e}"));
        }
    }
    if let Some(t) = &a.tracking {
        if let Err(e) = t.parse::<Tracking>() {
            out.push(format!("agent.tracking: {e}"));
        }
    }
    if let Some(x) = &a.accel {
        if let Err(e) = x.parse::<ftvm_real::qemu::Accel>() {
            out.push(format!("agent.accel: {e}"));
        }
    }
    if let Some(p) = a
        .epoch_policy
        .as_deref()
        .filter(|p| !["fixed", "output"].contains(p))
    {
        out.push(format!(
            "agent.epoch_policy: {p:?} is neither \"fixed\" nor \"output\""
        ));
    }
    if let Some(p) = a.max_idle_pct.filter(|p| !(1..=100).contains(p)) {
        out.push(format!("agent.max_idle_pct: {p} is not in 1..=100"));
    }
    for (v, key) in [(a.ram_mb, "ram_mb"), (a.output_cap_mb, "output_cap_mb")] {
        if v == Some(0) {
            out.push(format!("agent.{key}: must be positive"));
        }
    }
}

/// The protocol's own checks on the timing parameters (the agent runs the same at start).
fn check_protocol(a: &AgentSection, out: &mut Vec<String>) {
    let mut model = Config::new(VmId(a.vm.unwrap_or(1)), 1, NodeId(0));
    let ms = Duration::from_millis;
    model.epoch_interval = ms(a.epoch_ms.unwrap_or(25));
    model.heartbeat_interval = ms(a.heartbeat_ms.unwrap_or(20));
    model.failure_timeout = ms(a.failure_timeout_ms.unwrap_or(500));
    if let Err(e) = model.validate() {
        out.push(format!(
            "agent: epoch_ms/heartbeat_ms/failure_timeout_ms: {e}"
        ));
    }
}

fn check_witness(w: &WitnessSection, out: &mut Vec<String>) {
    address(
        required(&w.listen, "witness.listen", out),
        "witness.listen",
        out,
    );
    if let Some(keys) = required(&w.keys, "witness.keys", out) {
        match Identity::load_witness(keys) {
            Err(e) => out.push(format!("witness.keys: {}: {e}", keys.display())),
            Ok(id) if id.trust.nodes.is_empty() => out.push(format!(
                "witness.keys: no node public keys (node-<ID>.pub) in {}",
                keys.display()
            )),
            Ok(_) => {}
        }
    }
    if let Some(state) = required(&w.state, "witness.state", out) {
        let init = w.init == Some(true);
        if init && state.exists() {
            out.push(format!(
                "witness.init: the register {} exists; init would be refused (remove init)",
                state.display()
            ));
        }
        match state.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(dir) if !dir.is_dir() => out.push(format!(
                "witness.state: directory {} does not exist",
                dir.display()
            )),
            _ => {}
        }
    }
}

#[cfg(test)]
#[path = "config_check_tests.rs"]
mod tests;
