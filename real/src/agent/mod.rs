//! The real executor: one event loop per host around the driver core
//! (`ftvm_driver::NodeDriver`, the one the simulator runs). Helper threads and tasks report what
//! happens (connections, link deliveries, witness replies, VM frames, timers: `events`); the
//! core turns it into model inputs, and the effects it returns are carried out on a real VM,
//! real sockets and a real replica (`actions`). Every decision is the model's; this module only
//! moves bytes and measures.

pub mod accept;
mod actions;
pub use actions::witness_exchange_timeout;
pub mod capture;
pub mod cow;
pub mod event;
pub mod limits;
pub mod link;
pub mod mem_vm;
pub mod metrics;
pub mod metrics_http;
pub mod netio;
mod on_event;
pub mod prom;
pub mod qemu_vm;
mod resume_gate;
mod spare;
mod status;
pub mod vm;
pub mod witness;
pub mod witness_client;
pub mod witness_store;
pub mod zero_pages;

/// Checkpoint staging under the VM's bounds lives in the driver core.
pub use ftvm_driver::staging;
pub use status::StatusReport;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_driver::journal::{HostEntry, HostLine, Journal};
use ftvm_driver::NodeDriver;
use ftvm_model::{Epoch, Input, Node, NodeId, ReplicaAt, Start, Status, Time};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use self::capture::CaptureMode;
use self::cow::CowCheckpoint;
use self::event::{CommitError, ConnId, Event};
use self::limits::AgentLimits;
use self::link::{Link, LinkSetup};
use self::metrics::{EpochMetrics, MetricsSink};
use self::netio::NetIo;
use self::resume_gate::ResumeGate;
use self::staging::StagingLimits;
use self::vm::{Vm, VmError, VmLauncher};
use crate::auth::{Identity, Protection};
use crate::journal_file::{instant_and_clock_us, JournalWriter};
use crate::net::backpressure::OutputCap;
use crate::net::output::{HeldFrame, OutputAccount};
use crate::replica::{DiskSpec, Durability, JournalSpool, Replica, ReplicaError, StagedCheckpoint};
use crate::transport::TransportKind;

/// Errors that stop an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The checkpoint listener could not be opened.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The VM failed or died on its own.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The replica could not be opened or committed.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// A commit failed: the replica keeps its previous checkpoint, but this backup is unusable.
    #[error("commit of epoch {epoch} failed: {source}")]
    Commit {
        /// Epoch.
        epoch: u64,
        /// Cause.
        source: CommitError,
    },
    /// The metrics file could not be created.
    #[error("metrics file: {0}")]
    Metrics(#[source] crate::secure_fs::SecureFsError),
    /// The journal could not be opened or written.
    #[error("journal: {0}")]
    Journal(#[from] crate::journal_file::JournalFileError),
    /// The primary refused this host for a reason retrying cannot fix.
    #[error("refused by the primary: {0}")]
    Refused(String),
    /// The model refused the configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// A thread panicked while holding the replica: its state cannot be trusted.
    #[error("replica lock poisoned (a thread panicked while holding it)")]
    ReplicaLockPoisoned,
}

/// Everything an agent needs to know.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This host's node id.
    pub node: NodeId,
    /// How it starts.
    pub start: Start,
    /// Protocol parameters.
    pub model: ftvm_model::Config,
    /// Where this agent accepts checkpoint links.
    pub listen: SocketAddr,
    /// Checkpoint-link addresses of the other agents.
    pub peers: BTreeMap<NodeId, SocketAddr>,
    /// The witness: an `ftvm witness` service or an etcd cluster.
    pub witness: witness_client::WitnessClient,
    /// Directory of the replica (journal, device state, metadata).
    pub replica_dir: PathBuf,
    /// The replica's RAM file (on tmpfs: the restored QEMU maps it as guest RAM).
    pub replica_ram: PathBuf,
    /// This host's image of the VM's disk (raw, `model.disk_blocks` blocks), for a VM with a
    /// protected disk: the replica disk while this agent is a backup, the disk its restored VM
    /// runs on after a failover (and the one a booting primary's VM runs on).
    pub replica_disk: Option<PathBuf>,
    /// A backup start (`Start::Rejoin` or `Start::Backup`) with a committed replica from before
    /// a restart offers it to the primary (`Start::Resume`), which then sends only what changed
    /// since (a catch-up) when it made that replica. False: start as configured, which takes a
    /// full sync.
    pub resume_replica: bool,
    /// Make each commit survive a host crash too (`fsync` of the journal, the replica directory,
    /// the device blob and the metadata), for a `replica_dir` on persistent storage. Off, a
    /// commit survives a crash of this process only, and costs no sync (see `crate::replica`).
    pub replica_durable: bool,
    /// How checkpoints leave this host.
    pub transport: TransportKind,
    /// How checkpoints are captured, and when the VM resumes.
    pub capture: CaptureMode,
    /// Per-epoch metrics (JSON lines).
    pub metrics: Option<PathBuf>,
    /// Status file (JSON), rewritten at every phase change.
    pub status_file: Option<PathBuf>,
    /// This node's key pair and the public keys of the other nodes and the witness: every link
    /// and witness exchange is authenticated with them.
    pub identity: Arc<Identity>,
    /// How link frames are protected (both agents must agree).
    pub protection: Protection,
    /// Log protocol events to stderr.
    pub verbose: bool,
    /// Every this many epochs, record a digest of all guest RAM in `verify.jsonl` of
    /// `replica_dir`: the primary while paused at the capture, the backup right after the
    /// commit. Equal digests for an epoch prove the replica equals the primary at that
    /// checkpoint. Costs a pass over RAM while the VM is paused; for tests.
    pub verify_every: Option<u64>,
    /// Bounds on what peers and the VM can make this agent hold.
    pub limits: AgentLimits,
    /// Where to append this host's journal (the model's inputs and actions and the frames
    /// that left the gate; `ftvm scenario run --real` and `ftvm demo` check runs from it).
    pub journal: Option<PathBuf>,
}

/// Why an agent loop ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentExit {
    /// Asked to stop.
    Shutdown,
    /// Fenced for good (no rejoin configured).
    Fenced,
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

fn new_conn() -> ConnId {
    ConnId(NEXT_CONN.fetch_add(1, Ordering::Relaxed))
}

/// One host's agent.
pub struct Agent<L: VmLauncher> {
    cfg: AgentConfig,
    /// The model node with its peer table, output gate and staged checkpoints.
    driver: NodeDriver<ConnId, HeldFrame>,
    origin: Instant,
    launcher: L,
    vm: Option<L::Vm>,
    tx: UnboundedSender<Event>,
    rx: UnboundedReceiver<Event>,
    /// Every checkpoint link's I/O handle (the core knows which node each speaks for).
    links: HashMap<ConnId, Link>,
    /// Witness requests whose exchange is under way.
    witness_inflight: actions::Inflight,
    replica: Arc<Mutex<Replica>>,
    /// Where link readers write arriving checkpoints' journals (the replica's).
    spool: Arc<JournalSpool>,
    /// The thread applying committed checkpoints to the replica.
    applier: std::sync::mpsc::Sender<actions::ApplyJob>,
    /// The staging buffer the next capture fills (`spare::keep_larger` says which is kept).
    spare: Option<StagedCheckpoint>,
    captured: Option<StagedCheckpoint>,
    /// RAM copied ahead of the full capture of an epoch (`Action::PreCopy`).
    pre_copied: Option<(Epoch, StagedCheckpoint, std::time::Duration)>,
    /// cow: the write-protected pages of `captured`, until handed to its link.
    captured_cow: Option<CowCheckpoint>,
    /// The disk snapshot a full capture's disk blocks are read from as they are sent.
    captured_disk: Option<link::DiskSync>,
    /// Accounts for the frames the core's gate holds and lets go.
    output: OutputAccount,
    output_cap: Arc<OutputCap>,
    net: Option<NetIo>,
    metrics: MetricsSink,
    open_epochs: BTreeMap<u64, (EpochMetrics, Option<Instant>)>,
    paused_at: Option<Instant>,
    /// The VM ran again (from this epoch, after this many µs stopped) since the model last
    /// heard of it: `Input::Resumed`.
    resumed_note: Option<(Epoch, u64)>,
    /// paused-send: the resume held until the checkpoint is out.
    resume: ResumeGate,
    last_status: Option<Status>,
    takeover_started: Option<Instant>,
    failover_us: Option<u64>,
    status_written: Instant,
    /// How far a full checkpoint going out to a backup has got (the status file shows it).
    sync_progress: Arc<link::SyncProgress>,
    /// The journal file, when recording.
    journal: Option<JournalOut>,
    /// With an etcd witness, when recording: the register writes this agent made (see
    /// [`witness_journal_path`]).
    witness_journal: Option<Arc<Mutex<JournalWriter>>>,
    /// The last sync this node captured as primary (the status file shows it).
    last_sync: Option<metrics::LastSync>,
    /// The Prometheus registry `/metrics` serves, when the endpoint is on.
    exporter: Option<Arc<prom::AgentExporter>>,
    /// Wall time this node's VM ran after its last takeover.
    failover_at: Option<std::time::SystemTime>,
}

/// Where an agent recording its journal at `journal` records the writes it made to an etcd
/// witness's register (`node-1.jsonl` → `node-1.witness.jsonl`): with no witness process to
/// journal its decisions, the run check merges these into the register's history.
pub fn witness_journal_path(journal: &Path) -> PathBuf {
    journal.with_extension("witness.jsonl")
}

/// Where the core's journal goes, and the wall clock of model time zero.
struct JournalOut {
    file: JournalWriter,
    origin_clock_us: u64,
}

impl<L: VmLauncher> Agent<L> {
    /// An agent; `net` is the VM's network path (None for tests without networking).
    pub fn new(mut cfg: AgentConfig, launcher: L) -> Result<Self, AgentError> {
        if cfg.model.incarnation == 0 {
            // This run's lineage: a primary names its history with it, so that a replica of
            // another run (whose epochs may repeat ours) is never caught up as a prefix of it.
            cfg.model.incarnation = rand::random::<u64>().max(1);
        }
        cfg.model
            .validate()
            .map_err(|e| AgentError::Config(e.to_string()))?;
        let ram_bytes = cfg.model.ram_pages * u64::from(cfg.model.page_size);
        let durability = if cfg.replica_durable {
            Durability::Durable
        } else {
            Durability::Atomic
        };
        let disk = match (&cfg.replica_disk, cfg.model.disk_blocks) {
            (_, 0) => None,
            (Some(path), blocks) => Some(DiskSpec {
                path: path.clone(),
                blocks,
            }),
            (None, _) => {
                return Err(AgentError::Config(
                    "the VM has a protected disk but this agent was given no disk image".into(),
                ))
            }
        };
        let replica = Replica::open_with_disk(
            &cfg.replica_dir,
            &cfg.replica_ram,
            ram_bytes,
            cfg.model.page_size as usize,
            durability,
            disk.as_ref(),
        )?;
        let spool = replica.spool();
        let start = start_with(&cfg, replica.replica_at());
        let replica = Arc::new(Mutex::new(replica));
        let metrics = MetricsSink::new(cfg.metrics.as_deref()).map_err(AgentError::Metrics)?;
        let (tx, rx) = unbounded_channel();
        let output_cap = Arc::new(OutputCap::new(cfg.limits.output_cap_bytes));
        let mut driver = NodeDriver::new(Node::new(cfg.model.clone(), cfg.node, start));
        let (origin, origin_clock_us) = instant_and_clock_us();
        let journal = match &cfg.journal {
            Some(path) => {
                let mut file = JournalWriter::open(path)?;
                file.append([HostLine::Config {
                    node: cfg.node,
                    config: cfg.model.clone(),
                }])?;
                driver.record(Time::ZERO, start, Journal::new());
                Some(JournalOut {
                    file,
                    origin_clock_us,
                })
            }
            None => None,
        };
        let witness_journal = match (&cfg.journal, &cfg.witness) {
            (Some(path), witness_client::WitnessClient::Etcd(_)) => Some(Arc::new(Mutex::new(
                JournalWriter::open(&witness_journal_path(path))?,
            ))),
            _ => None,
        };
        Ok(Agent {
            driver,
            cfg,
            origin,
            launcher,
            vm: None,
            tx,
            rx,
            links: HashMap::new(),
            witness_inflight: actions::Inflight::default(),
            applier: actions::spawn_applier(replica.clone()),
            replica,
            spool,
            spare: None,
            captured: None,
            pre_copied: None,
            captured_cow: None,
            captured_disk: None,
            output: OutputAccount::new(output_cap.clone()),
            output_cap,
            net: None,
            metrics,
            open_epochs: BTreeMap::new(),
            paused_at: None,
            resumed_note: None,
            resume: ResumeGate::default(),
            last_status: None,
            takeover_started: None,
            failover_us: None,
            status_written: Instant::now(),
            sync_progress: Arc::default(),
            journal,
            witness_journal,
            last_sync: None,
            exporter: None,
            failover_at: None,
        })
    }

    /// The channel helper tasks report on (to build a [`NetIo`] before [`Agent::run`]).
    pub fn events(&self) -> UnboundedSender<Event> {
        self.tx.clone()
    }

    /// The output gate's byte budget, which the VM's network reader charges ([`NetIo::start`]).
    pub fn output_cap(&self) -> Arc<OutputCap> {
        self.output_cap.clone()
    }

    /// What arriving checkpoints are checked against: this VM's shape.
    fn staging_limits(&self) -> StagingLimits {
        StagingLimits {
            page_size: self.cfg.model.page_size,
            ram_pages: self.cfg.model.ram_pages,
            max_device_bytes: self.cfg.limits.max_device_bytes,
            disk_blocks: self.cfg.model.disk_blocks,
        }
    }

    /// Feeds `exporter` (served by [`metrics_http::serve`]) from every acked epoch and status
    /// rewrite.
    pub fn attach_exporter(&mut self, exporter: Arc<prom::AgentExporter>) {
        self.exporter = Some(exporter);
    }

    /// Attaches the VM's network path.
    pub fn attach_net(&mut self, net: NetIo) {
        self.net = Some(net);
    }

    fn now(&self) -> Time {
        Time::from_duration(self.origin.elapsed())
    }

    fn deadline(&self) -> tokio::time::Instant {
        let now = self.now();
        let wait = self
            .driver
            .poll_timeout()
            .map(|t| t.saturating_since(now))
            .unwrap_or(Duration::from_secs(3600));
        tokio::time::Instant::now() + wait
    }

    /// Runs until `shutdown` resolves, the node is fenced for good, or a fatal error.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<AgentExit, AgentError> {
        let mut pending = VecDeque::from([Input::Timeout]);
        let mut listening = false;
        tokio::pin!(shutdown);
        loop {
            while let Some(input) = pending.pop_front() {
                let now = self.now();
                let effects = self.driver.handle(now, input);
                // Journaled before anything it caused leaves this host (an ack, a frame), so
                // journals read at any moment never show an effect without its cause.
                self.write_journal()?;
                for effect in effects {
                    self.execute(effect, &mut pending).await?;
                }
                self.resume_if_due().await?;
                // Next in line: the model measures the pause up to when it hears of the resume.
                if let Some(r) = self.take_resumed() {
                    pending.push_front(r);
                }
                self.note_status();
            }
            // Listen only once the start actions ran (a fresh primary boots its VM in them):
            // joiners that call earlier are refused at once instead of queueing stale joins.
            if !listening {
                self.listen()?;
                listening = true;
            }
            if let ftvm_model::Role::Fenced(f) = self.driver.node().role() {
                if let ftvm_model::FenceReason::Misconfigured(r) = f.reason() {
                    return Err(AgentError::Refused(r.to_string()));
                }
                if self.cfg.model.rejoin_after_fence.is_none() {
                    return Ok(AgentExit::Fenced);
                }
            }
            let deadline = self.deadline();
            let Agent { rx, vm, .. } = &mut self;
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                _ = tokio::time::sleep_until(deadline) => {
                    pending.push_back(Input::Timeout);
                    continue;
                }
                err = vm_died(vm) => return Err(AgentError::Vm(err)),
                _ = &mut shutdown => return Ok(AgentExit::Shutdown),
            };
            if let Some(ev) = ev {
                self.on_event(ev, &mut pending).await?;
                self.resume_if_due().await?;
                if let Some(r) = self.take_resumed() {
                    pending.push_front(r);
                }
            }
        }
    }

    /// `Resumed` for the model once the VM runs again after a capture.
    fn take_resumed(&mut self) -> Option<Input> {
        self.resumed_note
            .take()
            .map(|(epoch, paused_us)| Input::Resumed { epoch, paused_us })
    }

    /// Appends what the core journaled since the last call, each line stamped with the wall
    /// clock of its model time (so hosts' journals merge in the order things happened).
    fn write_journal(&mut self) -> Result<(), AgentError> {
        let (Some(out), Some(journal)) = (self.journal.as_mut(), self.driver.journal_mut()) else {
            return Ok(());
        };
        let entries = journal.drain();
        if entries.is_empty() {
            return Ok(());
        }
        let node = self.cfg.node;
        let origin = out.origin_clock_us;
        out.file.append(entries.into_iter().map(|entry| {
            HostLine::Entry(HostEntry {
                node,
                wall_us: origin + entry.at.as_micros(),
                entry,
            })
        }))?;
        Ok(())
    }

    fn link_setup(&self) -> LinkSetup {
        LinkSetup {
            vm: self.cfg.model.vm,
            staging: self.staging_limits(),
            kind: self.cfg.transport,
            identity: self.cfg.identity.clone(),
            handshake_deadline: self.cfg.limits.conn.handshake_deadline,
            protection: self.cfg.protection,
            spool: Some(self.spool.clone()),
            progress: self.sync_progress.clone(),
            socket_buffer: self.cfg.limits.link_buffer_bytes,
        }
    }

    fn listen(&mut self) -> Result<(), AgentError> {
        let addr = self.cfg.listen;
        let listener =
            TcpListener::bind(addr).map_err(|source| AgentError::Listen { addr, source })?;
        accept::spawn(accept::Listener {
            listener,
            setup: self.link_setup(),
            node: self.cfg.node,
            limits: self.cfg.limits.conn,
            events: self.tx.clone(),
            new_conn,
        })
        .map_err(|source| AgentError::Listen { addr, source })
    }

    /// Closes a connection's link (dropping it shuts its socket down).
    fn drop_conn(&mut self, conn: ConnId) {
        self.links.remove(&conn);
        self.resume.link_gone(conn);
    }

    fn log(&self, args: std::fmt::Arguments<'_>) {
        // Protocol events: shown with --verbose, else at debug level.
        if self.cfg.verbose {
            tracing::info!(node = self.cfg.node.0, "{args}");
        } else {
            tracing::debug!(node = self.cfg.node.0, "{args}");
        }
    }
}

/// The start the model gets: a backup start resumes from the kept replica `kept` when there is
/// one and `cfg.resume_replica` allows it (see [`AgentConfig::resume_replica`]).
fn start_with(cfg: &AgentConfig, kept: Option<ReplicaAt>) -> Start {
    match (cfg.start, kept) {
        (Start::Rejoin | Start::Backup { .. }, Some(replica)) if cfg.resume_replica => {
            tracing::info!(
                node = cfg.node.0,
                "resuming from the kept replica: generation {}, epoch {} (synced at {}); \
                 offering it to the primary",
                replica.generation.0,
                replica.epoch.0,
                replica.since.0
            );
            Start::Resume { replica }
        }
        (start, _) => start,
    }
}

async fn vm_died<V: Vm>(vm: &mut Option<V>) -> VmError {
    match vm {
        Some(v) => v.died().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[path = "agent_tests.rs"]
mod tests;
