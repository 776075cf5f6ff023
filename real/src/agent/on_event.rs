//! What helper threads and tasks report, turned into model inputs by the driver core.

use std::collections::VecDeque;
use std::time::Instant;

use ftvm_driver::{Accepted, LinkEvent, Verdict};
use ftvm_model::Input;

use super::event::{ConnId, Event};
use super::vm::VmLauncher;
use super::{Agent, AgentError};
use crate::net::output::HeldFrame;

impl<L: VmLauncher> Agent<L> {
    pub(super) async fn on_event(
        &mut self,
        ev: Event,
        pending: &mut VecDeque<Input>,
    ) -> Result<(), AgentError> {
        match ev {
            Event::Accepted { conn, peer, link } => {
                // A connection speaks only as the node it authenticated as, and never displaces
                // the live link of our peer (the core's peer table decides).
                match self.driver.accepted(conn, peer) {
                    Accepted::Admitted(verdict) => {
                        self.links.insert(conn, link);
                        self.apply(verdict, pending);
                    }
                    Accepted::Refused => self.log(format_args!(
                        "refused a second link from node {peer}: its link is live"
                    )),
                }
            }
            Event::Connected { peer, conn, link } => {
                let verdict = self.driver.connected(conn, peer);
                if verdict != Verdict::Close(conn, None) {
                    self.links.insert(conn, link);
                }
                self.apply(verdict, pending);
            }
            Event::ConnectFailed { peer, conn, why } => {
                self.log(format_args!("connect to {peer} failed: {why}"));
                let verdict = self.driver.connect_failed(conn, peer);
                self.apply(verdict, pending);
            }
            Event::Heard { conn } => {
                let verdict = self.driver.heard(conn);
                self.apply(verdict, pending);
            }
            Event::Link { conn, event } => self.on_link(conn, event, pending),
            Event::PreCopied {
                epoch,
                staged,
                took,
            } => {
                tracing::debug!(
                    node = self.cfg.node.0,
                    "copied RAM ahead of the full capture of epoch {} in {} ms",
                    epoch.0,
                    took.as_millis()
                );
                self.pre_copied = Some((epoch, staged, took));
                pending.push_back(Input::PreCopied { epoch });
            }
            Event::BufferBack { staged } => {
                super::spare::keep_larger(&mut self.spare, staged);
            }
            Event::CheckpointSent {
                epoch,
                bytes,
                send_us,
                stats,
                cow,
                staged,
            } => {
                super::spare::keep_larger(&mut self.spare, staged);
                self.resume.sent(epoch);
                if let Some((m, sent)) = self.open_epochs.get_mut(&epoch.0) {
                    m.bytes = bytes;
                    m.send_us = send_us;
                    m.cow_copies = cow.copies;
                    m.cow_waits = cow.waits;
                    *sent = Some(Instant::now());
                    if let Some(sync) = m.last_sync() {
                        self.last_sync = Some(sync);
                    }
                }
                if stats.copied_completions > 0 && stats.zerocopy_active {
                    self.log(format_args!(
                        "transport: kernel copied {} zero-copy sends (loopback/veth path?)",
                        stats.copied_completions
                    ));
                }
                pending.push_back(Input::CheckpointSent { epoch });
            }
            Event::LinkClosed { conn, why } => {
                self.drop_conn(conn);
                let verdict = self.driver.closed(conn);
                if let Verdict::Feed(input) = verdict {
                    pending.push_back(input);
                }
                self.log(format_args!("link {conn:?} closed: {why}"));
            }
            Event::Witness(reply) => pending.push_back(Input::WitnessReply(reply)),
            Event::Committed { epoch, error } => match error {
                None => pending.push_back(Input::Committed { epoch }),
                Some(source) => {
                    return Err(AgentError::Commit {
                        epoch: epoch.0,
                        source,
                    })
                }
            },
            Event::VmFrame(frame) => self.vm_frame(frame, pending).await?,
            Event::WireFrame(frame) => {
                if let Some(net) = &self.net {
                    net.to_vm(&frame).await;
                }
            }
        }
        Ok(())
    }

    fn on_link(&mut self, conn: ConnId, event: LinkEvent, pending: &mut VecDeque<Input>) {
        if let LinkEvent::CheckpointDamaged { epoch, .. } = &event {
            // The model hears of it (and drops the stream); the link's closure follows.
            if let Some(peer) = self.driver.peer_of(conn) {
                tracing::warn!(
                    node = self.cfg.node.0,
                    epoch = epoch.0,
                    peer = peer.0,
                    "checkpoint dropped with its link"
                );
            }
        }
        let verdict = self.driver.on_link(conn, event);
        if let Verdict::Close(c, None) = verdict {
            self.log(format_args!(
                "dropped link {c:?}: its join named another node than it proved to be, or one with a live link"
            ));
        }
        self.apply(verdict, pending);
    }

    /// Carries out what the core said about a connection event.
    pub(super) fn apply(&mut self, verdict: Verdict<ConnId>, pending: &mut VecDeque<Input>) {
        match verdict {
            Verdict::Ignore => {}
            Verdict::Feed(input) => pending.push_back(input),
            Verdict::Close(conn, input) => {
                self.drop_conn(conn);
                pending.extend(input);
            }
        }
    }

    /// A frame from the VM goes to the gate; it leaves now only if the gate lets it. The node
    /// hears of the first frame held in an epoch (`OutputHeld`).
    async fn vm_frame(
        &mut self,
        frame: Vec<u8>,
        pending: &mut VecDeque<Input>,
    ) -> Result<(), AgentError> {
        let now = Instant::now();
        let frame = HeldFrame::new(frame, now);
        if self.driver.gate().is_fenced() {
            self.output.dropped([frame], now);
            return Ok(());
        }
        let t = self.now();
        let out = self.driver.emit(t, frame);
        pending.extend(out.feed);
        if let Some(f) = out.frame {
            // Journaled before it leaves (see `write_journal`).
            self.write_journal()?;
            let bytes = self.output.passed(f, now);
            if let Some(net) = &self.net {
                net.to_wire(vec![bytes]).await;
            }
        }
        Ok(())
    }
}
