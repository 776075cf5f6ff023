//! The fenced role: the VM on this host is stopped for good. A deposed primary may come back
//! as a joiner (and so re-protect the new primary) after `Config::rejoin_after_fence`.
//!
//! A fenced node is silent: it sends no heartbeat, ack or answer to anyone. A backup that still
//! follows it (the fence came from something other than its own takeover) must see nothing but
//! silence and closed links, so its failure detector fires within the failure timeout and it
//! asks the witness to take over. A `Join` is answered by closing its link: even a `Reject` is
//! bytes on the wire, and a driver may count any bytes as life.

use crate::action::Action;
use crate::ctx::Ctx;
use crate::ids::{Generation, NodeId};
use crate::input::Input;
use crate::joiner::Joiner;
use crate::msg::{PeerMsg, RejectReason};
use crate::node::Role;
use crate::status::{Phase, RoleKind, Status};
use crate::time::Time;

/// Why a node is fenced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceReason {
    /// The witness showed a newer generation (or another primary for ours): another node
    /// took over.
    Deposed {
        /// Newest generation seen.
        by: Generation,
    },
    /// A primary refused this node's join for a reason retrying cannot fix.
    Misconfigured(RejectReason),
}

/// A fenced node.
#[derive(Clone, Debug)]
pub struct Fenced {
    reason: FenceReason,
    generation: Generation,
    rejoin_at: Option<Time>,
}

impl Fenced {
    /// Enter the fenced role: emits `Fence` and schedules the rejoin if allowed.
    pub(crate) fn enter(ctx: &mut Ctx<'_>, reason: FenceReason, generation: Generation) -> Fenced {
        ctx.act(Action::Fence);
        let rejoin_at = match reason {
            FenceReason::Deposed { .. } => ctx.cfg.rejoin_after_fence.map(|d| ctx.now + d),
            FenceReason::Misconfigured(_) => None,
        };
        Fenced {
            reason,
            generation,
            rejoin_at,
        }
    }

    /// Why this node is fenced.
    pub fn reason(&self) -> FenceReason {
        self.reason
    }

    pub(crate) fn handle(&mut self, ctx: &mut Ctx<'_>, input: Input) -> Option<Role> {
        match input {
            Input::Timeout if self.rejoin_at.is_some_and(|t| ctx.now >= t) => {
                let mut j = Joiner::new();
                j.start(ctx);
                return Some(Role::Joiner(j));
            }
            // Whoever it is, it must not hear from us: close its link.
            Input::Message {
                from,
                msg: PeerMsg::Join { .. },
            } if from != ctx.me => ctx.act(Action::Disconnect { peer: from }),
            _ => {}
        }
        None
    }

    pub(crate) fn poll_timeout(&self) -> Option<Time> {
        self.rejoin_at
    }

    pub(crate) fn status(&self, me: NodeId) -> Status {
        Status::without_vm(me, RoleKind::Fenced, Phase::Fenced, self.generation)
    }
}
