//! The backup role: joins a primary, commits its checkpoints strictly in order and acks them,
//! and takes over (only with the witness's grant) when the primary falls silent.
//!
//! The replica and its *token* (generation + epoch of the sync it descends from) survive link
//! losses: a reconnect starts with a fresh `Join`, which offers the replica's last committed
//! epoch ([`ReplicaAt`]). The primary that made the replica answers with a catch-up (what
//! changed since that epoch); any other gets a full sync. Until the new sync is committed the
//! old replica is still a valid prefix of the primary's history, and the token is what the
//! witness checks at takeover.

use std::collections::VecDeque;

use crate::action::{Action, Event, Gate};
use crate::config::Config;
use crate::ctx::Ctx;
use crate::fenced::{FenceReason, Fenced};
use crate::ids::{Epoch, Generation, NodeId};
use crate::input::Input;
use crate::joiner::Joiner;
use crate::msg::{PeerMsg, RejectReason, ReplicaAt};
use crate::mutants::mutant;
use crate::node::Role;
use crate::primary::Primary;
use crate::status::{Phase, RoleKind, Status};
use crate::time::Time;
use crate::witness_msg::{Registration, WitnessReply, WitnessRequest};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum JoinStep {
    /// Link down; reconnect at `retry_at`.
    Idle { retry_at: Time },
    /// `Connect` issued.
    Connecting { deadline: Time },
    /// `Join` sent, waiting for `SyncStart` or `Reject`.
    AwaitSync { deadline: Time },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BPhase {
    Joining(JoinStep),
    Syncing,
    Protecting,
    TakingOver,
    Restoring { from: Epoch, generation: Generation },
}

/// A received, verified checkpoint waiting for (or under) commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Staged {
    epoch: Epoch,
    /// The full checkpoint that starts a replica (its epoch becomes the token).
    sync: bool,
    generation: Generation,
    /// Lineage of the stream's primary.
    lineage: u64,
    /// Which connection's stream it came from (acks go only to the current one).
    stream: u64,
}

/// What the replica descends from: the sync `since` of `generation`, sent by the primary of
/// `lineage`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Token {
    generation: Generation,
    lineage: u64,
    since: Epoch,
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    request: WitnessRequest,
    retry_at: Time,
}

/// A node following a primary.
#[derive(Clone, Debug)]
pub struct Backup {
    primary: NodeId,
    /// Generation of the stream we follow (from `SyncStart`), or the newest we know of.
    generation: Generation,
    phase: BPhase,
    /// Last sign of life from the primary.
    last_heard: Time,
    committed: Option<Epoch>,
    token: Option<Token>,
    stream: u64,
    /// Lineage of the primary whose stream we follow (from `SyncStart`).
    lineage: u64,
    /// What the last `Join` offered to resume from.
    offered: Option<ReplicaAt>,
    /// A replica whose token is void (its takeover was denied, or it was kept from another
    /// role): no use for a takeover, but still a prefix of its primary's history, so still
    /// worth offering for a catch-up. The primary decides whether it is.
    spare: Option<ReplicaAt>,
    sync: Option<Epoch>,
    next_expected: Option<Epoch>,
    staged: VecDeque<Staged>,
    committing: Option<Staged>,
    /// Highest epoch acked on the current stream.
    acked: Epoch,
    heartbeat_at: Time,
    takeover: Option<Pending>,
    /// Silence detected while a commit was under way: ask for the takeover once it lands.
    takeover_wanted: bool,
}

impl Backup {
    /// An empty replica that will join `primary`; `known` is the newest generation we know of.
    pub(crate) fn new(primary: NodeId, known: Generation) -> Backup {
        Backup {
            primary,
            generation: known,
            phase: BPhase::Joining(JoinStep::Idle {
                retry_at: Time::ZERO,
            }),
            last_heard: Time::ZERO,
            committed: None,
            token: None,
            stream: 0,
            lineage: 0,
            offered: None,
            spare: None,
            sync: None,
            next_expected: None,
            staged: VecDeque::new(),
            committing: None,
            acked: Epoch::NONE,
            heartbeat_at: Time::ZERO,
            takeover: None,
            takeover_wanted: false,
        }
    }

    /// A backup with a replica kept from before: it offers `replica` when it joins. With
    /// `token` (a restarted backup process) it may also still take over from it if the witness
    /// grants it; without (its takeover was denied) it only offers it for a catch-up.
    pub(crate) fn resume(
        primary: NodeId,
        known: Generation,
        replica: ReplicaAt,
        token: bool,
    ) -> Backup {
        let mut b = Backup::new(primary, known.max(replica.generation));
        if token {
            b.committed = Some(replica.epoch);
            b.token = Some(Token {
                generation: replica.generation,
                lineage: replica.lineage,
                since: replica.since,
            });
        } else {
            b.spare = Some(replica);
        }
        b
    }

    /// The committed replica a `Join` can offer.
    fn offer(&self) -> Option<ReplicaAt> {
        let (Some(t), Some(epoch)) = (self.token, self.committed) else {
            return self.spare;
        };
        Some(ReplicaAt {
            generation: t.generation,
            lineage: t.lineage,
            since: t.since,
            epoch,
        })
    }

    /// Start following: the failure detector runs from now; connect.
    pub(crate) fn start(&mut self, ctx: &mut Ctx<'_>) {
        self.last_heard = ctx.now;
        self.connect(ctx);
    }

    fn connect(&mut self, ctx: &mut Ctx<'_>) {
        ctx.act(Action::Connect { to: self.primary });
        let deadline = ctx.now + ctx.cfg.failure_timeout;
        self.phase = BPhase::Joining(JoinStep::Connecting { deadline });
    }

    pub(crate) fn handle(&mut self, ctx: &mut Ctx<'_>, input: Input) -> Option<Role> {
        match input {
            Input::Timeout => return self.on_timeout(ctx),
            Input::Connected { peer } if peer == self.primary => {
                if let BPhase::Joining(JoinStep::Connecting { .. }) = self.phase {
                    self.offered = self.offer();
                    let msg = PeerMsg::Join {
                        vm: ctx.cfg.vm,
                        node: ctx.me,
                        ram_pages: ctx.cfg.ram_pages,
                        page_size: ctx.cfg.page_size,
                        disk_blocks: ctx.cfg.disk_blocks,
                        known: self.generation,
                        replica: self.offered,
                    };
                    ctx.act(Action::Send {
                        to: self.primary,
                        msg,
                    });
                    let deadline = ctx.now + ctx.cfg.failure_timeout;
                    self.phase = BPhase::Joining(JoinStep::AwaitSync { deadline });
                }
            }
            Input::Disconnected { peer } if peer == self.primary => self.link_down(ctx, false),
            // Bytes count as life only inside a stream (a long full sync). While joining, only
            // a `SyncStart` or a busy `Reject` of our generation does: a node that stopped
            // its VM may still close or refuse our connections, and that is no sign of life.
            Input::Heard { from } if from == self.primary && self.streaming() => self.alive(ctx),
            Input::Message { from, msg } => return self.on_message(ctx, from, msg),
            Input::WitnessReply(reply) => return self.on_reply(ctx, reply),
            Input::CheckpointStarted { epoch } => {
                self.alive(ctx);
                let next = self.next_expected == Some(epoch);
                if mutant!(ctx.cfg, AckBeforeCommit) && self.phase == BPhase::Protecting && next {
                    self.ack(ctx, epoch);
                }
            }
            Input::CheckpointReceived { epoch, ok } => self.on_received(ctx, epoch, ok),
            Input::Committed { epoch } => return self.on_committed(ctx, epoch),
            Input::VmStarted => {
                if let BPhase::Restoring { from, generation } = self.phase {
                    return Some(Role::Primary(Primary::after_takeover(generation, from)));
                }
            }
            _ => {}
        }
        None
    }

    /// A checkpoint stream from the primary is under way.
    fn streaming(&self) -> bool {
        matches!(self.phase, BPhase::Syncing | BPhase::Protecting)
    }

    fn following(&self) -> bool {
        !matches!(self.phase, BPhase::TakingOver | BPhase::Restoring { .. })
    }

    fn alive(&mut self, ctx: &Ctx<'_>) {
        if self.following() {
            self.last_heard = ctx.now;
        }
    }

    /// The stream is gone (link dropped, bad checkpoint, refused join, join timeout): throw
    /// away what is staged, keep the replica, reconnect later with a fresh join.
    fn link_down(&mut self, ctx: &mut Ctx<'_>, close: bool) {
        if !self.following() {
            return;
        }
        if close {
            ctx.act(Action::Disconnect { peer: self.primary });
        }
        self.discard_stream(ctx);
        let retry_at = ctx.now + self.retry_delay(ctx);
        self.phase = BPhase::Joining(JoinStep::Idle { retry_at });
    }

    /// How long to wait before connecting again after a link closed. A backup still
    /// registered counts on the primary's `rejoin_grace`, which starts when the primary sees
    /// the old link close; a new link may be refused until then (a live link is never
    /// displaced). Waiting the whole `join_retry` could outlast the grace and cost the
    /// registration, so it retries every heartbeat instead: a few connects, bounded by the
    /// failure detector, which turns a primary that stays unreachable into a takeover.
    fn retry_delay(&self, ctx: &Ctx<'_>) -> std::time::Duration {
        let registered = self.token.is_some() && self.committed.is_some();
        if registered {
            ctx.cfg.join_retry.min(ctx.cfg.heartbeat_interval)
        } else {
            ctx.cfg.join_retry
        }
    }

    fn discard_stream(&mut self, ctx: &mut Ctx<'_>) {
        if matches!(self.phase, BPhase::Syncing | BPhase::Protecting) || !self.staged.is_empty() {
            ctx.act(Action::DiscardStaged);
        }
        self.staged.clear();
        self.sync = None;
        self.next_expected = None;
        self.acked = Epoch::NONE;
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_>, from: NodeId, msg: PeerMsg) -> Option<Role> {
        if from != self.primary {
            if let PeerMsg::Join { .. } = msg {
                ctx.reject_join(from, self.generation);
            }
            return None;
        }
        match msg {
            PeerMsg::SyncStart {
                generation,
                epoch,
                base,
                lineage,
                continues,
            } => {
                let awaiting = matches!(self.phase, BPhase::Joining(JoinStep::AwaitSync { .. }));
                if awaiting && continues {
                    return self.continue_stream(ctx, generation, lineage, epoch, base);
                }
                if awaiting && generation >= self.generation {
                    if !self.catch_up_fits(generation, lineage, epoch, base) {
                        // A catch-up on top of something we do not hold would leave a replica
                        // that is no state the VM was ever in. Start over.
                        ctx.log(Event::SyncRefused { epoch, base });
                        self.link_down(ctx, true);
                        return None;
                    }
                    self.generation = generation;
                    self.lineage = lineage;
                    self.stream += 1;
                    self.sync = Some(epoch);
                    self.next_expected = Some(epoch);
                    self.acked = Epoch::NONE;
                    self.phase = BPhase::Syncing;
                    self.heartbeat_at = ctx.now;
                    self.alive(ctx);
                }
            }
            PeerMsg::Heartbeat { generation, .. } if generation >= self.generation => {
                self.alive(ctx)
            }
            PeerMsg::Heartbeat { generation, .. } => {
                ctx.log(Event::StaleMessage { from, generation });
            }
            PeerMsg::Reject { generation, reason } => {
                // A primary of our generation that answers "busy" is alive: no failover for
                // that (a needless takeover would race its own drop of us).
                let busy = matches!(reason, RejectReason::Busy | RejectReason::HaveBackup);
                if busy && generation >= self.generation {
                    self.alive(ctx);
                }
                if let BPhase::Joining(_) = self.phase {
                    return self.rejected(ctx, reason);
                }
            }
            PeerMsg::Ack { .. } | PeerMsg::Join { .. } => {}
        }
        None
    }

    /// The primary kept us registered while we rejoined (within its grace): the catch-up goes
    /// on top of the replica our `Join` offered and continues its stream, token and all.
    fn continue_stream(
        &mut self,
        ctx: &mut Ctx<'_>,
        generation: Generation,
        lineage: u64,
        epoch: Epoch,
        base: Option<Epoch>,
    ) -> Option<Role> {
        let fits = self.token.is_some_and(|t| {
            t.generation == generation && t.lineage == lineage && generation == self.generation
        }) && self.catch_up_fits(generation, lineage, epoch, base)
            && base.is_some();
        if !fits {
            ctx.log(Event::SyncRefused { epoch, base });
            self.link_down(ctx, true);
            return None;
        }
        self.lineage = lineage;
        self.stream += 1;
        self.sync = None;
        self.next_expected = Some(epoch);
        self.acked = Epoch::NONE;
        self.phase = BPhase::Protecting;
        self.heartbeat_at = ctx.now;
        self.alive(ctx);
        None
    }

    /// Whether a sync announced by `SyncStart` can apply to our replica: a full one always; a
    /// catch-up only on top of exactly what our `Join` offered, from the same stream's primary.
    fn catch_up_fits(
        &self,
        generation: Generation,
        lineage: u64,
        epoch: Epoch,
        base: Option<Epoch>,
    ) -> bool {
        let Some(base) = base else { return true };
        self.offered.is_some_and(|o| {
            o.generation == generation && o.lineage == lineage && o.epoch == base && base < epoch
        })
    }

    fn rejected(&mut self, ctx: &mut Ctx<'_>, reason: RejectReason) -> Option<Role> {
        ctx.log(Event::Rejected {
            peer: self.primary,
            reason,
        });
        ctx.act(Action::Disconnect { peer: self.primary });
        if reason.is_permanent() {
            let fenced = Fenced::enter(ctx, FenceReason::Misconfigured(reason), self.generation);
            return Some(Role::Fenced(fenced));
        }
        if reason == RejectReason::NotPrimary && self.token.is_none() {
            // Nothing to take over with: find the real primary.
            return Some(self.become_joiner(ctx));
        }
        // Keep the replica: if the host we follow is really gone, the failure detector fires
        // and the witness decides whether our replica may take over.
        let retry_at = ctx.now + ctx.cfg.join_retry;
        self.phase = BPhase::Joining(JoinStep::Idle { retry_at });
        None
    }

    /// Find the primary again through the witness, keeping what the replica is worth for a
    /// catch-up (never its token).
    fn become_joiner(&mut self, ctx: &mut Ctx<'_>) -> Role {
        let mut j = match self.offer() {
            Some(r) => Joiner::with_replica(r, false),
            None => Joiner::new(),
        };
        j.start(ctx);
        Role::Joiner(j)
    }

    fn on_received(&mut self, ctx: &mut Ctx<'_>, epoch: Epoch, ok: bool) {
        if !matches!(self.phase, BPhase::Syncing | BPhase::Protecting) {
            return;
        }
        self.alive(ctx);
        let in_order = self.next_expected == Some(epoch);
        if in_order && (ok || mutant!(ctx.cfg, CommitPartial)) {
            self.staged.push_back(Staged {
                epoch,
                sync: self.sync == Some(epoch),
                generation: self.generation,
                lineage: self.lineage,
                stream: self.stream,
            });
            self.next_expected = Some(epoch.next());
            self.try_commit(ctx);
        } else {
            // Damaged or out of order: later incrementals cannot apply.
            ctx.log(Event::BadCheckpoint { epoch });
            match self.resumable() {
                true => self.rejoin_now(ctx),
                false => self.link_down(ctx, true),
            }
        }
    }

    /// Whether a broken stream can be continued: its sync is committed (before that, it is
    /// restarted as a fresh sync after `join_retry`).
    fn resumable(&self) -> bool {
        self.phase == BPhase::Protecting && self.token.is_some() && self.committed.is_some()
    }

    /// Close the broken stream (a damaged frame leaves a link whose bytes can no longer be
    /// trusted), keep the replica, and rejoin at once: the primary keeps a registered backup
    /// whose link closed registered for `Config::rejoin_grace`, output held, and continues its
    /// stream with a catch-up from the replica our `Join` offers.
    fn rejoin_now(&mut self, ctx: &mut Ctx<'_>) {
        self.link_down(ctx, true);
        self.phase = BPhase::Joining(JoinStep::Idle { retry_at: ctx.now });
    }

    fn try_commit(&mut self, ctx: &mut Ctx<'_>) {
        if self.committing.is_none() && !self.takeover_wanted {
            if let Some(s) = self.staged.pop_front() {
                // A sync starts a replica; every later commit of its stream descends from it.
                let since = match self.token {
                    Some(t) if !s.sync => t.since,
                    _ => s.epoch,
                };
                let replica = ReplicaAt {
                    generation: s.generation,
                    lineage: s.lineage,
                    since,
                    epoch: s.epoch,
                };
                ctx.act(Action::Commit {
                    epoch: s.epoch,
                    replica,
                });
                self.committing = Some(s);
            }
        }
    }

    fn ack(&mut self, ctx: &mut Ctx<'_>, epoch: Epoch) {
        if epoch > self.acked {
            self.acked = epoch;
            let msg = PeerMsg::Ack {
                generation: self.generation,
                epoch,
            };
            ctx.act(Action::Send {
                to: self.primary,
                msg,
            });
        }
    }

    fn on_committed(&mut self, ctx: &mut Ctx<'_>, epoch: Epoch) -> Option<Role> {
        let c = self.committing.filter(|c| c.epoch == epoch)?;
        self.committing = None;
        self.committed = Some(epoch);
        if c.sync {
            self.token = Some(Token {
                generation: c.generation,
                lineage: c.lineage,
                since: epoch,
            });
        }
        let current = c.stream == self.stream;
        if current && c.sync && self.phase == BPhase::Syncing {
            self.phase = BPhase::Protecting;
        }
        if current && self.phase == BPhase::Protecting {
            self.ack(ctx, epoch);
        }
        if self.takeover_wanted {
            return self.begin_takeover(ctx);
        }
        self.try_commit(ctx);
        None
    }

    fn on_timeout(&mut self, ctx: &mut Ctx<'_>) -> Option<Role> {
        match self.phase {
            BPhase::TakingOver => {
                if let Some(p) = self.takeover.as_mut() {
                    if ctx.now >= p.retry_at {
                        ctx.act(Action::ToWitness(p.request));
                        p.retry_at = ctx.now + ctx.cfg.witness_retry;
                    }
                }
                return None;
            }
            BPhase::Restoring { .. } => return None,
            _ => {}
        }
        if ctx.now >= self.last_heard + ctx.cfg.failure_timeout {
            return self.on_silence(ctx);
        }
        match self.phase {
            BPhase::Joining(JoinStep::Idle { retry_at }) if ctx.now >= retry_at => {
                self.connect(ctx)
            }
            BPhase::Joining(
                JoinStep::Connecting { deadline } | JoinStep::AwaitSync { deadline },
            ) if ctx.now >= deadline => self.link_down(ctx, true),
            BPhase::Syncing | BPhase::Protecting if ctx.now >= self.heartbeat_at => {
                let epoch = self.committed.unwrap_or(Epoch::NONE);
                let msg = PeerMsg::Heartbeat {
                    generation: self.generation,
                    epoch,
                };
                ctx.act(Action::Send {
                    to: self.primary,
                    msg,
                });
                self.heartbeat_at = ctx.now + ctx.cfg.heartbeat_interval;
            }
            _ => {}
        }
        None
    }

    /// The primary said nothing for `failure_timeout`.
    fn on_silence(&mut self, ctx: &mut Ctx<'_>) -> Option<Role> {
        ctx.log(Event::PeerLost { peer: self.primary });
        if !matches!(self.phase, BPhase::Joining(JoinStep::Idle { .. })) {
            ctx.act(Action::Disconnect { peer: self.primary });
        }
        self.discard_stream(ctx);
        let sync_landing = self.committing.is_some_and(|c| c.sync);
        if self.token.is_none() && !sync_landing {
            return Some(self.become_joiner(ctx));
        }
        self.phase = BPhase::TakingOver;
        if self.committing.is_some() {
            // Take over from the replica as it will be once this commit lands.
            self.takeover_wanted = true;
            return None;
        }
        self.begin_takeover(ctx)
    }

    fn begin_takeover(&mut self, ctx: &mut Ctx<'_>) -> Option<Role> {
        self.takeover_wanted = false;
        let (Some(token), Some(_)) = (self.token, self.committed) else {
            return Some(self.become_joiner(ctx));
        };
        if mutant!(ctx.cfg, FailoverWithoutWitness) {
            self.granted(ctx, token.generation.next());
            return None;
        }
        let backup = Registration {
            node: ctx.me,
            since: token.since,
        };
        let request = WitnessRequest::Takeover {
            generation: token.generation,
            backup,
        };
        ctx.act(Action::ToWitness(request));
        self.takeover = Some(Pending {
            request,
            retry_at: ctx.now + ctx.cfg.witness_retry,
        });
        None
    }

    fn on_reply(&mut self, ctx: &mut Ctx<'_>, reply: WitnessReply) -> Option<Role> {
        if reply.state.vm != ctx.cfg.vm || self.takeover.map(|p| p.request) != Some(reply.request) {
            return None;
        }
        self.takeover = None;
        if reply.granted {
            self.granted(ctx, reply.state.generation);
            None
        } else {
            // Dropped by the primary (or it never registered us): the replica may be older
            // than output already released, so it must never run. Start over as a joiner.
            ctx.log(Event::WitnessDenied(reply.request));
            self.spare = self.offer();
            self.token = None;
            self.committed = None;
            Some(self.become_joiner(ctx))
        }
    }

    fn granted(&mut self, ctx: &mut Ctx<'_>, new_generation: Generation) {
        let (Some(from), Some(token)) = (self.committed, self.token) else {
            return;
        };
        let generation = if mutant!(ctx.cfg, ReuseGeneration) {
            token.generation
        } else {
            new_generation
        };
        self.generation = generation;
        ctx.act(Action::SetOutputGate(Gate::Open));
        ctx.act(Action::StartVm { from, generation });
        self.phase = BPhase::Restoring { from, generation };
    }

    pub(crate) fn poll_timeout(&self, cfg: &Config) -> Option<Time> {
        match self.phase {
            BPhase::TakingOver => return self.takeover.map(|p| p.retry_at),
            BPhase::Restoring { .. } => return None,
            _ => {}
        }
        let silence = self.last_heard + cfg.failure_timeout;
        let other = match self.phase {
            BPhase::Joining(JoinStep::Idle { retry_at }) => retry_at,
            BPhase::Joining(
                JoinStep::Connecting { deadline } | JoinStep::AwaitSync { deadline },
            ) => deadline,
            _ => self.heartbeat_at,
        };
        Some(silence.min(other))
    }

    pub(crate) fn status(&self, me: NodeId) -> Status {
        let phase = match self.phase {
            BPhase::Joining(_) => Phase::Joining,
            BPhase::Syncing => Phase::Syncing,
            BPhase::Protecting => Phase::Protecting,
            BPhase::TakingOver => Phase::TakingOver,
            BPhase::Restoring { .. } => Phase::Restoring,
        };
        Status {
            node: me,
            role: RoleKind::Backup,
            phase,
            generation: self.generation,
            failed_over: false,
            peer: Some(self.primary),
            gate: None,
            running_epoch: Epoch::NONE,
            captured: Epoch::NONE,
            acked: self.acked,
            released: Epoch::NONE,
            committed: self.committed,
            registration: self.token.map(|t| Registration {
                node: me,
                since: t.since,
            }),
        }
    }
}

#[cfg(test)]
#[path = "backup_tests.rs"]
mod tests;
