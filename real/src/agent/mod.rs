//! The real executor: one event loop per host that feeds `ftvm_model::Node` with what happens
//! (connections, messages, checkpoints, witness replies, timers) and carries out the actions it
//! returns on a real VM, real sockets and a real replica. Every decision is the model's; this
//! module only moves bytes and measures.

pub mod accept;
pub mod capture;
pub mod cow;
pub mod event;
pub mod limits;
pub mod link;
pub mod mem_vm;
pub mod metrics;
pub mod netio;
pub mod qemu_vm;
mod resume_gate;
pub mod staging;
pub mod vm;
pub mod witness;
pub mod witness_store;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_model::{Action, Epoch, Gate, Input, Node, NodeId, Start, Status, Time};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use self::capture::CaptureMode;
use self::cow::CowCheckpoint;
use self::event::{CommitError, ConnId, Event};
use self::limits::AgentLimits;
use self::link::{CowPages, Link, LinkSetup, Outgoing, PausedPages, Side};
use self::metrics::{EpochMetrics, MetricsSink, RunSummary};
use self::netio::NetIo;
use self::resume_gate::ResumeGate;
use self::staging::StagingLimits;
use self::vm::{RestorePoint, Vm, VmError, VmLauncher};
use crate::auth::{Identity, Protection};
use crate::net::backpressure::{CapStats, OutputCap};
use crate::net::output::OutputGate;
use crate::replica::{Replica, ReplicaError, StagedCheckpoint};
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
    /// The witness's address.
    pub witness: SocketAddr,
    /// Directory of the replica (journal, device state, metadata).
    pub replica_dir: PathBuf,
    /// The replica's RAM file (on tmpfs: the restored QEMU maps it as guest RAM).
    pub replica_ram: PathBuf,
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
}

/// Why an agent loop ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentExit {
    /// Asked to stop.
    Shutdown,
    /// Fenced for good (no rejoin configured).
    Fenced,
}

/// A status line for files and logs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatusReport {
    /// Node id.
    pub node: u32,
    /// Role and phase.
    pub role: String,
    /// Phase name.
    pub phase: String,
    /// Generation.
    pub generation: u64,
    /// True after this node took over.
    pub failed_over: bool,
    /// Last committed epoch (backup).
    pub committed: Option<u64>,
    /// Last acked epoch (primary).
    pub acked: u64,
    /// Microseconds from this node's takeover request to its VM running, if it failed over.
    pub failover_us: Option<u64>,
    /// Metrics summary so far.
    pub summary: RunSummary,
    /// The output gate's byte cap: held bytes, the cap, how often and how long it was hit.
    pub output: CapStats,
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

fn new_conn() -> ConnId {
    ConnId(NEXT_CONN.fetch_add(1, Ordering::Relaxed))
}

/// One host's agent.
pub struct Agent<L: VmLauncher> {
    cfg: AgentConfig,
    node: Node,
    origin: Instant,
    launcher: L,
    vm: Option<L::Vm>,
    tx: UnboundedSender<Event>,
    rx: UnboundedReceiver<Event>,
    links: HashMap<ConnId, Link>,
    conn_peer: HashMap<ConnId, NodeId>,
    peer_conn: HashMap<NodeId, ConnId>,
    /// Accepted connections and the node each authenticated as (until it joins).
    conn_auth: HashMap<ConnId, NodeId>,
    /// Witness requests whose exchange is under way.
    witness_inflight: Inflight,
    replica: Arc<Mutex<Replica>>,
    staged: BTreeMap<u64, StagedCheckpoint>,
    spare: Option<StagedCheckpoint>,
    captured: Option<StagedCheckpoint>,
    /// cow: the write-protected pages of `captured`, until handed to its link.
    captured_cow: Option<CowCheckpoint>,
    gate: OutputGate,
    output_cap: Arc<OutputCap>,
    net: Option<NetIo>,
    metrics: MetricsSink,
    open_epochs: BTreeMap<u64, (EpochMetrics, Option<Instant>)>,
    paused_at: Option<Instant>,
    /// paused-send: the resume held until the checkpoint is out.
    resume: ResumeGate,
    last_status: Option<Status>,
    takeover_started: Option<Instant>,
    failover_us: Option<u64>,
    status_written: Instant,
}

impl<L: VmLauncher> Agent<L> {
    /// An agent; `net` is the VM's network path (None for tests without networking).
    pub fn new(cfg: AgentConfig, launcher: L) -> Result<Self, AgentError> {
        cfg.model
            .validate()
            .map_err(|e| AgentError::Config(e.to_string()))?;
        let ram_bytes = cfg.model.ram_pages * u64::from(cfg.model.page_size);
        let replica = Replica::open(
            &cfg.replica_dir,
            &cfg.replica_ram,
            ram_bytes,
            cfg.model.page_size as usize,
        )?;
        let metrics = MetricsSink::new(cfg.metrics.as_deref()).map_err(AgentError::Metrics)?;
        let (tx, rx) = unbounded_channel();
        let output_cap = Arc::new(OutputCap::new(cfg.limits.output_cap_bytes));
        Ok(Agent {
            node: Node::new(cfg.model.clone(), cfg.node, cfg.start),
            cfg,
            origin: Instant::now(),
            launcher,
            vm: None,
            tx,
            rx,
            links: HashMap::new(),
            conn_peer: HashMap::new(),
            peer_conn: HashMap::new(),
            conn_auth: HashMap::new(),
            witness_inflight: Inflight::default(),
            replica: Arc::new(Mutex::new(replica)),
            staged: BTreeMap::new(),
            spare: None,
            captured: None,
            captured_cow: None,
            gate: OutputGate::with_cap(output_cap.clone()),
            output_cap,
            net: None,
            metrics,
            open_epochs: BTreeMap::new(),
            paused_at: None,
            resume: ResumeGate::default(),
            last_status: None,
            takeover_started: None,
            failover_us: None,
            status_written: Instant::now(),
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
        }
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
            .node
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
                let actions = self.node.handle(now, input);
                for a in actions {
                    self.execute(a, &mut pending).await?;
                }
                self.resume_if_due().await?;
                self.note_status();
            }
            // Listen only once the start actions ran (a fresh primary boots its VM in them):
            // joiners that call earlier are refused at once instead of queueing stale joins.
            if !listening {
                self.listen()?;
                listening = true;
            }
            if let ftvm_model::Role::Fenced(f) = self.node.role() {
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
            }
        }
    }

    fn link_setup(&self) -> LinkSetup {
        LinkSetup {
            vm: self.cfg.model.vm,
            staging: self.staging_limits(),
            kind: self.cfg.transport,
            identity: self.cfg.identity.clone(),
            handshake_deadline: self.cfg.limits.conn.handshake_deadline,
            protection: self.cfg.protection,
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

    fn drop_conn(&mut self, conn: ConnId) -> Option<NodeId> {
        self.links.remove(&conn);
        self.conn_auth.remove(&conn);
        self.resume.link_gone(conn);
        let peer = self.conn_peer.remove(&conn)?;
        if self.peer_conn.get(&peer) == Some(&conn) {
            self.peer_conn.remove(&peer);
        }
        Some(peer)
    }

    fn peer_of(&self, conn: ConnId) -> Option<NodeId> {
        self.conn_peer.get(&conn).copied()
    }

    async fn on_event(
        &mut self,
        ev: Event,
        pending: &mut VecDeque<Input>,
    ) -> Result<(), AgentError> {
        match ev {
            Event::Accepted { conn, peer, link } => {
                // A connection speaks only as the node it authenticated as, and never displaces
                // a live link of that node: the newcomer is closed, and a genuine peer whose old
                // link really died dials again once this side has noticed.
                if self.peer_conn.contains_key(&peer) {
                    self.log(format_args!(
                        "refused a second link from node {peer}: one is live"
                    ));
                    drop(link);
                } else {
                    self.links.insert(conn, link);
                    self.conn_auth.insert(conn, peer);
                }
            }
            Event::Connected { peer, conn, link } => {
                if let Some(old) = self.peer_conn.insert(peer, conn) {
                    self.links.remove(&old);
                    self.conn_peer.remove(&old);
                }
                self.links.insert(conn, link);
                self.conn_peer.insert(conn, peer);
                pending.push_back(Input::Connected { peer });
            }
            Event::ConnectFailed { peer, why } => {
                self.log(format_args!("connect to {peer} failed: {why}"));
                pending.push_back(Input::Disconnected { peer });
            }
            Event::Heard { conn } => {
                if let Some(from) = self.peer_of(conn) {
                    pending.push_back(Input::Heard { from });
                }
            }
            Event::Message { conn, msg } => {
                let from = match (self.peer_of(conn), msg) {
                    (Some(p), _) => p,
                    (None, ftvm_model::PeerMsg::Join { node, .. }) => {
                        // An accepted connection joins as the node it authenticated as, and only
                        // while no other link of that node is live.
                        let proven = self.conn_auth.get(&conn).copied();
                        if proven != Some(node) || self.peer_conn.contains_key(&node) {
                            self.log(format_args!(
                                "dropped a link authenticated as {proven:?} that joined as {node}"
                            ));
                            self.links.remove(&conn);
                            self.conn_auth.remove(&conn);
                            return Ok(());
                        }
                        self.peer_conn.insert(node, conn);
                        self.conn_peer.insert(conn, node);
                        node
                    }
                    (None, _) => return Ok(()),
                };
                pending.push_back(Input::Message { from, msg });
            }
            Event::CheckpointStarted { conn, epoch } => {
                if self.peer_of(conn).is_some() {
                    pending.push_back(Input::CheckpointStarted { epoch });
                }
            }
            Event::CheckpointDamaged { conn, epoch, why } => {
                // As in the simulator: the model hears of a damaged checkpoint (and drops the
                // stream); the link's closure follows.
                if let Some(peer) = self.peer_of(conn) {
                    tracing::warn!(
                        node = self.cfg.node.0,
                        epoch = epoch.0,
                        peer = peer.0,
                        %why,
                        "checkpoint dropped with its link"
                    );
                    self.staged.remove(&epoch.0);
                    pending.push_back(Input::CheckpointReceived { epoch, ok: false });
                }
            }
            Event::CheckpointReceived {
                conn,
                epoch,
                staged,
            } => {
                if self.peer_of(conn).is_some() {
                    self.staged.insert(epoch.0, staged);
                    pending.push_back(Input::CheckpointReceived { epoch, ok: true });
                }
            }
            Event::CheckpointSent {
                epoch,
                bytes,
                send_us,
                stats,
                cow,
                staged,
            } => {
                self.spare = Some(staged);
                self.resume.sent(epoch);
                if let Some((m, sent)) = self.open_epochs.get_mut(&epoch.0) {
                    m.bytes = bytes;
                    m.send_us = send_us;
                    m.cow_copies = cow.copies;
                    m.cow_waits = cow.waits;
                    *sent = Some(Instant::now());
                }
                if stats.copied_completions > 0 && stats.zerocopy_active {
                    self.log(format_args!(
                        "transport: kernel copied {} zero-copy sends (loopback/veth path?)",
                        stats.copied_completions
                    ));
                }
                pending.push_back(Input::CheckpointSent { epoch });
            }
            Event::LinkClosed { conn, why } => {
                if let Some(peer) = self.drop_conn(conn) {
                    self.log(format_args!("link to {peer} closed: {why}"));
                    pending.push_back(Input::Disconnected { peer });
                }
            }
            Event::Witness(reply) => pending.push_back(Input::WitnessReply(reply)),
            Event::Committed { epoch, error } => match error {
                None => pending.push_back(Input::Committed { epoch }),
                Some(source) => {
                    return Err(AgentError::Commit {
                        epoch: epoch.0,
                        source,
                    })
                }
            },
            Event::VmFrame(frame) => {
                if let Some(f) = self.gate.push(frame, Instant::now()) {
                    if let Some(net) = &self.net {
                        net.to_wire(vec![f]).await;
                    }
                }
            }
            Event::WireFrame(frame) => {
                if let Some(net) = &self.net {
                    net.to_vm(&frame).await;
                }
            }
        }
        Ok(())
    }

    async fn execute(
        &mut self,
        action: Action,
        pending: &mut VecDeque<Input>,
    ) -> Result<(), AgentError> {
        match action {
            Action::PauseVm => {
                if let Some(vm) = self.vm.as_mut() {
                    vm.prepare_pause().await?;
                }
                self.paused_at = Some(Instant::now());
                if let Some(vm) = self.vm.as_mut() {
                    vm.pause().await?;
                }
            }
            Action::Capture { epoch, full } => {
                let mut buf = self
                    .spare
                    .take()
                    .or_else(|| self.captured.take())
                    .unwrap_or_default();
                // A cow checkpoint never sent finishes here (its pages stay protected; their
                // next writes are logged as usual).
                self.captured_cow = None;
                let stats = match self.vm.as_mut() {
                    Some(vm) => {
                        let stats = vm.capture(full, self.cfg.capture, &mut buf).await?;
                        if self.cfg.capture == CaptureMode::Cow {
                            let cow = vm.take_cow().ok_or_else(|| {
                                VmError::failed(
                                    "cow capture",
                                    "this VM does not support copy-on-write capture",
                                )
                            })?;
                            self.captured_cow = Some(cow);
                        }
                        stats
                    }
                    None => return Err(VmError::failed("capture", "no VM is running").into()),
                };
                buf.generation = self.node.status().generation.0;
                buf.epoch = epoch.0;
                if self.verify_due(epoch) {
                    if let Some(vm) = self.vm.as_mut() {
                        let digest = vm.ram_digest()?;
                        self.record_digest(epoch, digest);
                    }
                }
                let page_bytes = buf.indices.len() as u64 * u64::from(self.cfg.model.page_size);
                let bytes = page_bytes + buf.device.len() as u64;
                let m = EpochMetrics {
                    epoch: epoch.0,
                    generation: buf.generation,
                    full,
                    dirty_pages: stats.pages,
                    scan_us: stats.scan_us,
                    copy_us: stats.copy_us,
                    device_us: stats.device_us,
                    early_protected: stats.early_protected,
                    protected: stats.protected,
                    ..EpochMetrics::default()
                };
                self.open_epochs.insert(epoch.0, (m, None));
                self.captured = Some(buf);
                pending.push_back(Input::CaptureDone {
                    epoch,
                    pages: stats.pages,
                    bytes,
                });
            }
            Action::ResumeVm { epoch } => {
                match self.vm.as_mut() {
                    // The checkpoint just captured goes out from guest RAM first.
                    Some(_) if self.cfg.capture == CaptureMode::PausedSend => {
                        self.resume.defer(epoch);
                        return Ok(());
                    }
                    Some(vm) => vm.resume().await?,
                    // A fresh primary's first action: boot the VM.
                    None => self.vm = Some(self.launcher.boot().await?),
                }
                self.resumed(epoch);
            }
            Action::SendCheckpoint {
                to,
                epoch,
                full,
                generation,
            } => {
                let conn = self.peer_conn.get(&to).copied();
                let link = conn.and_then(|c| self.links.get(&c).map(|l| (c, l)));
                let cow = self.captured_cow.take();
                match (link, self.captured.take()) {
                    (Some((conn, link)), Some(staged)) if staged.epoch == epoch.0 => {
                        let paused = self.cfg.capture == CaptureMode::PausedSend;
                        let out = match (self.vm.as_ref().filter(|_| paused), cow) {
                            // SAFETY: the VM stays paused until this link reports the checkpoint
                            // sent or goes away: its ResumeVm is held in `self.resume`, which
                            // hears of both (CheckpointSent, drop_conn).
                            (Some(vm), _) => Outgoing::PausedSend(unsafe {
                                PausedPages::new(generation, full, staged, vm.guest_ram())
                            }),
                            (None, Some(cow)) => Outgoing::Cow(Box::new(CowPages::new(
                                generation, full, staged, cow,
                            ))),
                            (None, None) => Outgoing::Checkpoint {
                                generation,
                                full,
                                staged,
                            },
                        };
                        match link.try_send(out) {
                            Ok(()) if paused => self.resume.sending(conn, epoch),
                            Ok(()) => {}
                            // The writer is gone; its LinkClosed tells the model.
                            Err(out) => self.spare = out.into_staged(),
                        }
                    }
                    (_, staged) => {
                        // No link (its loss is already reported) or nothing captured: keep the
                        // buffer for reuse; the model hears of the link loss.
                        self.spare = staged;
                    }
                }
            }
            Action::Send { to, msg } => {
                if let Some(link) = self.peer_conn.get(&to).and_then(|c| self.links.get(c)) {
                    link.send(Outgoing::Peer(msg));
                }
            }
            Action::Connect { to } => self.connect(to),
            Action::Disconnect { peer } => {
                if let Some(conn) = self.peer_conn.get(&peer).copied() {
                    self.drop_conn(conn);
                }
            }
            Action::ToWitness(req) => {
                let (addr, vm, tx) = (self.cfg.witness, self.cfg.model.vm, self.tx.clone());
                let identity = self.cfg.identity.clone();
                if matches!(req, ftvm_model::WitnessRequest::Takeover { .. })
                    && self.takeover_started.is_none()
                {
                    self.takeover_started = Some(Instant::now());
                }
                // An exchange (handshake, request, the witness's two fsyncs, reply) may take
                // longer than the model's resend interval on a loaded host: it is left to
                // finish instead of being abandoned at each resend, and a resend of a request
                // still in flight is not sent twice.
                if !lock_inflight(&self.witness_inflight).insert(req) {
                    return Ok(());
                }
                let inflight = self.witness_inflight.clone();
                let timeout = witness_exchange_timeout(self.cfg.model.witness_retry);
                tokio::spawn(async move {
                    // No reply is fine: the node resends after `witness_retry`.
                    let answer = witness::request(addr, &identity, vm, req, timeout).await;
                    lock_inflight(&inflight).remove(&req);
                    match answer {
                        Ok(reply) => {
                            let _ = tx.send(Event::Witness(reply));
                        }
                        // Refused by the witness's authentication: say so, it will not heal.
                        Err(e @ witness::WitnessError::Auth { .. }) => {
                            tracing::error!(
                                error = %e,
                                "witness exchange refused by authentication"
                            )
                        }
                        Err(_) => {}
                    }
                });
            }
            Action::ReleaseOutput { through } => {
                let now = Instant::now();
                let frames = self.gate.release_through(through.0, now);
                let stats = self.gate.take_stats();
                self.close_epochs(through, frames.len() as u64, stats.longest_hold_us);
                if let Some(net) = &self.net {
                    net.to_wire(frames).await;
                }
            }
            Action::SetOutputGate(g) => {
                let frames = self.gate.set_open(g == Gate::Open, Instant::now());
                if let Some(net) = &self.net {
                    net.to_wire(frames).await;
                }
            }
            Action::Commit { epoch } => {
                // Older staged checkpoints were superseded; the model commits in order.
                let staged = self.staged.remove(&epoch.0);
                self.staged.retain(|&e, _| e > epoch.0);
                let replica = self.replica.clone();
                let tx = self.tx.clone();
                let verify = self.verify_due(epoch).then(|| self.verify_path());
                tokio::task::spawn_blocking(move || {
                    let error = match staged {
                        None => Some(CommitError::NotStaged),
                        Some(s) => match replica.lock() {
                            Ok(mut r) => r.commit(&s).err().map(CommitError::from).or_else(|| {
                                let path = verify?;
                                match r.ram_digest() {
                                    Ok(d) => {
                                        append_digest(&path, epoch, s.generation, d);
                                        None
                                    }
                                    Err(e) => Some(e.into()),
                                }
                            }),
                            Err(_) => Some(CommitError::LockPoisoned),
                        },
                    };
                    let _ = tx.send(Event::Committed { epoch, error });
                });
            }
            Action::DiscardStaged => self.staged.clear(),
            Action::StartVm { from, generation } => {
                let point = {
                    let r = self
                        .replica
                        .lock()
                        .map_err(|_| AgentError::ReplicaLockPoisoned)?;
                    RestorePoint {
                        ram_file: r.ram_path().to_path_buf(),
                        device: r.device_state()?,
                    }
                };
                self.log(format_args!(
                    "failover: restoring epoch {from} as generation {generation}"
                ));
                // The replica is only read until the restored VM runs (QEMU restores with
                // `-incoming`, which leaves shared RAM alone), so a start that failed can be
                // tried again from the same point: one failed QEMU start must not lose the VM.
                let vm = match self.launcher.restore(point.clone()).await {
                    Ok(vm) => vm,
                    Err(e) => {
                        self.log(format_args!(
                            "failover: starting the restored VM failed ({e}); trying once more"
                        ));
                        self.launcher.restore(point).await?
                    }
                };
                self.vm = Some(vm);
                self.gate.begin_epoch(from.0 + 1);
                if let Some(t) = self.takeover_started.take() {
                    let us = t.elapsed().as_micros() as u64;
                    self.failover_us = Some(us);
                    self.log(format_args!(
                        "failover: VM running {us} us after the takeover request"
                    ));
                }
                pending.push_back(Input::VmStarted);
            }
            Action::Fence => {
                self.log(format_args!(
                    "fenced: stopping the VM, dropping held output"
                ));
                self.captured_cow = None;
                if let Some(mut vm) = self.vm.take() {
                    vm.kill().await;
                }
                self.resume.clear();
                self.gate.fence();
                // A stopped VM must not look alive: close every checkpoint link, so a backup
                // still following us hears silence and takes over.
                let conns: Vec<ConnId> = self.links.keys().copied().collect();
                for conn in conns {
                    self.drop_conn(conn);
                }
            }
            Action::Log(e) => self.log(format_args!("{e:?}")),
        }
        Ok(())
    }

    /// The VM runs again from `epoch` on: record the pause, tag frames with `epoch`.
    fn resumed(&mut self, epoch: Epoch) {
        if let Some(paused) = self.paused_at.take() {
            let us = paused.elapsed().as_micros() as u64;
            if let Some((m, _)) = self.open_epochs.get_mut(&(epoch.0.saturating_sub(1))) {
                m.pause_us = us;
            }
        }
        self.gate.begin_epoch(epoch.0);
    }

    /// paused-send: resumes the VM once its checkpoint is out (see [`ResumeGate`]).
    async fn resume_if_due(&mut self) -> Result<(), AgentError> {
        let Some(epoch) = self.resume.due() else {
            return Ok(());
        };
        if let Some(vm) = self.vm.as_mut() {
            vm.resume().await?;
            self.resumed(epoch);
        }
        Ok(())
    }

    fn verify_due(&self, epoch: Epoch) -> bool {
        self.cfg
            .verify_every
            .is_some_and(|k| k > 0 && epoch.0.is_multiple_of(k))
    }

    fn verify_path(&self) -> PathBuf {
        self.cfg.replica_dir.join("verify.jsonl")
    }

    fn record_digest(&self, epoch: Epoch, digest: u64) {
        append_digest(
            &self.verify_path(),
            epoch,
            self.node.status().generation.0,
            digest,
        );
    }

    fn connect(&mut self, to: NodeId) {
        let tx = self.tx.clone();
        let Some(addr) = self.cfg.peers.get(&to).copied() else {
            let _ = tx.send(Event::ConnectFailed {
                peer: to,
                why: "no address configured for that node".into(),
            });
            return;
        };
        let Some(key) = self.cfg.identity.trust.nodes.get(&to).copied() else {
            let _ = tx.send(Event::ConnectFailed {
                peer: to,
                why: "no public key for that node in the key directory".into(),
            });
            return;
        };
        let setup = self.link_setup();
        tokio::task::spawn_blocking(move || {
            let failed = match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(stream) => {
                    let conn = new_conn();
                    let events = tx.clone();
                    let announce = move |link, peer| {
                        let _ = events.send(Event::Connected { peer, conn, link });
                    };
                    let events = tx.clone();
                    let refused = move |why: String| {
                        let why = format!("{addr}: {why}");
                        let _ = events.send(Event::ConnectFailed { peer: to, why });
                    };
                    let side = Side::Dial { peer: to, key };
                    link::spawn(
                        stream,
                        conn,
                        side,
                        setup,
                        None,
                        tx.clone(),
                        announce,
                        refused,
                    )
                    .err()
                    .map(|e| e.to_string())
                }
                Err(e) => Some(format!("{addr}: {e}")),
            };
            if let Some(why) = failed {
                let _ = tx.send(Event::ConnectFailed { peer: to, why });
            }
        });
    }

    /// Epochs up to `through` are acked: finish and record their metrics.
    fn close_epochs(&mut self, through: Epoch, frames: u64, longest_hold_us: u64) {
        let now = Instant::now();
        let done: Vec<u64> = self
            .open_epochs
            .range(..=through.0)
            .map(|(&e, _)| e)
            .collect();
        for e in done {
            if let Some((mut m, sent)) = self.open_epochs.remove(&e) {
                m.ack_us = sent
                    .map(|s| now.duration_since(s).as_micros() as u64)
                    .unwrap_or(0);
                if e == through.0 {
                    m.frames_released = frames;
                    m.longest_hold_us = longest_hold_us;
                    let cap = self.output_cap.take_since_last(now);
                    m.output_held_bytes = cap.held_bytes;
                    m.output_cap_hits = cap.cap_hits;
                    m.output_cap_paused_us = cap.cap_paused_us;
                }
                self.metrics.record(&m);
            }
        }
    }

    fn note_status(&mut self) {
        let st = self.node.status();
        let changed = self
            .last_status
            .map(|l| l.phase != st.phase || l.generation != st.generation || l.role != st.role)
            .unwrap_or(true);
        // Rewrite the status file on every change, and twice a second for the counters.
        if !changed {
            if self.status_written.elapsed() >= Duration::from_millis(500) {
                self.write_status();
            }
            return;
        }
        self.last_status = Some(st);
        tracing::info!(
            node = st.node.0,
            role = ?st.role,
            phase = %st.phase,
            generation = st.generation.0,
            "status"
        );
        self.write_status();
    }

    /// The current status report.
    pub fn status_report(&self) -> StatusReport {
        let st = self.node.status();
        StatusReport {
            node: st.node.0,
            role: format!("{:?}", st.role),
            phase: st.phase.name().to_string(),
            generation: st.generation.0,
            failed_over: st.failed_over,
            committed: st.committed.map(|e| e.0),
            acked: st.acked.0,
            failover_us: self.failover_us,
            summary: self.metrics.summary(),
            output: self.output_cap.stats(Instant::now()),
        }
    }

    fn write_status(&mut self) {
        self.status_written = Instant::now();
        let Some(path) = &self.cfg.status_file else {
            return;
        };
        if let Ok(json) = serde_json::to_vec(&self.status_report()) {
            // Best effort, as the report is rewritten often; readable, never writable, by others.
            let _ = crate::secure_fs::write_replace(
                path,
                &json,
                crate::secure_fs::READABLE_FILE_MODE,
                crate::secure_fs::Durability::Atomic,
            );
        }
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

/// The witness requests whose exchange is under way.
type Inflight = Arc<Mutex<std::collections::HashSet<ftvm_model::WitnessRequest>>>;

fn lock_inflight(
    f: &Inflight,
) -> std::sync::MutexGuard<'_, std::collections::HashSet<ftvm_model::WitnessRequest>> {
    f.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How long one witness exchange may take: many resend intervals, at least half a second.
fn witness_exchange_timeout(retry: Duration) -> Duration {
    (retry * 20).clamp(Duration::from_millis(500), Duration::from_secs(5))
}

fn append_digest(path: &std::path::Path, epoch: Epoch, generation: u64, digest: u64) {
    use std::io::Write;
    let line = format!(
        "{{\"epoch\":{},\"generation\":{},\"digest\":{}}}\n",
        epoch.0, generation, digest
    );
    // Verification output is best effort; a missing line makes the verifying test fail.
    if let Ok(mut f) = crate::secure_fs::open_append(path, crate::secure_fs::READABLE_FILE_MODE) {
        let _ = f.write_all(line.as_bytes());
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
