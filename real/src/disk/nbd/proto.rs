//! NBD wire constants and the fixed-size request header (the subset this server speaks; names as
//! in the protocol document, `doc/proto.md` of the NBD project).

use super::error::NbdError;

/// Server greeting, first 8 bytes.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Greeting's second word (newstyle), and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Server handshake flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// The client may skip the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (the same two bits).
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1;
/// See [`FLAG_NO_ZEROES`].
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Client ends the negotiation.
pub const OPT_ABORT: u32 = 2;
/// Client asks for the export names.
pub const OPT_LIST: u32 = 3;
/// Client asks about an export and stays in negotiation.
pub const OPT_INFO: u32 = 6;
/// Client asks about an export and starts transmission on it.
pub const OPT_GO: u32 = 7;

/// Option reply types.
pub const REP_ACK: u32 = 1;
/// One export name (reply to `OPT_LIST`).
pub const REP_SERVER: u32 = 2;
/// One piece of export information (reply to `OPT_INFO`/`OPT_GO`).
pub const REP_INFO: u32 = 3;
/// Error replies have the top bit set.
const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option not supported.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Option malformed.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// No such export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;

/// Information types in `REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
/// Block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1;
/// Server accepts `CMD_FLUSH`.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Server accepts `CMD_TRIM`.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Server accepts `CMD_WRITE_ZEROES`.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write the payload.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Persist what was written.
pub const CMD_FLUSH: u16 = 3;
/// Discard a range.
pub const CMD_TRIM: u16 = 4;
/// Write zeroes without a payload.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Command flag: persist before replying.
pub const CMD_FLAG_FUA: u16 = 1;
/// `CMD_WRITE_ZEROES` must allocate (not punch a hole).
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Error values in replies (the protocol's own numbering, equal to Linux errno).
pub const EIO: u32 = 5;
/// Invalid request: out of range, too large, unknown command.
pub const EINVAL: u32 = 22;
/// No space left.
pub const ENOSPC: u32 = 28;

/// Size of a request header on the wire.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header on the wire.
pub const REPLY_LEN: usize = 16;

/// One transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command (`CMD_*`).
    pub command: u16,
    /// Opaque value echoed in the reply.
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Byte count (the payload length for `CMD_WRITE`).
    pub length: u32,
}

impl Request {
    /// Parses a header; a wrong magic means the stream is out of step and cannot be recovered.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Request, NbdError> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != REQUEST_MAGIC {
            return Err(NbdError::BadRequestMagic(magic));
        }
        Ok(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            command: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
            offset: u64::from_be_bytes([b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23]]),
            length: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
        })
    }

    /// The header as the client sends it.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// A simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; REPLY_LEN] {
    let mut b = [0u8; REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_and_bad_magic_is_an_error() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        let mut b = r.encode();
        assert_eq!(Request::parse(&b).unwrap(), r);
        b[0] ^= 1;
        assert!(matches!(
            Request::parse(&b),
            Err(NbdError::BadRequestMagic(_))
        ));
    }
}
