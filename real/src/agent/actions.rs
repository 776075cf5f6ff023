//! Carrying out the model's actions on the real VM, sockets and replica, one function per
//! action. The driver core has done the bookkeeping of each before it gets here (see
//! `ftvm_driver::Effect`): the frames a release lets out, the checkpoint a commit applies, the
//! connections a disconnect or fence closes, the link a send goes on.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_driver::Effect;
use ftvm_model::{
    Action, Epoch, Generation, Input, NodeId, PeerMsg, ReplicaAt, Scope, WitnessRequest,
};

use super::capture::CaptureMode;
use super::event::{CommitError, ConnId, Event};
use super::link::{self, CowPages, Outgoing, PausedPages, Side};
use super::metrics::{EpochMetrics, LastSync};
use super::spare;
use super::vm::{PreCopy, RestorePoint, Vm, VmError, VmLauncher};
use super::zero_pages;
use super::{new_conn, Agent, AgentError};
use crate::net::output::HeldFrame;
use crate::replica::StagedCheckpoint;

impl<L: VmLauncher> Agent<L> {
    /// Carries out one action with the core's bookkeeping of it.
    pub(super) async fn execute(
        &mut self,
        effect: Effect<ConnId, HeldFrame>,
        pending: &mut VecDeque<Input>,
    ) -> Result<(), AgentError> {
        let Effect {
            action,
            released,
            dropped,
            close,
            staged,
            link,
        } = effect;
        for conn in close {
            self.drop_conn(conn);
        }
        if !dropped.is_empty() {
            self.output.dropped(dropped, Instant::now());
        }
        match action {
            Action::PreCopy { epoch } => self.pre_copy(epoch, pending),
            Action::PauseVm => self.pause_vm().await,
            Action::Capture { epoch, scope } => self.capture(epoch, scope, pending).await,
            Action::ResumeVm { epoch } => self.resume_vm(epoch).await,
            Action::SendCheckpoint {
                epoch,
                full,
                generation,
                ..
            } => {
                self.send_checkpoint(link, epoch, full, generation);
                Ok(())
            }
            Action::Send { msg, .. } => {
                self.send(link, msg);
                Ok(())
            }
            Action::Connect { to } => {
                self.connect(to);
                Ok(())
            }
            Action::ToWitness(request) => {
                self.ask_witness(request);
                Ok(())
            }
            Action::ReleaseOutput { through } => {
                self.release_output(through, released).await;
                Ok(())
            }
            Action::SetOutputGate(_) => {
                self.send_released(released).await;
                Ok(())
            }
            Action::Commit { epoch, replica } => {
                self.commit(epoch, replica, staged);
                Ok(())
            }
            Action::StartVm { from, generation } => self.start_vm(from, generation, pending).await,
            Action::Fence => {
                self.fence().await;
                Ok(())
            }
            // Closed above / cleared by the core.
            Action::Disconnect { .. } | Action::DiscardStaged => Ok(()),
            Action::Log(e) => {
                self.log(format_args!("{e:?}"));
                Ok(())
            }
        }
    }

    async fn pause_vm(&mut self) -> Result<(), AgentError> {
        if let Some(vm) = self.vm.as_mut() {
            vm.prepare_pause().await?;
        }
        self.paused_at = Some(Instant::now());
        if let Some(vm) = self.vm.as_mut() {
            vm.pause().await?;
        }
        Ok(())
    }

    /// Before a full capture: copy RAM's non-zero pages into a staging buffer on a blocking
    /// thread while the VM runs (`Event::PreCopied` brings it back), so that the capture's
    /// pause copies only what the guest wrote meanwhile — 0.2 s per GiB less pause — and zero
    /// pages are not sent (`super::zero_pages`). Capture modes that send from guest RAM only
    /// list the non-zero pages there. A VM or capture mode that cannot (see
    /// `Vm::start_pre_copy`) answers at once.
    fn pre_copy(&mut self, epoch: Epoch, pending: &mut VecDeque<Input>) -> Result<(), AgentError> {
        let how = match self.vm.as_mut() {
            Some(vm) => vm.start_pre_copy(epoch, self.cfg.capture)?,
            None => PreCopy::None,
        };
        let Some(vm) = self.vm.as_ref().filter(|_| how != PreCopy::None) else {
            pending.push_back(Input::PreCopied { epoch });
            return Ok(());
        };
        if let Some((_, old, _)) = self.pre_copied.take() {
            spare::keep_larger(&mut self.spare, old);
        }
        let ram = vm.guest_ram();
        let page_size = self.cfg.model.page_size as usize;
        let mut buf = self.reuse_buffer();
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            buf.data.clear();
            buf.indices.clear();
            // The guest writes RAM meanwhile: a page may be copied torn, or found zero and
            // written after. Every page it writes from `start_pre_copy` on is in the
            // capture's dirty log and taken again then, whatever it holds.
            match how {
                PreCopy::Copy => {
                    // Room for all of RAM at once: growing by reallocation would copy what
                    // is in already (each page is faulted in once, as it is first written).
                    buf.data.reserve(ram.as_slice().len());
                    zero_pages::copy_nonzero_pages(
                        ram.as_slice(),
                        page_size,
                        &mut buf.indices,
                        &mut buf.data,
                    )
                }
                PreCopy::Scan | PreCopy::None => {
                    zero_pages::nonzero_pages(ram.as_slice(), page_size, &mut buf.indices)
                }
            }
            // The mark the capture checks: this buffer holds the pre-copy of `epoch`.
            buf.epoch = epoch.0;
            buf.full = true;
            let _ = tx.send(Event::PreCopied {
                epoch,
                staged: buf,
                took: t.elapsed(),
            });
        });
        Ok(())
    }

    /// A capture buffer to fill: the spare, else the last capture's, else a new one.
    fn reuse_buffer(&mut self) -> StagedCheckpoint {
        self.spare
            .take()
            .or_else(|| self.captured.take())
            .unwrap_or_default()
    }

    async fn capture(
        &mut self,
        epoch: Epoch,
        scope: Scope,
        pending: &mut VecDeque<Input>,
    ) -> Result<(), AgentError> {
        let (pre_copied, pre_copy_us) = match self.pre_copied.take() {
            Some((e, buf, took)) if e == epoch => {
                let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
                (Some(buf), us)
            }
            Some((_, stale, _)) => {
                spare::keep_larger(&mut self.spare, stale);
                (None, 0)
            }
            None => (None, 0),
        };
        let mut buf = match pre_copied {
            Some(buf) => buf,
            None => {
                let mut buf = self.reuse_buffer();
                // Only a buffer copied ahead for this capture may reach it with RAM (or a
                // list of pages) in it, and marked as such.
                buf.data.clear();
                buf.indices.clear();
                buf.full = false;
                buf
            }
        };
        // A cow checkpoint never sent finishes here (its pages stay protected; their next
        // writes are logged as usual).
        self.captured_cow = None;
        self.captured_disk = None;
        let Some(vm) = self.vm.as_mut() else {
            return Err(VmError::failed("capture", "no VM is running").into());
        };
        let stats = vm.capture(epoch, scope, self.cfg.capture, &mut buf).await?;
        if self.cfg.capture == CaptureMode::Cow {
            let cow = vm.take_cow().ok_or_else(|| {
                VmError::failed(
                    "cow capture",
                    "this VM does not support copy-on-write capture",
                )
            })?;
            self.captured_cow = Some(cow);
        }
        self.captured_disk = vm.take_disk_sync();
        buf.generation = self.driver.status().generation.0;
        buf.epoch = epoch.0;
        // A catch-up applies on top of the backup's replica, like an ordinary epoch.
        let full = scope == Scope::Full;
        buf.full = full;
        if self.verify_due(epoch) {
            if let Some(vm) = self.vm.as_mut() {
                let digest = vm.ram_digest()?;
                let disk = vm.disk_digest()?;
                self.record_digest(epoch, digest, disk);
            }
        }
        let page_bytes = buf.indices.len() as u64 * u64::from(self.cfg.model.page_size);
        let bytes = page_bytes + buf.disk_data.len() as u64 + buf.device.len() as u64;
        let m = EpochMetrics {
            epoch: epoch.0,
            generation: buf.generation,
            full,
            catch_up_from: match scope {
                Scope::Since(base) => Some(base.0),
                Scope::Epoch | Scope::Full => None,
            },
            dirty_pages: stats.pages,
            scan_us: stats.scan_us,
            copy_us: stats.copy_us,
            pre_copy_us,
            device_us: stats.device_us,
            disk_blocks: stats.disk_blocks,
            disk_us: stats.disk_us,
            early_protected: stats.early_protected,
            protected: stats.protected,
            ..EpochMetrics::default()
        };
        if let Some(sync) = m.last_sync() {
            self.log_sync(&sync, &m);
            self.last_sync = Some(sync);
            // A sync is news for whoever watches the status file (a catch-up may be acked
            // before the next periodic rewrite).
            self.write_status();
        }
        self.open_epochs.insert(epoch.0, (m, None));
        self.captured = Some(buf);
        pending.push_back(Input::CaptureDone {
            epoch,
            pages: stats.pages,
            bytes,
        });
        Ok(())
    }

    /// One line per sync captured: which kind, and what it holds.
    fn log_sync(&self, sync: &LastSync, m: &EpochMetrics) {
        let (pages, blocks) = (m.dirty_pages, m.disk_blocks);
        match sync.base {
            Some(base) => tracing::info!(
                node = self.cfg.node.0,
                "catch-up sync in epoch {}: {pages} pages and {blocks} disk blocks written since the backup's epoch {base}",
                sync.epoch
            ),
            None => tracing::info!(
                node = self.cfg.node.0,
                "full sync in epoch {}: {pages} pages and {blocks} disk blocks",
                sync.epoch
            ),
        }
    }

    /// Guest RAM in bytes.
    fn ram_bytes(&self) -> usize {
        let bytes = self.cfg.model.ram_pages * u64::from(self.cfg.model.page_size);
        usize::try_from(bytes).unwrap_or(usize::MAX)
    }

    /// The size of the warm staging buffer to make ready for the next sync's full copy, if one
    /// is needed: none is kept yet and the capture mode copies pages (the others send from
    /// guest RAM).
    fn warm_buffer_wanted(&self) -> Option<usize> {
        (self.spare.is_none() && self.cfg.capture.copies_pages()).then(|| self.ram_bytes())
    }

    async fn resume_vm(&mut self, epoch: Epoch) -> Result<(), AgentError> {
        match self.vm.as_mut() {
            // The checkpoint just captured goes out from guest RAM first.
            Some(_) if self.cfg.capture == CaptureMode::PausedSend => {
                self.resume.defer(epoch);
                return Ok(());
            }
            Some(vm) => vm.resume().await?,
            // A fresh primary's first action: boot the VM. The first backup's sync copies all
            // of RAM into the staging buffer while the VM is paused: have it ready.
            None => {
                self.vm = Some(self.launcher.boot().await?);
                if let Some(bytes) = self.warm_buffer_wanted() {
                    self.spare = Some(warm_buffer(bytes));
                }
            }
        }
        self.resumed(epoch);
        Ok(())
    }

    /// The VM runs again from `epoch` on: record the pause. (The gate tags frames with `epoch`
    /// since the model's `ResumeVm`: while a paused-send resume is held, frames still read from
    /// the netdev were emitted before the pause and are held one epoch longer, never shorter.)
    fn resumed(&mut self, epoch: Epoch) {
        // The model hears of it with the pause measured here (stop → cont), which the output
        // epoch policy spaces early captures by.
        let mut paused_us = 0;
        if let Some(paused) = self.paused_at.take() {
            let us = u64::try_from(paused.elapsed().as_micros()).unwrap_or(u64::MAX);
            paused_us = us.max(1);
            if let Some((m, _)) = self.open_epochs.get_mut(&(epoch.0.saturating_sub(1))) {
                m.pause_us = us;
            }
        }
        self.resumed_note = Some((epoch, paused_us));
    }

    /// paused-send: resumes the VM once its checkpoint is out (see `ResumeGate`).
    pub(super) async fn resume_if_due(&mut self) -> Result<(), AgentError> {
        let Some(epoch) = self.resume.due() else {
            return Ok(());
        };
        if let Some(vm) = self.vm.as_mut() {
            vm.resume().await?;
            self.resumed(epoch);
        }
        Ok(())
    }

    fn send_checkpoint(
        &mut self,
        conn: Option<ConnId>,
        epoch: Epoch,
        full: bool,
        generation: Generation,
    ) {
        let link = conn.and_then(|c| self.links.get(&c).map(|l| (c, l)));
        let cow = self.captured_cow.take();
        let disk = self.captured_disk.take();
        let (Some((conn, link)), Some(staged)) = (link, self.captured.take()) else {
            // No link (its loss is already reported) or nothing captured: keep the buffer for
            // reuse; the model hears of the link loss.
            return;
        };
        if staged.epoch != epoch.0 {
            spare::keep_larger(&mut self.spare, staged);
            return;
        }
        let paused = self.cfg.capture == CaptureMode::PausedSend;
        // A catch-up is no full checkpoint, but as long to send: its progress is shown too.
        let sync = self
            .open_epochs
            .get(&epoch.0)
            .is_some_and(|(m, _)| m.is_sync());
        let out = match (self.vm.as_ref().filter(|_| paused), cow) {
            (Some(vm), _) => {
                // SAFETY: the VM stays paused until this link reports the checkpoint sent or goes
                // away: its ResumeVm is held in `self.resume`, which hears of both (CheckpointSent,
                // drop_conn).
                let mut p = unsafe { PausedPages::new(generation, full, staged, vm.guest_ram()) };
                p.disk = disk;
                p.sync = sync;
                Outgoing::PausedSend(Box::new(p))
            }
            (None, Some(cow)) => {
                let mut c = CowPages::new(generation, full, staged, cow);
                c.disk = disk;
                c.sync = sync;
                Outgoing::Cow(Box::new(c))
            }
            (None, None) => Outgoing::Checkpoint {
                generation,
                full,
                sync,
                staged,
                disk,
            },
        };
        match link.try_send(out) {
            Ok(()) if paused => self.resume.sending(conn, epoch),
            Ok(()) => {}
            // The writer is gone; its LinkClosed tells the model.
            Err(out) => {
                if let Some(buf) = out.into_staged() {
                    spare::keep_larger(&mut self.spare, buf);
                }
            }
        }
    }

    fn send(&mut self, conn: Option<ConnId>, msg: PeerMsg) {
        if let Some(link) = conn.and_then(|c| self.links.get(&c)) {
            link.send(Outgoing::Peer(msg));
        }
    }

    fn connect(&mut self, to: NodeId) {
        let tx = self.tx.clone();
        let conn = new_conn();
        self.driver.dialling(to, conn);
        let failed = |why: &str| {
            let why = why.to_string();
            let _ = tx.send(Event::ConnectFailed {
                peer: to,
                conn,
                why,
            });
        };
        let Some(addr) = self.cfg.peers.get(&to).copied() else {
            return failed("no address configured for that node");
        };
        let Some(key) = self.cfg.identity.trust.nodes.get(&to).copied() else {
            return failed("no public key for that node in the key directory");
        };
        let setup = self.link_setup();
        tokio::task::spawn_blocking(move || {
            let failed = match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(stream) => {
                    let events = tx.clone();
                    let announce = move |link, peer| {
                        let _ = events.send(Event::Connected { peer, conn, link });
                    };
                    let events = tx.clone();
                    let refused = move |why: String| {
                        let why = format!("{addr}: {why}");
                        let _ = events.send(Event::ConnectFailed {
                            peer: to,
                            conn,
                            why,
                        });
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
                let _ = tx.send(Event::ConnectFailed {
                    peer: to,
                    conn,
                    why,
                });
            }
        });
    }

    fn ask_witness(&mut self, req: WitnessRequest) {
        let (witness, vm, tx) = (self.cfg.witness.clone(), self.cfg.model.vm, self.tx.clone());
        let (identity, node) = (self.cfg.identity.clone(), self.cfg.node);
        if matches!(req, WitnessRequest::Takeover { .. }) && self.takeover_started.is_none() {
            self.takeover_started = Some(Instant::now());
        }
        // An exchange (handshake, request, the witness's two fsyncs, reply; or etcd's reads and
        // compare-and-sets) may take longer than the model's resend interval on a loaded host:
        // it is left to finish instead of being abandoned at each resend, and a resend of a
        // request still in flight is not sent twice.
        if !lock_inflight(&self.witness_inflight).insert(req) {
            return;
        }
        let inflight = self.witness_inflight.clone();
        let journal = self.witness_journal.clone();
        let timeout = witness_exchange_timeout(self.cfg.model.witness_retry);
        tokio::spawn(async move {
            // No reply is fine: the node resends after `witness_retry`. An etcd without quorum
            // ends here too: silence, never a denial.
            let answer = witness.request(&identity, node, vm, req, timeout).await;
            lock_inflight(&inflight).remove(&req);
            match answer {
                Ok(answer) => {
                    // Recorded before the node hears of it, so the history never lags what
                    // the node did with it.
                    if let (Some(entry), Some(j)) = (answer.decided, &journal) {
                        let mut j = j.lock().unwrap_or_else(|p| p.into_inner());
                        if let Err(e) = j.append([entry]) {
                            tracing::error!(error = %e, "witness journal write failed");
                        }
                    }
                    let _ = tx.send(Event::Witness(answer.reply));
                }
                // Refused by authentication, or a register missing or not ours: say so, it will
                // not heal.
                Err(e) if e.is_permanent() => {
                    tracing::error!(error = %e, "witness exchange failed for good")
                }
                Err(e) => tracing::debug!(error = %e, "witness did not answer"),
            }
        });
    }

    async fn release_output(&mut self, through: Epoch, released: Vec<HeldFrame>) {
        let frames = self.output.released(released, Instant::now());
        let stats = self.output.take_stats();
        self.close_epochs(through, frames.len() as u64, stats.longest_hold_us);
        if let Some(net) = &self.net {
            net.to_wire(frames).await;
        }
    }

    /// Degraded (or held again): what the gate let go leaves now.
    async fn send_released(&mut self, released: Vec<HeldFrame>) {
        let frames = self.output.released(released, Instant::now());
        if let Some(net) = &self.net {
            net.to_wire(frames).await;
        }
    }

    /// Commits the staged checkpoint to the replica off the event loop; `Committed` reports it
    /// at the commit point (the rename of its journal), and the applier thread then applies its
    /// pages to the RAM file, at a lower priority than the ack's path. Whatever reads the
    /// replica before that (the next commit, a failover's `start_vm`) applies it first from the
    /// journal (`Replica::settle`). An epoch whose RAM digest is recorded (`verify_every`) is
    /// applied here, so that the digest is of that checkpoint and not of a later one. The
    /// journal that makes the commit carries `replica`, what the replica is once it lands
    /// (what a restart offers the primary).
    fn commit(&mut self, epoch: Epoch, replica_at: ReplicaAt, staged: Option<StagedCheckpoint>) {
        let replica = self.replica.clone();
        let tx = self.tx.clone();
        let verify = self.verify_due(epoch).then(|| self.verify_path());
        let applier = self.applier.clone();
        tokio::task::spawn_blocking(move || {
            let committed = |error| {
                let _ = tx.send(Event::Committed { epoch, error });
            };
            let Some(s) = staged else {
                return committed(Some(CommitError::NotStaged));
            };
            let Ok(mut r) = replica.lock() else {
                return committed(Some(CommitError::LockPoisoned));
            };
            if let Err(e) = r.commit_point(&s, replica_at) {
                return committed(Some(e.into()));
            }
            committed(None);
            let job = ApplyJob {
                epoch,
                staged: s,
                verify,
            };
            if job.verify.is_some() {
                // The digest must be of this checkpoint: applied here, before the next commit
                // can take the lock.
                return job.run(&mut r);
            }
            drop(r);
            if let Err(std::sync::mpsc::SendError(job)) = applier.send(job) {
                // No applier thread: apply here.
                if let Ok(mut r) = replica.lock() {
                    job.run(&mut r);
                }
            }
        });
    }

    async fn start_vm(
        &mut self,
        from: Epoch,
        generation: Generation,
        pending: &mut VecDeque<Input>,
    ) -> Result<(), AgentError> {
        let point = {
            let mut r = self
                .replica
                .lock()
                .map_err(|_| AgentError::ReplicaLockPoisoned)?;
            // The last commit's pages in the RAM file before QEMU maps it (a no-op unless its
            // apply failed: the commit applies them under this lock).
            r.settle()?;
            RestorePoint {
                device: r.device_state()?,
                ram_file: r.ram_path().to_path_buf(),
                disk: r.disk_path().map(Path::to_path_buf),
            }
        };
        self.log(format_args!(
            "failover: restoring epoch {from} as generation {generation}"
        ));
        // The replica is only read until the restored VM runs (QEMU restores with `-incoming`,
        // which leaves shared RAM alone), so a start that failed can be tried again from the
        // same point: one failed QEMU start must not lose the VM.
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
        // The next backup's sync copies all of RAM: warm a buffer off the takeover's path.
        if let Some(bytes) = self.warm_buffer_wanted() {
            let tx = self.tx.clone();
            tokio::task::spawn_blocking(move || {
                let _ = tx.send(Event::BufferBack {
                    staged: warm_buffer(bytes),
                });
            });
        }
        if let Some(t) = self.takeover_started.take() {
            let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.failover_us = Some(us);
            self.failover_at = Some(std::time::SystemTime::now());
            self.log(format_args!(
                "failover: VM running {us} us after the takeover request"
            ));
        }
        pending.push_back(Input::VmStarted);
        Ok(())
    }

    async fn fence(&mut self) {
        self.log(format_args!(
            "fenced: stopping the VM, dropping held output"
        ));
        self.captured_cow = None;
        self.captured_disk = None;
        if let Some(mut vm) = self.vm.take() {
            vm.kill().await;
        }
        self.resume.clear();
        // The core closed every checkpoint link (above): a backup still following us hears
        // silence and takes over.
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
                    .map(|s| u64::try_from(now.duration_since(s).as_micros()).unwrap_or(u64::MAX))
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
                if let Some(exporter) = &self.exporter {
                    exporter.observe_epoch(&m);
                }
            }
        }
    }

    fn verify_due(&self, epoch: Epoch) -> bool {
        self.cfg
            .verify_every
            .is_some_and(|k| k > 0 && epoch.0.is_multiple_of(k))
    }

    fn verify_path(&self) -> PathBuf {
        self.cfg.replica_dir.join("verify.jsonl")
    }

    fn record_digest(&self, epoch: Epoch, digest: u64, disk: Option<u64>) {
        append_digest(
            &self.verify_path(),
            epoch,
            self.driver.status().generation.0,
            digest,
            disk,
        );
    }
}

/// A staging buffer whose page area holds `bytes` with every page written once: a fresh
/// allocation faults its pages in on first write, which in a full capture would happen while
/// the VM is paused and the event loop waits (0.4 s per GiB here).
fn warm_buffer(bytes: usize) -> StagedCheckpoint {
    let mut staged = StagedCheckpoint::default();
    staged.data.resize(bytes, 0);
    staged.data.clear();
    staged
}

/// An apply this long is logged: later commits wait for it.
const SLOW_APPLY: Duration = Duration::from_millis(100);

/// A committed checkpoint to apply to the replica.
pub(super) struct ApplyJob {
    epoch: Epoch,
    staged: StagedCheckpoint,
    /// Where to append the replica's RAM digest once applied (verification runs).
    verify: Option<PathBuf>,
}

impl ApplyJob {
    fn run(self, r: &mut crate::replica::Replica) {
        let ApplyJob {
            epoch,
            staged,
            verify,
        } = self;
        // A failure leaves the journal to replay: the next commit or read of the replica
        // applies it again, or fails with its error.
        let started = Instant::now();
        let applied = r.apply_committed(&staged).and_then(|()| match &verify {
            Some(path) => r.ram_digest().and_then(|d| {
                let disk = r.disk_digest()?;
                append_digest(path, epoch, staged.generation, d, disk);
                Ok(())
            }),
            None => Ok(()),
        });
        if let Err(e) = applied {
            tracing::error!(epoch = epoch.0, error = %e, "applying a committed checkpoint failed");
        }
        // The next commit waits for this one: a long apply holds the VM's output that long.
        let took = started.elapsed();
        if took >= SLOW_APPLY {
            tracing::info!(
                epoch = epoch.0,
                full = staged.full,
                pages = staged.indices.len(),
                disk_blocks = staged.disk_indices.len(),
                took_ms = took.as_millis() as u64,
                "applied a committed checkpoint to the replica"
            );
        }
    }
}

/// Where committed checkpoints go to be applied: a thread of lower priority (nice +10), so
/// that copying 10,000 pages into the RAM file does not take a CPU from the ack on its way
/// out. It ends when the agent drops its sender.
pub(super) fn spawn_applier(
    replica: Arc<Mutex<crate::replica::Replica>>,
) -> std::sync::mpsc::Sender<ApplyJob> {
    let (tx, rx) = std::sync::mpsc::channel::<ApplyJob>();
    let spawned = std::thread::Builder::new()
        .name("replica-apply".into())
        .spawn(move || {
            // SAFETY: setpriority only reads its integer arguments; `who` 0 with PRIO_PROCESS is
            // the calling thread on Linux (each thread has its own nice value). Failing to
            // lower the priority leaves the thread at the default one, which is harmless.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, 0, 10);
            }
            while let Ok(job) = rx.recv() {
                let Ok(mut r) = replica.lock() else {
                    // The next commit reports the poisoned lock.
                    return;
                };
                job.run(&mut r);
            }
        });
    if let Err(e) = spawned {
        // The receiver is gone with the closure: every commit applies its checkpoint itself.
        tracing::warn!(error = %e, "no replica apply thread; commits apply in place");
    }
    tx
}

/// The witness requests whose exchange is under way.
pub(super) type Inflight = Arc<Mutex<std::collections::HashSet<WitnessRequest>>>;

fn lock_inflight(
    f: &Inflight,
) -> std::sync::MutexGuard<'_, std::collections::HashSet<WitnessRequest>> {
    f.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How long one witness exchange may take: many resend intervals, at least half a second.
pub fn witness_exchange_timeout(retry: Duration) -> Duration {
    (retry * 20).clamp(Duration::from_millis(500), Duration::from_secs(5))
}

fn append_digest(
    path: &std::path::Path,
    epoch: Epoch,
    generation: u64,
    digest: u64,
    disk: Option<u64>,
) {
    use std::io::Write;
    let disk = disk.map_or(String::new(), |d| format!(",\"disk_digest\":{d}"));
    let line = format!(
        "{{\"epoch\":{},\"generation\":{},\"digest\":{}{disk}}}\n",
        epoch.0, generation, digest
    );
    // Verification output is best effort; a missing line makes the verifying test fail.
    if let Ok(mut f) = crate::secure_fs::open_append(path, crate::secure_fs::READABLE_FILE_MODE) {
        let _ = f.write_all(line.as_bytes());
    }
}

#[cfg(test)]
mod warm_buffer_tests {
    /// The warm buffer can take all of RAM without growing, and starts empty.
    #[test]
    fn a_warm_buffer_holds_all_of_ram_and_is_empty() {
        let b = super::warm_buffer(3 << 20);
        assert!(b.data.is_empty());
        assert!(b.data.capacity() >= 3 << 20);
    }
}
