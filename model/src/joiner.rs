//! The joiner role: a node without a usable replica asks the witness who the primary is, then
//! becomes that primary's backup (which connects and sends `Join`).

use crate::action::Action;
use crate::backup::Backup;
use crate::ctx::Ctx;
use crate::ids::{Generation, NodeId};
use crate::input::Input;
use crate::msg::PeerMsg;
use crate::node::Role;
use crate::status::{Phase, RoleKind, Status};
use crate::time::Time;
use crate::witness_msg::WitnessRequest;

/// A node locating the primary through the witness.
#[derive(Clone, Debug, Default)]
pub struct Joiner {
    known: Generation,
    retry_at: Option<Time>,
}

impl Joiner {
    pub(crate) fn new() -> Joiner {
        Joiner::default()
    }

    /// Ask the witness (and keep asking every `witness_retry`).
    pub(crate) fn start(&mut self, ctx: &mut Ctx<'_>) {
        self.query(ctx);
    }

    fn query(&mut self, ctx: &mut Ctx<'_>) {
        ctx.act(Action::ToWitness(WitnessRequest::Query));
        self.retry_at = Some(ctx.now + ctx.cfg.witness_retry);
    }

    pub(crate) fn handle(&mut self, ctx: &mut Ctx<'_>, input: Input) -> Option<Role> {
        match input {
            Input::Timeout if self.retry_at.is_some_and(|t| ctx.now >= t) => self.query(ctx),
            Input::WitnessReply(reply) if reply.request == WitnessRequest::Query => {
                let s = reply.state;
                if s.vm != ctx.cfg.vm {
                    return None; // a misrouted reply; keep asking
                }
                self.known = self.known.max(s.generation);
                // The witness may still name us (we were primary and restarted): our backup,
                // if any, takes over after the failure timeout; keep asking until it has.
                if s.primary != ctx.me {
                    let mut b = Backup::new(s.primary, s.generation);
                    b.start(ctx);
                    return Some(Role::Backup(b));
                }
            }
            Input::Message {
                from,
                msg: PeerMsg::Join { .. },
            } => ctx.reject_join(from, self.known),
            _ => {}
        }
        None
    }

    pub(crate) fn poll_timeout(&self) -> Option<Time> {
        self.retry_at
    }

    pub(crate) fn status(&self, me: NodeId) -> Status {
        Status::without_vm(me, RoleKind::Joiner, Phase::Locating, self.known)
    }
}
