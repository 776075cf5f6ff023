//! `ftvm status`: one table for a protected VM: each agent's role and phase, whether the VM is
//! protected, generation, replica lag, last failover, and the witness register: from its state
//! file when readable here, or from etcd (`--witness etcd://...`). Agents are read over their `/status` endpoint (`--metrics-listen`)
//! or from `status.json` in their state directory; one that cannot be read is shown as such.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use ftvm_model::VmId;
use ftvm_real::etcd_witness::{EtcdTarget, EtcdWitness};
use serde_json::Value;

/// Arguments of `ftvm status`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// An agent's HTTP endpoint (its `--metrics-listen`), `IP:PORT`; repeat for each.
    #[arg(long = "agent")]
    agents: Vec<SocketAddr>,
    /// An agent's state directory on this host (its `status.json`); repeat for each.
    #[arg(long = "state-dir")]
    state_dirs: Vec<PathBuf>,
    /// A config file: its agent (by `metrics_listen`, else `state_dir`) and its witness's
    /// register (`[witness] state`) when present; repeat for each.
    #[arg(long = "config")]
    configs: Vec<PathBuf>,
    /// The witness's register file (`ftvm witness --state`), when readable here.
    #[arg(long)]
    witness_state: Option<PathBuf>,
    /// An etcd witness, `etcd://HOST:PORT[,HOST:PORT...]`: its register of `--vm` is read
    /// (linearizably) and shown.
    #[arg(long)]
    witness: Option<String>,
    /// With --witness: the key prefix of the registers.
    #[arg(long, default_value = ftvm_real::etcd_witness::DEFAULT_PREFIX)]
    witness_prefix: String,
    /// With --witness: the VM whose register to show.
    #[arg(long, default_value_t = 1)]
    vm: u64,
    #[command(flatten)]
    witness_tls: crate::etcd_tls_args::EtcdTlsArgs,
    /// Refresh every this many seconds until interrupted.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
    watch: Option<u64>,
}

/// Where one agent's status comes from.
#[derive(Debug, Clone)]
enum Source {
    Http(SocketAddr),
    File(PathBuf),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Http(a) => write!(f, "http://{a}"),
            Source::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Largest status answer read (a report is under a KiB).
const MAX_ANSWER: u64 = 256 << 10;
/// Time an agent has to answer.
const TIMEOUT: Duration = Duration::from_secs(2);

/// GETs `/status` from `addr`.
fn fetch_http(addr: SocketAddr) -> anyhow::Result<Value> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).context("connecting")?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    s.write_all(b"GET /status HTTP/1.1\r\nHost: ftvm\r\nConnection: close\r\n\r\n")?;
    let mut answer = Vec::new();
    s.take(MAX_ANSWER).read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").context("not an HTTP answer")?;
    if !head.starts_with("HTTP/1.1 200") {
        anyhow::bail!("answered {}", head.lines().next().unwrap_or_default());
    }
    serde_json::from_str(body).context("not a status report")
}

fn fetch(source: &Source) -> anyhow::Result<Value> {
    match source {
        Source::Http(a) => fetch_http(*a),
        Source::File(p) => {
            let f = std::fs::File::open(p).context("unreadable")?;
            let mut bytes = Vec::new();
            f.take(MAX_ANSWER).read_to_end(&mut bytes)?;
            serde_json::from_slice(&bytes).context("not a status report")
        }
    }
}

/// One agent's line (or why it could not be read).
fn agent_line(source: &Source, status: anyhow::Result<Value>) -> String {
    let s = match status {
        Ok(s) => s,
        Err(e) => return format!("{:<28} UNREACHABLE: {e:#}", source.to_string()),
    };
    let opt = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    let role = opt(&s["role"]).to_lowercase();
    let phase = opt(&s["phase"]);
    let protection = match (role.as_str(), phase.as_str()) {
        ("primary", "protected") => "protected",
        ("primary", _) => "UNPROTECTED",
        ("backup", "protecting") => "replica current",
        ("backup", _) => "replica not current",
        _ => "-",
    };
    let failover = match (&s["last_failover_unix_ms"], &s["failover_us"]) {
        (Value::Number(at), us) => format!(
            "at {} ({} ms)",
            at.as_u64().map(|ms| ms / 1000).unwrap_or(0),
            us.as_u64().map(|u| u / 1000).unwrap_or(0)
        ),
        _ => "-".into(),
    };
    format!(
        "{:<28} node {:<3} vm {:<3} {:<8} {:<12} {:<20} gen {:<4} lag {:<6} failover {}",
        source.to_string(),
        opt(&s["node"]),
        opt(&s["vm"]),
        role,
        phase,
        protection,
        opt(&s["generation"]),
        opt(&s["replica_lag_epochs"]),
        failover
    )
}

/// Where a witness register is read.
enum Register {
    /// An `ftvm witness` state file.
    File(PathBuf),
    /// An etcd witness's key for a VM.
    Etcd(EtcdWitness, VmId),
}

impl std::fmt::Display for Register {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Register::File(p) => write!(f, "{}", p.display()),
            Register::Etcd(w, vm) => write!(f, "{} {}", w.target().url(), w.target().key(*vm)),
        }
    }
}

/// Reads an etcd register as the JSON a state file holds.
fn fetch_etcd(w: &EtcdWitness, vm: VmId) -> anyhow::Result<Value> {
    let state = crate::witness_etcd_cmd::runtime()?.block_on(w.query(vm, TIMEOUT))?;
    Ok(serde_json::to_value(state)?)
}

fn register_line(reg: &Register) -> String {
    let read = match reg {
        Register::File(path) => fetch(&Source::File(path.clone())),
        Register::Etcd(w, vm) => fetch_etcd(w, *vm),
    };
    match read {
        Ok(r) => format!(
            "witness register {reg}: vm {} generation {} primary {} backup {}",
            r["vm"],
            r["generation"],
            r["primary"],
            match &r["backup"] {
                Value::Null => "none".to_string(),
                b => b["node"].to_string(),
            }
        ),
        Err(e) => format!("witness register {reg}: UNREADABLE: {e:#}"),
    }
}

/// The sources and register files the arguments name.
fn sources(args: &Args) -> anyhow::Result<(Vec<Source>, Vec<Register>)> {
    let mut out: Vec<Source> = args.agents.iter().map(|a| Source::Http(*a)).collect();
    out.extend(
        args.state_dirs
            .iter()
            .map(|d| Source::File(d.join("status.json"))),
    );
    let mut registers: Vec<Register> = args
        .witness_state
        .iter()
        .map(|p| Register::File(p.clone()))
        .collect();
    if let Some(url) = &args.witness {
        let target = EtcdTarget::parse(url, &args.witness_prefix).context("--witness")?;
        let w = args.witness_tls.witness(target)?;
        registers.push(Register::Etcd(w, VmId(args.vm)));
    }
    for c in &args.configs {
        let file = crate::config_file::load(c)?;
        if let Some(a) = file.agent {
            match (a.metrics_listen.and_then(|m| m.parse().ok()), a.state_dir) {
                (Some(addr), _) => out.push(Source::Http(addr)),
                (None, Some(dir)) => out.push(Source::File(dir.join("status.json"))),
                (None, None) => {}
            }
        }
        registers.extend(file.witness.and_then(|w| w.state).map(Register::File));
    }
    if out.is_empty() && registers.is_empty() {
        anyhow::bail!(
            "nothing to show: give --agent, --state-dir, --config, --witness-state or --witness"
        );
    }
    Ok((out, registers))
}

/// The whole report, one line per agent and register.
fn report(agents: &[Source], registers: &[Register]) -> (String, bool) {
    let mut text = String::new();
    let mut all_ok = true;
    for r in registers {
        text.push_str(&register_line(r));
        text.push('\n');
    }
    for a in agents {
        let st = fetch(a);
        all_ok &= st.is_ok();
        text.push_str(&agent_line(a, st));
        text.push('\n');
    }
    (text, all_ok)
}

/// Prints the report (exit 0 when every agent answered, 1 otherwise), or refreshes it.
pub fn run(args: Args) -> anyhow::Result<i32> {
    let (agents, registers) = sources(&args)?;
    loop {
        let (text, ok) = report(&agents, &registers);
        let Some(every) = args.watch else {
            print!("{text}");
            return Ok(if ok { 0 } else { 1 });
        };
        // Clear the screen and redraw, like watch(1).
        print!("\x1b[2J\x1b[H{text}");
        let _ = std::io::stdout().flush();
        std::thread::sleep(Duration::from_secs(every.max(1)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_agent_is_shown_as_such_and_fails_the_exit_code() {
        let d = tempfile::tempdir().unwrap();
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        std::fs::write(
            d.path().join("status.json"),
            r#"{"node":2,"vm":1,"role":"Primary","phase":"degraded","generation":2,
               "replica_lag_epochs":null,"last_failover_unix_ms":1700000000000,"failover_us":180000}"#,
        )
        .unwrap();
        let agents = [
            Source::Http(dead_addr),
            Source::File(d.path().join("status.json")),
            Source::File(d.path().join("missing.json")),
        ];
        let etcd = EtcdTarget::parse(&format!("etcd://{dead_addr}"), "/p").unwrap();
        let registers = [
            Register::File(d.path().join("nope.json")),
            Register::Etcd(EtcdWitness::new(etcd), VmId(1)),
        ];
        let (text, ok) = report(&agents, &registers);
        assert!(!ok);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[0].contains("UNREADABLE"), "{text}");
        assert!(
            lines[1].contains("UNREADABLE") && lines[1].contains("/p/vm/1"),
            "{text}"
        );
        assert!(lines[2].contains("UNREACHABLE"), "{text}");
        assert!(
            lines[3].contains("primary") && lines[3].contains("UNPROTECTED"),
            "{text}"
        );
        assert!(
            lines[3].contains("gen 2") && lines[3].contains("(180 ms)"),
            "{text}"
        );
        assert!(lines[4].contains("UNREACHABLE"), "{text}");
    }
}
