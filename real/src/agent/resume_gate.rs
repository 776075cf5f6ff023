//! Holds the primary's VM paused in `paused-send` mode until its checkpoint is out.
//!
//! The model emits `ResumeVm` right after the capture (before `SendCheckpoint`); its docs allow a
//! paused-send driver to delay that resume until the checkpoint is sent. The pages of such a
//! checkpoint are read by the link's writer straight from the guest RAM mapping, so the VM must
//! not run until the writer reported the transport released them (`CheckpointSent`).
//!
//! A link that goes away (closed by the peer, dropped by the model, replaced) also ends the wait:
//! by then its socket is shut down, so nothing more can be queued from guest RAM, and bytes a
//! zero-copy send still reads from it would only reach a dying connection. Even then a page
//! changed under the transport cannot end up in a replica: the frame's checksum was computed over
//! the pages as they were when paused, so the backup rejects the torn frame. Waiting instead for
//! the transport to be dropped could keep the VM paused for the whole stall timeout of a dead
//! peer.

use ftvm_model::Epoch;

use super::event::ConnId;

/// The deferred resume and the checkpoints it waits for.
#[derive(Debug, Default)]
pub(super) struct ResumeGate {
    /// The epoch of the `ResumeVm` being held (frames are tagged with it once resumed).
    deferred: Option<Epoch>,
    /// Checkpoints being sent from guest RAM: (link, epoch).
    in_flight: Vec<(ConnId, Epoch)>,
}

impl ResumeGate {
    /// Holds a `ResumeVm { epoch }` of the model (a newer one replaces an older one: the VM never
    /// ran in between, so no frame carries the older tag).
    pub(super) fn defer(&mut self, epoch: Epoch) {
        self.deferred = Some(epoch);
    }

    /// Checkpoint `epoch` was queued on link `conn` with its pages in guest RAM.
    pub(super) fn sending(&mut self, conn: ConnId, epoch: Epoch) {
        self.in_flight.push((conn, epoch));
    }

    /// The writer reported checkpoint `epoch` sent and its buffers released.
    pub(super) fn sent(&mut self, epoch: Epoch) {
        if let Some(i) = self.in_flight.iter().position(|&(_, e)| e == epoch) {
            self.in_flight.remove(i);
        }
    }

    /// Link `conn` is gone: its sends no longer hold the VM (module docs).
    pub(super) fn link_gone(&mut self, conn: ConnId) {
        self.in_flight.retain(|&(c, _)| c != conn);
    }

    /// The resume to carry out now, if one is held and nothing it waits for is in flight.
    pub(super) fn due(&mut self) -> Option<Epoch> {
        if self.in_flight.is_empty() {
            self.deferred.take()
        } else {
            None
        }
    }

    /// Forgets everything (the VM was killed).
    pub(super) fn clear(&mut self) {
        *self = ResumeGate::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_waits_for_every_send_in_flight() {
        let mut g = ResumeGate::default();
        assert_eq!(g.due(), None);
        g.defer(Epoch(5));
        g.sending(ConnId(1), Epoch(4));
        assert_eq!(g.due(), None);
        g.sent(Epoch(3)); // not in flight: ignored
        assert_eq!(g.due(), None);
        g.sent(Epoch(4));
        assert_eq!(g.due(), Some(Epoch(5)));
        assert_eq!(g.due(), None, "a resume is carried out once");
    }

    #[test]
    fn nothing_in_flight_resumes_at_once() {
        let mut g = ResumeGate::default();
        g.defer(Epoch(2));
        assert_eq!(g.due(), Some(Epoch(2)));
    }

    #[test]
    fn a_lost_link_releases_only_its_own_sends() {
        let mut g = ResumeGate::default();
        g.sending(ConnId(1), Epoch(4));
        g.defer(Epoch(5));
        g.sending(ConnId(2), Epoch(5));
        g.defer(Epoch(6));
        g.link_gone(ConnId(1));
        assert_eq!(g.due(), None);
        g.link_gone(ConnId(2));
        assert_eq!(g.due(), Some(Epoch(6)), "the newest held resume wins");
    }

    #[test]
    fn clear_drops_the_held_resume() {
        let mut g = ResumeGate::default();
        g.defer(Epoch(2));
        g.sending(ConnId(1), Epoch(1));
        g.clear();
        assert_eq!(g.due(), None);
    }
}
