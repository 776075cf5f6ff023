//! A local "data centre" on one machine: network namespaces for the primary host, the backup host,
//! the witness and a client (docs/ARCHITECTURE.md, Local deployments), joined by two
//! networks with a bridge each in a switch namespace:
//!
//! - the **service network** 10.77.S.0/24 carries only the VM's traffic: each host namespace
//!   bridges its uplink `eth0` with the tap device the agent attaches the VM to (so the VM keeps
//!   one MAC and IP whichever host runs it), and the client sits on it. No host has an address
//!   there, and a routing rule drops every packet that reaches a host's own stack through that
//!   bridge, so neither the guest nor the client can reach an agent or the witness, not even by
//!   routing to their replication addresses by hand (Linux would otherwise accept a packet for
//!   any of its addresses on any interface);
//! - the **replication network** 10.78.S.0/24 carries checkpoints, heartbeats and witness
//!   requests between the primary, the backup and the witness only.
//!
//! ```text
//!                  service (VM)          replication
//!  ns <p>pri: br0 [eth0 + tap0]  ─┐      eth1 = 10.78.S.1   ─┐
//!  ns <p>bak: br0 [eth0 + tap0]  ─┼─ sw  eth1 = 10.78.S.2   ─┼─ sw br1 = 10.78.S.254 (witness)
//!  ns <p>cli: eth0 = 10.77.S.100 ─┘  br0                     │
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
    /// Entering a namespace failed.
    #[error("cannot enter a network namespace: {0}")]
    Enter(std::io::Error),
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
    /// A third agent host, waiting to join (only in topologies made with a spare).
    Spare,
}

impl Host {
    fn suffix(self) -> &'static str {
        match self {
            Host::Primary => "pri",
            Host::Backup => "bak",
            Host::Switch => "sw",
            Host::Client => "cli",
            Host::Spare => "spr",
        }
    }
}

/// A created topology; removed again on drop.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    subnet: u8,
    keep: bool,
    spare: bool,
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
        Topology::create_hosts(prefix, subnet, false)
    }

    /// As [`Topology::create`], with a third agent host ([`Host::Spare`]) when `spare`.
    pub fn create_hosts(prefix: &str, subnet: u8, spare: bool) -> Result<Topology, TopologyError> {
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
            spare,
        };
        topo.remove();
        topo.build()?;
        Ok(topo)
    }

    fn build(&self) -> Result<(), TopologyError> {
        let sw = self.ns(Host::Switch);
        let mut hosts = vec![Host::Switch, Host::Client];
        hosts.extend(self.agent_hosts());
        for &h in &hosts {
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
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        ip(&["-n", &sw, "link", "add", "br1", "type", "bridge"])?;
        ip(&[
            "-n",
            &sw,
            "link",
            "set",
            "br1",
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ])?;
        let sw_addr = format!("{}/24", self.addr(Host::Switch));
        ip(&["-n", &sw, "addr", "add", &sw_addr, "dev", "br1"])?;
        ip(&["-n", &sw, "link", "set", "br1", "up"])?;
        seal_service_bridge(&sw)?;
        let mut hosts = vec![Host::Client];
        hosts.extend(self.agent_hosts());
        for h in hosts {
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
            // The host's own address is on the replication network only.
            let rport = self.replication_port(h);
            ip(&[
                "-n", &sw, "link", "add", &rport, "type", "veth", "peer", "name", "eth1", "netns",
                &ns,
            ])?;
            ip(&["-n", &sw, "link", "set", &rport, "master", "br1", "up"])?;
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth1"])?;
            ip(&["-n", &ns, "link", "set", "eth1", "up"])?;
            // A host bridges its service uplink with the VM's tap, with no address of its own.
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
            ip(&["-n", &ns, "link", "set", "br0", "up"])?;
            seal_service_bridge(&ns)?;
        }
        Ok(())
    }

    /// The hosts agents run on: primary and backup, and the spare if there is one.
    pub fn agent_hosts(&self) -> Vec<Host> {
        let mut h = vec![Host::Primary, Host::Backup];
        if self.spare {
            h.push(Host::Spare);
        }
        h
    }

    /// Name of a host's network namespace.
    pub fn ns(&self, h: Host) -> String {
        format!("{}{}", self.prefix, h.suffix())
    }

    /// A host's IPv4 address: where its agent (or, for the switch, the witness) listens, on the
    /// replication network; the client's is on the service network, its only one.
    pub fn addr(&self, h: Host) -> Ipv4Addr {
        match h {
            Host::Primary => Ipv4Addr::new(10, 78, self.subnet, 1),
            Host::Backup => Ipv4Addr::new(10, 78, self.subnet, 2),
            Host::Switch => Ipv4Addr::new(10, 78, self.subnet, 254),
            Host::Client => Ipv4Addr::new(10, 77, self.subnet, 100),
            Host::Spare => Ipv4Addr::new(10, 78, self.subnet, 3),
        }
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

    fn replication_port(&self, h: Host) -> String {
        format!("rp-{}", h.suffix())
    }

    /// Cuts (`up == false`) or repairs a host's links to the switch, on both networks: the host
    /// is isolated from everyone, VM traffic included.
    pub fn set_host_link(&self, h: Host, up: bool) -> Result<(), TopologyError> {
        let state = if up { "up" } else { "down" };
        let sw = self.ns(Host::Switch);
        ip(&["-n", &sw, "link", "set", &self.switch_port(h), state])?;
        if matches!(h, Host::Primary | Host::Backup | Host::Spare) {
            ip(&["-n", &sw, "link", "set", &self.replication_port(h), state])?;
        }
        Ok(())
    }

    /// Cuts or repairs host-to-host traffic between primary and backup only (both still reach
    /// the witness, and the VM's bridged traffic is untouched): a blackhole route
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
        let mut froms = self.agent_hosts();
        froms.push(Host::Switch);
        for &from in &froms {
            for to in froms.iter().copied().chain([Host::Client]) {
                if from != to {
                    self.set_route(from, to, true)?;
                }
            }
        }
        Ok(())
    }

    /// Runs `f` on a thread that has entered `h`'s network namespace (sockets it creates live
    /// there, also after it returns); the calling thread stays where it is.
    pub fn in_ns<T: Send + 'static>(
        &self,
        h: Host,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, TopologyError> {
        enter_ns(&self.ns(h), f)
    }

    /// Leaves the namespaces in place when dropped (for debugging a failed run).
    pub fn keep(&mut self) {
        self.keep = true;
    }

    fn remove(&self) {
        for h in [
            Host::Primary,
            Host::Backup,
            Host::Spare,
            Host::Client,
            Host::Switch,
        ] {
            // Deleting a namespace deletes its veth ends and bridges; errors mean it was absent.
            let _ = ip(&["netns", "del", &self.ns(h)]);
        }
    }
}

/// Runs `f` on a new thread inside network namespace `ns` (one `ip netns` created).
pub fn enter_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, TopologyError> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).map_err(TopologyError::Enter)?;
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| TopologyError::Enter(e.into()))?;
        Ok(f())
    })
    .join()
    .unwrap_or_else(|_| {
        Err(TopologyError::Enter(std::io::Error::other(
            "the thread in the namespace panicked",
        )))
    })
}

/// Makes namespace `ns` drop every packet that reaches its own stack through its service bridge
/// `br0`: a rule ahead of the local table (moved from priority 0 to 100 for that) blackholes
/// whatever arrives on `br0`. Frames bridged between the bridge's ports are not routed and pass.
fn seal_service_bridge(ns: &str) -> Result<(), TopologyError> {
    for family in ["-4", "-6"] {
        ip(&[
            "-n", ns, family, "rule", "add", "pref", "100", "lookup", "local",
        ])?;
        ip(&["-n", ns, family, "rule", "del", "pref", "0"])?;
        ip(&[
            "-n",
            ns,
            family,
            "rule",
            "add",
            "pref",
            "10",
            "iif",
            "br0",
            "blackhole",
        ])?;
    }
    Ok(())
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
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::time::Duration;

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

    fn ping(topo: &Topology, from: Host, to: Ipv4Addr) -> bool {
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
    }

    #[test]
    fn builds_a_reachable_topology_and_cuts_links() {
        let topo = Topology::create("ftvt1", 201).expect("topology (needs root and iproute2)");
        let ping = |from: Host, to: Ipv4Addr| ping(&topo, from, to);
        assert!(ping(Host::Primary, topo.addr(Host::Backup)));
        assert!(ping(Host::Backup, topo.addr(Host::Switch)));
        topo.set_pair_link(false).unwrap();
        assert!(!ping(Host::Primary, topo.addr(Host::Backup)));
        assert!(ping(Host::Primary, topo.addr(Host::Switch)));
        topo.set_pair_link(true).unwrap();
        assert!(ping(Host::Primary, topo.addr(Host::Backup)));
        topo.set_host_link(Host::Primary, false).unwrap();
        assert!(!ping(Host::Switch, topo.addr(Host::Primary)));
        assert!(ping(Host::Switch, topo.addr(Host::Backup)));
        topo.set_host_link(Host::Primary, true).unwrap();
        assert!(ping(Host::Switch, topo.addr(Host::Primary)));
    }

    /// Removes the stand-in guest's namespace however the test ends.
    struct Guest(String);
    impl Drop for Guest {
        fn drop(&mut self) {
            let _ = ip(&["netns", "del", &self.0]);
        }
    }

    fn listen(topo: &Topology, h: Host, addr: SocketAddr) -> TcpListener {
        topo.in_ns(h, move || TcpListener::bind(addr))
            .unwrap()
            .unwrap_or_else(|e| panic!("listen on {addr} in {h:?}: {e}"))
    }

    fn connects(ns: &str, addr: SocketAddr) -> bool {
        enter_ns(ns, move || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(700)).is_ok()
        })
        .unwrap()
    }

    #[test]
    fn the_client_and_the_guest_reach_the_vm_but_no_agent_or_witness_port() {
        let topo = Topology::create("ftvt2", 202).expect("topology (needs root and iproute2)");
        // A stand-in guest: a namespace on the primary's service bridge with the VM's address,
        // like QEMU's tap, serving port 80.
        let guest = Guest("ftvt2vm".into());
        let _ = ip(&["netns", "del", &guest.0]);
        ip(&["netns", "add", &guest.0]).unwrap();
        let pri = topo.ns(Host::Primary);
        ip(&[
            "-n", &pri, "link", "add", "gst0", "type", "veth", "peer", "name", "eth0", "netns",
            &guest.0,
        ])
        .unwrap();
        ip(&["-n", &pri, "link", "set", "gst0", "master", "br0", "up"]).unwrap();
        let vm = format!("{}/24", topo.vm_addr());
        ip(&["-n", &guest.0, "addr", "add", &vm, "dev", "eth0"]).unwrap();
        ip(&["-n", &guest.0, "link", "set", "eth0", "up"]).unwrap();
        let service = SocketAddr::from((topo.vm_addr(), 80));
        let _svc = enter_ns(&guest.0, move || TcpListener::bind(service))
            .unwrap()
            .unwrap();

        let ports = [
            (
                Host::Primary,
                SocketAddr::from((topo.addr(Host::Primary), 7000)),
            ),
            (
                Host::Backup,
                SocketAddr::from((topo.addr(Host::Backup), 7000)),
            ),
            (
                Host::Switch,
                SocketAddr::from((topo.addr(Host::Switch), 7100)),
            ),
        ];
        let _listeners: Vec<TcpListener> =
            ports.iter().map(|&(h, a)| listen(&topo, h, a)).collect();
        // The ports are live: the primary reaches the backup's agent and the witness.
        assert!(connects(&pri, ports[1].1));
        assert!(connects(&pri, ports[2].1));

        let client = topo.ns(Host::Client);
        assert!(connects(&client, service), "the client reaches the VM");
        for (_, a) in ports {
            assert!(!connects(&client, a), "the client reached {a}");
            assert!(!connects(&guest.0, a), "the guest reached {a}");
        }
        // Routing to the replication network by hand over the service link does not help, even
        // on hosts that can route back to the service network (as one with a default route
        // can): they answer ARP for their addresses there, but drop what comes in on the bridge.
        let repl = format!("10.78.{}.0/24", 202);
        for ns in [&client, &guest.0] {
            ip(&["-n", ns, "route", "add", &repl, "dev", "eth0"]).unwrap();
        }
        let service_net = format!("10.77.{}.0/24", 202);
        for h in [Host::Primary, Host::Backup, Host::Switch] {
            ip(&[
                "-n",
                &topo.ns(h),
                "route",
                "add",
                &service_net,
                "dev",
                "br0",
            ])
            .unwrap();
        }
        for (_, a) in ports {
            assert!(!connects(&client, a), "the client reached {a} by a route");
            assert!(!connects(&guest.0, a), "the guest reached {a} by a route");
        }
        assert!(
            connects(&client, service),
            "the client still reaches the VM"
        );
    }
}
