//! The fixed frame header every frame starts with, and the checks made on it before any body
//! byte is looked at (so a stale or foreign checkpoint is refused before its pages arrive).
//!
//! ```text
//! offset size field
//!      0    4 magic "FTVM"
//!      4    2 protocol version (u16 LE)
//!      6    1 kind
//!      7    1 flags (must be 0)
//!      8    8 vm id
//!     16    8 generation
//!     24    8 body length in bytes
//!     32    4 crc32 of bytes 0..32
//! ```
//! The body follows, then a crc32 of the body (4 bytes).

use super::bytes::{Reader, Writer};
use super::error::{Part, WireError};
use crate::ids::{Generation, VmId};

/// Frame magic.
pub const MAGIC: [u8; 4] = *b"FTVM";
/// Protocol version this build speaks.
pub const VERSION: u16 = 3;
/// Header length including its checksum.
pub const HEADER_LEN: usize = 36;
/// Trailer (body checksum) length.
pub const TRAILER_LEN: usize = 4;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// `PeerMsg::Join`.
    Join,
    /// `PeerMsg::Reject`.
    Reject,
    /// `PeerMsg::SyncStart`.
    SyncStart,
    /// `PeerMsg::Ack`.
    Ack,
    /// `PeerMsg::Heartbeat`.
    Heartbeat,
    /// A checkpoint (meta, page records, device state).
    Checkpoint,
    /// A `WitnessRequest`.
    WitnessRequest,
    /// A `WitnessReply`.
    WitnessReply,
}

impl FrameKind {
    pub(crate) fn code(self) -> u8 {
        match self {
            FrameKind::Join => 1,
            FrameKind::Reject => 2,
            FrameKind::SyncStart => 3,
            FrameKind::Ack => 4,
            FrameKind::Heartbeat => 5,
            FrameKind::Checkpoint => 16,
            FrameKind::WitnessRequest => 32,
            FrameKind::WitnessReply => 33,
        }
    }

    fn from_code(code: u8) -> Option<FrameKind> {
        Some(match code {
            1 => FrameKind::Join,
            2 => FrameKind::Reject,
            3 => FrameKind::SyncStart,
            4 => FrameKind::Ack,
            5 => FrameKind::Heartbeat,
            16 => FrameKind::Checkpoint,
            32 => FrameKind::WitnessRequest,
            33 => FrameKind::WitnessReply,
            _ => return None,
        })
    }

    /// Frames checked against `Expect::min_generation`. A `Join` carries the joiner's (maybe
    /// unknown) generation and witness traffic carries the register's, so they are exempt.
    fn generation_checked(self) -> bool {
        !matches!(
            self,
            FrameKind::Join | FrameKind::WitnessRequest | FrameKind::WitnessReply
        )
    }
}

/// A decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Header {
    /// Frame kind.
    pub kind: FrameKind,
    /// VM the frame belongs to.
    pub vm: VmId,
    /// Sender's generation.
    pub generation: Generation,
    /// Body length (without the trailer).
    pub body_len: u64,
}

impl Header {
    /// Bytes of the whole frame: header + body + trailer (saturating).
    pub fn frame_len(&self) -> u64 {
        (HEADER_LEN as u64 + TRAILER_LEN as u64).saturating_add(self.body_len)
    }

    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut v = Vec::with_capacity(HEADER_LEN);
        v.extend_from_slice(&MAGIC);
        let mut w = Writer { buf: &mut v };
        w.u16(VERSION);
        w.u8(self.kind.code());
        w.u8(0);
        w.u64(self.vm.0);
        w.u64(self.generation.0);
        w.u64(self.body_len);
        let crc = crc32fast::hash(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        let mut out = [0u8; HEADER_LEN];
        out.copy_from_slice(&v);
        out
    }

    /// Parse and check the first `HEADER_LEN` bytes. Order: magic, version (before the checksum,
    /// so a future version with another layout is reported as such), checksum, fields, VM,
    /// generation.
    pub(crate) fn decode(bytes: &[u8; HEADER_LEN], expect: &Expect) -> Result<Header, WireError> {
        if bytes[0..4] != MAGIC {
            return Err(WireError::BadMagic);
        }
        let mut r = Reader::new(&bytes[4..]);
        let version = r.u16()?;
        if version != VERSION {
            return Err(WireError::WrongVersion {
                found: version,
                supported: VERSION,
            });
        }
        let stored = u32::from_le_bytes([bytes[32], bytes[33], bytes[34], bytes[35]]);
        if crc32fast::hash(&bytes[..32]) != stored {
            return Err(WireError::Corrupted { part: Part::Header });
        }
        let kind =
            FrameKind::from_code(r.u8()?).ok_or(WireError::Malformed("unknown frame kind"))?;
        if r.u8()? != 0 {
            return Err(WireError::Malformed("unknown header flags"));
        }
        let header = Header {
            kind,
            vm: VmId(r.u64()?),
            generation: Generation(r.u64()?),
            body_len: r.u64()?,
        };
        if header.vm != expect.vm {
            return Err(WireError::WrongVm {
                expected: expect.vm,
                found: header.vm,
            });
        }
        if kind.generation_checked() && header.generation < expect.min_generation {
            return Err(WireError::StaleGeneration {
                current: expect.min_generation,
                found: header.generation,
            });
        }
        Ok(header)
    }
}

/// What the receiver accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Expect {
    /// Our VM: frames of any other VM are refused (`WrongVm`).
    pub vm: VmId,
    /// Our generation: peer frames of an older one are refused (`StaleGeneration`); `Join` and
    /// witness frames are exempt. Use `Generation::UNKNOWN` to accept any.
    pub min_generation: Generation,
}

impl Expect {
    /// Accept frames of `vm` from any generation.
    pub fn vm(vm: VmId) -> Expect {
        Expect {
            vm,
            min_generation: Generation::UNKNOWN,
        }
    }
}
