//! The primary role (placeholder while the logic lands).

use crate::action::Gate;
use crate::config::Config;
use crate::ctx::Ctx;
use crate::ids::{Epoch, Generation, NodeId};
use crate::input::Input;
use crate::node::Role;
use crate::status::{Phase, RoleKind, Status};
use crate::time::Time;

/// A node running the VM.
#[derive(Clone, Debug)]
pub struct Primary {
    generation: Generation,
    epoch: Epoch,
}

impl Primary {
    pub(crate) fn fresh() -> Primary {
        Primary {
            generation: Generation::FIRST,
            epoch: Epoch::FIRST,
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
            role: RoleKind::Primary,
            phase: Phase::Waiting,
            generation: self.generation,
            failed_over: false,
            peer: None,
            gate: Some(Gate::Held),
            running_epoch: self.epoch,
            captured: Epoch::NONE,
            acked: Epoch::NONE,
            released: Epoch::NONE,
            committed: None,
            registration: None,
        }
    }
}
