//! A protocol node's host: the simulator's I/O around the shared driver core
//! (`ftvm_driver::NodeDriver`, the one the real agent runs). It owns the sockets, the simulated
//! VM and the replica; the core owns the model node, the connection ↔ peer table, the output
//! gate and the staged checkpoints. Socket and VM events go to the core, and the effects it
//! returns are carried out in `exec`. Every decision is the model's.

mod accept;
mod event;
mod exec;
mod peer_io;
mod witness_call;

use std::collections::{BTreeMap, VecDeque};

use ftvm_driver::journal::{HostEntry, Journal};
use ftvm_driver::{Accepted, NodeDriver, StagingLimits, Verdict};
use ftvm_model::{Epoch, Generation, Input, Node, NodeId, Start, Time, VmId};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::task::{spawn_local, JoinHandle};
use turmoil::net::TcpStream;

use crate::net::{write_loop, Job, WriterNote, PEER_PORT, SERVICE_PORT};
use crate::observer::Instance;
use crate::rng::SimRng;
use crate::scenario::{VmSpec, VM_ID};
use crate::trace::{HostId, TraceKind};
use crate::vm::replica::Replica;
use crate::vm::service::Reply;
use crate::vm::{Captured, SimVm};
use crate::world::{now, Shared};
use event::{ConnId, HostEvent};

/// A reply waiting at (or passing) the output gate.
#[derive(Clone, Debug)]
pub(crate) struct OutFrame {
    conn: ConnId,
    reply: Reply,
    instance: Instance,
    generation: Generation,
    tag: Epoch,
}

/// One connection: its writer and the tasks to stop when it is dropped.
struct Conn {
    writer: Option<UnboundedSender<Job>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub(crate) struct NodeHost {
    w: Shared,
    me: NodeId,
    host: HostId,
    spec: VmSpec,
    vm_id: VmId,
    driver: NodeDriver<ConnId, OutFrame>,
    vm: Option<SimVm>,
    instance: Instance,
    vm_generation: Generation,
    restore_at: Option<Time>,
    /// A capture under way that keeps the VM paused (`VmSpec::capture_pause`): when it ends,
    /// and its `CaptureDone`.
    capture_done: Option<(Time, Input)>,
    /// A full sync's pre-copy under way (`VmSpec::pre_copy`): when it ends, and its
    /// `PreCopied`.
    pre_copied: Option<(Time, Input)>,
    /// When the VM was paused for the capture under way.
    paused_since: Option<Time>,
    /// Client requests that arrived while the VM was paused, served at the resume.
    deferred: Vec<(ConnId, crate::vm::service::Request)>,
    captured: BTreeMap<Epoch, Captured>,
    replica: Replica,
    /// The primary that sent each staged checkpoint (the observer's origin of a commit).
    staged_from: BTreeMap<Epoch, NodeId>,
    /// Checkpoint-link connections (dialling, accepted or live) and their tasks.
    links: BTreeMap<ConnId, Conn>,
    clients: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    tx: UnboundedSender<HostEvent>,
}

/// The RNG stream each node's lineage is drawn from (plus the node id).
const LINEAGE_STREAM: u64 = 0x4c49_4e45_0000;

/// The software of node `me` (called again at every restart).
pub(crate) async fn run_node(w: Shared, me: NodeId) -> turmoil::Result {
    let (start, config, spec, seed, replica) = {
        let mut world = w.borrow_mut();
        let starts = {
            let n = world.starts.entry(me).or_insert(0);
            *n += 1;
            *n
        };
        let kept = match world.resume.remove(&me) {
            true => world.kept.as_ref().and_then(|k| k.get(&me)).cloned(),
            false => None,
        };
        let start = match (starts, me.0, kept.as_ref().and_then(|r| r.at)) {
            (1, 1, _) => Start::Primary,
            (1, _, _) => Start::Backup { primary: NodeId(1) },
            (_, _, Some(replica)) => Start::Resume { replica },
            _ => Start::Rejoin,
        };
        let replica = match start {
            Start::Resume { .. } => kept.unwrap_or_else(|| Replica::empty(&world.scenario.vm)),
            _ => Replica::empty(&world.scenario.vm),
        };
        // Each start of the software draws its own lineage (see `Config::incarnation`), as a
        // real agent process does; the journal records it after the start.
        let mut config = world.config.clone();
        config.incarnation = SimRng::derive(world.seed, LINEAGE_STREAM + u64::from(me.0))
            .next_u64()
            .wrapping_add(u64::from(starts));
        let t = now();
        world.note(t, HostId::Node(me), TraceKind::Start(start));
        if let Some(journals) = world.journals.as_mut() {
            journals.entry(me).or_insert_with(|| crate::HostJournal {
                node: me,
                config: config.clone(),
                start,
                entries: Vec::new(),
            });
        }
        (
            start,
            config,
            world.scenario.vm.clone(),
            world.seed,
            replica,
        )
    };
    let peer_listener = accept::bind(PEER_PORT).await?;
    let service_listener = accept::bind(SERVICE_PORT).await?;
    let (tx, rx) = unbounded_channel();
    spawn_local(accept::accept_peers(peer_listener, tx.clone()));
    spawn_local(accept::accept_clients(service_listener, tx.clone()));
    let mut host = NodeHost {
        w: w.clone(),
        me,
        host: HostId::Node(me),
        replica,
        spec,
        vm_id: VM_ID,
        driver: NodeDriver::new(Node::new(config, me, start)),
        vm: None,
        instance: 0,
        vm_generation: Generation::UNKNOWN,
        restore_at: None,
        capture_done: None,
        pre_copied: None,
        paused_since: None,
        deferred: Vec::new(),
        captured: BTreeMap::new(),
        staged_from: BTreeMap::new(),
        links: BTreeMap::new(),
        clients: BTreeMap::new(),
        next_conn: 0,
        tx,
    };
    if w.borrow().journals.is_some() {
        host.driver.record(now(), start, Journal::new());
    }
    // A restart reads its replica disk as it was left (empty unless kept).
    let disk = host.replica.disk.hash();
    w.borrow_mut().obs.replica_disk_reset(me, disk);
    if start == Start::Primary {
        host.vm = Some(SimVm::fresh(&host.spec, seed));
        host.instance = w.borrow_mut().obs.new_instance(me);
        host.vm_generation = Generation::FIRST;
    }
    host.run(rx).await;
    Ok(())
}

impl NodeHost {
    async fn run(&mut self, mut rx: UnboundedReceiver<HostEvent>) {
        self.feed(Input::Timeout);
        loop {
            let t = now();
            let event = match self.next_due() {
                Some(due) if due <= t => None,
                Some(due) => {
                    tokio::select! {
                        biased;
                        ev = rx.recv() => ev,
                        _ = tokio::time::sleep(due.saturating_since(t)) => None,
                    }
                }
                None => rx.recv().await,
            };
            match event {
                Some(ev) => self.on_event(ev),
                None => self.on_due(),
            }
            // The replica disk moves only at commits (disk consistency).
            let disk = self.replica.disk.hash();
            self.w.borrow_mut().obs.replica_disk(now(), self.me, disk);
        }
    }

    fn next_due(&self) -> Option<Time> {
        [
            self.driver.poll_timeout(),
            self.restore_at,
            self.capture_done.map(|(t, _)| t),
            self.pre_copied.map(|(t, _)| t),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn on_due(&mut self) {
        let t = now();
        if self.restore_at.is_some_and(|r| r <= t) {
            self.restore_at = None;
            if let Some(vm) = self.vm.as_mut() {
                vm.resume(t);
            }
            self.feed(Input::VmStarted);
        }
        if let Some((_, done)) = self.capture_done.filter(|(at, _)| *at <= t) {
            self.capture_done = None;
            self.feed(done);
        }
        if let Some((_, done)) = self.pre_copied.filter(|(at, _)| *at <= t) {
            self.pre_copied = None;
            self.feed(done);
        }
        if self.driver.poll_timeout().is_some_and(|d| d <= t) {
            self.feed(Input::Timeout);
        }
    }

    /// Feed one input, carry out the actions, and feed the inputs they produce at once.
    fn feed(&mut self, input: Input) {
        self.feed_all(VecDeque::from([input]));
    }

    /// Feed inputs in order, and the inputs their actions produce.
    fn feed_all(&mut self, mut queue: VecDeque<Input>) {
        while let Some(input) = queue.pop_front() {
            let t = now();
            self.note(t, TraceKind::Input(input));
            for effect in self.driver.handle(t, input) {
                self.note(t, TraceKind::Action(effect.action));
                self.exec(t, effect, &mut queue);
            }
            let running = self.vm.as_ref().is_some_and(SimVm::is_running);
            let status = self.driver.status();
            self.w.borrow_mut().obs.status(t, self.me, status, running);
        }
        self.flush_journal();
    }

    /// Moves what the core journaled to the run's record (as a real agent writes it to disk).
    fn flush_journal(&mut self) {
        let Some(journal) = self.driver.journal_mut() else {
            return;
        };
        let entries = journal.drain();
        let mut world = self.w.borrow_mut();
        if let Some(j) = world.journals.as_mut().and_then(|j| j.get_mut(&self.me)) {
            j.entries.extend(entries.into_iter().map(|entry| HostEntry {
                node: self.me,
                wall_us: entry.at.as_micros(),
                entry,
            }));
        }
    }

    fn note(&self, t: Time, what: TraceKind) {
        self.w.borrow_mut().note(t, self.host, what);
    }

    /// What the core says about a connection event: close what it names, feed the input.
    fn apply(&mut self, verdict: Verdict<ConnId>) {
        match verdict {
            Verdict::Ignore => {}
            Verdict::Feed(input) => self.feed(input),
            Verdict::Close(conn, input) => {
                self.links.remove(&conn);
                if let Some(input) = input {
                    self.feed(input);
                }
            }
        }
    }

    fn new_conn_id(&mut self) -> ConnId {
        self.next_conn += 1;
        self.next_conn
    }

    /// Start the reader and writer of an established checkpoint link.
    fn attach(&mut self, id: ConnId, peer: NodeId, stream: TcpStream) -> Conn {
        let (rd, wr) = stream.into_split();
        let (jobs, job_rx) = unbounded_channel();
        let tx = self.tx.clone();
        let limits = StagingLimits {
            page_size: self.spec.page_size,
            ram_pages: self.spec.pages,
            max_device_bytes: ftvm_driver::staging::DEFAULT_MAX_DEVICE_BYTES,
            disk_blocks: self.spec.disk_blocks,
        };
        let reader = spawn_local(peer_io::read_peer(rd, id, self.vm_id, limits, tx.clone()));
        let writer = spawn_local(write_loop(
            self.w.clone(),
            wr,
            job_rx,
            self.host,
            HostId::Node(peer),
            move |n| {
                let ev = match n {
                    WriterNote::Sent(epoch) => HostEvent::CheckpointSent { conn: id, epoch },
                    WriterNote::Failed => HostEvent::Closed { conn: id },
                };
                let _ = tx.send(ev);
            },
        ));
        Conn {
            writer: Some(jobs),
            tasks: vec![reader, writer],
        }
    }

    fn on_event(&mut self, ev: HostEvent) {
        match ev {
            HostEvent::PeerAccepted { peer, stream } => {
                let id = self.new_conn_id();
                // Accepted links speak for the node their address names, once it joins.
                if let Accepted::Admitted(verdict) = self.driver.accepted(id, peer) {
                    let conn = self.attach(id, peer, stream);
                    self.links.insert(id, conn);
                    self.apply(verdict);
                }
            }
            HostEvent::Connected { conn, peer, stream } => {
                let verdict = self.driver.connected(conn, peer);
                if verdict != Verdict::Close(conn, None) {
                    let c = self.attach(conn, peer, stream);
                    self.links.insert(conn, c);
                }
                self.apply(verdict);
            }
            HostEvent::ConnectFailed { conn, peer } => {
                self.links.remove(&conn);
                let verdict = self.driver.connect_failed(conn, peer);
                self.apply(verdict);
            }
            HostEvent::Link { conn, event } => {
                #[cfg(feature = "mutants")]
                self.mutant_disk_writes_on_arrival(&event);
                if let ftvm_driver::LinkEvent::CheckpointReceived(cp) = &event {
                    if let Some(from) = self.driver.peer_of(conn) {
                        self.staged_from.insert(Epoch(cp.epoch), from);
                    }
                }
                if let ftvm_driver::LinkEvent::CheckpointDamaged { epoch, .. } = &event {
                    if let Some(from) = self.driver.peer_of(conn) {
                        self.staged_from.insert(*epoch, from);
                    }
                }
                let verdict = self.driver.on_link(conn, event);
                self.apply(verdict);
            }
            HostEvent::Heard { conn } => {
                let verdict = self.driver.heard(conn);
                self.apply(verdict);
            }
            HostEvent::CheckpointSent { conn, epoch } => {
                if self.driver.peer_of(conn).is_some() {
                    self.feed(Input::CheckpointSent { epoch });
                }
            }
            HostEvent::Closed { conn } => {
                self.links.remove(&conn);
                let verdict = self.driver.closed(conn);
                self.apply(verdict);
            }
            HostEvent::Witness(reply) => self.feed(Input::WitnessReply(reply)),
            HostEvent::ClientAccepted { stream } => self.accept_client(stream),
            HostEvent::Request { client_conn, req } => {
                let mut queue = VecDeque::new();
                self.serve(client_conn, req, &mut queue);
                self.feed_all(queue);
            }
            HostEvent::ClientClosed { client_conn } => {
                self.clients.remove(&client_conn);
            }
        }
    }

    /// The planted `DiskWritesBeforeCommit` bug: an arriving checkpoint's disk blocks (what of
    /// them arrived, for one cut short or damaged) go to the replica disk at once, not at its
    /// commit.
    #[cfg(feature = "mutants")]
    fn mutant_disk_writes_on_arrival(&mut self, event: &ftvm_driver::LinkEvent) {
        use ftvm_driver::LinkEvent;
        if self.w.borrow().config.mutant != Some(ftvm_model::Mutant::DiskWritesBeforeCommit) {
            return;
        }
        match event {
            LinkEvent::CheckpointReceived(cp)
            | LinkEvent::CheckpointDamaged {
                partial: Some(cp), ..
            } => self.replica.write_disk(cp),
            _ => {}
        }
    }

    fn accept_client(&mut self, stream: TcpStream) {
        let id = self.new_conn_id();
        let (rd, wr) = stream.into_split();
        let (jobs, job_rx) = unbounded_channel();
        let reader = spawn_local(accept::read_client(rd, id, self.tx.clone()));
        let writer = spawn_local(write_loop(
            self.w.clone(),
            wr,
            job_rx,
            self.host,
            HostId::Clients,
            |_| {},
        ));
        self.clients.insert(
            id,
            Conn {
                writer: Some(jobs),
                tasks: vec![reader, writer],
            },
        );
    }

    /// The VM handles a request if it runs here; otherwise the connection is refused (the
    /// client then tries another host). A VM paused by a capture handles it at the resume.
    /// What the node must hear of it (held output) goes onto `queue`.
    fn serve(
        &mut self,
        client_conn: ConnId,
        req: crate::vm::service::Request,
        queue: &mut VecDeque<Input>,
    ) {
        let t = now();
        if self.paused_since.is_some() && self.vm.is_some() {
            self.deferred.push((client_conn, req));
            return;
        }
        let Some(vm) = self.vm.as_mut().filter(|vm| vm.is_running()) else {
            self.clients.remove(&client_conn);
            return;
        };
        let reply = vm.serve(t, &req);
        let frame = OutFrame {
            conn: client_conn,
            reply,
            instance: self.instance,
            generation: self.vm_generation,
            tag: self.driver.gate().tag(),
        };
        let out = self.driver.emit(t, frame);
        if let Some(f) = out.frame {
            self.release(t, vec![f]);
        }
        queue.extend(out.feed);
        self.flush_journal();
    }

    /// Frames the gate let out: report them, then send them to their clients.
    fn release(&mut self, t: Time, frames: Vec<OutFrame>) {
        for f in frames {
            {
                let mut world = self.w.borrow_mut();
                world
                    .obs
                    .released(t, self.me, f.instance, f.generation, f.tag, &f.reply);
                world.note(
                    t,
                    self.host,
                    TraceKind::Released {
                        reply: f.reply,
                        generation: f.generation,
                        tag: f.tag,
                    },
                );
            }
            if let Some(w) = self.clients.get(&f.conn).and_then(|c| c.writer.as_ref()) {
                let _ = w.send(Job::Bytes(f.reply.encode().to_vec()));
            }
        }
    }
}
