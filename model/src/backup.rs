//! The backup role (placeholder while the logic lands).

use crate::config::Config;
use crate::ctx::Ctx;
use crate::ids::{Generation, NodeId};
use crate::input::Input;
use crate::node::Role;
use crate::status::{Phase, RoleKind, Status};
use crate::time::Time;

/// A node following a primary.
#[derive(Clone, Debug)]
pub struct Backup {
    primary: NodeId,
    generation: Generation,
}

impl Backup {
    pub(crate) fn new(primary: NodeId, known: Generation) -> Backup {
        Backup {
            primary,
            generation: known,
        }
    }

    pub(crate) fn start(&mut self, _ctx: &mut Ctx<'_>) {}

    pub(crate) fn handle(&mut self, _ctx: &mut Ctx<'_>, _input: Input) -> Option<Role> {
        None
    }

    pub(crate) fn poll_timeout(&self, _cfg: &Config) -> Option<Time> {
        None
    }

    pub(crate) fn status(&self, me: NodeId) -> Status {
        Status {
            node: me,
            role: RoleKind::Backup,
            phase: Phase::Joining,
            generation: self.generation,
            failed_over: false,
            peer: Some(self.primary),
            gate: None,
            running_epoch: Default::default(),
            captured: Default::default(),
            acked: Default::default(),
            released: Default::default(),
            committed: None,
            registration: None,
        }
    }
}
