//! The witness: the fencing party that decides, per VM, who may run it.
//!
//! # The register
//!
//! One linearizable compare-and-set register per VM, [`WitnessState`]:
//! `{ generation, primary, backup: Option<Registration>, floor, promoted }`, initially
//! `{ 1, P, None, 0, None }`. A [`Registration`](crate::Registration) is a backup node plus its *token* `since`, the
//! epoch of the full checkpoint its replica was synced from. Requests:
//!
//! * `RegisterBackup { g, P, (B, e) }` — granted iff `g == generation`, `P == primary`, and either
//!   `backup == (B, e)` already (a resend) or `backup == None && e > floor`. Sets `backup`.
//! * `DropBackup { g, P, (B, e) }` — granted iff `g == generation`, `P == primary` and the current
//!   registration (if any) has `since <= e`. Sets `backup = None`, `floor = max(floor, e)`.
//! * `Takeover { g, (B, e) }` — granted iff `g == generation && backup == (B, e)`: sets
//!   `generation = g + 1, primary = B, backup = None, floor = 0, promoted = (B, e)`. A resend
//!   after that is granted again (`generation == g + 1 && promoted == (B, e)`). Denied with
//!   `g == generation` it raises `floor` to `e`: the backup gives its replica up on a denial,
//!   so its token must never become registrable later.
//! * `Query` — always granted, changes nothing.
//!
//! Every reply carries the request it answers, `granted`, and the state after it. Handling is
//! a pure function of (state, request): [`Witness::handle`] is the linearization point, and a
//! driver that persists [`Witness::state`] before it sends the reply keeps the register
//! linearizable across witness restarts.
//!
//! # Why the rule is safe
//!
//! The properties that matter (the invariants of docs/ARCHITECTURE.md, Safety argument) and
//! why they hold, assuming only that the driver calls `handle` one request at a time,
//! persists the state before replying, and that the network may delay, drop, duplicate and
//! reorder requests and replies arbitrarily:
//!
//! 1. **At most one primary may release output per generation.** A node acts as primary of
//!    generation `g` only if it started `g` (generation 1's initial primary) or holds a granted
//!    `Takeover { g - 1, .. }`, and a takeover of `g - 1` is granted for exactly one
//!    registration: the grant moves `generation` to `g`, so no other request naming `g - 1`
//!    can succeed afterwards. Generations only grow.
//!
//! 2. **Only the registered backup can take over, and the primary knows whenever none can.**
//!    The primary opens its gate (releases unacked output) only after a reply showing
//!    `{ its generation, itself, backup: None }` *and* with its newest token `e_max` dropped
//!    (granted `DropBackup(e_max)` ⇒ `floor >= e_max`), or right after its own takeover (no
//!    registration of the new generation exists yet). From then on no `RegisterBackup` it ever
//!    sent can apply: each carries a token `<= e_max <= floor`, so a late duplicate is refused.
//!    And no `Takeover { g, .. }` can succeed while `backup == None`. The backup can therefore
//!    never resume from an epoch older than what the open gate let out. Conversely, if a
//!    `Takeover` won the race, the primary's `DropBackup` is refused (generation moved on),
//!    and the primary fences itself instead of opening the gate.
//!
//! 3. **What a client saw is never lost by a failover.** While a backup is (or may be)
//!    registered, the primary releases epoch `N` only after that backup acked `N`, and the
//!    backup acks only after `N` is durably committed; after a granted takeover it resumes
//!    from its last committed epoch, which is `>= N`. A backup whose takeover is denied throws
//!    its replica away, and the denial voids its token (`floor`), so the primary's possibly
//!    still travelling `RegisterBackup` for that token cannot later name a backup that has no
//!    replica — which would otherwise let nobody take over while the primary believes it is
//!    protected.
//!
//! 4. **Stale and duplicate requests are harmless.** `RegisterBackup` applies once (equality or
//!    `since > floor`), `DropBackup` never removes a newer registration (`since` comparison),
//!    `Takeover` needs the exact registration of the current generation. A resend of a request
//!    that already took effect is answered "granted" without changing anything, so a node that
//!    lost the first reply learns the truth. Tokens are unique within a generation because
//!    every sync uses a fresh epoch, and requests of older generations never match.
//!
//! Liveness needs the witness reachable: a primary that cannot reach it keeps output held
//! (its VM keeps running), and a backup that cannot reach it does not fail over. That is the
//! price of never needing a lease or synchronized clocks.

use crate::ids::{Epoch, NodeId, VmId};
use crate::mutants::mutant;
use crate::time::Time;
use crate::witness_msg::{WitnessReply, WitnessRequest, WitnessState};

/// The fencing party for one VM (a driver serving several VMs keeps one per `VmId`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Witness {
    state: WitnessState,
    /// A planted bug (test builds only).
    #[cfg(feature = "mutants")]
    mutant: Option<crate::mutants::Mutant>,
}

impl Witness {
    /// A fresh VM whose first primary is `primary`: `{1, primary, None}`.
    pub fn new(vm: VmId, primary: NodeId) -> Witness {
        Witness::from_state(WitnessState::initial(vm, primary))
    }

    /// Resume from a persisted register.
    pub fn from_state(state: WitnessState) -> Witness {
        Witness {
            state,
            #[cfg(feature = "mutants")]
            mutant: None,
        }
    }

    /// The same witness with `mutant` planted (test builds only).
    #[cfg(feature = "mutants")]
    pub fn with_mutant(mut self, mutant: Option<crate::mutants::Mutant>) -> Witness {
        self.mutant = mutant;
        self
    }

    /// The register; persist it after every `handle` that changed it, before replying.
    pub fn state(&self) -> &WitnessState {
        &self.state
    }

    /// Apply one request that node `from` was proven to send (drivers authenticate the
    /// connection), after checking that `from` may make it: only the node a request names as its
    /// sender may send it — the primary its `RegisterBackup` and `DropBackup`, the backup its
    /// `Takeover`; anyone configured may `Query`. A request from another node is denied without
    /// touching the register (in particular a forged `Takeover` does not raise `floor`: the
    /// named backup did not give its replica up).
    pub fn handle_from(
        &mut self,
        now: Time,
        from: NodeId,
        request: WitnessRequest,
    ) -> WitnessReply {
        if request.sender().is_some_and(|s| s != from) {
            return WitnessReply {
                request,
                granted: false,
                state: self.state,
            };
        }
        self.handle(now, request)
    }

    /// Apply one request atomically and answer it. `now` is unused: the rule needs no clock.
    /// The sender is not checked: drivers that can tell who sent it call [`Witness::handle_from`].
    pub fn handle(&mut self, _now: Time, request: WitnessRequest) -> WitnessReply {
        let granted = self.apply(request);
        WitnessReply {
            request,
            granted,
            state: self.state,
        }
    }

    fn apply(&mut self, request: WitnessRequest) -> bool {
        let drop_keeps_floor = mutant!(self, DropKeepsFloor);
        let denial_keeps_floor = mutant!(self, DenialKeepsFloor);
        let s = &mut self.state;
        match request {
            WitnessRequest::Query => true,
            WitnessRequest::RegisterBackup {
                generation,
                primary,
                backup,
            } => {
                if generation != s.generation || primary != s.primary {
                    false
                } else if s.backup == Some(backup) {
                    true
                } else if s.backup.is_none() && backup.since > s.floor {
                    s.backup = Some(backup);
                    true
                } else {
                    false
                }
            }
            WitnessRequest::DropBackup {
                generation,
                primary,
                backup,
            } => {
                if generation != s.generation || primary != s.primary {
                    false
                } else if s.backup.is_some_and(|r| r.since > backup.since) {
                    // A registration newer than anything this request knows of: a stale drop.
                    false
                } else {
                    s.backup = None;
                    if !drop_keeps_floor {
                        s.floor = s.floor.max(backup.since);
                    }
                    true
                }
            }
            WitnessRequest::Takeover { generation, backup } => {
                if generation == s.generation
                    && s.backup == Some(backup)
                    && generation.next() != generation
                {
                    s.generation = generation.next();
                    s.primary = backup.node;
                    s.backup = None;
                    s.floor = Epoch::NONE;
                    s.promoted = Some(backup);
                    true
                } else if s.generation == generation.next()
                    && s.generation != generation
                    && s.promoted == Some(backup)
                {
                    true
                } else {
                    if generation == s.generation && !denial_keeps_floor {
                        s.floor = s.floor.max(backup.since);
                    }
                    false
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Generation;
    use crate::witness_msg::Registration;

    #[test]
    fn only_the_named_sender_may_make_a_request() {
        let mut w = Witness::new(VM, P);
        // B forging the primary's registration of itself: denied, nothing changes.
        let r = w.handle_from(T, B, register(1, P, reg(B, 5)));
        assert!(!r.granted);
        assert_eq!(w.state(), &WitnessState::initial(VM, P));
        // The primary's own request goes through.
        assert!(w.handle_from(T, P, register(1, P, reg(B, 5))).granted);
        // C forging B's takeover, or P taking over as B: denied, floor untouched.
        let take = WitnessRequest::Takeover {
            generation: Generation(1),
            backup: reg(B, 5),
        };
        let before = *w.state();
        assert!(!w.handle_from(T, C, take).granted);
        assert!(!w.handle_from(T, P, take).granted);
        assert_eq!(w.state(), &before);
        // C forging the primary's drop: denied, B stays registered.
        assert!(!w.handle_from(T, C, drop_(1, P, reg(B, 5))).granted);
        assert_eq!(w.state().backup, Some(reg(B, 5)));
        // Anyone may read the register; B's own takeover is granted.
        assert!(w.handle_from(T, C, WitnessRequest::Query).granted);
        assert!(w.handle_from(T, B, take).granted);
        assert_eq!(w.state().primary, B);
    }

    const VM: VmId = VmId(7);
    const P: NodeId = NodeId(1);
    const B: NodeId = NodeId(2);
    const C: NodeId = NodeId(3);
    const T: Time = Time::ZERO;

    fn reg(node: NodeId, since: u64) -> Registration {
        Registration {
            node,
            since: Epoch(since),
        }
    }
    fn register(g: u64, primary: NodeId, backup: Registration) -> WitnessRequest {
        WitnessRequest::RegisterBackup {
            generation: Generation(g),
            primary,
            backup,
        }
    }
    fn drop_(g: u64, primary: NodeId, backup: Registration) -> WitnessRequest {
        WitnessRequest::DropBackup {
            generation: Generation(g),
            primary,
            backup,
        }
    }
    fn takeover(g: u64, backup: Registration) -> WitnessRequest {
        WitnessRequest::Takeover {
            generation: Generation(g),
            backup,
        }
    }

    #[test]
    fn initial_state_and_query() {
        let mut w = Witness::new(VM, P);
        let r = w.handle(T, WitnessRequest::Query);
        assert!(r.granted);
        assert_eq!(r.request, WitnessRequest::Query);
        assert_eq!(r.state, WitnessState::initial(VM, P));
        assert_eq!(r.state.generation, Generation(1));
        assert_eq!(r.state.backup, None);
    }

    #[test]
    fn register_then_takeover_bumps_generation() {
        let mut w = Witness::new(VM, P);
        assert!(w.handle(T, register(1, P, reg(B, 5))).granted);
        assert_eq!(w.state().backup, Some(reg(B, 5)));
        let r = w.handle(T, takeover(1, reg(B, 5)));
        assert!(r.granted);
        assert_eq!(r.state.generation, Generation(2));
        assert_eq!(r.state.primary, B);
        assert_eq!(r.state.backup, None);
        assert_eq!(r.state.promoted, Some(reg(B, 5)));
        // The old primary is now refused everything.
        assert!(!w.handle(T, drop_(1, P, reg(B, 5))).granted);
        assert!(!w.handle(T, register(1, P, reg(C, 9))).granted);
    }

    #[test]
    fn only_the_current_primary_registers_and_only_one_backup() {
        let mut w = Witness::new(VM, P);
        assert!(
            !w.handle(T, register(1, B, reg(C, 5))).granted,
            "not the primary"
        );
        assert!(
            !w.handle(T, register(2, P, reg(C, 5))).granted,
            "wrong generation"
        );
        assert!(w.handle(T, register(1, P, reg(B, 5))).granted);
        assert!(
            w.handle(T, register(1, P, reg(B, 5))).granted,
            "a resend is idempotent"
        );
        assert!(
            !w.handle(T, register(1, P, reg(C, 6))).granted,
            "a second backup"
        );
        assert_eq!(w.state().backup, Some(reg(B, 5)));
    }

    #[test]
    fn takeover_needs_the_exact_registration() {
        let mut w = Witness::new(VM, P);
        assert!(
            !w.handle(T, takeover(1, reg(B, 5))).granted,
            "nobody registered"
        );
        assert!(w.handle(T, register(1, P, reg(B, 6))).granted);
        assert!(!w.handle(T, takeover(1, reg(C, 6))).granted, "other node");
        assert!(
            !w.handle(T, takeover(0, reg(B, 6))).granted,
            "other generation"
        );
        assert_eq!(w.state().generation, Generation(1));
        assert!(w.handle(T, takeover(1, reg(B, 6))).granted);
    }

    #[test]
    fn takeover_resend_is_granted_again_but_not_after_a_further_failover() {
        let mut w = Witness::new(VM, P);
        w.handle(T, register(1, P, reg(B, 5)));
        assert!(w.handle(T, takeover(1, reg(B, 5))).granted);
        let again = w.handle(T, takeover(1, reg(B, 5)));
        assert!(again.granted);
        assert_eq!(again.state.generation, Generation(2));
        // B (primary of 2) registers C, C takes over: B's old request is now history.
        assert!(w.handle(T, register(2, B, reg(C, 40))).granted);
        assert!(w.handle(T, takeover(2, reg(C, 40))).granted);
        assert!(!w.handle(T, takeover(1, reg(B, 5))).granted);
        assert_eq!(w.state().generation, Generation(3));
        assert_eq!(w.state().primary, C);
    }

    #[test]
    fn drop_wins_the_race_against_takeover() {
        let mut w = Witness::new(VM, P);
        w.handle(T, register(1, P, reg(B, 5)));
        assert!(w.handle(T, drop_(1, P, reg(B, 5))).granted);
        let r = w.handle(T, takeover(1, reg(B, 5)));
        assert!(!r.granted);
        assert_eq!(r.state.primary, P);
        assert_eq!(r.state.generation, Generation(1));
    }

    #[test]
    fn takeover_wins_the_race_against_drop() {
        let mut w = Witness::new(VM, P);
        w.handle(T, register(1, P, reg(B, 5)));
        assert!(w.handle(T, takeover(1, reg(B, 5))).granted);
        let r = w.handle(T, drop_(1, P, reg(B, 5)));
        assert!(!r.granted);
        assert_eq!(
            r.state.generation,
            Generation(2),
            "the reply shows the primary it is deposed"
        );
    }

    #[test]
    fn late_duplicate_register_cannot_resurrect_a_dropped_backup() {
        let mut w = Witness::new(VM, P);
        assert!(w.handle(T, register(1, P, reg(B, 5))).granted);
        assert!(w.handle(T, drop_(1, P, reg(B, 5))).granted);
        assert_eq!(w.state().floor, Epoch(5));
        // A copy of the register that was held up in the network arrives now.
        assert!(!w.handle(T, register(1, P, reg(B, 5))).granted);
        assert_eq!(w.state().backup, None);
        // A newer sync of the same node registers fine.
        assert!(w.handle(T, register(1, P, reg(B, 9))).granted);
    }

    #[test]
    fn drop_before_its_register_arrives_voids_the_register() {
        let mut w = Witness::new(VM, P);
        // The joiner vanished while the register was travelling; the primary drops at once.
        assert!(w.handle(T, drop_(1, P, reg(B, 5))).granted);
        assert!(!w.handle(T, register(1, P, reg(B, 5))).granted);
        assert_eq!(w.state().backup, None);
    }

    #[test]
    fn stale_drop_leaves_a_newer_registration_alone() {
        let mut w = Witness::new(VM, P);
        w.handle(T, register(1, P, reg(B, 5)));
        w.handle(T, drop_(1, P, reg(B, 5)));
        assert!(w.handle(T, register(1, P, reg(B, 9))).granted);
        assert!(!w.handle(T, drop_(1, P, reg(B, 5))).granted);
        assert_eq!(w.state().backup, Some(reg(B, 9)));
        assert!(
            w.handle(T, drop_(1, P, reg(B, 9))).granted,
            "a drop naming the newest token"
        );
        assert!(
            w.handle(T, drop_(1, P, reg(B, 9))).granted,
            "and its resend"
        );
    }

    #[test]
    fn denied_takeover_voids_its_token() {
        let mut w = Witness::new(VM, P);
        // B asks before P's register (for the same sync) reached the witness: denied ...
        assert!(!w.handle(T, takeover(1, reg(B, 5))).granted);
        // ... and B throws its replica away, so the register must not make it the backup.
        assert!(!w.handle(T, register(1, P, reg(B, 5))).granted);
        // Nor can a duplicate of the takeover succeed later.
        assert!(!w.handle(T, takeover(1, reg(B, 5))).granted);
        assert_eq!(w.state().generation, Generation(1));
    }

    #[test]
    fn denied_takeover_of_an_old_generation_changes_nothing() {
        let mut w = Witness::new(VM, P);
        w.handle(T, register(1, P, reg(B, 5)));
        w.handle(T, takeover(1, reg(B, 5)));
        let before = *w.state();
        assert!(!w.handle(T, takeover(1, reg(C, 50))).granted);
        assert_eq!(*w.state(), before);
    }

    /// The planted floor bugs open exactly the holes the module docs close: a late
    /// registration after a drop, or after a denied takeover, goes through.
    #[cfg(feature = "mutants")]
    #[test]
    fn floor_mutants_let_a_late_registration_through() {
        use crate::mutants::Mutant;
        let sound = || Witness::new(VM, P);
        let planted = |m| Witness::new(VM, P).with_mutant(Some(m));
        for (m, mut w) in [
            (
                Some(Mutant::DropKeepsFloor),
                planted(Mutant::DropKeepsFloor),
            ),
            (None, sound()),
        ] {
            assert!(w.handle(T, register(1, P, reg(B, 5))).granted);
            assert!(w.handle(T, drop_(1, P, reg(B, 5))).granted);
            let late = w.handle(T, register(1, P, reg(B, 5))).granted;
            assert_eq!(late, m.is_some(), "{m:?}: late register after a drop");
        }
        for (m, mut w) in [
            (
                Some(Mutant::DenialKeepsFloor),
                planted(Mutant::DenialKeepsFloor),
            ),
            (None, sound()),
        ] {
            assert!(!w.handle(T, takeover(1, reg(B, 5))).granted);
            let late = w.handle(T, register(1, P, reg(B, 5))).granted;
            assert_eq!(late, m.is_some(), "{m:?}: late register after a denial");
        }
        // Each bug leaves the other rule alone.
        let mut w = planted(Mutant::DenialKeepsFloor);
        w.handle(T, register(1, P, reg(B, 5)));
        w.handle(T, drop_(1, P, reg(B, 5)));
        assert!(!w.handle(T, register(1, P, reg(B, 5))).granted);
        let mut w = planted(Mutant::DropKeepsFloor);
        w.handle(T, takeover(1, reg(B, 5)));
        assert!(!w.handle(T, register(1, P, reg(B, 5))).granted);
    }

    #[test]
    fn state_survives_a_restart() {
        let mut w = Witness::new(VM, P);
        w.handle(T, register(1, P, reg(B, 5)));
        let saved = *w.state();
        let mut w2 = Witness::from_state(saved);
        assert!(w2.handle(T, takeover(1, reg(B, 5))).granted);
        assert_eq!(w2.state().primary, B);
    }
}
