//! The per-call context a role handler works in: configuration, identity, time, and the
//! actions it emits (in order).

use crate::action::{Action, Event};
use crate::config::Config;
use crate::ids::NodeId;
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
}
