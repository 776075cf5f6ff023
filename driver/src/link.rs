//! The one path from a checkpoint link's bytes to what the node hears: frames are decoded
//! (with the generation floor raised by every `SyncStart`), control messages pass up, and
//! checkpoint items are staged under the VM's bounds until a checkpoint ends whole or is given
//! up. Both executors feed it what their sockets read; neither decodes frames itself.

use std::fmt;

use ftvm_model::wire::{Item, StreamDecoder, WireError};
use ftvm_model::{Epoch, Generation, PeerMsg};

use crate::checkpoint::StagedCheckpoint;
use crate::staging::{CheckpointAssembler, Staged, StagingError, StagingLimits};

/// A frame decoder for one link direction: the model's [`StreamDecoder`], or one that first
/// authenticates or decrypts what it decodes (the real agent's).
pub trait ItemDecoder {
    /// Why the stream is unusable.
    type Error: fmt::Display;
    /// Consumes a prefix of `input` (or input it already holds) and yields at most one item.
    fn decode<'a>(&'a mut self, input: &'a [u8]) -> Result<(usize, Option<Item<'a>>), Self::Error>;
    /// Whether it holds input it has not yielded yet (call `decode` again even with no input).
    fn pending(&self) -> bool {
        false
    }
    /// Refuses frames of generations below `generation` from now on.
    fn set_min_generation(&mut self, generation: Generation);
    /// The stream ended: fine only between frames.
    fn finish(&self) -> Result<(), Self::Error>;
}

impl ItemDecoder for StreamDecoder {
    type Error = WireError;

    fn decode<'a>(&'a mut self, input: &'a [u8]) -> Result<(usize, Option<Item<'a>>), WireError> {
        StreamDecoder::decode(self, input)
    }

    fn set_min_generation(&mut self, generation: Generation) {
        StreamDecoder::set_min_generation(self, generation)
    }

    fn finish(&self) -> Result<(), WireError> {
        StreamDecoder::finish(self)
    }
}

/// What a link delivered.
#[derive(Debug)]
pub enum LinkEvent {
    /// A control message.
    Message(PeerMsg),
    /// A checkpoint passed its first checks and began to arrive.
    CheckpointStarted(Epoch),
    /// A checkpoint arrived whole and verified.
    CheckpointReceived(StagedCheckpoint),
    /// A checkpoint was given up: damaged bytes, refused by staging, or the link ended inside
    /// it. The link is unusable after this.
    CheckpointDamaged {
        /// Its epoch.
        epoch: Epoch,
        /// What of it arrived.
        partial: Option<StagedCheckpoint>,
    },
}

/// Why a link's stream cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum LinkError<E: fmt::Display + fmt::Debug> {
    /// The decoder refused the bytes (damaged, forged, foreign or stale frames).
    #[error("bad frame: {0}")]
    Frame(E),
    /// A checkpoint broke the VM's bounds.
    #[error(transparent)]
    Staging(#[from] StagingError),
    /// Witness traffic on a checkpoint link.
    #[error("witness frame on a checkpoint link")]
    WitnessFrame,
    /// The stream ended inside a frame.
    #[error("closed mid-frame: {0}")]
    Truncated(E),
}

/// The reading side of one checkpoint link.
#[derive(Debug)]
pub struct LinkReader<D> {
    dec: D,
    assembler: CheckpointAssembler,
    floor: Generation,
    failed: bool,
}

impl<D: ItemDecoder> LinkReader<D>
where
    D::Error: fmt::Debug,
{
    /// A reader of frames decoded by `dec`, staging checkpoints of a VM of `limits`.
    pub fn new(dec: D, limits: StagingLimits) -> LinkReader<D> {
        LinkReader {
            dec,
            assembler: CheckpointAssembler::new(limits),
            floor: Generation::UNKNOWN,
            failed: false,
        }
    }

    /// The generation below which frames are refused.
    pub fn floor(&self) -> Generation {
        self.floor
    }

    /// The checkpoint being received, as far as it arrived.
    pub fn in_progress(&self) -> Option<&StagedCheckpoint> {
        self.assembler.in_progress()
    }

    /// Feeds bytes read from the link, appending what they delivered to `out`. After an error
    /// the link is unusable: call [`LinkReader::close`] and drop the connection.
    pub fn feed(
        &mut self,
        mut input: &[u8],
        out: &mut Vec<LinkEvent>,
    ) -> Result<(), LinkError<D::Error>> {
        if self.failed {
            return Ok(());
        }
        let r = self.feed_inner(&mut input, out);
        self.failed = r.is_err();
        r
    }

    fn feed_inner(
        &mut self,
        input: &mut &[u8],
        out: &mut Vec<LinkEvent>,
    ) -> Result<(), LinkError<D::Error>> {
        // An encrypting decoder also yields items from plaintext it already holds.
        while !input.is_empty() || self.dec.pending() {
            let was_pending = self.dec.pending();
            let (used, item) = self.dec.decode(input).map_err(LinkError::Frame)?;
            let mut new_floor = None;
            let yielded = item.is_some();
            match item {
                None => {}
                Some(Item::Peer(msg)) => {
                    if let PeerMsg::SyncStart { generation, .. } = msg {
                        new_floor = Some(generation);
                    }
                    out.push(LinkEvent::Message(msg));
                }
                Some(Item::WitnessRequest(_) | Item::WitnessReply(_)) => {
                    return Err(LinkError::WitnessFrame)
                }
                Some(item) => match self.assembler.feed(item)? {
                    Staged::Nothing => {}
                    Staged::Started(epoch) => out.push(LinkEvent::CheckpointStarted(epoch)),
                    Staged::Complete(_, staged) => out.push(LinkEvent::CheckpointReceived(staged)),
                },
            }
            *input = &input[used..];
            // A newer generation's sync makes every older frame on this link stale.
            if let Some(g) = new_floor.filter(|g| *g > self.floor) {
                self.floor = g;
                self.dec.set_min_generation(g);
            }
            // No progress on the input: the decoder waits for more bytes. (An encrypting
            // decoder consumes no input, and may yield nothing, while it works through
            // plaintext it held: that is progress too.)
            if used == 0 && !yielded && !was_pending {
                break;
            }
        }
        Ok(())
    }

    /// The stream ended cleanly (EOF): an error if it ended inside a frame.
    pub fn end_of_stream(&self) -> Result<(), LinkError<D::Error>> {
        if self.failed {
            return Ok(());
        }
        self.dec.finish().map_err(LinkError::Truncated)
    }

    /// The link is gone, for whatever reason: a checkpoint still open is given up and reported
    /// as damaged, as the node must hear.
    pub fn close(&mut self) -> Option<LinkEvent> {
        self.failed = true;
        self.assembler
            .abort()
            .map(|a| LinkEvent::CheckpointDamaged {
                epoch: a.epoch,
                partial: a.partial,
            })
    }
}

#[cfg(test)]
#[path = "link_tests.rs"]
mod tests;
