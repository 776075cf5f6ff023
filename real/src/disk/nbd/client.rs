//! A minimal, strict NBD client: fixed newstyle, `OPT_GO`, simple replies, one request at a
//! time. For tests and diagnostics (QEMU is the production client); it can also send requests a
//! well-behaved client never would.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::error::NbdError;
use super::proto::*;

/// A connection in the transmission phase.
#[derive(Debug)]
pub struct NbdClient {
    stream: UnixStream,
    size: u64,
    flags: u16,
    max_payload: Option<u32>,
    next_cookie: u64,
}

impl NbdClient {
    /// Connects to the server at `socket` and selects `export` with `OPT_GO` (asking for the
    /// block size constraints).
    pub fn connect(socket: &Path, export: &str) -> Result<NbdClient, NbdError> {
        let mut s = UnixStream::connect(socket)?;
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting)?;
        if greeting[0..8] != NBDMAGIC.to_be_bytes() || greeting[8..16] != IHAVEOPT.to_be_bytes() {
            return Err(NbdError::ServerViolation("not a newstyle NBD greeting"));
        }
        let server_flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::ServerViolation("server is not fixed newstyle"));
        }
        s.write_all(&(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES).to_be_bytes())?;

        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let mut msg = IHAVEOPT.to_be_bytes().to_vec();
        msg.extend_from_slice(&OPT_GO.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(&data);
        s.write_all(&msg)?;

        let (mut size, mut flags, mut max_payload) = (None, 0, None);
        loop {
            let mut head = [0u8; 20];
            s.read_exact(&mut head)?;
            if head[0..8] != OPT_REPLY_MAGIC.to_be_bytes() {
                return Err(NbdError::ServerViolation("bad option reply magic"));
            }
            let kind = u32::from_be_bytes([head[12], head[13], head[14], head[15]]);
            let len = u32::from_be_bytes([head[16], head[17], head[18], head[19]]);
            if len > 1 << 16 {
                return Err(NbdError::ServerViolation("option reply too long"));
            }
            let mut body = vec![0u8; len as usize];
            s.read_exact(&mut body)?;
            match kind {
                REP_ACK => break,
                REP_INFO => match body.get(0..2).map(|t| u16::from_be_bytes([t[0], t[1]])) {
                    Some(INFO_EXPORT) if body.len() == 12 => {
                        size =
                            Some(u64::from_be_bytes(body[2..10].try_into().map_err(
                                |_| NbdError::ServerViolation("short export info"),
                            )?));
                        flags = u16::from_be_bytes([body[10], body[11]]);
                    }
                    Some(INFO_BLOCK_SIZE) if body.len() == 14 => {
                        max_payload =
                            Some(u32::from_be_bytes([body[10], body[11], body[12], body[13]]));
                    }
                    _ => {}
                },
                k if k & (1 << 31) != 0 => {
                    return Err(NbdError::OptionRefused {
                        option: OPT_GO,
                        reply: k,
                    })
                }
                _ => return Err(NbdError::ServerViolation("unexpected option reply")),
            }
        }
        let size = size.ok_or(NbdError::ServerViolation("no export info before ack"))?;
        Ok(NbdClient {
            stream: s,
            size,
            flags,
            max_payload,
            next_cookie: 1,
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags the server announced.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// Largest payload the server accepts, if it said.
    pub fn max_payload(&self) -> Option<u32> {
        self.max_payload
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, NbdError> {
        self.request(CMD_READ, 0, offset, len, &[])?;
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data)?;
        Ok(data)
    }

    /// Writes `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        let len = u32::try_from(data.len())
            .map_err(|_| NbdError::ServerViolation("payload over 4 GiB cannot be sent"))?;
        self.request(CMD_WRITE, 0, offset, len, data)
    }

    /// `CMD_FLUSH`.
    pub fn flush(&mut self) -> Result<(), NbdError> {
        self.request(CMD_FLUSH, 0, 0, 0, &[])
    }

    /// `CMD_WRITE_ZEROES`.
    pub fn write_zeroes(&mut self, offset: u64, len: u32) -> Result<(), NbdError> {
        self.request(CMD_WRITE_ZEROES, 0, offset, len, &[])
    }

    /// `CMD_TRIM`.
    pub fn trim(&mut self, offset: u64, len: u32) -> Result<(), NbdError> {
        self.request(CMD_TRIM, 0, offset, len, &[])
    }

    /// Sends any request (the header says `length`; `payload` is sent as is, whatever its
    /// length) and waits for its simple reply; a non-zero error is
    /// [`NbdError::ErrorReply`]. Read data, if any, is left for the caller.
    pub fn request(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<(), NbdError> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let head = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        }
        .encode();
        self.stream.write_all(&head)?;
        self.stream.write_all(payload)?;
        let mut reply = [0u8; REPLY_LEN];
        self.stream.read_exact(&mut reply)?;
        if reply[0..4] != SIMPLE_REPLY_MAGIC.to_be_bytes() {
            return Err(NbdError::ServerViolation("bad reply magic"));
        }
        if reply[8..16] != cookie.to_be_bytes() {
            return Err(NbdError::ServerViolation("reply to another request"));
        }
        match u32::from_be_bytes([reply[4], reply[5], reply[6], reply[7]]) {
            0 => Ok(()),
            e => Err(NbdError::ErrorReply(e)),
        }
    }

    /// `CMD_DISC`, then closes.
    pub fn disconnect(mut self) -> Result<(), NbdError> {
        let head = Request {
            flags: 0,
            command: CMD_DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        }
        .encode();
        self.stream.write_all(&head)?;
        Ok(())
    }
}
