//! Carrying out the model's actions, with the driver core's bookkeeping already done (see
//! `ftvm_driver::Effect`). Actions whose effect completes at once in the simulation (capture,
//! commit) push their answering input onto `queue`, which `feed` handles next.

use std::collections::VecDeque;

use ftvm_driver::{Effect, StagedCheckpoint};
use ftvm_model::wire::{
    encode_checkpoint_with_disk, DISK_BLOCK_SIZE, HEADER_LEN, META_LEN, RECORD_HEADER_LEN,
};
use ftvm_model::{
    Action, Epoch, Generation, Input, NodeId, ReplicaAt, Scope, Time, WitnessRequest,
};
use tokio::task::spawn_local;
use turmoil::net::TcpStream;

use super::event::ConnId;
use super::event::HostEvent;
use super::{witness_call, Conn, NodeHost, OutFrame};
use crate::invariant::Invariant;
use crate::net::{Job, PEER_PORT};
use crate::trace::{HostId, TraceKind};
use crate::vm::SimVm;

impl NodeHost {
    pub(super) fn exec(
        &mut self,
        t: Time,
        effect: Effect<ConnId, OutFrame>,
        queue: &mut VecDeque<Input>,
    ) {
        let Effect {
            action,
            released,
            close,
            staged,
            link,
            ..
        } = effect;
        for conn in close {
            self.links.remove(&conn);
        }
        match action {
            Action::PreCopy { epoch } => {
                // The simulated copy only takes time: the full capture after it is whole
                // anyway (the real drivers copy only what was written meanwhile).
                let done = Input::PreCopied { epoch };
                match self.spec.pre_copy {
                    d if d.is_zero() => queue.push_back(done),
                    d => self.pre_copied = Some((t + d, done)),
                }
            }
            Action::PauseVm => {
                if let Some(vm) = self.vm.as_mut() {
                    vm.pause(t);
                    self.paused_since.get_or_insert(t);
                }
            }
            Action::Capture { epoch, scope } => self.capture(t, epoch, scope, queue),
            Action::ResumeVm { epoch } => {
                let paused = self
                    .paused_since
                    .take()
                    .map(|since| t.saturating_since(since));
                if let Some(d) = paused {
                    self.w.borrow_mut().obs.paused(d);
                }
                if let Some(vm) = self.vm.as_mut() {
                    vm.resume(t);
                    let paused_us = paused.map_or(0, |d| d.as_micros().max(1));
                    queue.push_back(Input::Resumed {
                        epoch,
                        paused_us: u64::try_from(paused_us).unwrap_or(u64::MAX),
                    });
                }
                // Requests that came in while paused, in their order (their replies are
                // tagged with the epoch that starts now).
                for (conn, req) in std::mem::take(&mut self.deferred) {
                    self.serve(conn, req, queue);
                }
            }
            Action::SendCheckpoint {
                to,
                epoch,
                full,
                generation,
            } => self.send_checkpoint(t, to, link, epoch, full, generation, queue),
            Action::Send { msg, .. } => {
                let bytes = ftvm_model::wire::encode_peer(self.vm_id, &msg);
                if let Some(w) = link.and_then(|c| self.writer(c)) {
                    let _ = w.send(Job::Bytes(bytes));
                }
            }
            Action::Connect { to } => self.connect(to),
            Action::Disconnect { .. } | Action::Log(_) => {}
            Action::ToWitness(request) => self.ask_witness(request),
            Action::ReleaseOutput { .. } | Action::SetOutputGate(_) => self.release(t, released),
            Action::Commit { epoch, replica } => self.commit(t, epoch, replica, staged, queue),
            Action::DiscardStaged => self.staged_from.clear(),
            Action::StartVm { from, generation } => self.start_vm(t, from, generation),
            Action::Fence => {
                self.vm = None;
                self.capture_done = None;
                self.pre_copied = None;
                self.paused_since = None;
                self.deferred.clear();
                self.instance = 0;
                self.captured.clear();
                self.staged_from.clear();
                self.restore_at = None;
            }
        }
    }

    fn writer(&self, conn: ConnId) -> Option<tokio::sync::mpsc::UnboundedSender<Job>> {
        self.links.get(&conn).and_then(|c| c.writer.clone())
    }

    fn driver_error(&self, t: Time, detail: String) {
        self.w
            .borrow_mut()
            .obs
            .fail(Invariant::Driver, t, Some(self.me), detail);
    }

    fn capture(&mut self, t: Time, epoch: Epoch, scope: Scope, queue: &mut VecDeque<Input>) {
        let Some(vm) = self.vm.as_mut() else {
            return self.driver_error(t, format!("Capture {{ {epoch} }} but no VM runs here"));
        };
        vm.pause(t);
        let cap = vm.capture(epoch, scope);
        let hash = vm.state_hash();
        let disk_hash = vm.disk_hash();
        let pages = cap.pages.len() as u64;
        let bytes = pages * u64::from(self.spec.page_size)
            + cap.disk.len() as u64 * u64::from(DISK_BLOCK_SIZE)
            + cap.device.len() as u64;
        {
            let mut world = self.w.borrow_mut();
            world.obs.captured(
                t,
                self.me,
                self.instance,
                self.vm_generation,
                epoch,
                Some(hash),
            );
            world
                .obs
                .captured_disk(self.me, self.vm_generation, epoch, disk_hash);
            world.obs.sync_captured(scope);
            if let Scope::Since(_) = scope {
                world.catching_up.insert(self.me, epoch);
            }
            world.note(t, self.host, TraceKind::Captured { epoch, hash });
        }
        self.captured.insert(epoch, cap);
        let done = Input::CaptureDone {
            epoch,
            pages,
            bytes,
        };
        match self.spec.capture_pause {
            d if d.is_zero() => queue.push_back(done),
            d => self.capture_done = Some((t + d, done)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn send_checkpoint(
        &mut self,
        t: Time,
        to: NodeId,
        link: Option<ConnId>,
        epoch: Epoch,
        full: bool,
        generation: Generation,
        queue: &mut VecDeque<Input>,
    ) {
        // Older captures can never be sent any more.
        self.captured.retain(|e, _| *e >= epoch);
        let Some(cap) = self.captured.remove(&epoch) else {
            return self.driver_error(t, format!("SendCheckpoint of {epoch}, never captured"));
        };
        let Some(writer) = link.and_then(|c| self.writer(c)) else {
            // The link is already gone; tell the model the way a dead socket would.
            queue.push_back(Input::Disconnected { peer: to });
            return;
        };
        let pages: Vec<(u64, &[u8])> = cap.pages.iter().map(|(i, d)| (*i, &d[..])).collect();
        let disk: Vec<(u64, &[u8])> = cap.disk.iter().map(|(i, d)| (*i, &d[..])).collect();
        let page_size = self.spec.page_size;
        let mut bytes = match encode_checkpoint_with_disk(
            self.vm_id,
            generation,
            epoch,
            full,
            page_size,
            &pages,
            &disk,
            &cap.device,
        ) {
            Ok(b) => b,
            Err(e) => return self.driver_error(t, format!("cannot encode {epoch}: {e}")),
        };
        let corrupt = self
            .w
            .borrow_mut()
            .shaper
            .take_corruption(self.host, HostId::Node(to));
        if corrupt {
            // First byte of the first page record's data, or of the device state.
            let at = HEADER_LEN
                + META_LEN
                + if pages.is_empty() {
                    0
                } else {
                    RECORD_HEADER_LEN
                };
            if let Some(b) = bytes.get_mut(at) {
                *b ^= 0x5A;
            }
            self.note(
                t,
                TraceKind::Note(format!("damaged checkpoint {epoch} on the wire")),
            );
        }
        let _ = writer.send(Job::Checkpoint { epoch, bytes });
    }

    fn connect(&mut self, to: NodeId) {
        let id = self.new_conn_id();
        self.driver.dialling(to, id);
        let tx = self.tx.clone();
        let name = format!("n{}", to.0);
        let task = spawn_local(async move {
            let ev = match TcpStream::connect((name.as_str(), PEER_PORT)).await {
                Ok(stream) => HostEvent::Connected {
                    conn: id,
                    peer: to,
                    stream,
                },
                Err(_) => HostEvent::ConnectFailed { conn: id, peer: to },
            };
            let _ = tx.send(ev);
        });
        // The core dropped any previous link to `to` (closed above, from the effect).
        self.links.insert(
            id,
            Conn {
                writer: None,
                tasks: vec![task],
            },
        );
    }

    fn ask_witness(&mut self, request: WitnessRequest) {
        // A call outliving a few resends is stale; the model has resent it by then.
        let limit = self.driver.node().config().witness_retry * 4;
        spawn_local(witness_call::call_witness(
            self.w.clone(),
            self.me,
            self.vm_id,
            request,
            limit,
            self.tx.clone(),
        ));
    }

    fn commit(
        &mut self,
        t: Time,
        epoch: Epoch,
        replica: ReplicaAt,
        staged: Option<StagedCheckpoint>,
        queue: &mut VecDeque<Input>,
    ) {
        let from = self.staged_from.remove(&epoch);
        self.staged_from.retain(|&e, _| e > epoch);
        let (Some(cp), Some(from)) = (staged, from) else {
            return self.driver_error(t, format!("Commit of {epoch}, which is not staged"));
        };
        self.replica
            .apply(&cp, from, self.spec.page_size as usize, replica);
        if cp.full {
            self.w.borrow_mut().obs.full_sync_committed();
        }
        self.keep_replica();
        let hash = self.replica.state_hash();
        let disk_hash = self.replica.disk.hash();
        let origin = self.replica.committed;
        {
            let mut world = self.w.borrow_mut();
            if let Some(origin) = origin {
                world
                    .obs
                    .committed(t, self.me, origin, self.replica.since, Some(hash));
                world.obs.committed_disk(t, self.me, origin, disk_hash);
            }
            world.note(t, self.host, TraceKind::Committed { epoch, hash });
        }
        queue.push_back(Input::Committed { epoch });
    }

    /// Leaves a copy of the replica where a restart that keeps it will find it (only when the
    /// scenario has such a restart: copying every commit costs time).
    fn keep_replica(&mut self) {
        let mut world = self.w.borrow_mut();
        if let Some(kept) = world.kept.as_mut() {
            kept.insert(self.me, self.replica.clone());
        }
    }

    fn start_vm(&mut self, t: Time, from: Epoch, generation: Generation) {
        let Some(origin) = self.replica.committed.filter(|o| o.epoch == from) else {
            return self.driver_error(
                t,
                format!(
                    "StartVm from {from}, but the replica holds {:?}",
                    self.replica.committed.map(|o| o.epoch)
                ),
            );
        };
        let vm = SimVm::restore(
            &self.spec,
            self.replica.ram.clone(),
            self.replica.disk.clone(),
            &self.replica.device,
        );
        let restore = {
            let mut world = self.w.borrow_mut();
            world.obs.restored_disk(t, self.me, origin, vm.disk_hash());
            let instance = world.obs.new_instance(self.me);
            world.obs.restored(
                t,
                self.me,
                instance,
                origin.generation,
                from,
                &vm.counters(),
            );
            self.instance = instance;
            world.scenario.timing.restore
        };
        self.vm = Some(vm);
        self.vm_generation = generation;
        self.restore_at = Some(t + restore);
    }
}
