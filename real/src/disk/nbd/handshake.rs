//! The server side of the fixed newstyle negotiation: greeting, then options until the client
//! starts transmission (`OPT_GO` or `OPT_EXPORT_NAME`) or gives up.

use std::io::{Read, Write};

use super::error::NbdError;
use super::proto::*;

/// Longest option data read: `OPT_GO` carries a name (the protocol caps names at 4096 bytes) and
/// a few info requests. Anything longer is hostile or broken; reading it would be unbounded.
pub const MAX_OPTION_LEN: u32 = 4096 + 4 + 2 + 2 * 64;
/// Options accepted before transmission starts; a client that never decides is hung up on.
pub const MAX_OPTIONS: u32 = 64;

/// The one export a server offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// Name the client must ask for.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`TFLAG_*`).
    pub flags: u16,
    /// Longest payload (`CMD_READ`/`CMD_WRITE`) the server accepts; advertised as the maximum
    /// block size to a client that asks.
    pub max_payload: u32,
}

/// How a negotiation ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiated {
    /// The client starts transmission on the export.
    Transmission,
    /// The client sent `OPT_ABORT`.
    Aborted,
}

/// Runs the negotiation on `r`/`w` (the two directions of one connection).
pub fn negotiate<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    export: &Export,
) -> Result<Negotiated, NbdError> {
    let mut greeting = [0u8; 18];
    greeting[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    greeting[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&greeting)?;
    w.flush()?;

    let client_flags = read_u32(r)?;
    if client_flags & !(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES) != 0 {
        return Err(NbdError::UnknownClientFlags(client_flags));
    }
    if client_flags & CLIENT_FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::NotFixedNewstyle(client_flags));
    }
    let no_zeroes = client_flags & CLIENT_FLAG_NO_ZEROES != 0;

    let mut data = Vec::new();
    for _ in 0..MAX_OPTIONS {
        let magic = read_u64(r)?;
        if magic != IHAVEOPT {
            return Err(NbdError::BadOptionMagic(magic));
        }
        let option = read_u32(r)?;
        let length = read_u32(r)?;
        if length > MAX_OPTION_LEN {
            return Err(NbdError::OptionTooLong {
                option,
                length,
                max: MAX_OPTION_LEN,
            });
        }
        data.clear();
        data.resize(length as usize, 0);
        r.read_exact(&mut data)?;
        match option {
            OPT_EXPORT_NAME => {
                if data != export.name.as_bytes() {
                    return Err(NbdError::UnknownExport(
                        String::from_utf8_lossy(&data).into_owned(),
                    ));
                }
                let mut reply = Vec::with_capacity(10 + 124);
                reply.extend_from_slice(&export.size.to_be_bytes());
                reply.extend_from_slice(&export.flags.to_be_bytes());
                if !no_zeroes {
                    reply.resize(10 + 124, 0);
                }
                w.write_all(&reply)?;
                w.flush()?;
                return Ok(Negotiated::Transmission);
            }
            OPT_ABORT => {
                // The client may already have closed; its ack is a courtesy.
                let _ = option_reply(w, option, REP_ACK, &[]);
                return Ok(Negotiated::Aborted);
            }
            OPT_LIST => {
                if data.is_empty() {
                    let mut entry = Vec::with_capacity(4 + export.name.len());
                    entry.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                    entry.extend_from_slice(export.name.as_bytes());
                    option_reply(w, option, REP_SERVER, &entry)?;
                    option_reply(w, option, REP_ACK, &[])?;
                } else {
                    option_reply(w, option, REP_ERR_INVALID, &[])?;
                }
            }
            OPT_INFO | OPT_GO => match parse_info_request(&data) {
                None => option_reply(w, option, REP_ERR_INVALID, &[])?,
                Some((name, _)) if name != export.name.as_bytes() => {
                    option_reply(w, option, REP_ERR_UNKNOWN, &[])?
                }
                Some((_, requests)) => {
                    let mut info = [0u8; 12];
                    info[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
                    info[2..10].copy_from_slice(&export.size.to_be_bytes());
                    info[10..12].copy_from_slice(&export.flags.to_be_bytes());
                    option_reply(w, option, REP_INFO, &info)?;
                    if requests
                        .chunks_exact(2)
                        .any(|c| u16::from_be_bytes([c[0], c[1]]) == INFO_BLOCK_SIZE)
                    {
                        // Any alignment works (min 1); whole 4 KiB blocks are cheapest to track.
                        let mut bs = [0u8; 14];
                        bs[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                        bs[2..6].copy_from_slice(&1u32.to_be_bytes());
                        bs[6..10].copy_from_slice(&4096u32.to_be_bytes());
                        bs[10..14].copy_from_slice(&export.max_payload.to_be_bytes());
                        option_reply(w, option, REP_INFO, &bs)?;
                    }
                    option_reply(w, option, REP_ACK, &[])?;
                    if option == OPT_GO {
                        return Ok(Negotiated::Transmission);
                    }
                }
            },
            // STARTTLS (a unix socket needs none), STRUCTURED_REPLY (simple replies suffice),
            // SET_META_CONTEXT and the rest: the client falls back.
            _ => option_reply(w, option, REP_ERR_UNSUP, &[])?,
        }
    }
    Err(NbdError::TooManyOptions(MAX_OPTIONS))
}

/// `OPT_INFO`/`OPT_GO` data: u32 name length, name, u16 request count, u16 requests.
/// Returns the name and the raw requests, or `None` if the lengths do not add up.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name_end = 4usize.checked_add(name_len)?;
    let name = data.get(4..name_end)?;
    let count_end = name_end.checked_add(2)?;
    let count = u16::from_be_bytes(data.get(name_end..count_end)?.try_into().ok()?) as usize;
    let requests = data.get(count_end..)?;
    (requests.len() == count * 2).then_some((name, requests))
}

fn option_reply<W: Write>(w: &mut W, option: u32, kind: u32, data: &[u8]) -> Result<(), NbdError> {
    let mut head = [0u8; 20];
    head[0..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    head[8..12].copy_from_slice(&option.to_be_bytes());
    head[12..16].copy_from_slice(&kind.to_be_bytes());
    head[16..20].copy_from_slice(&(data.len() as u32).to_be_bytes());
    w.write_all(&head)?;
    w.write_all(data)?;
    w.flush()?;
    Ok(())
}

fn read_u32<R: Read>(r: &mut R) -> Result<u32, NbdError> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64<R: Read>(r: &mut R) -> Result<u64, NbdError> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export() -> Export {
        Export {
            name: "disk".into(),
            size: 1 << 20,
            flags: TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH,
            max_payload: 1 << 16,
        }
    }

    fn option(code: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn run(client: &[u8]) -> (Result<Negotiated, NbdError>, Vec<u8>) {
        let mut out = Vec::new();
        let r = negotiate(&mut &client[..], &mut out, &export());
        (r, out)
    }

    #[test]
    fn export_name_with_and_without_zeroes() {
        let mut c = 1u32.to_be_bytes().to_vec();
        c.extend(option(OPT_EXPORT_NAME, b"disk"));
        let (r, out) = run(&c);
        assert_eq!(r.unwrap(), Negotiated::Transmission);
        assert_eq!(out.len(), 18 + 10 + 124);
        assert_eq!(&out[18..26], &(1u64 << 20).to_be_bytes());
        let mut c = 3u32.to_be_bytes().to_vec();
        c.extend(option(OPT_EXPORT_NAME, b"disk"));
        assert_eq!(run(&c).1.len(), 18 + 10);
        let mut c = 3u32.to_be_bytes().to_vec();
        c.extend(option(OPT_EXPORT_NAME, b"other"));
        assert!(matches!(run(&c).0, Err(NbdError::UnknownExport(n)) if n == "other"));
    }

    #[test]
    fn hostile_negotiations_end_with_errors_not_panics() {
        // Old-style (non-fixed) client, unknown flag bits.
        assert!(matches!(
            run(&0u32.to_be_bytes()).0,
            Err(NbdError::NotFixedNewstyle(0))
        ));
        assert!(matches!(
            run(&0x81u32.to_be_bytes()).0,
            Err(NbdError::UnknownClientFlags(_))
        ));
        // A 4 GiB option is refused before any allocation.
        let mut c = 3u32.to_be_bytes().to_vec();
        c.extend(IHAVEOPT.to_be_bytes());
        c.extend(OPT_GO.to_be_bytes());
        c.extend(u32::MAX.to_be_bytes());
        assert!(matches!(run(&c).0, Err(NbdError::OptionTooLong { .. })));
        // Bad option magic; truncated option; endless options.
        let mut c = 3u32.to_be_bytes().to_vec();
        c.extend(0u64.to_be_bytes());
        assert!(matches!(run(&c).0, Err(NbdError::BadOptionMagic(0))));
        let mut c = 3u32.to_be_bytes().to_vec();
        c.extend(&option(OPT_GO, b"0123456789")[..20]);
        assert!(matches!(run(&c).0, Err(NbdError::Io(_))));
        let mut c = 3u32.to_be_bytes().to_vec();
        for _ in 0..=MAX_OPTIONS {
            c.extend(option(99, b""));
        }
        assert!(matches!(run(&c).0, Err(NbdError::TooManyOptions(_))));
        // GO whose inner name length overruns the option: an error reply, negotiation goes on.
        let mut c = 3u32.to_be_bytes().to_vec();
        let mut go = u32::MAX.to_be_bytes().to_vec();
        go.extend(b"disk\0\0");
        c.extend(option(OPT_GO, &go));
        c.extend(option(OPT_ABORT, b""));
        let (r, out) = run(&c);
        assert_eq!(r.unwrap(), Negotiated::Aborted);
        assert_eq!(&out[18 + 12..18 + 16], &REP_ERR_INVALID.to_be_bytes());
    }

    #[test]
    fn parse_info_request_checks_every_length() {
        let mut d = 4u32.to_be_bytes().to_vec();
        d.extend(b"disk");
        d.extend(1u16.to_be_bytes());
        d.extend(INFO_BLOCK_SIZE.to_be_bytes());
        let (name, reqs) = parse_info_request(&d).unwrap();
        assert_eq!((name, reqs.len()), (&b"disk"[..], 2));
        assert!(parse_info_request(&d[..d.len() - 1]).is_none());
        assert!(parse_info_request(&d[..3]).is_none());
        assert!(parse_info_request(&[]).is_none());
    }
}
