//! Typed decode/encode errors. A driver that gets one drops the frame (and, on a stream,
//! the connection: a stream is not resynchronised after an error).

use std::fmt;

use crate::ids::{Generation, VmId};

/// Which checksum failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    /// The 32-byte frame header.
    Header,
    /// The body (message fields, or checkpoint meta + pages + device state).
    Body,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Header => "header",
            Part::Body => "body",
        })
    }
}

/// Why bytes were not accepted as a frame (or could not be encoded).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The input ended inside a frame.
    #[error("truncated frame: {needed} more bytes needed")]
    Truncated {
        /// Bytes missing (at least).
        needed: u64,
    },
    /// Not an ftvm frame at all.
    #[error("bad magic: not an ftvm frame")]
    BadMagic,
    /// A frame of another protocol version.
    #[error("unsupported protocol version {found} (this build speaks {supported})")]
    WrongVersion {
        /// Version in the frame.
        found: u16,
        /// Version this build speaks.
        supported: u16,
    },
    /// A checksum did not match: the bytes were damaged.
    #[error("corrupted frame: {part} checksum mismatch")]
    Corrupted {
        /// Which checksum.
        part: Part,
    },
    /// The frame belongs to another VM.
    #[error("frame for {found}, expected {expected}")]
    WrongVm {
        /// Our VM.
        expected: VmId,
        /// The frame's VM.
        found: VmId,
    },
    /// The frame comes from a generation older than ours.
    #[error("stale generation {found} (current is {current})")]
    StaleGeneration {
        /// Our generation.
        current: Generation,
        /// The frame's generation.
        found: Generation,
    },
    /// Checksums matched but the content makes no sense (unknown kind, bad length, bad tag).
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    /// The encoder was fed something that contradicts the checkpoint's declared shape.
    #[error("checkpoint encoder misuse: {0}")]
    EncoderMisuse(&'static str),
}
