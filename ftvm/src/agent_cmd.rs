//! `ftvm primary` / `ftvm backup`: one host's agent protecting a QEMU VM.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ftvm_model::{Config, NodeId, Start, VmId};
use ftvm_real::agent::capture::CaptureMode;
use ftvm_real::agent::limits::AgentLimits;
use ftvm_real::agent::link::socket_buffer::DEFAULT_LINK_BUFFER_BYTES;
use ftvm_real::agent::metrics_http;
use ftvm_real::agent::netio::NetIo;
use ftvm_real::agent::prom::AgentExporter;
use ftvm_real::agent::qemu_vm::{QemuLauncher, Tracking};
use ftvm_real::agent::witness_client::WitnessClient;
use ftvm_real::agent::{Agent, AgentConfig, AgentExit};
use ftvm_real::auth::{Identity, Protection};
use ftvm_real::net::backpressure::DEFAULT_OUTPUT_CAP_BYTES;
use ftvm_real::qemu::{BootOptions, NetBackend, NetConfig, QemuConfig};
use ftvm_real::secure_fs;
use ftvm_real::transport::TransportKind;

use crate::guest_args::GuestArgs;

/// Arguments shared by `ftvm primary` and `ftvm backup`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// This host's node id.
    #[arg(long)]
    node: u32,
    /// Where this agent accepts checkpoint links.
    #[arg(long)]
    listen: SocketAddr,
    /// Another agent: `ID=ADDR` (repeat for each).
    #[arg(long = "peer", value_parser = parse_peer)]
    peers: Vec<(u32, SocketAddr)>,
    /// For `backup`: the node it first protects (default: the only peer).
    #[arg(long)]
    primary: Option<u32>,
    /// For `backup`: this host restarted — ask the witness who the primary is, then join it.
    #[arg(long)]
    rejoin: bool,
    /// The witness: `HOST:PORT` of an `ftvm witness`, or `etcd://HOST:PORT[,HOST:PORT...]` to
    /// keep the VM's register in an etcd cluster (created beforehand by `ftvm witness-init`).
    #[arg(long)]
    witness: String,
    /// With an etcd witness: the key prefix; the VM's register is `<prefix>/vm/<id>`.
    #[arg(long, default_value = ftvm_real::etcd_witness::DEFAULT_PREFIX)]
    witness_prefix: String,
    #[command(flatten)]
    witness_tls: crate::etcd_tls_args::EtcdTlsArgs,
    /// Key directory (`ftvm keygen`): this node's private key `node-<ID>.key` and the public
    /// keys of the other nodes and the witness. Every link and witness exchange is
    /// authenticated with them.
    #[arg(long)]
    keys: PathBuf,
    /// Encrypt checkpoint links (AES-256-GCM) instead of only authenticating their
    /// frames. Pages are then copied while they are encrypted: no zero-copy sends. Both agents
    /// must agree.
    #[arg(long)]
    encrypt: bool,
    /// The protected VM's id (same on every host).
    #[arg(long, default_value_t = 1)]
    vm: u64,
    /// The guest.
    #[command(flatten)]
    guest: GuestArgs,
    /// State directory: replica, QEMU sockets and logs, metrics, status.
    #[arg(long)]
    state_dir: PathBuf,
    /// The VM's disk on this host: a raw image whose size (whole 4 KiB blocks) every agent of
    /// the VM must share. The primary's VM runs on it (served by this agent over NBD); a
    /// backup's replica disk is this file, overwritten by the sync; after a failover the
    /// restored VM runs on it. Absent: the VM has no disk.
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Directory for guest RAM files (must be tmpfs-like: QEMU maps them shared).
    #[arg(long, default_value = "/dev/shm")]
    ram_dir: PathBuf,
    /// Tap device carrying the VM's network on this host (absent: released frames are dropped).
    #[arg(long)]
    tap: Option<String>,
    /// Epoch length in milliseconds (the longest epoch under `--epoch-policy output`).
    #[arg(long, default_value_t = 25)]
    epoch_ms: u64,
    #[command(flatten)]
    epoch: crate::epoch_policy_args::EpochPolicyArgs,
    /// Heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 20)]
    heartbeat_ms: u64,
    /// Silence after which the peer is presumed dead, in milliseconds.
    #[arg(long, default_value_t = 500)]
    failure_timeout_ms: u64,
    /// Checkpoint transport: copy, msg-zerocopy, uring-zc or auto.
    #[arg(long, default_value = "copy")]
    transport: String,
    /// Checkpoint capture: paused-send (VM paused while pages go out from guest RAM), staged
    /// (pages copied while paused, sent while the VM runs) or cow (pages write-protected while
    /// paused and sent from guest RAM while the VM runs; a write copies a page not yet sent).
    #[arg(long, default_value = "staged")]
    capture: String,
    /// Dirty-page tracking: pagemap (userfaultfd + PAGEMAP_SCAN) or hash (cross-check).
    #[arg(long, default_value = "pagemap")]
    tracking: String,
    /// The user QEMU runs as once its machine is set up (`-runas`): `auto` picks `ftvm-qemu`
    /// when that user exists (real/host/install-deps.sh creates it) and QEMU loads the
    /// dirty-tracking library (which keeps QEMU dying with the agent after the drop); `root`
    /// keeps QEMU as root; any other name is used as given.
    #[arg(long, default_value = "root")]
    qemu_user: String,
    /// Every N epochs record a digest of guest RAM (primary: paused at capture; backup: after
    /// commit) in <state-dir>/replica/verify.jsonl, to prove the replica matches. For tests.
    #[arg(long)]
    verify_every: Option<u64>,
    /// Make every replica commit survive a host crash too: `fsync` the journal before its
    /// commit point, the replica directory after it, and the device state and metadata (the
    /// behaviour before commits went at memory speed). Only useful with a --state-dir on
    /// persistent storage and guest RAM that outlives a reboot; by default a commit survives a
    /// crash of the agent process, costs no sync, and the replica (on tmpfs beside the RAM
    /// file) is lost with the host.
    #[arg(long)]
    durable_replica: bool,
    /// Start a backup with an empty replica even if the state directory holds a committed one
    /// (by default a restarted backup offers it to its primary, which sends only what changed
    /// since: a catch-up instead of a full sync).
    #[arg(long)]
    discard_replica: bool,
    /// Most MiB of guest frames held behind the output gate; at the cap the agent stops reading
    /// the VM's network (the guest's transmit stalls, nothing is dropped) until acks release it.
    #[arg(long, default_value_t = DEFAULT_OUTPUT_CAP_BYTES >> 20, value_parser = clap::value_parser!(u64).range(1..))]
    output_cap_mb: u64,
    /// KiB of each kernel buffer (send and receive) of a checkpoint link's socket; 0 leaves
    /// them to the kernel's autotuning. Bytes queued there are bytes every ack waits behind, so
    /// the default covers a LAN's bandwidth-delay product and little more; raise it for a
    /// link with a longer round trip.
    #[arg(long, default_value_t = (DEFAULT_LINK_BUFFER_BYTES >> 10) as u64)]
    link_buffer_kib: u64,
    /// Log protocol events.
    #[arg(long)]
    verbose: bool,
    /// Append this host's journal here (the model's inputs and actions and the frames that
    /// left the output gate, JSON lines): `ftvm scenario run --real` and `ftvm demo` check a
    /// run's invariants from its hosts' journals.
    #[arg(long)]
    journal: Option<PathBuf>,
    /// Serve Prometheus metrics (`/metrics`) and the status report (`/status`, JSON) over
    /// HTTP on this address (off by default).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// A TOML config file whose `[agent]` section gives these flags (flags given here win);
    /// `ftvm check-config` validates it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Plant one of the model's protocol bugs (test builds with the `mutants` feature only),
    /// e.g. `release-before-ack`.
    #[cfg(feature = "mutants")]
    #[arg(long)]
    mutant: Option<String>,
}

impl Args {
    /// `--state-dir`.
    pub fn state_dir(&self) -> &std::path::Path {
        &self.state_dir
    }

    /// `--epoch-ms`.
    #[cfg(test)]
    pub fn epoch_ms(&self) -> u64 {
        self.epoch_ms
    }

    /// `--listen`.
    #[cfg(test)]
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }
}

/// The mutant named `name` (`release-before-ack` names `ReleaseBeforeAck`).
#[cfg(feature = "mutants")]
pub fn parse_mutant(name: &str) -> anyhow::Result<ftvm_model::Mutant> {
    let want = name.replace('-', "").to_lowercase();
    ftvm_model::Mutant::ALL
        .into_iter()
        .find(|m| format!("{m:?}").to_lowercase() == want)
        .ok_or_else(|| anyhow::anyhow!("no mutant named {name:?}"))
}

fn parse_peer(s: &str) -> Result<(u32, SocketAddr), String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("peer {s:?} is not ID=ADDR"))?;
    let id = id
        .parse()
        .map_err(|_| format!("peer id {id:?} is not a number"))?;
    let addr = addr
        .parse()
        .map_err(|_| format!("peer address {addr:?} is not IP:PORT"))?;
    Ok((id, addr))
}

/// The user QEMU drops to (see `--qemu-user`); `has_preload` says whether QEMU loads the
/// library that keeps it dying with the agent after the drop.
fn qemu_user(flag: &str, has_preload: bool) -> anyhow::Result<Option<String>> {
    use ftvm_real::qemu::{unprivileged_user_exists, DEFAULT_QEMU_USER};
    match flag {
        "root" => Ok(None),
        "auto" => Ok((has_preload && unprivileged_user_exists(DEFAULT_QEMU_USER))
            .then(|| DEFAULT_QEMU_USER.to_string())),
        name if !has_preload => bail!(
            "--qemu-user {name} needs the dirty-tracking library in QEMU (--tracking pagemap), \
             which keeps QEMU dying with the agent once it runs as another user"
        ),
        name if !unprivileged_user_exists(name) => {
            bail!("--qemu-user {name}: no such user other than root")
        }
        name => Ok(Some(name.to_string())),
    }
}

/// Which role the command starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `ftvm primary`.
    Primary,
    /// `ftvm backup`.
    Backup,
}

/// Runs an agent until it is killed or fenced for good.
pub fn run(role: Role, args: Args) -> anyhow::Result<i32> {
    let peers: BTreeMap<NodeId, SocketAddr> =
        args.peers.iter().map(|&(id, a)| (NodeId(id), a)).collect();
    if peers.contains_key(&NodeId(args.node)) {
        bail!("--peer lists this node ({}) itself", args.node);
    }
    let start = match role {
        Role::Primary => Start::Primary,
        Role::Backup if args.rejoin => Start::Rejoin,
        Role::Backup => {
            let primary = match (args.primary, peers.len()) {
                (Some(p), _) => p,
                (None, 1) => peers.keys().next().map(|n| n.0).unwrap_or_default(),
                (None, _) => bail!("backup: say which node is primary with --primary"),
            };
            Start::Backup {
                primary: NodeId(primary),
            }
        }
    };
    if args.guest.ram_mb == 0 {
        bail!("--ram-mb must be positive");
    }
    let accel = args.guest.accel()?;
    let transport: TransportKind = args.transport.parse().context("--transport")?;
    let capture: CaptureMode = args.capture.parse().context("--capture")?;
    let tracking: Tracking = args
        .tracking
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))
        .context("--tracking")?;
    let witness = WitnessClient::parse(&args.witness, &args.witness_prefix).context("--witness")?;
    let identity = match witness {
        WitnessClient::Service(_) => Identity::load_node(&args.keys, NodeId(args.node)),
        // etcd as the witness: no witness key to authenticate.
        WitnessClient::Etcd(_) => {
            Identity::load_node_without_witness_key(&args.keys, NodeId(args.node))
        }
    }
    .with_context(|| format!("loading keys from {}", args.keys.display()))?;
    for peer in peers.keys() {
        if !identity.trust.nodes.contains_key(peer) {
            bail!(
                "no public key for node {peer} in {} (copy its node-{peer}.pub there)",
                args.keys.display()
            );
        }
    }
    let mut witness =
        WitnessClient::parse(&args.witness, &args.witness_prefix).context("--witness")?;
    if let Some(tls) = args.witness_tls.load()? {
        witness = witness.with_etcd_tls(tls).context("--witness-ca")?;
    }
    let guest = args.guest.image()?;
    secure_fs::private_dir(&args.state_dir).context("the state directory")?;
    let page_size = 4096u32;
    let ram_bytes = args.guest.ram_mb << 20;

    let mut model = Config::new(VmId(args.vm), ram_bytes / u64::from(page_size), NodeId(0));
    model.epoch_interval = Duration::from_millis(args.epoch_ms);
    model.epoch_policy = args.epoch.policy();
    model.heartbeat_interval = Duration::from_millis(args.heartbeat_ms);
    if let Some(disk) = &args.disk {
        model.disk_blocks = disk_blocks(disk)?;
    }
    model.failure_timeout = Duration::from_millis(args.failure_timeout_ms);
    #[cfg(feature = "mutants")]
    {
        model.mutant = args.mutant.as_deref().map(parse_mutant).transpose()?;
    }
    model.validate().context("protocol parameters")?;

    let stem = format!("ftvm-vm{}-n{}", args.vm, args.node);
    let ram_file = args.ram_dir.join(format!("{stem}.ram"));
    let replica_ram = args.ram_dir.join(format!("{stem}-replica.ram"));
    // The primary boots a fresh VM: never over an old RAM file (booting replaces it again, and
    // creates it 0600; another user's file there is refused).
    secure_fs::remove_stale(&ram_file).context("the old RAM file")?;
    let netdev_socket = args.state_dir.join("netdev.sock");

    let mut base = QemuConfig::new(
        &guest.kernel,
        &ram_file,
        ram_bytes,
        args.state_dir.join("qemu"),
    );
    secure_fs::private_dir(&args.state_dir.join("qemu")).context("the QEMU directory")?;
    args.guest.apply(&guest, accel, &mut base);
    base.net = Some(NetConfig {
        mac: args.guest.mac.clone(),
        backend: NetBackend::Stream {
            socket: netdev_socket.clone(),
        },
    });
    if capture == CaptureMode::Cow && tracking == Tracking::Hash {
        bail!("--capture cow takes its dirty log from write faults; it cannot use --tracking hash");
    }
    let preload = match tracking {
        Tracking::Pagemap => Some(
            ftvm_real::dirty::preload_library_path()
                .context("locating the dirty-tracking library")?,
        ),
        Tracking::Hash => None,
    };
    base.run_as = qemu_user(&args.qemu_user, preload.is_some())?;
    let launcher = QemuLauncher {
        base,
        restore_dir: args.state_dir.join("qemu-restored"),
        tracking,
        preload,
        // A TCG boot takes 3-5 s here; one that printed nothing for 15 s has hung (it happens:
        // docs/ARCHITECTURE.md, Platform facts) and is retried.
        boot: BootOptions {
            timeout: Duration::from_secs(15),
            ..BootOptions::default()
        },
        page_size: page_size as usize,
        capture,
        disk: args.disk.clone(),
    };
    let cfg = AgentConfig {
        node: NodeId(args.node),
        start,
        model,
        listen: args.listen,
        peers,
        witness,
        replica_dir: args.state_dir.join("replica"),
        replica_ram,
        replica_disk: args.disk.clone(),
        replica_durable: args.durable_replica,
        resume_replica: !args.discard_replica,
        transport,
        capture,
        metrics: Some(args.state_dir.join("metrics.jsonl")),
        status_file: Some(args.state_dir.join("status.json")),
        identity: Arc::new(identity),
        protection: if args.encrypt {
            Protection::Encrypt
        } else {
            Protection::Mac
        },
        verbose: args.verbose,
        verify_every: args.verify_every,
        limits: AgentLimits {
            output_cap_bytes: args.output_cap_mb.saturating_mul(1 << 20),
            link_buffer_bytes: link_buffer_bytes(args.link_buffer_kib)?,
            ..AgentLimits::default()
        },
        journal: args.journal.clone(),
    };
    // One thread runs the loop and spawns QEMU: PR_SET_PDEATHSIG ties QEMU to that thread, so a
    // killed agent takes its QEMU with it (a dead host's VM must not linger).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let node = args.node;
    let exit = rt.block_on(async move {
        let mut agent = Agent::new(cfg, launcher).context("starting the agent")?;
        let net = NetIo::start(
            &netdev_socket,
            args.tap.as_deref(),
            agent.events(),
            agent.output_cap(),
        )
        .context("setting up the VM's network path")?;
        agent.attach_net(net);
        if let Some(addr) = args.metrics_listen {
            let exporter = Arc::new(AgentExporter::new(args.vm, node));
            let listener = metrics_http::bind(addr).await?;
            tokio::spawn(metrics_http::serve(listener, exporter.clone()));
            agent.attach_exporter(exporter);
        }
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        agent.run(shutdown).await.context("agent")
    })?;
    match exit {
        AgentExit::Shutdown => Ok(0),
        AgentExit::Fenced => {
            tracing::warn!(node, "fenced: another host runs the VM now");
            Ok(3)
        }
    }
}

/// The size of the disk image at `path` in 4 KiB blocks (a size that is not whole blocks, or a
/// missing file, is refused with the reason).
/// `--link-buffer-kib` in bytes: 0 is the kernel's autotuning (`None`). The kernel takes an
/// `int` and doubles it, so anything above 1 GiB is refused rather than wrapped.
pub(crate) fn link_buffer_bytes(kib: u64) -> anyhow::Result<Option<usize>> {
    const MAX_KIB: u64 = 1 << 20;
    match kib {
        0 => Ok(None),
        k if k > MAX_KIB => {
            anyhow::bail!("--link-buffer-kib {k}: at most {MAX_KIB} (1 GiB), or 0 for the kernel's autotuning")
        }
        // At most 2^30: fits a usize on every target this runs on.
        k => Ok(Some((k << 10) as usize)),
    }
}

fn disk_blocks(path: &std::path::Path) -> anyhow::Result<u64> {
    let block = u64::from(ftvm_model::wire::DISK_BLOCK_SIZE);
    let len = std::fs::metadata(path)
        .with_context(|| format!("the disk image {}", path.display()))?
        .len();
    if len == 0 || len % block != 0 {
        bail!(
            "the disk image {} is {len} bytes, not a positive multiple of {block}",
            path.display()
        );
    }
    Ok(len / block)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ftvm_real::qemu::{unprivileged_user_exists, DEFAULT_QEMU_USER};

    #[test]
    fn link_buffer_kib_zero_is_autotuning_and_too_large_is_refused() {
        assert_eq!(link_buffer_bytes(0).unwrap(), None);
        assert_eq!(link_buffer_bytes(256).unwrap(), Some(256 << 10));
        let e = link_buffer_bytes(1 << 21).unwrap_err().to_string();
        assert!(e.contains("at most"), "{e}");
    }

    #[test]
    fn qemu_user_drops_only_with_the_library_that_ties_qemu_to_the_agent() {
        assert_eq!(qemu_user("root", true).unwrap(), None);
        assert_eq!(qemu_user("auto", false).unwrap(), None);
        let auto = qemu_user("auto", true).unwrap();
        assert_eq!(
            auto.is_some(),
            unprivileged_user_exists(DEFAULT_QEMU_USER),
            "{auto:?}"
        );
        assert_eq!(
            qemu_user("nobody", true).unwrap().as_deref(),
            Some("nobody")
        );
        let e = qemu_user("nobody", false).unwrap_err().to_string();
        assert!(e.contains("--tracking pagemap"), "{e}");
        assert!(qemu_user("no-such-user-ftvm", true).is_err());
    }
}
