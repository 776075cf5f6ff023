//! The joiner role: a node that does not know whom to follow asks the witness who the primary
//! is, then becomes that primary's backup (which connects and sends `Join`). A restarted
//! backup comes here with the replica it kept, to offer it to the primary.

use crate::action::Action;
use crate::backup::Backup;
use crate::ctx::Ctx;
use crate::ids::{Generation, NodeId};
use crate::input::Input;
use crate::msg::{PeerMsg, ReplicaAt};
use crate::node::Role;
use crate::status::{Phase, RoleKind, Status};
use crate::time::Time;
use crate::witness_msg::WitnessRequest;

/// A node locating the primary through the witness.
#[derive(Clone, Debug, Default)]
pub struct Joiner {
    known: Generation,
    retry_at: Option<Time>,
    /// A committed replica kept from before (a restart, or a denied takeover).
    replica: Option<ReplicaAt>,
    /// Its token may still be registered (a restarted backup process), so it may take over.
    token: bool,
}

impl Joiner {
    pub(crate) fn new() -> Joiner {
        Joiner::default()
    }

    pub(crate) fn with_replica(replica: ReplicaAt, token: bool) -> Joiner {
        Joiner {
            replica: Some(replica),
            token,
            ..Joiner::default()
        }
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
                    // A replica of an older generation can neither be caught up (another
                    // primary's history) nor take over (its token is void): start empty.
                    let mut b = match self.replica.filter(|r| r.generation == s.generation) {
                        Some(r) => Backup::resume(s.primary, s.generation, r, self.token),
                        None => Backup::new(s.primary, s.generation),
                    };
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
