//! A local deployment: witness, primary and backup agents (and a client) as processes in network
//! namespaces, one per host. Shared by `ftvm demo`, `ftvm bench e2e` and the real tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ftvm_real::auth::keys;
use ftvm_real::host::fault_net::FaultNet;
use ftvm_real::host::relay::Shape;
use ftvm_real::host::topology::{Host, Topology};
use ftvm_real::secure_fs;

/// How to deploy.
#[derive(Debug, Clone)]
pub struct DeployOpts {
    /// Guest directory (vmlinuz, initrd.img, cmdline).
    pub guest_dir: PathBuf,
    /// Work directory (recreated, 0700; refused if someone else's).
    pub work_dir: PathBuf,
    /// Guest RAM in MiB.
    pub ram_mb: u64,
    /// Epoch in ms (the longest epoch under the output policy).
    pub epoch_ms: u64,
    /// When epochs end.
    pub epoch_policy: ftvm_model::EpochPolicy,
    /// Guest dirtying rate, pages/s.
    pub dirty_pages: u64,
    /// QEMU accelerator.
    pub accel: String,
    /// Checkpoint transport.
    pub transport: String,
    /// Capture mode (None: the agent's default).
    pub capture: Option<String>,
    /// Failure timeout in ms.
    pub failure_timeout_ms: u64,
    /// Namespace prefix.
    pub prefix: String,
    /// Subnet number.
    pub subnet: u8,
    /// RAM digests every N epochs.
    pub verify_every: Option<u64>,
    /// Plant this protocol bug in both agents (`--mutant`; binaries built with the `mutants`
    /// feature only).
    pub mutant: Option<String>,
    /// Leave namespaces behind.
    pub keep: bool,
    /// The VM's disk (None: a diskless VM).
    pub disk: Option<DeployDisk>,
    /// Which witness decides failovers.
    pub witness: WitnessKind,
}

/// The witness of a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WitnessKind {
    /// One `ftvm witness` process on the witness host.
    #[default]
    Ftvm,
    /// A 3-member etcd cluster on the witness host; the agents use it as the witness.
    Etcd,
}

/// The protected VM's disk in a deployment: each agent gets its own raw image in
/// `<work>/disks/` — the primary's a sparse copy of `source` (or zeroes), every other one zeroes
/// of the same size, filled by its sync.
#[derive(Debug, Clone)]
pub struct DeployDisk {
    /// Image the VM starts from (its size is the disk's); None: an empty disk of `bytes`.
    pub source: Option<PathBuf>,
    /// Size of an empty disk, in bytes (whole 4 KiB blocks).
    pub bytes: u64,
    /// The guest's disk writer (`ftvm.diskwrite=`: blocks per second or `max`), if any.
    pub guest_write: Option<String>,
}

impl DeployDisk {
    /// Node `node`'s image in a deployment in `work_dir`.
    pub fn image(work_dir: &Path, node: u32) -> PathBuf {
        work_dir.join("disks").join(format!("n{node}.raw"))
    }

    /// Creates every node's image (`nodes` of them): node 1's from the source.
    pub fn create(&self, work_dir: &Path, nodes: u32) -> anyhow::Result<()> {
        secure_fs::private_dir(&work_dir.join("disks")).context("the disk directory")?;
        let bytes = match &self.source {
            Some(src) => {
                let dst = DeployDisk::image(work_dir, 1);
                let st = Command::new("cp")
                    .arg("--sparse=always")
                    .arg(src)
                    .arg(&dst)
                    .status()
                    .context("running cp")?;
                if !st.success() {
                    bail!("copying the disk image {} failed ({st})", src.display());
                }
                std::fs::metadata(&dst)
                    .with_context(|| format!("the disk image {}", dst.display()))?
                    .len()
            }
            None => self.bytes,
        };
        let first = if self.source.is_some() { 2 } else { 1 };
        for node in first..=nodes {
            let p = DeployDisk::image(work_dir, node);
            let f = secure_fs::replace(&p, secure_fs::PRIVATE_FILE_MODE)
                .with_context(|| format!("creating {}", p.display()))?;
            f.set_len(bytes)
                .with_context(|| format!("sizing {}", p.display()))?;
        }
        Ok(())
    }
}

/// A child process that is killed when dropped.
pub struct Proc {
    /// What it is, for messages.
    pub name: &'static str,
    /// The process.
    pub child: Child,
    /// Where its output goes.
    pub log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `ftvm ARGS` inside `host`'s namespace, output to `log`.
pub fn spawn_in(
    topo: &Topology,
    host: Host,
    name: &'static str,
    args: &[String],
    log: &Path,
) -> anyhow::Result<Proc> {
    let exe = std::env::current_exe().context("locating the ftvm binary")?;
    let log_file = secure_fs::replace(log, secure_fs::PRIVATE_FILE_MODE)
        .with_context(|| format!("creating the {name}'s log"))?;
    let child = Command::new("ip")
        .args(["netns", "exec", &topo.ns(host)])
        .arg(exe)
        .args(args)
        .args(crate::logging::child_args())
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting the {name}"))?;
    Ok(Proc {
        name,
        child,
        log: log.to_path_buf(),
    })
}

/// An agent's status file, or Null.
pub fn status(dir: &Path) -> serde_json::Value {
    std::fs::read(dir.join("status.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Polls `ok` until it holds, failing early if one of `procs` exits.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    procs: &mut [&mut Proc],
    mut ok: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while !ok() {
        for p in procs.iter_mut() {
            if let Some(st) = p.child.try_wait()? {
                bail!(
                    "the {} exited ({st}) while waiting for {what}; {}",
                    p.name,
                    last_words(&p.log)
                );
            }
        }
        if t0.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// How many closing lines of a dead process's log an error quotes.
const LAST_WORDS_LINES: usize = 3;

/// "its log ends: …" with the last lines of `log`, so a failure explains itself where it is
/// printed (a CI log) instead of pointing at a file that may be gone.
pub fn last_words(log: &Path) -> String {
    let Ok(tail) = ftvm_real::log_tail::last_lines(log, LAST_WORDS_LINES) else {
        return format!("its log {} is unreadable", log.display());
    };
    if tail.is_empty() {
        return format!("its log {} is empty", log.display());
    }
    format!("its log {} ends:\n  {}", log.display(), tail.join("\n  "))
}

/// True when running as root.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A running deployment.
pub struct Deployment {
    /// The link relays and loss rules, when the agents dial through them (stopped first).
    pub faults: Option<FaultNet>,
    /// The hosts.
    pub topo: Topology,
    /// Options it runs with.
    pub opts: DeployOpts,
    /// The witness process (`ftvm witness`; none with the etcd witness).
    pub witness: Option<Proc>,
    /// The etcd cluster, with the etcd witness.
    pub etcd: Option<ftvm_real::host::etcd_cluster::EtcdCluster>,
    /// The backup agent.
    pub backup: Proc,
    /// The primary agent.
    pub primary: Proc,
    /// The spare agent (node 3), in deployments with a spare host.
    pub spare: Option<Proc>,
    /// Arguments the backup agent was started with (to restart it).
    pub backup_args: Vec<String>,
    /// Where this deployment's guest RAM files live (removed last).
    ram_dir: RamDir,
}

/// The guest RAM files of one deployment, in a /dev/shm directory named after its namespace
/// prefix and subnet. Real hosts each have their own /dev/shm; hosts that are namespaces of one
/// machine share it, and two deployments must not map each other's RAM files.
struct RamDir {
    path: PathBuf,
    keep: bool,
}

impl RamDir {
    fn create(opts: &DeployOpts) -> anyhow::Result<RamDir> {
        let path = Path::new("/dev/shm").join(format!("ftvm-{}-{}", opts.prefix, opts.subnet));
        // A crashed earlier run of the same deployment may have left RAM files behind; the
        // name is predictable in a world-writable directory, so a directory someone else
        // planted there (or a link) is refused rather than reused.
        secure_fs::fresh_private_dir(&path).context("the guest RAM directory")?;
        Ok(RamDir {
            path,
            keep: opts.keep,
        })
    }
}

impl Drop for RamDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

impl Deployment {
    /// Creates the hosts and starts witness, backup and primary (not waiting for protection).
    pub fn start(opts: DeployOpts) -> anyhow::Result<Deployment> {
        Deployment::start_with(opts, None, false)
    }

    /// As [`Deployment::start`], but with `relayed` the agents dial each other and the witness
    /// through fault-injecting relays whose links start shaped so (see [`FaultNet`]), and with
    /// `spare` a third agent (node 3, on [`Host::Spare`]) keeps asking node 1 to let it join.
    pub fn start_with(
        opts: DeployOpts,
        relayed: Option<Shape>,
        spare: bool,
    ) -> anyhow::Result<Deployment> {
        if !is_root() {
            bail!("deployments create network namespaces and tap devices: run as root");
        }
        secure_fs::fresh_private_dir(&opts.work_dir).context("the work directory")?;
        let mut topo = Topology::create_hosts(&opts.prefix, opts.subnet, spare)
            .context("creating the hosts")?;
        if opts.keep {
            topo.keep();
        }
        let faults = match relayed {
            Some(shape) => Some(FaultNet::start(&topo, shape).context("starting the link relays")?),
            None => None,
        };
        let relays = faults.is_some();
        let w = opts.work_dir.clone();
        secure_fs::private_dir(&crate::run_check::journal_dir(&w)).context("the journals")?;
        let ram_dir = RamDir::create(&opts)?;
        if let Some(disk) = &opts.disk {
            disk.create(&w, topo.agent_hosts().len() as u32)?;
        }
        // Hosts that are namespaces of one machine share one key directory; real hosts would
        // each hold only their own private key.
        for name in ["node-1", "node-2", "node-3", "witness"] {
            keys::generate_into(&keys_dir(&w), name)
                .with_context(|| format!("generating {name}'s keys"))?;
        }
        // A fresh VM in a fresh work directory: the one place a register is created.
        let (witness, etcd) = match opts.witness {
            WitnessKind::Ftvm => {
                let p = spawn_in(
                    &topo,
                    Host::Switch,
                    "witness",
                    &witness_args(&topo, &w, true),
                    &w.join("witness.log"),
                )?;
                (Some(p), None)
            }
            WitnessKind::Etcd => {
                // With relays, the agents still reach etcd directly (see `node_args`): only
                // their links to each other are relayed.
                let nodes: Vec<u32> = (1..=topo.agent_hosts().len() as u32).collect();
                let c = crate::deploy_etcd::start(
                    &topo,
                    &etcd_dir(&w),
                    &nodes,
                    ftvm_model::VmId(1),
                    ftvm_model::NodeId(1),
                )?;
                (None, Some(c))
            }
        };
        let mut backup_args: Vec<String> = vec!["backup".into()];
        backup_args.extend(node_args(&topo, &opts, &ram_dir.path, relays, 2));
        let backup = spawn_in(
            &topo,
            Host::Backup,
            "backup agent",
            &backup_args,
            &w.join("backup.log"),
        )?;
        let mut pargs: Vec<String> = vec!["primary".into()];
        pargs.extend(node_args(&topo, &opts, &ram_dir.path, relays, 1));
        let primary = spawn_in(
            &topo,
            Host::Primary,
            "primary agent",
            &pargs,
            &w.join("primary.log"),
        )?;
        let spare = if spare {
            let mut args: Vec<String> = vec!["backup".into()];
            args.extend(node_args(&topo, &opts, &ram_dir.path, relays, 3));
            Some(spawn_in(
                &topo,
                Host::Spare,
                "spare agent",
                &args,
                &w.join("spare.log"),
            )?)
        } else {
            None
        };
        Ok(Deployment {
            faults,
            topo,
            opts,
            witness,
            etcd,
            backup,
            primary,
            spare,
            backup_args,
            ram_dir,
        })
    }

    /// The processes a wait watches (an exit is an error): the witness process, if any, and
    /// the agents asked for.
    pub fn watched(&mut self, primary: bool, backup: bool) -> Vec<&mut Proc> {
        let mut procs: Vec<&mut Proc> = self.witness.as_mut().into_iter().collect();
        if backup {
            procs.push(&mut self.backup);
        }
        if primary {
            procs.push(&mut self.primary);
        }
        procs
    }

    /// The etcd cluster of a deployment on the etcd witness (faults on the witness act on it).
    pub fn etcd_mut(&mut self) -> anyhow::Result<&mut ftvm_real::host::etcd_cluster::EtcdCluster> {
        self.etcd
            .as_mut()
            .context("this deployment's witness is `ftvm witness`: no etcd cluster to act on")
    }

    /// The `ftvm witness` process (faults on the witness act on it).
    pub fn witness_proc(&mut self) -> anyhow::Result<&mut Proc> {
        self.witness
            .as_mut()
            .context("this deployment's witness is etcd: no `ftvm witness` process to act on")
    }

    /// The command line (after the role) of node `node`'s agent in this deployment.
    pub fn node_args(&self, node: u32) -> Vec<String> {
        node_args(
            &self.topo,
            &self.opts,
            &self.ram_dir.path,
            self.faults.is_some(),
            node,
        )
    }

    /// State directory of node `node` (1: the primary host, 2: the backup host, 3: the spare).
    pub fn node_dir(&self, node: u32) -> PathBuf {
        self.opts.work_dir.join(node_dir_name(node))
    }

    /// State directory of the primary host.
    pub fn primary_dir(&self) -> PathBuf {
        self.opts.work_dir.join("primary")
    }

    /// State directory of the backup host.
    pub fn backup_dir(&self) -> PathBuf {
        self.opts.work_dir.join("backup")
    }

    /// Stops every agent so that their journals can be checked whole: first those that are not
    /// primaries by their status (a replica journals its commit of epoch N as it happens, a
    /// primary its capture of N only after the step that sent it, so a check of live journals
    /// can see a commit whose capture is not written yet), then, after a moment in which the
    /// primaries write out their step, the rest.
    pub fn stop_agents_replicas_first(&mut self) {
        let dirs = [self.primary_dir(), self.backup_dir(), self.node_dir(3)];
        let is_primary: Vec<bool> = dirs
            .iter()
            .map(|d| status(d)["role"] == "Primary")
            .collect();
        let mut procs: Vec<(bool, &mut Proc)> = vec![
            (is_primary[0], &mut self.primary),
            (is_primary[1], &mut self.backup),
        ];
        if let Some(spare) = self.spare.as_mut() {
            procs.push((is_primary[2], spare));
        }
        for primaries in [false, true] {
            for (_, p) in procs.iter_mut().filter(|(role, _)| *role == primaries) {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
            if !primaries {
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }

    /// Waits until the primary reports `protected`, printing the progress of a long sync (from
    /// the primary's status file) once a second.
    pub fn wait_protected(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let pdir = self.primary_dir();
        let mut shown = Instant::now();
        wait_until(
            "the primary to be protected",
            timeout,
            &mut self.watched(true, true),
            || {
                let st = status(&pdir);
                if shown.elapsed() >= Duration::from_secs(1) {
                    if let Some(line) = sync_progress_line(&st["sync"]) {
                        println!("   {line}");
                        shown = Instant::now();
                    }
                }
                st["phase"] == "protected"
            },
        )
    }

    /// Checks the network split from the client's namespace: the VM's service accepts a
    /// connection, and no agent or witness port does (they sit on the replication network,
    /// which the client and the guest cannot reach). `service_port` is the VM's (80 for the
    /// small guest's counter, 3306 for the database guest). Returns what was tried and seen.
    pub fn check_isolation(&self, service_port: u16) -> anyhow::Result<serde_json::Value> {
        let t = &self.topo;
        let vm = SocketAddr::from((t.vm_addr(), service_port));
        let closed = [
            (
                "primary agent",
                SocketAddr::from((t.addr(Host::Primary), 7000)),
            ),
            (
                "backup agent",
                SocketAddr::from((t.addr(Host::Backup), 7000)),
            ),
        ];
        let witness_ports = match self.opts.witness {
            WitnessKind::Ftvm => vec![SocketAddr::from((t.addr(Host::Switch), 7100))],
            WitnessKind::Etcd => crate::deploy_etcd::etcd_client_addrs(t),
        };
        let several = witness_ports.len() > 1;
        let closed: Vec<(String, SocketAddr)> = closed
            .into_iter()
            .map(|(w, a)| (w.to_string(), a))
            .chain(witness_ports.into_iter().enumerate().map(|(i, a)| {
                let what = if several {
                    format!("witness (etcd member {})", i + 1)
                } else {
                    "witness".into()
                };
                (what, a)
            }))
            .collect();
        let probe = move |a: SocketAddr, wait: Duration| {
            std::net::TcpStream::connect_timeout(&a, wait).map(drop)
        };
        let seen = t
            .in_ns(Host::Client, move || {
                // The VM's SYN-ACK is output like any other: held until the backup acked its
                // epoch, which on a loaded host took ~1 s right after protection (seen with
                // the database guest), so the VM gets longer than the closed ports.
                // A neighbour entry that failed while the sync held the VM's ARP replies
                // refuses at once ("no route to host"): ask again until the time is up.
                let deadline = Instant::now() + Duration::from_secs(5);
                let vm_seen = loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match probe(vm, left.max(Duration::from_millis(100))) {
                        Err(_) if Instant::now() + Duration::from_millis(100) < deadline => {
                            std::thread::sleep(Duration::from_millis(100))
                        }
                        seen => break seen,
                    }
                };
                let ports: Vec<_> = closed
                    .iter()
                    .map(|(w, a)| (w.clone(), *a, probe(*a, Duration::from_secs(1))))
                    .collect();
                (vm_seen, ports)
            })
            .context("probing from the client's namespace")?;
        if let Err(e) = seen.0 {
            bail!("the client cannot reach the VM's service at {vm}: {e}");
        }
        let mut report = serde_json::Map::new();
        report.insert("vm".into(), "reachable".into());
        for (what, a, r) in seen.1 {
            match r {
                Ok(()) => {
                    bail!("the client reached the {what}'s port {a}: the networks are not split")
                }
                Err(e) => report.insert(what, format!("unreachable ({e})").into()),
            };
        }
        Ok(report.into())
    }

    /// Starts the client for `seconds`; its JSON report goes to `out`.
    pub fn client(&self, seconds: f64, out: &Path) -> anyhow::Result<Proc> {
        self.clients(1, seconds, out)
    }

    /// `n` clients at once, as one process writing one report to `out`.
    pub fn clients(&self, n: u32, seconds: f64, out: &Path) -> anyhow::Result<Proc> {
        spawn_in(
            &self.topo,
            Host::Client,
            "client",
            &[
                "client".into(),
                "--addr".into(),
                format!("{}:80", self.topo.vm_addr()),
                "--seconds".into(),
                seconds.to_string(),
                "--clients".into(),
                n.to_string(),
            ],
            out,
        )
    }
}

/// `syncing the backup: 120/410 MiB (29%) at 85.0 MiB/s, 3.4 s left`, from a status file's
/// `sync` object (None when no sync is under way).
pub fn sync_progress_line(sync: &serde_json::Value) -> Option<String> {
    let done = sync["bytes_done"].as_u64()?;
    let total = sync["bytes_total"].as_u64()?.max(1);
    let rate = sync["rate_bytes_per_s"].as_f64().unwrap_or(0.0);
    let eta = sync["eta_s"].as_f64().unwrap_or(-1.0);
    let mib = |b: f64| b / f64::from(1u32 << 20);
    let left = if eta >= 0.0 {
        format!("{eta:.1} s left")
    } else {
        "time left unknown".into()
    };
    Some(format!(
        "syncing the backup: {:.0}/{:.0} MiB ({}%) at {:.1} MiB/s, {left}",
        mib(done as f64),
        mib(total as f64),
        done * 100 / total,
        mib(rate),
    ))
}

/// Reads the last JSON line a client wrote.
pub fn client_report(out: &Path) -> serde_json::Value {
    std::fs::read_to_string(out)
        .ok()
        .and_then(|s| s.lines().last().and_then(|l| serde_json::from_str(l).ok()))
        .unwrap_or(serde_json::Value::Null)
}

/// Where the etcd witness of a deployment in `work_dir` keeps its data and certificates.
pub fn etcd_dir(work_dir: &Path) -> PathBuf {
    work_dir.join("etcd")
}

/// The key directory of a deployment in `work_dir`.
pub fn keys_dir(work_dir: &Path) -> PathBuf {
    work_dir.join("keys")
}

/// The witness's command line in a deployment in `work_dir`; `init` creates its register (a
/// fresh VM), otherwise it must exist (a restarted witness).
pub fn witness_args(topo: &Topology, work_dir: &Path, init: bool) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "witness".into(),
        "--listen".into(),
        format!("{}:7100", topo.addr(Host::Switch)),
        "--state".into(),
        work_dir.join("witness.json").display().to_string(),
        "--keys".into(),
        keys_dir(work_dir).display().to_string(),
        "--journal".into(),
        crate::run_check::witness_journal(work_dir)
            .display()
            .to_string(),
        "--verbose".into(),
    ];
    if init {
        a.push("--init".into());
    }
    a
}

/// The state directory's name of node `node`.
fn node_dir_name(node: u32) -> &'static str {
    match node {
        1 => "primary",
        2 => "backup",
        _ => "spare",
    }
}

/// The agent command line (after the role) of node `node`: it dials every other node and the
/// witness directly, or through the relays on its own host (`relayed`); a node other than 1
/// follows node 1 first.
fn node_args(
    topo: &Topology,
    o: &DeployOpts,
    ram_dir: &Path,
    relayed: bool,
    node: u32,
) -> Vec<String> {
    let nodes = topo.agent_hosts().len() as u32;
    let host_of = |n: u32| match n {
        1 => Host::Primary,
        2 => Host::Backup,
        _ => Host::Spare,
    };
    let peers: Vec<(u32, SocketAddr)> = (1..=nodes)
        .filter(|&m| m != node)
        .map(|m| {
            let addr = if relayed {
                FaultNet::peer_addr(m)
            } else {
                SocketAddr::from((topo.addr(host_of(m)), 7000))
            };
            (m, addr)
        })
        .collect();
    let witness = match (o.witness, relayed) {
        (WitnessKind::Etcd, _) => crate::deploy_etcd::etcd_url(topo),
        (WitnessKind::Ftvm, true) => FaultNet::witness_addr().to_string(),
        (WitnessKind::Ftvm, false) => SocketAddr::from((topo.addr(Host::Switch), 7100)).to_string(),
    };
    let mut a = agent_args(topo, o, node, host_of(node), ram_dir, &peers, witness);
    if o.witness == WitnessKind::Etcd {
        a.extend(crate::deploy_etcd::agent_tls_args(
            &etcd_dir(&o.work_dir),
            node,
        ));
    }
    if node != 1 && peers.len() > 1 {
        a.extend(["--primary".into(), "1".into()]);
    }
    a
}

/// The agent command line of node `node` on `host`.
fn agent_args(
    topo: &Topology,
    o: &DeployOpts,
    node: u32,
    host: Host,
    ram_dir: &Path,
    peers: &[(u32, SocketAddr)],
    witness: String,
) -> Vec<String> {
    let dir = node_dir_name(node);
    let mut a: Vec<String> = vec![
        "--node".into(),
        node.to_string(),
        "--listen".into(),
        format!("{}:7000", topo.addr(host)),
    ];
    for (n, addr) in peers {
        a.extend(["--peer".into(), format!("{n}={addr}")]);
    }
    a.extend([
        "--witness".into(),
        witness,
        "--keys".into(),
        keys_dir(&o.work_dir).display().to_string(),
        "--guest-dir".into(),
        o.guest_dir.display().to_string(),
        "--ram-mb".into(),
        o.ram_mb.to_string(),
        "--accel".into(),
        o.accel.clone(),
        "--vm-ip".into(),
        format!("{}/24", topo.vm_addr()),
        "--dirty-pages".into(),
        o.dirty_pages.to_string(),
        "--state-dir".into(),
        o.work_dir.join(dir).display().to_string(),
        "--ram-dir".into(),
        ram_dir.display().to_string(),
        "--tap".into(),
        topo.tap_name().into(),
        "--epoch-ms".into(),
        o.epoch_ms.to_string(),
        "--transport".into(),
        o.transport.clone(),
        "--failure-timeout-ms".into(),
        o.failure_timeout_ms.to_string(),
        "--journal".into(),
        crate::run_check::node_journal(&o.work_dir, node)
            .display()
            .to_string(),
        "--verbose".into(),
    ]);
    a.extend(crate::epoch_policy_args::EpochPolicyArgs::of(o.epoch_policy).to_args());
    if let Some(disk) = &o.disk {
        a.push("--disk".into());
        a.push(DeployDisk::image(&o.work_dir, node).display().to_string());
        if let Some(rate) = &disk.guest_write {
            a.push("--disk-write".into());
            a.push(rate.clone());
        }
    }
    if let Some(m) = &o.mutant {
        a.push("--mutant".into());
        a.push(m.clone());
    }
    if let Some(c) = &o.capture {
        a.push("--capture".into());
        a.push(c.clone());
    }
    if let Some(k) = o.verify_every {
        a.push("--verify-every".into());
        a.push(k.to_string());
    }
    a
}

/// What [`compare_digests`] compared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DigestsCompared {
    /// Checkpoints whose RAM digests both hosts recorded (all equal).
    pub ram: usize,
    /// Of those, checkpoints whose disk digests both recorded (all equal).
    pub disk: usize,
}

/// Compares the RAM (and disk) digests both hosts recorded; fails on the first checkpoint where
/// they differ.
pub fn compare_digests(pdir: &Path, bdir: &Path) -> anyhow::Result<DigestsCompared> {
    type Digests = std::collections::BTreeMap<(u64, u64), (u64, Option<u64>)>;
    let read = |dir: &Path| -> Digests {
        std::fs::read_to_string(dir.join("replica/verify.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| {
                Some((
                    (v["generation"].as_u64()?, v["epoch"].as_u64()?),
                    (v["digest"].as_u64()?, v["disk_digest"].as_u64()),
                ))
            })
            .collect()
    };
    let (p, b) = (read(pdir), read(bdir));
    let mut n = DigestsCompared::default();
    for (key, (ram, disk)) in &p {
        let Some((bram, bdisk)) = b.get(key) else {
            continue;
        };
        if bram != ram {
            bail!(
                "replica differs from the primary's RAM at generation {} epoch {}",
                key.0,
                key.1
            );
        }
        n.ram += 1;
        if let (Some(d), Some(bd)) = (disk, bdisk) {
            if d != bd {
                bail!(
                    "replica disk differs from the primary's disk at generation {} epoch {}",
                    key.0,
                    key.1
                );
            }
            n.disk += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_progress_reads_the_status_file_object() {
        let v = serde_json::json!({
            "bytes_done": 120u64 << 20, "bytes_total": 480u64 << 20,
            "rate_bytes_per_s": 85.0 * 1048576.0, "eta_s": 4.2
        });
        assert_eq!(
            sync_progress_line(&v).unwrap(),
            "syncing the backup: 120/480 MiB (25%) at 85.0 MiB/s, 4.2 s left"
        );
        assert_eq!(sync_progress_line(&serde_json::Value::Null), None);
    }

    #[test]
    fn last_words_quotes_the_closing_lines_and_says_when_there_are_none() {
        let dir = std::env::temp_dir().join(format!("ftvm-last-words-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("agent.log");
        std::fs::write(&log, "one\ntwo\n\nthree\nftvm: error: four\n").unwrap();
        let w = last_words(&log);
        assert!(
            w.ends_with("ends:\n  two\n  three\n  ftvm: error: four"),
            "{w}"
        );
        std::fs::write(&log, "\n").unwrap();
        assert!(last_words(&log).ends_with("is empty"));
        assert!(last_words(&dir.join("missing.log")).ends_with("is unreadable"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
