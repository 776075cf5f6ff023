//! The primary role: runs the VM's epoch loop, syncs joiners, registers/drops its backup with
//! the witness, and gates output on the backup's acks.
//!
//! Output rule (see [`crate::witness`] for why it is safe): the gate is `Held` whenever a backup
//! is, or may be, registered with the witness, and frames of epoch `N` leave only after that
//! backup acked `N`. It opens only after the witness confirmed that no backup is registered
//! for our generation (a granted `DropBackup` of our newest token), or right after a takeover,
//! and never at a fresh start before the first backup was protecting.
//!
//! Deposition. Only the witness says who runs the VM. A witness reply naming a newer
//! generation, or another primary for ours, fences this node at once. A peer's frame that
//! claims a newer generation proves nothing (it may be forged, corrupt or stale): the primary
//! closes the link that carried it (dropping its backup if it came from there), asks the
//! witness with a `Query`, resent every `witness_retry` until a reply comes, and fences only
//! if that reply shows it was deposed. Until then it runs on under the usual rules.
//!
//! Why running on while the claim is checked is safe, even if the claim is true: every
//! release follows one of three rules, none of which looks at peer frames.
//! 1. *An ack from the registered backup `B` for epoch `N`.* `B` acks `N` only after committing
//!    it and acks nothing once it has asked for a takeover; the witness grants a takeover of
//!    our generation to `B` alone. So whoever deposed us resumes from a replica holding `N`.
//! 2. *An open gate after a granted `DropBackup` of our newest token.* From that reply on the
//!    witness holds no backup for our generation and refuses every older registration, so
//!    nobody can take over our generation: we cannot have been deposed while the gate is open.
//! 3. *An open gate right after our own takeover*, the same argument for the new generation.
//!
//! Deposition therefore never lets a released frame go missing from the new primary's history;
//! the evidence only decides how soon a deposed primary stops its VM. That stays prompt: a
//! primary is deposed only after its registered backup stopped following it, so the backup's
//! link fails or falls silent, the `DropBackup` that follows is refused, and the primary fences.
//! If the witness cannot be reached, the primary keeps running with its output held, as with
//! any other unanswered request.

use std::time::Duration;

use crate::action::{Action, Event, FullSyncReason, Gate, Scope};
use crate::config::Config;
use crate::ctx::Ctx;
use crate::epoch_policy::EpochPolicy;
use crate::fenced::{FenceReason, Fenced};
use crate::ids::{Epoch, Generation, NodeId};
use crate::input::Input;
use crate::msg::{PeerMsg, RejectReason, ReplicaAt};
use crate::mutants::mutant;
use crate::node::Role;
use crate::status::{Phase, RoleKind, Status};
use crate::time::Time;
use crate::witness_msg::{Registration, WitnessReply, WitnessRequest};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PPhase {
    Waiting,
    Syncing,
    Registering,
    Protected,
    Dropping,
    Rejoining,
    Degraded,
}

/// The replica shape a `Join` announces, checked against this VM's.
#[derive(Clone, Copy, Debug)]
struct JoinerSize {
    ram_pages: u64,
    page_size: u32,
    disk_blocks: u64,
}

/// Epochs a joiner synced with the gate open may lag behind after its sync before the gate
/// closes anyway (see [`Primary::maybe_close_gate`]).
pub(crate) const PRE_COPY_ROUNDS: u64 = 8;

/// The backup or joiner this primary streams to.
#[derive(Clone, Copy, Debug)]
struct Peer {
    node: NodeId,
    /// Epoch of its sync: its registration token.
    sync: Epoch,
    /// The sync is a catch-up on top of the peer's replica of this epoch (`None`: full).
    base: Option<Epoch>,
    /// The epoch whose ack lets us register the peer: its replica then holds everything
    /// released so far. `None` while the stream runs with the gate open (pre-copy, see
    /// [`Primary::maybe_close_gate`]).
    register_at: Option<Epoch>,
    last_heard: Time,
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    request: WitnessRequest,
    retry_at: Time,
}

/// A node running the VM.
#[derive(Clone, Debug)]
pub struct Primary {
    generation: Generation,
    failed_over: bool,
    phase: PPhase,
    gate: Gate,
    /// Tag of the frames the VM emits now.
    running: Epoch,
    /// Capture issued, `CaptureDone` outstanding (the VM is paused; or, while `pre_copying`,
    /// still runs while a full capture's pages are copied aside).
    capturing: Option<Epoch>,
    /// `PreCopy` issued for `capturing`, `PreCopied` outstanding: the pause has not begun.
    pre_copying: bool,
    /// `SendCheckpoint` issued, `CheckpointSent` outstanding.
    sending: Option<Epoch>,
    captured: Epoch,
    acked: Epoch,
    released: Epoch,
    /// The first epoch of this VM's run on this host: a replica of an earlier epoch is not a
    /// state this run can catch up from (after a takeover, the epoch restored).
    history_from: Epoch,
    next_capture_at: Time,
    /// The gate holds output of the running epoch (told by `OutputHeld`); cleared at capture.
    output_waiting: bool,
    /// When the last capture paused the VM.
    paused_at: Time,
    /// When the VM last resumed after a capture, and how long that pause was (the output
    /// policy's idle bound spaces early captures by it).
    resumed_at: Time,
    last_pause: Duration,
    /// The last capture's pause may still be measured by a `Resumed` (until then it counts up
    /// to `CaptureDone`).
    pause_open: bool,
    peer: Option<Peer>,
    /// Newest registration asked of the witness in this generation and not yet dropped.
    token: Option<Registration>,
    pending: Option<Pending>,
    /// May run unprotected with the gate open once the witness confirms no backup: true after
    /// the first protection or a takeover; false at a fresh start (output waits for a backup).
    may_open: bool,
    heartbeat_at: Time,
    /// A peer claimed a newer generation: when to resend the `Query` that checks it with the
    /// witness (`None`: nothing to check).
    confirming: Option<Time>,
    /// Our registered backup broke its stream and said it comes back: who, and until when we
    /// wait for its `Join` before dropping it.
    rejoin: Option<(NodeId, Time)>,
    /// That backup's `Join` came while a capture ran: its offer, taken up once the capture is
    /// done (a `Reject` would send it away for its whole join retry, which may outlast the
    /// grace, and a replica it kept would be lost to a full sync).
    rejoin_offer: Option<(NodeId, Option<ReplicaAt>)>,
}

impl Primary {
    /// A fresh VM in generation 1, waiting for its first backup with output held.
    pub(crate) fn fresh() -> Primary {
        Primary {
            generation: Generation::FIRST,
            failed_over: false,
            phase: PPhase::Waiting,
            gate: Gate::Held,
            running: Epoch::FIRST,
            capturing: None,
            pre_copying: false,
            sending: None,
            captured: Epoch::NONE,
            acked: Epoch::NONE,
            released: Epoch::NONE,
            history_from: Epoch::NONE,
            next_capture_at: Time::ZERO,
            output_waiting: false,
            paused_at: Time::ZERO,
            resumed_at: Time::ZERO,
            last_pause: Duration::ZERO,
            pause_open: false,
            peer: None,
            token: None,
            pending: None,
            may_open: false,
            heartbeat_at: Time::ZERO,
            confirming: None,
            rejoin: None,
            rejoin_offer: None,
        }
    }

    /// The backup that won `Takeover` and restored epoch `from`: primary of `generation`,
    /// gate already open (no backup can be registered in a brand-new generation), frames
    /// tagged `from + 1`.
    pub(crate) fn after_takeover(generation: Generation, from: Epoch) -> Primary {
        Primary {
            generation,
            failed_over: true,
            phase: PPhase::Degraded,
            gate: Gate::Open,
            running: from.next(),
            captured: from,
            history_from: from,
            may_open: true,
            ..Primary::fresh()
        }
    }

    /// Fresh start: hold output, run the VM.
    pub(crate) fn start(&mut self, ctx: &mut Ctx<'_>) {
        ctx.act(Action::SetOutputGate(Gate::Held));
        ctx.act(Action::ResumeVm {
            epoch: self.running,
        });
    }

    pub(crate) fn handle(&mut self, ctx: &mut Ctx<'_>, input: Input) -> Option<Role> {
        let next = match input {
            Input::Timeout => self.on_timeout(ctx),
            Input::Message { from, msg } => self.on_message(ctx, from, msg),
            Input::WitnessReply(reply) => self.on_reply(ctx, reply),
            Input::Disconnected { peer } => {
                if self.peer.is_some_and(|p| p.node == peer) {
                    // The link is gone already: no `Disconnect`, which would close whatever
                    // link the driver holds for the peer by now (a rejoin's new one).
                    if self.phase == PPhase::Protected && self.token.is_some() {
                        self.await_rejoin(ctx, false);
                    } else {
                        self.peer_lost(ctx, false);
                    }
                }
                None
            }
            Input::Heard { from } => {
                self.heard(ctx, from);
                None
            }
            Input::CaptureDone { epoch, .. } => {
                self.on_capture_done(ctx, epoch);
                None
            }
            Input::PreCopied { epoch } => {
                if self.pre_copying && self.capturing == Some(epoch) {
                    self.pre_copying = false;
                    self.pause_and_capture(ctx, epoch, Scope::Full);
                }
                None
            }
            Input::Resumed { epoch, paused_us } => {
                // The capture's pause really ended now: the output policy spaces early captures
                // by it, counted from here (at or after the real resume, so the VM runs at
                // least the gap). (A fresh VM's first resume is its boot, no pause.)
                if self.pause_open && epoch == self.running && self.capturing.is_none() {
                    self.pause_open = false;
                    let seen = ctx.now.saturating_since(self.paused_at);
                    self.last_pause = match paused_us {
                        0 => seen,
                        us => Duration::from_micros(us).min(seen),
                    };
                    self.resumed_at = ctx.now;
                }
                None
            }
            Input::OutputHeld { epoch } => {
                // Frames held while their epoch is being captured leave with its ack anyway.
                if epoch == self.running && self.capturing.is_none() {
                    self.output_waiting = true;
                }
                None
            }
            Input::CheckpointSent { epoch } => {
                if self.sending == Some(epoch) {
                    self.sending = None;
                }
                None
            }
            // Backup-side inputs and link-up notices mean nothing to a primary.
            Input::Connected { .. }
            | Input::CheckpointStarted { .. }
            | Input::CheckpointReceived { .. }
            | Input::Committed { .. }
            | Input::VmStarted => None,
        };
        if next.is_none() {
            self.maybe_capture(ctx);
        }
        next
    }

    fn heard(&mut self, ctx: &Ctx<'_>, from: NodeId) {
        if let Some(p) = self.peer.as_mut().filter(|p| p.node == from) {
            p.last_heard = ctx.now;
        }
    }

    fn on_timeout(&mut self, ctx: &mut Ctx<'_>) -> Option<Role> {
        if let Some(p) = self.peer {
            if ctx.now >= p.last_heard + ctx.cfg.failure_timeout {
                self.peer_lost(ctx, true);
            } else if ctx.now >= self.heartbeat_at {
                let msg = PeerMsg::Heartbeat {
                    generation: self.generation,
                    epoch: self.captured,
                };
                ctx.act(Action::Send { to: p.node, msg });
                self.heartbeat_at = ctx.now + ctx.cfg.heartbeat_interval;
            }
        }
        if let Some(p) = self.pending.as_mut() {
            if ctx.now >= p.retry_at {
                ctx.act(Action::ToWitness(p.request));
                p.retry_at = ctx.now + ctx.cfg.witness_retry;
            }
        }
        if self.confirming.is_some_and(|t| ctx.now >= t) {
            self.query(ctx);
        }
        if self.rejoin.is_some_and(|(_, until)| ctx.now >= until) {
            // The backup did not come back in time: settle it as lost.
            self.drop_registration(ctx);
        }
        None
    }

    /// Stop for good: close the link to the peer (so it hears no more life from us, and its
    /// failure detector runs), then stop the VM and drop held output.
    fn fence(&mut self, ctx: &mut Ctx<'_>, by: Generation) -> Option<Role> {
        ctx.log(Event::Deposed { by });
        if let Some(p) = self.peer.take() {
            ctx.act(Action::Disconnect { peer: p.node });
        }
        let fenced = Fenced::enter(ctx, FenceReason::Deposed { by }, self.generation);
        Some(Role::Fenced(fenced))
    }

    /// Ask the witness whether we are still its primary.
    fn query(&mut self, ctx: &mut Ctx<'_>) {
        ctx.act(Action::ToWitness(WitnessRequest::Query));
        self.confirming = Some(ctx.now + ctx.cfg.witness_retry);
    }

    /// `from` sent a frame of a newer generation. Our backup follows our generation and
    /// a joiner that knows of a newer one was sent to its primary by the witness, so no sound
    /// peer sends that to us: whatever the link carries is not a stream we can use, and we
    /// close it (losing our backup if it came from there). Whether we were deposed only the
    /// witness can say: ask it (once; the `Query` is resent until answered, so a flood of
    /// claims costs one request per `witness_retry`). See the module docs for why we may run
    /// on meanwhile.
    fn claimed(&mut self, ctx: &mut Ctx<'_>, from: NodeId, generation: Generation) {
        ctx.log(Event::GenerationClaimed { from, generation });
        if self.peer.is_some_and(|p| p.node == from) {
            self.peer_lost(ctx, true);
        } else if from != ctx.me {
            ctx.act(Action::Disconnect { peer: from });
        }
        if self.confirming.is_none() {
            self.query(ctx);
        }
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_>, from: NodeId, msg: PeerMsg) -> Option<Role> {
        if msg.generation() > self.generation {
            self.claimed(ctx, from, msg.generation());
            return None;
        }
        match msg {
            PeerMsg::Join {
                vm,
                node,
                ram_pages,
                page_size,
                disk_blocks,
                replica,
                ..
            } => {
                let size = JoinerSize {
                    ram_pages,
                    page_size,
                    disk_blocks,
                };
                self.on_join(ctx, from, vm, node, size, replica);
            }
            PeerMsg::Ack { generation, epoch } => {
                if generation < self.generation {
                    ctx.log(Event::StaleMessage { from, generation });
                } else {
                    self.on_ack(ctx, from, epoch);
                }
            }
            PeerMsg::Heartbeat { generation, .. } => {
                if generation < self.generation {
                    ctx.log(Event::StaleMessage { from, generation });
                } else {
                    self.heard(ctx, from);
                }
            }
            // A primary never follows anyone; older-generation noise is ignored.
            PeerMsg::SyncStart { .. } | PeerMsg::Reject { .. } => {}
        }
        None
    }

    /// Our registered backup's link closed (it broke the stream on a damaged checkpoint, or
    /// its process restarted): it may be back in a moment with its replica. We keep it
    /// registered and the gate held for `rejoin_grace`; if we die meanwhile, it still takes
    /// over from its replica (untouched until a catch-up commits, atomically). Silence is not
    /// treated so: a silent backup may be cut off and about to take over, so it is dropped.
    /// `close`: the link may still be open, so the driver closes it (`Disconnect`).
    fn await_rejoin(&mut self, ctx: &mut Ctx<'_>, close: bool) {
        let Some(p) = self.peer.take() else { return };
        ctx.log(Event::PeerLost { peer: p.node });
        if close {
            ctx.act(Action::Disconnect { peer: p.node });
        }
        self.sending = None;
        self.phase = PPhase::Rejoining;
        self.rejoin = Some((p.node, ctx.now + ctx.cfg.rejoin_grace()));
    }

    /// The backup we wait for rejoined offering `offer`: continue its registration with a
    /// catch-up from the offered epoch, or, if the offer does not fit, drop it after all.
    fn on_rejoin(&mut self, ctx: &mut Ctx<'_>, from: NodeId, offer: Option<ReplicaAt>) {
        self.rejoin = None;
        let (Some(token), Ok(base)) = (self.token, self.catch_up_base(ctx.cfg, offer)) else {
            self.drop_registration(ctx);
            return self.reject(ctx, from, RejectReason::Busy);
        };
        if base < token.since || base < self.acked {
            self.drop_registration(ctx);
            return self.reject(ctx, from, RejectReason::Busy);
        }
        self.peer = Some(Peer {
            node: from,
            sync: token.since,
            base: Some(base),
            register_at: Some(token.since),
            last_heard: ctx.now,
        });
        self.phase = PPhase::Protected;
        self.start_stream(ctx, Ok(base), true);
    }

    fn reject(&self, ctx: &mut Ctx<'_>, to: NodeId, reason: RejectReason) {
        ctx.log(Event::Rejected { peer: to, reason });
        let msg = PeerMsg::Reject {
            generation: self.generation,
            reason,
        };
        ctx.act(Action::Send { to, msg });
    }

    fn on_join(
        &mut self,
        ctx: &mut Ctx<'_>,
        from: NodeId,
        vm: crate::ids::VmId,
        node: NodeId,
        size: JoinerSize,
        replica: Option<ReplicaAt>,
    ) {
        if vm != ctx.cfg.vm {
            return self.reject(ctx, from, RejectReason::WrongVm);
        }
        if size.ram_pages != ctx.cfg.ram_pages {
            return self.reject(ctx, from, RejectReason::RamSizeMismatch);
        }
        if size.page_size != ctx.cfg.page_size {
            return self.reject(ctx, from, RejectReason::PageSizeMismatch);
        }
        // A replica disk of another size could not hold (or would not fill) the VM's disk:
        // after a takeover the VM would see a different disk.
        if size.disk_blocks != ctx.cfg.disk_blocks {
            return self.reject(ctx, from, RejectReason::DiskSizeMismatch);
        }
        if from == ctx.me || node != from {
            return; // a confused or spoofed join; nothing sane to answer
        }
        if let Some((node, _)) = self.rejoin {
            if node == from && self.capturing.is_some() {
                self.rejoin_offer = Some((from, replica));
                return;
            }
            if node == from {
                return self.on_rejoin(ctx, from, replica);
            }
            return self.reject(ctx, from, RejectReason::HaveBackup);
        }
        if let Some(p) = self.peer {
            if p.node == from {
                // Our own backup joins afresh: its old stream is gone. Settle that first.
                self.peer_lost(ctx, true);
                return self.reject(ctx, from, RejectReason::Busy);
            }
            return self.reject(ctx, from, RejectReason::HaveBackup);
        }
        if self.pending.is_some() || self.capturing.is_some() || self.sending.is_some() {
            return self.reject(ctx, from, RejectReason::Busy);
        }
        // Accept. With the gate open (degraded: the witness holds no backup for us), output
        // keeps flowing while the sync and the epochs after it stream: the joiner cannot take
        // over before it is registered, so nothing it lacks can have been promised. The gate
        // closes once the stream has caught up (`maybe_close_gate`), and the registration
        // waits for the epoch after that. With the gate held (no first protection yet), every
        // frame from the sync point on waits for this backup's ack anyway.
        let register_at = (self.gate == Gate::Held).then_some(self.running);
        let base = self.catch_up_base(ctx.cfg, replica);
        self.peer = Some(Peer {
            node: from,
            sync: self.running,
            base: base.ok(),
            register_at,
            last_heard: ctx.now,
        });
        self.acked = Epoch::NONE;
        self.phase = PPhase::Syncing;
        self.start_stream(ctx, base, false);
    }

    /// Announce the stream to our peer and capture its first checkpoint: a catch-up from the
    /// base, or all of RAM and disk for the reason given; `continues`: the peer's registration
    /// goes on (a rejoin).
    fn start_stream(
        &mut self,
        ctx: &mut Ctx<'_>,
        base: Result<Epoch, FullSyncReason>,
        continues: bool,
    ) {
        let Some(p) = self.peer else { return };
        let epoch = self.running;
        ctx.log(Event::SyncChosen {
            peer: p.node,
            epoch,
            base: base.ok(),
            full_because: base.err(),
        });
        let base = base.ok();
        self.heartbeat_at = ctx.now + ctx.cfg.heartbeat_interval;
        let msg = PeerMsg::SyncStart {
            generation: self.generation,
            epoch,
            base,
            lineage: ctx.cfg.incarnation,
            continues,
        };
        ctx.act(Action::Send { to: p.node, msg });
        let scope = match base {
            Some(b) if mutant!(ctx.cfg, CatchUpSkipsEpoch) => Scope::Since(b.next()),
            Some(b) => Scope::Since(b),
            None => Scope::Full,
        };
        self.capture(ctx, scope);
    }

    /// The epoch a joiner's offered replica can be caught up from, or why it cannot: only a
    /// replica this run of ours made (our generation and lineage) of an epoch we captured is
    /// a prefix of our history we can vouch for. (The driver keeps each page's last writing
    /// epoch for the whole run, so no captured epoch is too old.)
    fn catch_up_base(
        &self,
        cfg: &Config,
        replica: Option<ReplicaAt>,
    ) -> Result<Epoch, FullSyncReason> {
        let r = replica.ok_or(FullSyncReason::NoReplica)?;
        if r.generation != self.generation {
            return Err(FullSyncReason::OtherGeneration);
        }
        if r.lineage != cfg.incarnation {
            return Err(FullSyncReason::OtherLineage);
        }
        if r.epoch <= self.history_from || r.epoch > self.captured || r.epoch < r.since {
            return Err(FullSyncReason::OutsideHistory);
        }
        Ok(r.epoch)
    }

    /// Closes the running epoch with a capture of `scope`. A full one (a full sync) first has
    /// the driver copy RAM aside while the VM runs (`PreCopy`), so that its pause takes only
    /// what the VM wrote meanwhile: no pause copies all of RAM, whatever its size. Nothing
    /// else is captured until it is done.
    fn capture(&mut self, ctx: &mut Ctx<'_>, scope: Scope) {
        let epoch = self.running;
        if scope == Scope::Full {
            ctx.act(Action::PreCopy { epoch });
            self.capturing = Some(epoch);
            self.pre_copying = true;
            // The epoch runs on until the copy is done; its length counts from the pause.
            self.next_capture_at = ctx.now + ctx.cfg.epoch_interval;
            return;
        }
        self.pause_and_capture(ctx, epoch, scope);
    }

    fn pause_and_capture(&mut self, ctx: &mut Ctx<'_>, epoch: Epoch, scope: Scope) {
        ctx.act(Action::PauseVm);
        ctx.act(Action::Capture { epoch, scope });
        self.capturing = Some(epoch);
        self.output_waiting = false;
        self.paused_at = ctx.now;
        self.pause_open = true;
        self.next_capture_at = ctx.now + ctx.cfg.epoch_interval;
    }

    fn on_capture_done(&mut self, ctx: &mut Ctx<'_>, epoch: Epoch) {
        if self.capturing != Some(epoch) {
            return;
        }
        self.capturing = None;
        self.captured = epoch;
        self.running = epoch.next();
        self.last_pause = ctx.now.saturating_since(self.paused_at);
        self.resumed_at = ctx.now;
        ctx.act(Action::ResumeVm {
            epoch: self.running,
        });
        if let Some((from, offer)) = self.rejoin_offer.take() {
            if self.rejoin.is_some_and(|(n, _)| n == from) {
                return self.on_rejoin(ctx, from, offer);
            }
        }
        let Some(p) = self.peer else { return };
        let full = epoch == p.sync && p.base.is_none();
        let generation = self.generation;
        ctx.act(Action::SendCheckpoint {
            to: p.node,
            epoch,
            full,
            generation,
        });
        self.sending = Some(epoch);
        if mutant!(ctx.cfg, ReleaseBeforeAck) && self.phase == PPhase::Protected {
            self.release(ctx, epoch);
        }
    }

    fn on_ack(&mut self, ctx: &mut Ctx<'_>, from: NodeId, epoch: Epoch) {
        let Some(p) = self.peer.as_mut().filter(|p| p.node == from) else {
            return;
        };
        p.last_heard = ctx.now;
        // Acks are cumulative and must name something we sent to this backup.
        if epoch < p.sync || epoch > self.captured || epoch <= self.acked {
            return;
        }
        let p = *p;
        self.acked = epoch;
        match self.phase {
            PPhase::Syncing if p.register_at.is_none_or(|r| epoch < r) => {
                self.maybe_close_gate(ctx);
            }
            PPhase::Syncing => {
                // The joiner's replica holds every epoch whose output left: ask the witness to
                // let it take over.
                let backup = Registration {
                    node: p.node,
                    since: p.sync,
                };
                self.token = Some(backup);
                self.phase = PPhase::Registering;
                let generation = self.generation;
                let request = WitnessRequest::RegisterBackup {
                    generation,
                    primary: ctx.me,
                    backup,
                };
                self.ask(ctx, request);
            }
            PPhase::Protected => self.release(ctx, epoch),
            _ => {}
        }
    }

    /// Pre-copy: the joiner of a sync started with the gate open has committed the sync and
    /// every epoch captured since, so what the VM writes next fits an ordinary checkpoint.
    /// Hold output from here and capture at once: once the joiner acks that capture, its
    /// replica holds every epoch whose frames left, and it may be registered. Clients wait for
    /// this one epoch and the registration, never for the sync.
    ///
    /// A stream whose checkpoint round trip outlasts an epoch always has one in flight when an
    /// ack comes, so it never catches up exactly: after [`PRE_COPY_ROUNDS`] epochs acked past
    /// the sync (each then an ordinary epoch's writes) the gate closes anyway, and clients wait
    /// as they do for any protected epoch. When the gate closes does not matter for safety:
    /// the registration waits for the ack of the first epoch held.
    fn maybe_close_gate(&mut self, ctx: &mut Ctx<'_>) {
        let Some(p) = self.peer.as_mut() else { return };
        let rounds = self.acked.0.saturating_sub(p.sync.0);
        let caught_up =
            self.acked >= p.sync && (self.acked == self.captured || rounds >= PRE_COPY_ROUNDS);
        if p.register_at.is_some() || !caught_up || self.capturing.is_some() {
            return;
        }
        p.register_at = Some(self.running);
        ctx.log(Event::GateClosing {
            peer: p.node,
            epoch: self.running,
        });
        if self.gate == Gate::Open {
            self.gate = Gate::Held;
            ctx.act(Action::SetOutputGate(Gate::Held));
        }
        self.next_capture_at = ctx.now;
    }

    fn release(&mut self, ctx: &mut Ctx<'_>, through: Epoch) {
        if self.gate == Gate::Held && through > self.released {
            self.released = through;
            ctx.act(Action::ReleaseOutput { through });
        }
    }

    fn ask(&mut self, ctx: &mut Ctx<'_>, request: WitnessRequest) {
        ctx.act(Action::ToWitness(request));
        self.pending = Some(Pending {
            request,
            retry_at: ctx.now + ctx.cfg.witness_retry,
        });
    }

    /// The backup/joiner fell silent, its link dropped, or it rejoined afresh.
    /// Also used when the witness refused its registration (then the peer may be gone already).
    /// `close`: its link may still be open, so the driver closes it (`Disconnect`).
    fn peer_lost(&mut self, ctx: &mut Ctx<'_>, close: bool) {
        if let Some(p) = self.peer.take() {
            ctx.log(Event::PeerLost { peer: p.node });
            if close {
                ctx.act(Action::Disconnect { peer: p.node });
            }
        }
        // The driver may abandon a send to a closed link; never wait for its completion.
        self.sending = None;
        self.drop_registration(ctx);
    }

    /// No backup follows us any more: revoke its registration, if any, at the witness.
    fn drop_registration(&mut self, ctx: &mut Ctx<'_>) {
        self.rejoin = None;
        if let Some((from, _)) = self.rejoin_offer.take() {
            self.reject(ctx, from, RejectReason::Busy);
        }
        self.acked = Epoch::NONE;
        match self.token {
            // A registration may exist (granted, or still travelling): revoke it, output held.
            // Our token is the newest we ever asked for, so the drop also voids any late
            // duplicate of our RegisterBackup.
            Some(backup) => {
                self.phase = PPhase::Dropping;
                let generation = self.generation;
                let request = WitnessRequest::DropBackup {
                    generation,
                    primary: ctx.me,
                    backup,
                };
                self.ask(ctx, request);
            }
            // Lost mid-sync, before any RegisterBackup: the witness still has no backup.
            None => self.unprotected(ctx),
        }
    }

    /// The witness is known to hold no backup for us.
    fn unprotected(&mut self, ctx: &mut Ctx<'_>) {
        if self.may_open {
            self.phase = PPhase::Degraded;
            if self.gate == Gate::Held {
                self.gate = Gate::Open;
                ctx.act(Action::SetOutputGate(Gate::Open));
            }
        } else {
            self.phase = PPhase::Waiting;
        }
    }

    fn on_reply(&mut self, ctx: &mut Ctx<'_>, reply: WitnessReply) -> Option<Role> {
        let s = reply.state;
        if s.vm != ctx.cfg.vm {
            return None;
        }
        // Any reply is a snapshot of the register: if it names a newer generation, or another
        // primary for ours, we were deposed, whatever request it answers.
        if s.generation > self.generation
            || (s.generation == self.generation && s.primary != ctx.me)
        {
            return self.fence(ctx, s.generation);
        }
        if reply.request == WitnessRequest::Query {
            // The register still names us: whatever a peer claimed was false. (A late reply to
            // an older Query may end the check too early; that costs nothing but time, since
            // our releases never relied on the claim: see the module docs.)
            self.confirming = None;
        }
        if self.pending.map(|p| p.request) != Some(reply.request) {
            return None; // an answer to something we no longer wait for
        }
        self.pending = None;
        if !reply.granted {
            ctx.log(Event::WitnessDenied(reply.request));
        }
        match (reply.request, reply.granted) {
            (WitnessRequest::RegisterBackup { .. }, true) => {
                self.may_open = true;
                self.phase = PPhase::Protected;
                self.release(ctx, self.acked);
            }
            (WitnessRequest::RegisterBackup { .. }, false) => {
                // Still our generation, so our token was voided (the backup gave up): it cannot
                // take over. Revoke explicitly to be sure, output stays held meanwhile.
                self.peer_lost(ctx, true);
            }
            (WitnessRequest::DropBackup { .. }, true) => {
                self.token = None;
                self.unprotected(ctx);
            }
            (WitnessRequest::DropBackup { .. }, false) => {
                // Only a registration newer than our newest token refuses a drop, and only we
                // register in our generation: the register is not what we believe. Stop.
                return self.fence(ctx, s.generation);
            }
            _ => {}
        }
        None
    }

    /// Whether the next incremental capture waits only for its time to come.
    fn can_capture(&self, cfg: &Config) -> bool {
        let streaming = matches!(
            self.phase,
            PPhase::Syncing | PPhase::Registering | PPhase::Protected
        );
        let Some(p) = self.peer.filter(|_| streaming) else {
            return false;
        };
        // The sync epoch itself counts as unacked until acked.
        let acked_floor = self.acked.0.max(p.sync.0.saturating_sub(1));
        let unacked = self.captured.0.saturating_sub(acked_floor);
        self.capturing.is_none() && self.sending.is_none() && unacked < cfg.max_unacked
    }

    /// When output waiting at the gate may end the epoch early (`None`: it may not).
    fn early_capture_at(&self, cfg: &Config) -> Option<Time> {
        match cfg.epoch_policy {
            EpochPolicy::Output(p) if self.output_waiting => {
                Some(p.earliest(self.resumed_at, self.last_pause))
            }
            _ => None,
        }
    }

    fn maybe_capture(&mut self, ctx: &mut Ctx<'_>) {
        if !self.can_capture(ctx.cfg) {
            return;
        }
        let early = self.early_capture_at(ctx.cfg).is_some_and(|t| ctx.now >= t);
        if early || ctx.now >= self.next_capture_at {
            self.capture(ctx, Scope::Epoch);
        }
    }

    pub(crate) fn poll_timeout(&self, cfg: &Config) -> Option<Time> {
        let mut t: Option<Time> = None;
        let mut at = |x: Time| t = Some(t.map_or(x, |t| t.min(x)));
        if let Some(p) = self.peer {
            at(p.last_heard + cfg.failure_timeout);
            at(self.heartbeat_at);
        }
        if let Some(p) = self.pending {
            at(p.retry_at);
        }
        if let Some(t) = self.confirming {
            at(t);
        }
        if let Some((_, until)) = self.rejoin {
            at(until);
        }
        if self.can_capture(cfg) {
            at(self.next_capture_at);
            if let Some(early) = self.early_capture_at(cfg) {
                at(early);
            }
        }
        t
    }

    pub(crate) fn status(&self, me: NodeId) -> Status {
        let phase = match self.phase {
            PPhase::Waiting => Phase::Waiting,
            PPhase::Syncing => Phase::Syncing,
            PPhase::Registering => Phase::Registering,
            PPhase::Protected => Phase::Protected,
            PPhase::Dropping => Phase::Dropping,
            PPhase::Rejoining => Phase::Rejoining,
            PPhase::Degraded => Phase::Degraded,
        };
        Status {
            node: me,
            role: RoleKind::Primary,
            phase,
            generation: self.generation,
            failed_over: self.failed_over,
            peer: self.peer.map(|p| p.node),
            gate: Some(self.gate),
            running_epoch: self.running,
            captured: self.captured,
            acked: self.acked,
            released: self.released,
            committed: None,
            registration: self.token,
        }
    }
}

#[cfg(test)]
#[path = "primary_tests.rs"]
mod tests;
