//! A veth pair between two fresh network namespaces, so the benchmark can measure a path that
//! crosses a (virtual) device instead of loopback. Needs root and iproute2; removed on drop.
//!
//! Threads join a namespace with `setns(CLONE_NEWNET)`, which affects only the calling thread:
//! the benchmark's sender and receiver threads each enter their side.

use std::fs::File;
use std::net::Ipv4Addr;
use std::process::Command;

use nix::sched::{setns, CloneFlags};

/// Address of the sending side.
const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 251, 0, 1);
/// Address of the receiving side.
const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 251, 0, 2);

/// Two namespaces joined by a veth pair; deleted on drop.
#[derive(Debug)]
pub(crate) struct VethPair {
    ns_a: String,
    ns_b: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2 installed?): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl VethPair {
    /// Creates namespaces `ftvmtb<pid>a`/`b` with `veth` ends `ftvtb<pid>a`/`b` (names fit
    /// IFNAMSIZ), addressed 10.251.0.1/24 and 10.251.0.2/24 (private to the namespaces).
    pub(crate) fn create() -> Result<Self, String> {
        let pid = std::process::id();
        let pair = VethPair {
            ns_a: format!("ftvmtb{pid}a"),
            ns_b: format!("ftvmtb{pid}b"),
        };
        let (if_a, if_b) = (format!("ftvtb{pid}a"), format!("ftvtb{pid}b"));
        // Remove leftovers of a crashed run with the same pid; errors just mean there were none.
        let _ = ip(&["netns", "del", &pair.ns_a]);
        let _ = ip(&["netns", "del", &pair.ns_b]);
        ip(&["netns", "add", &pair.ns_a])?;
        ip(&["netns", "add", &pair.ns_b])?;
        let a = ADDR_A.to_string() + "/24";
        let b = ADDR_B.to_string() + "/24";
        let steps: [&[&str]; 7] = [
            &[
                "link", "add", &if_a, "netns", &pair.ns_a, "type", "veth", "peer", "name", &if_b,
                "netns", &pair.ns_b,
            ],
            &["-n", &pair.ns_a, "addr", "add", &a, "dev", &if_a],
            &["-n", &pair.ns_b, "addr", "add", &b, "dev", &if_b],
            &["-n", &pair.ns_a, "link", "set", &if_a, "up"],
            &["-n", &pair.ns_b, "link", "set", &if_b, "up"],
            &["-n", &pair.ns_a, "link", "set", "lo", "up"],
            &["-n", &pair.ns_b, "link", "set", "lo", "up"],
        ];
        for step in steps {
            ip(step)?; // on error `pair` drops and deletes both namespaces
        }
        Ok(pair)
    }

    /// Moves the calling thread into the sending side's namespace.
    pub(crate) fn enter_sender(&self) -> Result<(), String> {
        enter(&self.ns_a)
    }

    /// Moves the calling thread into the receiving side's namespace.
    pub(crate) fn enter_receiver(&self) -> Result<(), String> {
        enter(&self.ns_b)
    }

    /// Where the receiver listens.
    pub(crate) fn receiver_addr(&self) -> Ipv4Addr {
        ADDR_B
    }
}

fn enter(ns: &str) -> Result<(), String> {
    let path = format!("/run/netns/{ns}");
    let f = File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
    setns(&f, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns({path}): {e}"))
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // Deleting a namespace destroys the veth end inside it, and with it the pair.
        for ns in [&self.ns_a, &self.ns_b] {
            if let Err(e) = ip(&["netns", "del", ns]) {
                tracing::warn!("benchmark cleanup: {e}");
            }
        }
    }
}
