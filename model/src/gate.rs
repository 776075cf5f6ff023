//! Reference semantics of the output gate: which frames the VM emitted may leave the host,
//! given the node's actions. Drivers can use it as their gate's bookkeeping; checkers use it
//! to decide what counts as *released output*.

use std::collections::VecDeque;

use crate::action::{Action, Gate};
use crate::ids::Epoch;

/// Frames of one host's VM, tagged with the epoch they were emitted in.
///
/// Feed every [`Action`] of the host's node to [`OutputGate::apply`] (in order) and every frame
/// the VM emits to [`OutputGate::emit`]; what these return has been released.
#[derive(Clone, Debug)]
pub struct OutputGate<T> {
    gate: Gate,
    tag: Epoch,
    /// Highest epoch released (none before the first `ReleaseOutput`).
    released_through: Option<Epoch>,
    held: VecDeque<(Epoch, T)>,
    fenced: bool,
}

impl<T> Default for OutputGate<T> {
    fn default() -> Self {
        OutputGate::new()
    }
}

impl<T> OutputGate<T> {
    /// Gate held, nothing released, frames tagged `Epoch::NONE` until a `ResumeVm`/`StartVm`.
    pub fn new() -> OutputGate<T> {
        OutputGate {
            gate: Gate::Held,
            tag: Epoch::NONE,
            released_through: None,
            held: VecDeque::new(),
            fenced: false,
        }
    }

    /// Apply one node action; returns the frames it released (in emission order).
    pub fn apply(&mut self, action: &Action) -> Vec<T> {
        self.apply_tagged(action)
            .into_iter()
            .map(|(_, f)| f)
            .collect()
    }

    /// [`OutputGate::apply`], with the epoch tag of each frame released.
    pub fn apply_tagged(&mut self, action: &Action) -> Vec<(Epoch, T)> {
        match *action {
            Action::ResumeVm { epoch } => self.tag = epoch,
            Action::StartVm { from, .. } => self.tag = from.next(),
            Action::ReleaseOutput { through } if !self.fenced => {
                self.released_through = self.released_through.max(Some(through));
                let mut out = Vec::new();
                while self.held.front().is_some_and(|(tag, _)| *tag <= through) {
                    out.extend(self.held.pop_front());
                }
                return out;
            }
            Action::SetOutputGate(gate) if !self.fenced => {
                self.gate = gate;
                if gate == Gate::Open {
                    return self.held.drain(..).collect();
                }
            }
            Action::Fence => {
                self.fenced = true;
                self.held.clear();
            }
            _ => {}
        }
        Vec::new()
    }

    /// The VM emitted `frame` now: returns it if it may leave at once, otherwise holds it.
    /// A fenced host drops it.
    pub fn emit(&mut self, frame: T) -> Option<T> {
        if self.fenced {
            None
        } else if self.gate == Gate::Open || self.released_through.is_some_and(|r| self.tag <= r) {
            Some(frame)
        } else {
            self.held.push_back((self.tag, frame));
            None
        }
    }

    /// Takes every held frame out of the gate without releasing it (a driver that must account
    /// for frames a `Fence` is about to drop calls it first).
    pub fn take_held(&mut self) -> Vec<T> {
        self.held.drain(..).map(|(_, f)| f).collect()
    }

    /// Tag of frames emitted now.
    pub fn tag(&self) -> Epoch {
        self.tag
    }

    /// Current gate state.
    pub fn gate(&self) -> Gate {
        self.gate
    }

    /// Highest `ReleaseOutput` seen (`Epoch::NONE` before the first).
    pub fn released_through(&self) -> Epoch {
        self.released_through.unwrap_or(Epoch::NONE)
    }

    /// Frames waiting.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// After `Fence`: nothing ever leaves again.
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Generation;

    #[test]
    fn held_frames_leave_in_order_when_their_epoch_is_released() {
        let mut g = OutputGate::new();
        g.apply(&Action::SetOutputGate(Gate::Held));
        g.apply(&Action::ResumeVm { epoch: Epoch(1) });
        assert_eq!(g.emit("a"), None);
        g.apply(&Action::ResumeVm { epoch: Epoch(2) });
        assert_eq!(g.emit("b"), None);
        assert_eq!(g.held(), 2);
        assert_eq!(
            g.apply(&Action::ReleaseOutput { through: Epoch(1) }),
            vec!["a"]
        );
        assert_eq!(
            g.apply(&Action::ReleaseOutput { through: Epoch(1) }),
            Vec::<&str>::new()
        );
        assert_eq!(
            g.apply(&Action::ReleaseOutput { through: Epoch(2) }),
            vec!["b"]
        );
        assert_eq!(g.released_through(), Epoch(2));
    }

    #[test]
    fn opening_releases_everything_and_passes_new_frames() {
        let mut g = OutputGate::new();
        g.apply(&Action::ResumeVm { epoch: Epoch(4) });
        assert_eq!(g.emit(1), None);
        assert_eq!(g.apply(&Action::SetOutputGate(Gate::Open)), vec![1]);
        assert_eq!(g.emit(2), Some(2));
        g.apply(&Action::SetOutputGate(Gate::Held));
        assert_eq!(g.emit(3), None);
        assert_eq!(g.tag(), Epoch(4));
    }

    #[test]
    fn fence_drops_everything_forever() {
        let mut g = OutputGate::new();
        g.apply(&Action::ResumeVm { epoch: Epoch(1) });
        g.emit(1);
        g.apply(&Action::Fence);
        assert!(g.is_fenced());
        assert_eq!(
            g.apply(&Action::SetOutputGate(Gate::Open)),
            Vec::<i32>::new()
        );
        assert_eq!(g.emit(2), None);
        assert_eq!(g.held(), 0);
    }

    #[test]
    fn nothing_passes_before_the_first_release_and_late_frames_of_released_epochs_pass() {
        let mut g = OutputGate::new();
        assert_eq!(g.emit(1), None, "untagged frames wait too");
        g.apply(&Action::ResumeVm { epoch: Epoch(2) });
        assert_eq!(g.emit(2), None);
        assert_eq!(
            g.apply(&Action::ReleaseOutput { through: Epoch(2) }),
            vec![1, 2]
        );
        assert_eq!(g.emit(3), Some(3), "its epoch is released already");
    }

    #[test]
    fn start_vm_tags_the_next_epoch() {
        let mut g: OutputGate<u8> = OutputGate::new();
        g.apply(&Action::StartVm {
            from: Epoch(9),
            generation: Generation(2),
        });
        assert_eq!(g.tag(), Epoch(10));
    }
}
