//! The versioned binary wire format: every frame is a checked header (magic, version, kind,
//! VM, generation, body length, header crc32), a body and a crc32 of the body.
//!
//! * [`encode_peer`], [`encode_witness_request`], [`encode_witness_reply`]: small frames.
//! * [`CheckpointEncoder`]: a checkpoint frame streamed from borrowed page and disk block
//!   slices.
//! * [`StreamDecoder`]: incremental decoding of a connection's byte stream.
//! * [`decode`]: one whole frame from a buffer.
//!
//! Decoding refuses truncated input, damaged bytes (checksums), other protocol versions,
//! other VMs and older generations with a typed [`WireError`]; it never panics on any input.

// Values here come off the wire (or go onto it): a cast that drops bits must be a checked
// conversion, or say why it cannot lose anything.
#![warn(clippy::cast_possible_truncation)]

mod bytes;
mod checkpoint;
mod error;
mod header;
mod message;
mod stream;

pub use checkpoint::{
    encode_checkpoint, encode_checkpoint_with_disk, Checkpoint, CheckpointEncoder, CheckpointMeta,
    CheckpointPrefix, DISK_BLOCK_SIZE, MAX_PAGE_SIZE, META_LEN, RECORD_HEADER_LEN,
};
pub use error::{Part, WireError};
pub use header::{Expect, FrameKind, Header, HEADER_LEN, MAGIC, TRAILER_LEN, VERSION};
pub use stream::{Item, StreamDecoder};

use self::bytes::Writer;
use crate::ids::{Generation, VmId};
use crate::msg::PeerMsg;
use crate::witness_msg::{WitnessReply, WitnessRequest};

/// A whole decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A peer message.
    Peer(PeerMsg),
    /// A checkpoint.
    Checkpoint(Checkpoint),
    /// A witness request.
    WitnessRequest(WitnessRequest),
    /// A witness reply.
    WitnessReply(WitnessReply),
}

fn frame(kind: FrameKind, vm: VmId, generation: Generation, body: &[u8]) -> Vec<u8> {
    let header = Header {
        kind,
        vm,
        generation,
        body_len: body.len() as u64,
    };
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + TRAILER_LEN);
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(body);
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out
}

/// Encode a peer message of `vm`. The header generation is the message's; a `Join` is sent
/// under its own `vm` field (which is what the receiver checks).
pub fn encode_peer(vm: VmId, msg: &PeerMsg) -> Vec<u8> {
    let mut body = Vec::with_capacity(16);
    let (kind, generation) = message::encode_peer(msg, &mut body);
    let vm = if let PeerMsg::Join { vm: join_vm, .. } = *msg {
        join_vm
    } else {
        vm
    };
    frame(kind, vm, generation, &body)
}

/// Encode a request to the witness of `vm`.
pub fn encode_witness_request(vm: VmId, req: &WitnessRequest) -> Vec<u8> {
    let mut body = Vec::with_capacity(32);
    message::encode_request(req, &mut Writer { buf: &mut body });
    frame(
        FrameKind::WitnessRequest,
        vm,
        stream::request_generation(req),
        &body,
    )
}

/// Encode a witness reply (VM and generation come from its state).
pub fn encode_witness_reply(reply: &WitnessReply) -> Vec<u8> {
    let mut body = Vec::with_capacity(96);
    message::encode_reply(reply, &mut Writer { buf: &mut body });
    frame(
        FrameKind::WitnessReply,
        reply.state.vm,
        reply.state.generation,
        &body,
    )
}

/// Decode the frame at the start of `bytes`; returns it and its length. Input ending inside
/// the frame is `Truncated`.
pub fn decode(bytes: &[u8], expect: &Expect) -> Result<(Frame, usize), WireError> {
    let mut dec = StreamDecoder::new(*expect);
    let mut pos = 0;
    let mut cp: Option<Checkpoint> = None;
    loop {
        let (used, item) = dec.decode(&bytes[pos..])?;
        pos += used;
        let done = match item {
            None if pos == bytes.len() || used == 0 => {
                return Err(WireError::Truncated {
                    needed: dec.needed().max(1),
                })
            }
            None => None,
            Some(Item::Peer(m)) => Some(Frame::Peer(m)),
            Some(Item::WitnessRequest(r)) => Some(Frame::WitnessRequest(r)),
            Some(Item::WitnessReply(r)) => Some(Frame::WitnessReply(r)),
            Some(Item::CheckpointBegin { generation, meta }) => {
                let pages =
                    Vec::with_capacity(usize::try_from(meta.page_count.min(1 << 16)).unwrap_or(0));
                cp = Some(Checkpoint {
                    generation,
                    meta,
                    pages,
                    disk: Vec::new(),
                    device: Vec::new(),
                });
                None
            }
            Some(Item::Page { index, data }) => {
                if let Some(c) = cp.as_mut() {
                    c.pages.push((index, data.to_vec()));
                }
                None
            }
            Some(Item::DiskBlock { index, data }) => {
                if let Some(c) = cp.as_mut() {
                    c.disk.push((index, data.to_vec()));
                }
                None
            }
            Some(Item::Device { data, .. }) => {
                if let Some(c) = cp.as_mut() {
                    c.device.extend_from_slice(data);
                }
                None
            }
            Some(Item::CheckpointEnd { .. }) => cp.take().map(Frame::Checkpoint),
        };
        if let Some(f) = done {
            return Ok((f, pos));
        }
    }
}

#[cfg(test)]
mod tests;
