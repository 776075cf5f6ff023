//! `Node`: the state machine of one host, switching roles at failover, fencing and rejoin.

use crate::action::{Action, Event};
use crate::backup::Backup;
use crate::config::{Config, Start};
use crate::ctx::Ctx;
use crate::fenced::Fenced;
use crate::ids::{Generation, NodeId};
use crate::input::Input;
use crate::joiner::Joiner;
use crate::primary::Primary;
use crate::status::{Phase, Status};
use crate::time::Time;

/// The role a node holds now. Transitions: Backup → Primary (granted takeover), Primary →
/// Fenced (deposed), Backup → Joiner (replica given up), Joiner → Backup (witness named a
/// primary), Fenced → Joiner (after `Config::rejoin_after_fence`).
#[derive(Clone, Debug)]
pub enum Role {
    /// Runs the VM.
    Primary(Primary),
    /// Follows a primary.
    Backup(Backup),
    /// Looks for the primary through the witness.
    Joiner(Joiner),
    /// Stopped for good, maybe waiting to rejoin.
    Fenced(Fenced),
}

/// One host's protocol state machine. Deterministic: the same inputs at the same times give
/// the same actions.
#[derive(Clone, Debug)]
pub struct Node {
    cfg: Config,
    me: NodeId,
    role: Role,
    started: bool,
}

impl Node {
    /// A node for `me`. The start actions (e.g. `ResumeVm` of a fresh primary, `Connect` of a
    /// backup) come out of the first `handle` call, whatever its input; `poll_timeout` returns
    /// `Time::ZERO` until then, so a driver can simply start with `handle(now, Input::Timeout)`.
    pub fn new(config: Config, me: NodeId, start: Start) -> Node {
        let cfg = config.sanitized();
        let role = match start {
            Start::Primary => Role::Primary(Primary::fresh()),
            Start::Backup { primary } => Role::Backup(Backup::new(primary, Generation::UNKNOWN)),
            Start::Rejoin => Role::Joiner(Joiner::new()),
            Start::Resume { replica } => Role::Joiner(Joiner::with_replica(replica, true)),
        };
        Node {
            cfg,
            me,
            role,
            started: false,
        }
    }

    /// Feed one input; returns the actions to carry out, in order.
    pub fn handle(&mut self, now: Time, input: Input) -> Vec<Action> {
        let before = self.phase();
        let mut ctx = Ctx::new(&self.cfg, self.me, now);
        if !self.started {
            self.started = true;
            match &mut self.role {
                Role::Primary(r) => r.start(&mut ctx),
                Role::Backup(r) => r.start(&mut ctx),
                Role::Joiner(r) => r.start(&mut ctx),
                Role::Fenced(_) => {}
            }
        }
        let next = match &mut self.role {
            Role::Primary(r) => r.handle(&mut ctx, input),
            Role::Backup(r) => r.handle(&mut ctx, input),
            Role::Joiner(r) => r.handle(&mut ctx, input),
            Role::Fenced(r) => r.handle(&mut ctx, input),
        };
        // The new role's constructor has already emitted its entry actions into `ctx`.
        if let Some(role) = next {
            self.role = role;
        }
        let after = self.phase();
        if before != after {
            ctx.log(Event::Phase {
                from: before,
                to: after,
            });
        }
        ctx.out
    }

    /// When the driver must call `handle(t, Input::Timeout)` next (`None`: only on input).
    pub fn poll_timeout(&self) -> Option<Time> {
        if !self.started {
            return Some(Time::ZERO);
        }
        match &self.role {
            Role::Primary(r) => r.poll_timeout(&self.cfg),
            Role::Backup(r) => r.poll_timeout(&self.cfg),
            Role::Joiner(r) => r.poll_timeout(),
            Role::Fenced(r) => r.poll_timeout(),
        }
    }

    /// Snapshot for metrics and checkers.
    pub fn status(&self) -> Status {
        match &self.role {
            Role::Primary(r) => r.status(self.me),
            Role::Backup(r) => r.status(self.me),
            Role::Joiner(r) => r.status(self.me),
            Role::Fenced(r) => r.status(self.me),
        }
    }

    /// The current role (read-only).
    pub fn role(&self) -> &Role {
        &self.role
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.me
    }

    /// The configuration in force (after clamping).
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn phase(&self) -> Phase {
        self.status().phase
    }
}
