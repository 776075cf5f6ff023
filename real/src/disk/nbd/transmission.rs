//! The server side of the transmission phase: one request at a time, simple replies.
//!
//! Every request is checked before it touches the backend: the byte range must lie inside the
//! export (`offset + length` computed without overflow) and a payload must fit the advertised
//! maximum. A refused `CMD_WRITE`'s payload is read and dropped in small pieces, so the stream
//! stays in step and memory stays bounded whatever length the client claims.

use std::io::{self, Read, Write};

use super::error::NbdError;
use super::proto::*;

/// Where the served bytes live. Offsets and lengths are already range-checked.
pub trait Backend {
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `data` at `offset`; `fua`: persist before returning.
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()>;
    /// Makes `length` bytes at `offset` read as zeroes (`CMD_WRITE_ZEROES`, and `CMD_TRIM`:
    /// a discarded range reads as zeroes here, so primary and replica agree on it).
    fn zero_at(&self, offset: u64, length: u64, fua: bool) -> io::Result<()>;
    /// Persists what was written (`CMD_FLUSH`).
    fn flush(&self) -> io::Result<()>;
    /// Counts a request refused with an error reply.
    fn refused(&self, _request: &Request, _error: u32) {}
}

/// Serves requests until the client disconnects (`CMD_DISC` or end of stream at a request
/// boundary, both `Ok`) or breaks the protocol.
pub fn serve<R: Read, W: Write, B: Backend>(
    r: &mut R,
    w: &mut W,
    backend: &B,
    size: u64,
    max_payload: u32,
) -> Result<(), NbdError> {
    // Reply header followed by the read data, sent with one write; grows to at most
    // REPLY_LEN + max_payload.
    let mut buf: Vec<u8> = Vec::new();
    let mut head = [0u8; REQUEST_LEN];
    loop {
        if !read_header(r, &mut head)? {
            return Ok(());
        }
        let req = Request::parse(&head)?;
        let in_range = req
            .offset
            .checked_add(u64::from(req.length))
            .is_some_and(|end| end <= size);
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let error = match req.command {
            CMD_READ => {
                if in_range && req.length <= max_payload {
                    let len = req.length as usize;
                    buf.clear();
                    buf.resize(REPLY_LEN + len, 0);
                    match backend.read_at(&mut buf[REPLY_LEN..], req.offset) {
                        Ok(()) => {
                            buf[..REPLY_LEN].copy_from_slice(&simple_reply(0, req.cookie));
                            w.write_all(&buf)?;
                            w.flush()?;
                            continue;
                        }
                        Err(e) => errno_of(&e),
                    }
                } else {
                    EINVAL
                }
            }
            CMD_WRITE => {
                if in_range && req.length <= max_payload {
                    buf.clear();
                    buf.resize(req.length as usize, 0);
                    r.read_exact(&mut buf)?;
                    match backend.write_at(&buf, req.offset, fua) {
                        Ok(()) => 0,
                        Err(e) => errno_of(&e),
                    }
                } else {
                    discard(r, u64::from(req.length))?;
                    EINVAL
                }
            }
            CMD_DISC => return Ok(()),
            CMD_FLUSH => match backend.flush() {
                Ok(()) => 0,
                Err(e) => errno_of(&e),
            },
            CMD_TRIM | CMD_WRITE_ZEROES => {
                if in_range {
                    match backend.zero_at(req.offset, u64::from(req.length), fua) {
                        Ok(()) => 0,
                        Err(e) => errno_of(&e),
                    }
                } else {
                    EINVAL
                }
            }
            // CMD_CACHE, BLOCK_STATUS, RESIZE and unknown commands: none carries a payload.
            _ => EINVAL,
        };
        if error != 0 {
            backend.refused(&req, error);
        }
        w.write_all(&simple_reply(error, req.cookie))?;
        w.flush()?;
    }
}

/// Reads a request header; `false` if the stream ended cleanly before its first byte.
fn read_header<R: Read>(r: &mut R, head: &mut [u8; REQUEST_LEN]) -> Result<bool, NbdError> {
    let mut got = 0;
    while got < REQUEST_LEN {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// Reads and drops `len` payload bytes.
fn discard<R: Read>(r: &mut R, len: u64) -> Result<(), NbdError> {
    let copied = io::copy(&mut r.take(len), &mut io::sink())?;
    if copied < len {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    Ok(())
}

/// The reply error for a failed backend operation.
fn errno_of(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ENOSPC,
        _ => EIO,
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// An in-memory export that records what it was asked.
    struct Mem {
        data: RefCell<Vec<u8>>,
        flushes: RefCell<u32>,
        refused: RefCell<Vec<u32>>,
    }

    impl Backend for Mem {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let o = offset as usize;
            buf.copy_from_slice(&self.data.borrow()[o..o + buf.len()]);
            Ok(())
        }
        fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
            let o = offset as usize;
            self.data.borrow_mut()[o..o + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn zero_at(&self, offset: u64, length: u64, _fua: bool) -> io::Result<()> {
            let o = offset as usize;
            self.data.borrow_mut()[o..o + length as usize].fill(0);
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            *self.flushes.borrow_mut() += 1;
            Ok(())
        }
        fn refused(&self, _r: &Request, e: u32) {
            self.refused.borrow_mut().push(e);
        }
    }

    fn req(command: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
        Request {
            flags: 0,
            command,
            cookie,
            offset,
            length,
        }
        .encode()
        .to_vec()
    }

    const SIZE: u64 = 8192;

    fn mem() -> Mem {
        Mem {
            data: RefCell::new(vec![7u8; SIZE as usize]),
            flushes: RefCell::new(0),
            refused: RefCell::new(Vec::new()),
        }
    }

    /// Splits the server's output into (error, cookie, data-after-header-if-any) by the
    /// lengths the client knows.
    fn replies(out: &[u8], read_lens: &[usize]) -> Vec<(u32, u64)> {
        let mut v = Vec::new();
        let mut pos = 0;
        let mut reads = read_lens.iter();
        while pos < out.len() {
            let h = &out[pos..pos + REPLY_LEN];
            assert_eq!(&h[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
            let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
            let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
            pos += REPLY_LEN;
            if err == 0 && cookie >= 100 {
                pos += reads.next().unwrap();
            }
            v.push((err, cookie));
        }
        v
    }

    #[test]
    fn reads_writes_zeroes_flush() {
        let m = mem();
        let mut c = req(CMD_WRITE, 1, 4090, 10);
        c.extend([1u8; 10]);
        c.extend(req(CMD_READ, 100, 4088, 14));
        c.extend(req(CMD_WRITE_ZEROES, 2, 4092, 2));
        c.extend(req(CMD_TRIM, 3, 0, 8192));
        c.extend(req(CMD_FLUSH, 4, 0, 0));
        c.extend(req(CMD_DISC, 5, 0, 0));
        c.extend(req(CMD_FLUSH, 6, 0, 0)); // after DISC: never served
        let mut out = Vec::new();
        serve(&mut &c[..], &mut out, &m, SIZE, 4096).unwrap();
        assert_eq!(
            &out[16 + 16..16 + 16 + 14],
            &[7, 7, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 7, 7]
        );
        assert_eq!(
            replies(&out, &[14]),
            vec![(0, 1), (0, 100), (0, 2), (0, 3), (0, 4)]
        );
        assert_eq!(*m.flushes.borrow(), 1);
        assert!(m.data.borrow().iter().all(|&b| b == 0));
    }

    #[test]
    fn hostile_requests_get_einval_and_leave_the_export_untouched() {
        let m = mem();
        let mut c = Vec::new();
        // Past the end, straddling the end, offset overflow, over the payload limit (the 4 GiB
        // read is refused before any buffer is sized for it).
        c.extend(req(CMD_READ, 10, SIZE, 1));
        c.extend(req(CMD_READ, 11, SIZE - 1, 2));
        c.extend(req(CMD_READ, 12, u64::MAX, u32::MAX));
        c.extend(req(CMD_READ, 13, 0, 4097));
        c.extend(req(CMD_WRITE, 14, SIZE - 2, 3));
        c.extend([9u8; 3]);
        c.extend(req(CMD_WRITE, 15, 0, 5000)); // within the export, over max payload
        c.extend(vec![9u8; 5000]);
        c.extend(req(CMD_WRITE_ZEROES, 16, u64::MAX - 1, 2));
        c.extend(req(CMD_TRIM, 17, 4096, 4097));
        c.extend(req(77, 18, 0, 0));
        // Still in step: a valid write then a clean end.
        c.extend(req(CMD_WRITE, 19, 0, 1));
        c.push(5);
        let mut out = Vec::new();
        serve(&mut &c[..], &mut out, &m, SIZE, 4096).unwrap();
        let got = replies(&out, &[]);
        assert_eq!(
            got,
            (10..=18)
                .map(|c| (EINVAL, c))
                .chain([(0, 19)])
                .collect::<Vec<_>>()
        );
        assert_eq!(m.refused.borrow().len(), 9);
        let d = m.data.borrow();
        assert_eq!(d[0], 5);
        assert!(d[1..].iter().all(|&b| b == 7));
    }

    #[test]
    fn broken_streams_are_errors() {
        let m = mem();
        let mut bad = req(CMD_READ, 1, 0, 1);
        bad[0] = 0;
        let mut out = Vec::new();
        assert!(matches!(
            serve(&mut &bad[..], &mut out, &m, SIZE, 4096),
            Err(NbdError::BadRequestMagic(_))
        ));
        // Header cut short; payload cut short (also for a refused write's payload).
        let c = req(CMD_READ, 1, 0, 1);
        assert!(matches!(
            serve(&mut &c[..10], &mut out, &m, SIZE, 4096),
            Err(NbdError::Io(_))
        ));
        let mut c = req(CMD_WRITE, 1, 0, 100);
        c.extend([0u8; 50]);
        assert!(matches!(
            serve(&mut &c[..], &mut out, &m, SIZE, 4096),
            Err(NbdError::Io(_))
        ));
        let mut c = req(CMD_WRITE, 1, 0, u32::MAX);
        c.extend([0u8; 50]);
        assert!(matches!(
            serve(&mut &c[..], &mut out, &m, SIZE, 4096),
            Err(NbdError::Io(_))
        ));
        assert!(m.data.borrow().iter().all(|&b| b == 7));
    }
}
