//! The per-call context a role handler works in: configuration, identity, time, and the
//! actions it emits (in order).

use crate::action::{Action, Event};
use crate::config::Config;
use crate::ids::{Generation, NodeId};
use crate::msg::{PeerMsg, RejectReason};
use crate::time::Time;

pub(crate) struct Ctx<'a> {
    pub cfg: &'a Config,
    pub me: NodeId,
    pub now: Time,
    pub out: Vec<Action>,
}

impl<'a> Ctx<'a> {
    pub fn new(cfg: &'a Config, me: NodeId, now: Time) -> Ctx<'a> {
        Ctx {
            cfg,
            me,
            now,
            out: Vec::new(),
        }
    }

    pub fn act(&mut self, action: Action) {
        self.out.push(action);
    }

    pub fn log(&mut self, event: Event) {
        self.out.push(Action::Log(event));
    }

    /// Answers a `Join` from `to`: this node is not the primary (`generation` is the newest it
    /// knows, so the joiner can tell how stale its own view is).
    pub fn reject_join(&mut self, to: NodeId, generation: Generation) {
        let reason = RejectReason::NotPrimary;
        let msg = PeerMsg::Reject { generation, reason };
        self.act(Action::Send { to, msg });
    }
}
