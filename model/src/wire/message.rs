//! Bodies of the small frames: peer messages and witness traffic. Each kind has a fixed body
//! length, checked at the header so a bogus length never makes a receiver allocate. Unused
//! fields must be zero, which keeps every value's encoding unique.

use super::bytes::{Reader, Writer};
use super::error::WireError;
use super::header::FrameKind;
use crate::ids::{Epoch, Generation, NodeId, VmId};
use crate::msg::{PeerMsg, RejectReason, ReplicaAt};
use crate::witness_msg::{Registration, WitnessReply, WitnessRequest, WitnessState};

const REQUEST_LEN: u64 = 25;
const STATE_LEN: u64 = 54;

/// Fixed body length of a message kind (`None` for checkpoints, whose length varies).
pub(crate) fn body_len(kind: FrameKind) -> Option<u64> {
    Some(match kind {
        FrameKind::Join => 24 + 1 + 32,
        FrameKind::Reject => 1,
        FrameKind::SyncStart => 8 + 1 + 8 + 8 + 1,
        FrameKind::Ack | FrameKind::Heartbeat => 8,
        FrameKind::WitnessRequest => REQUEST_LEN,
        FrameKind::WitnessReply => REQUEST_LEN + 1 + STATE_LEN,
        FrameKind::Checkpoint => return None,
    })
}

/// Kind, header generation and body of a peer message.
pub(crate) fn encode_peer(msg: &PeerMsg, body: &mut Vec<u8>) -> (FrameKind, Generation) {
    let mut w = Writer { buf: body };
    let kind = match *msg {
        PeerMsg::Join {
            node,
            ram_pages,
            page_size,
            disk_blocks,
            replica,
            ..
        } => {
            w.u32(node.0);
            w.u64(ram_pages);
            w.u32(page_size);
            w.u64(disk_blocks);
            // Flag, then generation, lineage, since, epoch (all zero without a replica).
            w.bool(replica.is_some());
            let r = replica.unwrap_or(ReplicaAt {
                generation: Generation(0),
                lineage: 0,
                since: Epoch(0),
                epoch: Epoch(0),
            });
            w.u64(r.generation.0);
            w.u64(r.lineage);
            w.u64(r.since.0);
            w.u64(r.epoch.0);
            FrameKind::Join
        }
        PeerMsg::Reject { reason, .. } => {
            w.u8(reason.code());
            FrameKind::Reject
        }
        PeerMsg::SyncStart {
            epoch,
            base,
            lineage,
            continues,
            ..
        } => {
            w.u64(epoch.0);
            w.bool(base.is_some());
            w.u64(base.map_or(0, |b| b.0));
            w.u64(lineage);
            w.bool(continues);
            FrameKind::SyncStart
        }
        PeerMsg::Ack { epoch, .. } => {
            w.u64(epoch.0);
            FrameKind::Ack
        }
        PeerMsg::Heartbeat { epoch, .. } => {
            w.u64(epoch.0);
            FrameKind::Heartbeat
        }
    };
    (kind, msg.generation())
}

/// Parse a peer message body (length already checked).
pub(crate) fn decode_peer(
    kind: FrameKind,
    vm: VmId,
    generation: Generation,
    body: &[u8],
) -> Result<PeerMsg, WireError> {
    let mut r = Reader::new(body);
    let msg = match kind {
        FrameKind::Join => PeerMsg::Join {
            vm,
            node: NodeId(r.u32()?),
            ram_pages: r.u64()?,
            page_size: r.u32()?,
            disk_blocks: r.u64()?,
            known: generation,
            replica: {
                let present = r.bool()?;
                let at = ReplicaAt {
                    generation: Generation(r.u64()?),
                    lineage: r.u64()?,
                    since: Epoch(r.u64()?),
                    epoch: Epoch(r.u64()?),
                };
                match present {
                    true => Some(at),
                    false if at == ReplicaAt::default() => None,
                    false => return Err(WireError::Malformed("fields of an absent replica set")),
                }
            },
        },
        FrameKind::Reject => PeerMsg::Reject {
            generation,
            reason: RejectReason::from_code(r.u8()?)
                .ok_or(WireError::Malformed("unknown reject reason"))?,
        },
        FrameKind::SyncStart => {
            let epoch = Epoch(r.u64()?);
            let present = r.bool()?;
            let base = Epoch(r.u64()?);
            let base = match present {
                true => Some(base),
                false if base == Epoch(0) => None,
                false => return Err(WireError::Malformed("base of a full sync set")),
            };
            PeerMsg::SyncStart {
                generation,
                epoch,
                base,
                lineage: r.u64()?,
                continues: r.bool()?,
            }
        }
        FrameKind::Ack => PeerMsg::Ack {
            generation,
            epoch: Epoch(r.u64()?),
        },
        FrameKind::Heartbeat => PeerMsg::Heartbeat {
            generation,
            epoch: Epoch(r.u64()?),
        },
        _ => return Err(WireError::Malformed("not a peer message kind")),
    };
    r.end()?;
    Ok(msg)
}

pub(crate) fn encode_request(req: &WitnessRequest, w: &mut Writer<'_>) {
    let (tag, generation, primary, backup) = match *req {
        WitnessRequest::Query => (0, Generation(0), NodeId(0), None),
        WitnessRequest::RegisterBackup {
            generation,
            primary,
            backup,
        } => (1, generation, primary, Some(backup)),
        WitnessRequest::DropBackup {
            generation,
            primary,
            backup,
        } => (2, generation, primary, Some(backup)),
        WitnessRequest::Takeover { generation, backup } => (3, generation, NodeId(0), Some(backup)),
    };
    let backup = backup.unwrap_or(Registration {
        node: NodeId(0),
        since: Epoch(0),
    });
    w.u8(tag);
    w.u64(generation.0);
    w.u32(primary.0);
    w.u32(backup.node.0);
    w.u64(backup.since.0);
}

pub(crate) fn decode_request(r: &mut Reader<'_>) -> Result<WitnessRequest, WireError> {
    let tag = r.u8()?;
    let generation = Generation(r.u64()?);
    let primary = NodeId(r.u32()?);
    let backup = Registration {
        node: NodeId(r.u32()?),
        since: Epoch(r.u64()?),
    };
    let zero_reg = Registration {
        node: NodeId(0),
        since: Epoch(0),
    };
    let req = match tag {
        0 if generation.0 == 0 && primary.0 == 0 && backup == zero_reg => WitnessRequest::Query,
        1 => WitnessRequest::RegisterBackup {
            generation,
            primary,
            backup,
        },
        2 => WitnessRequest::DropBackup {
            generation,
            primary,
            backup,
        },
        3 if primary.0 == 0 => WitnessRequest::Takeover { generation, backup },
        0 | 3 => {
            return Err(WireError::Malformed(
                "unused witness request field not zero",
            ))
        }
        _ => return Err(WireError::Malformed("unknown witness request")),
    };
    Ok(req)
}

fn encode_opt_reg(reg: Option<Registration>, w: &mut Writer<'_>) {
    w.bool(reg.is_some());
    let reg = reg.unwrap_or(Registration {
        node: NodeId(0),
        since: Epoch(0),
    });
    w.u32(reg.node.0);
    w.u64(reg.since.0);
}

fn decode_opt_reg(r: &mut Reader<'_>) -> Result<Option<Registration>, WireError> {
    let present = r.bool()?;
    let reg = Registration {
        node: NodeId(r.u32()?),
        since: Epoch(r.u64()?),
    };
    match (present, reg.node.0 == 0 && reg.since.0 == 0) {
        (true, _) => Ok(Some(reg)),
        (false, true) => Ok(None),
        (false, false) => Err(WireError::Malformed(
            "absent registration has non-zero fields",
        )),
    }
}

pub(crate) fn encode_reply(reply: &WitnessReply, w: &mut Writer<'_>) {
    encode_request(&reply.request, w);
    w.bool(reply.granted);
    let s = &reply.state;
    w.u64(s.vm.0);
    w.u64(s.generation.0);
    w.u32(s.primary.0);
    encode_opt_reg(s.backup, w);
    w.u64(s.floor.0);
    encode_opt_reg(s.promoted, w);
}

/// Parse a witness reply; the header's VM and generation must match the state inside.
pub(crate) fn decode_reply(
    vm: VmId,
    generation: Generation,
    body: &[u8],
) -> Result<WitnessReply, WireError> {
    let mut r = Reader::new(body);
    let request = decode_request(&mut r)?;
    let granted = r.bool()?;
    let state = WitnessState {
        vm: VmId(r.u64()?),
        generation: Generation(r.u64()?),
        primary: NodeId(r.u32()?),
        backup: decode_opt_reg(&mut r)?,
        floor: Epoch(r.u64()?),
        promoted: decode_opt_reg(&mut r)?,
    };
    r.end()?;
    if state.vm != vm || state.generation != generation {
        return Err(WireError::Malformed(
            "witness reply header disagrees with its state",
        ));
    }
    Ok(WitnessReply {
        request,
        granted,
        state,
    })
}
