//! Segment loss on real links, made by nftables: in a host's namespace, packets to a peer
//! (output hook) and from it (input hook) are dropped at random with the link's rate
//! (`numgen random mod 1000000 < rate × 10⁶`). TCP then does what the simulator models: it
//! resends the lost segment after its retransmission timeout, and the stream behind it waits.
//! (Linux's timeout is at least 200 ms where the simulator's `rto_ms` defaults to 40 ms.)
//!
//! Each namespace gets one table, `inet ftvm_faults`, rewritten whole at every change.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// Errors applying loss rules.
#[derive(Debug, thiserror::Error)]
pub enum LossError {
    /// `nft` could not be run.
    #[error("cannot run `nft` (is the nftables package installed, are we root?): {0}")]
    Spawn(std::io::Error),
    /// `nft` refused the rules.
    #[error("nft in namespace {ns} failed: {stderr}")]
    Nft {
        /// The namespace.
        ns: String,
        /// What it printed.
        stderr: String,
    },
    /// A rate outside 0..=1.
    #[error("loss rate {0} is not in 0..=1")]
    BadRate(f64),
}

/// The name of the table in each namespace.
const TABLE: &str = "inet ftvm_faults";
/// Resolution of a rate.
const SCALE: f64 = 1_000_000.0;

/// Loss rates per namespace and peer address.
#[derive(Debug, Default)]
pub struct LossRules {
    rates: BTreeMap<String, BTreeMap<Ipv4Addr, u32>>,
}

impl LossRules {
    /// No loss anywhere.
    pub fn new() -> LossRules {
        LossRules::default()
    }

    /// Drops packets between namespace `ns` and `peer`, both ways, with probability `rate`.
    pub fn set(&mut self, ns: &str, peer: Ipv4Addr, rate: f64) -> Result<(), LossError> {
        if !(0.0..=1.0).contains(&rate) {
            return Err(LossError::BadRate(rate));
        }
        let per_million = (rate * SCALE).round() as u32;
        let peers = self.rates.entry(ns.to_string()).or_default();
        if per_million == 0 {
            peers.remove(&peer);
        } else {
            peers.insert(peer, per_million);
        }
        apply(ns, &ruleset(peers))
    }

    /// The rate currently set between `ns` and `peer`.
    pub fn rate(&self, ns: &str, peer: Ipv4Addr) -> f64 {
        self.rates
            .get(ns)
            .and_then(|p| p.get(&peer))
            .map_or(0.0, |&n| f64::from(n) / SCALE)
    }
}

/// The nft script that replaces the namespace's table with rules for `peers`.
fn ruleset(peers: &BTreeMap<Ipv4Addr, u32>) -> String {
    let mut out = String::new();
    let mut inp = String::new();
    for (addr, n) in peers {
        out.push_str(&format!(
            "    ip daddr {addr} numgen random mod {} < {n} drop\n",
            SCALE as u32
        ));
        inp.push_str(&format!(
            "    ip saddr {addr} numgen random mod {} < {n} drop\n",
            SCALE as u32
        ));
    }
    format!(
        "table {TABLE}\ndelete table {TABLE}\ntable {TABLE} {{\n  \
         chain out {{\n    type filter hook output priority 0; policy accept;\n{out}  }}\n  \
         chain in {{\n    type filter hook input priority 0; policy accept;\n{inp}  }}\n}}\n"
    )
}

fn apply(ns: &str, script: &str) -> Result<(), LossError> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(LossError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(LossError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(LossError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LossError::Nft {
            ns: ns.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_drops_both_ways_at_the_rate_and_replaces_the_table() {
        let mut peers = BTreeMap::new();
        peers.insert(Ipv4Addr::new(10, 78, 1, 2), 50_000);
        let s = ruleset(&peers);
        assert!(s.starts_with("table inet ftvm_faults\ndelete table inet ftvm_faults\n"));
        assert!(s.contains("ip daddr 10.78.1.2 numgen random mod 1000000 < 50000 drop"));
        assert!(s.contains("ip saddr 10.78.1.2 numgen random mod 1000000 < 50000 drop"));
        assert!(s.contains("hook output") && s.contains("hook input"));
        assert!(!ruleset(&BTreeMap::new()).contains("drop"));
    }

    #[test]
    fn a_bad_rate_is_refused_before_nft_runs() {
        let mut r = LossRules::new();
        assert!(matches!(
            r.set("nowhere", Ipv4Addr::LOCALHOST, 1.5),
            Err(LossError::BadRate(_))
        ));
        assert_eq!(r.rate("nowhere", Ipv4Addr::LOCALHOST), 0.0);
    }

    #[test]
    fn loss_in_a_namespace_drops_about_the_rate_of_pings() {
        use crate::host::topology::{Host, Topology};
        let topo = Topology::create("ftvt3", 203).expect("topology (needs root and iproute2)");
        let mut r = LossRules::new();
        let (ns, peer) = (topo.ns(Host::Primary), topo.addr(Host::Backup));
        r.set(&ns, peer, 0.5)
            .expect("nft (needs the nftables package)");
        assert_eq!(r.rate(&ns, peer), 0.5);
        let pings = |n: u32| -> u32 {
            let out = Command::new("ip")
                .args(["netns", "exec", &ns, "ping", "-q", "-c", &n.to_string()])
                .args(["-i", "0.01", "-W", "1", &peer.to_string()])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            text.split(',')
                .find_map(|p| p.trim().strip_suffix(" received"))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0)
        };
        // A ping and its reply each survive with 1/2: about a quarter come back.
        let got = pings(200);
        assert!(
            (20..=80).contains(&got),
            "{got} of 200 pings answered at 50% loss"
        );
        r.set(&ns, peer, 0.0).unwrap();
        assert_eq!(pings(20), 20);
    }
}
