//! A local "data centre" on one machine: network namespaces for the primary host, the backup host,
//! the witness and a client, joined by a bridge in a switch namespace (DESIGN: hosts are processes
//! in network namespaces). Each host namespace bridges its uplink with a tap device that the
//! agent attaches the VM's network to, so the VM keeps one MAC and IP whichever host runs it.
//!
//! ```text
//!  ns <p>pri: br0 = 10.77.S.1  [eth0 + tap0]  ─┐
//!  ns <p>bak: br0 = 10.77.S.2  [eth0 + tap0]  ─┼─ ns <p>sw: br0 = 10.77.S.254 (witness)
//!  ns <p>cli: eth0 = 10.77.S.100               ─┘
//!  VM: 10.77.S.10 (on whichever host runs it)
//! ```

use std::net::Ipv4Addr;
use std::process::Command;

/// Errors setting up or changing the topology.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// `ip` could not be run at all.
    #[error("cannot run `ip` (is iproute2 installed, are we root?): {0}")]
    Spawn(std::io::Error),
    /// An `ip` command failed.
    #[error("`ip {args}` failed: {stderr}")]
    Command {
        /// The arguments given to `ip`.
        args: String,
        /// What it printed.
        stderr: String,
    },
    /// The prefix would make names longer than Linux allows.
    #[error("namespace prefix {0:?} must be 1..=8 characters of [a-z0-9-]")]
    BadPrefix(String),
}

/// The hosts of the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// Runs the protected VM first.
    Primary,
    /// Holds the replica and takes over.
    Backup,
    /// Runs the witness (the switch namespace).
    Switch,
    /// Drives the VM's service.
    Client,
}

impl Host {
    fn suffix(self) -> &'static str {
        match self {
            Host::Primary => "pri",
            Host::Backup => "bak",
            Host::Switch => "sw",
            Host::Client => "cli",
        }
    }
}

/// A created topology; removed again on drop.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    subnet: u8,
    keep: bool,
}

/// Runs `ip` with `args`, turning a failure into an error carrying its stderr.
pub fn ip(args: &[&str]) -> Result<(), TopologyError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(TopologyError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(TopologyError::Command {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

impl Topology {
    /// Builds the namespaces, links and addresses. `prefix` keeps parallel topologies apart,
    /// `subnet` picks 10.77.<subnet>.0/24. A leftover topology of the same prefix is removed first.
    pub fn create(prefix: &str, subnet: u8) -> Result<Topology, TopologyError> {
        let ok = !prefix.is_empty()
            && prefix.len() <= 8
            && prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(TopologyError::BadPrefix(prefix.to_string()));
        }
        let topo = Topology {
            prefix: prefix.to_string(),
            subnet,
            keep: false,
        };
        topo.remove();
        topo.build()?;
        Ok(topo)
    }

    fn build(&self) -> Result<(), TopologyError> {
        let sw = self.ns(Host::Switch);
        for h in [Host::Switch, Host::Primary, Host::Backup, Host::Client] {
            ip(&["netns", "add", &self.ns(h)])?;
            ip(&["-n", &self.ns(h), "link", "set", "lo", "up"])?;
        }
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        // No STP and no forwarding delay: a port is usable the moment it is up, and a moved MAC
        // is learnt from the first frame (the RARP QEMU sends after failover).
        ip(&[
            "-n",
            &sw,
            "link",
            "set",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ])?;
        let sw_addr = format!("{}/24", self.addr(Host::Switch));
        ip(&["-n", &sw, "addr", "add", &sw_addr, "dev", "br0"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for h in [Host::Primary, Host::Backup, Host::Client] {
            let port = self.switch_port(h);
            let ns = self.ns(h);
            ip(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            let addr = format!("{}/24", self.addr(h));
            if h == Host::Client {
                ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
                ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
                continue;
            }
            // A host bridges its uplink with the VM's tap; the host's own address sits on the bridge.
            ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"])?;
            ip(&[
                "-n",
                &ns,
                "link",
                "set",
                "br0",
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
            ])?;
            ip(&["-n", &ns, "tuntap", "add", "dev", "tap0", "mode", "tap"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "master", "br0", "up"])?;
            ip(&["-n", &ns, "link", "set", "tap0", "master", "br0", "up"])?;
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "br0"])?;
            ip(&["-n", &ns, "link", "set", "br0", "up"])?;
        }
        Ok(())
    }

    /// Name of a host's network namespace.
    pub fn ns(&self, h: Host) -> String {
        format!("{}{}", self.prefix, h.suffix())
    }

    /// A host's IPv4 address.
    pub fn addr(&self, h: Host) -> Ipv4Addr {
        let last = match h {
            Host::Primary => 1,
            Host::Backup => 2,
            Host::Client => 100,
            Host::Switch => 254,
        };
        Ipv4Addr::new(10, 77, self.subnet, last)
    }

    /// The protected VM's address.
    pub fn vm_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, 10)
    }

    /// The name of the tap device the agent attaches to in a host namespace.
    pub fn tap_name(&self) -> &'static str {
        "tap0"
    }

    fn switch_port(&self, h: Host) -> String {
        format!("sw-{}", h.suffix())
    }

    /// Cuts (`up == false`) or repairs a host's only link to the switch: the host is isolated
    /// from everyone, VM traffic included.
    pub fn set_host_link(&self, h: Host, up: bool) -> Result<(), TopologyError> {
        let state = if up { "up" } else { "down" };
        ip(&[
            "-n",
            &self.ns(Host::Switch),
            "link",
            "set",
            &self.switch_port(h),
            state,
        ])
    }

    /// Cuts or repairs host-to-host traffic between primary and backup only (both still reach
    /// the witness and the client, and the VM's bridged traffic is untouched): a blackhole route
    /// on each side for the other's address.
    pub fn set_pair_link(&self, up: bool) -> Result<(), TopologyError> {
        let verb = if up { "del" } else { "add" };
        for (h, other) in [(Host::Primary, Host::Backup), (Host::Backup, Host::Primary)] {
            let dst = format!("{}/32", self.addr(other));
            ip(&["-n", &self.ns(h), "route", verb, "blackhole", &dst])?;
        }
        Ok(())
    }

    /// Blocks (`up == false`) or unblocks host-to-host traffic from `from` to `to` with a
    /// blackhole route in `from`'s namespace (VM traffic is bridged and unaffected).
    pub fn set_route(&self, from: Host, to: Host, up: bool) -> Result<(), TopologyError> {
        let verb = if up { "del" } else { "add" };
        let dst = format!("{}/32", self.addr(to));
        match ip(&["-n", &self.ns(from), "route", verb, "blackhole", &dst]) {
            // Deleting a route that is not there, or adding one twice, changes nothing.
            Err(TopologyError::Command { stderr, .. })
                if stderr.contains("No such process") || stderr.contains("File exists") =>
            {
                Ok(())
            }
            r => r,
        }
    }

    /// Removes every blackhole route set by [`Topology::set_route`] or
    /// [`Topology::set_pair_link`].
    pub fn clear_routes(&self) -> Result<(), TopologyError> {
        for from in [Host::Primary, Host::Backup, Host::Switch] {
            for to in [Host::Primary, Host::Backup, Host::Switch, Host::Client] {
                if from != to {
                    self.set_route(from, to, true)?;
                }
            }
        }
        Ok(())
    }

    /// Leaves the namespaces in place when dropped (for debugging a failed run).
    pub fn keep(&mut self) {
        self.keep = true;
    }

    fn remove(&self) {
        for h in [Host::Primary, Host::Backup, Host::Client, Host::Switch] {
            // Deleting a namespace deletes its veth ends and bridges; errors mean it was absent.
            let _ = ip(&["netns", "del", &self.ns(h)]);
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if !self.keep {
            self.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_prefix() {
        assert!(matches!(
            Topology::create("Bad Prefix!", 1),
            Err(TopologyError::BadPrefix(_))
        ));
        assert!(matches!(
            Topology::create("waytoolongprefix", 1),
            Err(TopologyError::BadPrefix(_))
        ));
    }

    #[test]
    fn builds_a_reachable_topology_and_cuts_links() {
        let topo = Topology::create("ftvt1", 201).expect("topology (needs root and iproute2)");
        let ping = |from: Host, to: Ipv4Addr| {
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &topo.ns(from),
                    "ping",
                    "-c1",
                    "-W1",
                    &to.to_string(),
                ])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        };
        assert!(ping(Host::Client, topo.addr(Host::Primary)));
        assert!(ping(Host::Primary, topo.addr(Host::Backup)));
        assert!(ping(Host::Backup, topo.addr(Host::Switch)));
        topo.set_pair_link(false).unwrap();
        assert!(!ping(Host::Primary, topo.addr(Host::Backup)));
        assert!(ping(Host::Primary, topo.addr(Host::Switch)));
        topo.set_pair_link(true).unwrap();
        assert!(ping(Host::Primary, topo.addr(Host::Backup)));
        topo.set_host_link(Host::Primary, false).unwrap();
        assert!(!ping(Host::Client, topo.addr(Host::Primary)));
        topo.set_host_link(Host::Primary, true).unwrap();
        assert!(ping(Host::Client, topo.addr(Host::Primary)));
    }
}
