//! The observer's picture of each node: its last reported model status, whether its host is
//! up, whether its VM runs, and when its phase or acks last moved.

use ftvm_model::{Generation, NodeId, Phase, RoleKind, Status, Time};

#[derive(Clone, Copy, Debug)]
pub(crate) struct NodeView {
    pub status: Option<Status>,
    pub alive: bool,
    pub vm_running: bool,
    /// When role, phase or generation last changed.
    pub phase_since: Time,
    /// When the acked epoch last grew (a protected primary making progress).
    pub acked_at: Time,
}

impl NodeView {
    pub fn new() -> NodeView {
        NodeView {
            status: None,
            alive: true,
            vm_running: false,
            phase_since: Time::ZERO,
            acked_at: Time::ZERO,
        }
    }

    pub fn update(&mut self, now: Time, s: Status, vm_running: bool) {
        if let Some(old) = self.status {
            if old.role != s.role || old.phase != s.phase || old.generation != s.generation {
                self.phase_since = now;
            }
            if s.acked > old.acked {
                self.acked_at = now;
            }
        } else {
            self.phase_since = now;
        }
        self.status = Some(s);
        self.vm_running = vm_running;
    }

    /// An up, unfenced primary: `(node, generation)`.
    pub fn as_primary(&self) -> Option<(NodeId, Generation)> {
        let s = self.status?;
        (self.alive && s.role == RoleKind::Primary && s.phase != Phase::Fenced)
            .then_some((s.node, s.generation))
    }
}
