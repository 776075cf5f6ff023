//! Framing of handshake and witness messages: `FTVA`, a version byte, a kind byte, a 2-byte
//! big-endian length, then that many bytes (at most a Noise message, 65,535 bytes). The magic
//! lets a node that meets an old, unauthenticated ftvm (or anything else) say so in one line.

use std::io::{Read, Write};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::AuthError;

const MAGIC: [u8; 4] = *b"FTVA";
const VERSION: u8 = 2;
const HEAD_LEN: usize = 8;

/// The largest message (Noise's limit).
pub(crate) const MAX_MSG: usize = 65_535;

/// What a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    /// First handshake message (dialler to listener).
    Hello = 1,
    /// Second handshake message.
    Welcome = 2,
    /// A Noise transport message (after the handshake).
    Sealed = 3,
}

fn head(kind: Kind, len: u16) -> [u8; HEAD_LEN] {
    let mut h = [0; HEAD_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = VERSION;
    h[5] = kind as u8;
    h[6..].copy_from_slice(&len.to_be_bytes());
    h
}

fn parse(h: &[u8; HEAD_LEN], want: Kind) -> Result<usize, AuthError> {
    if h[..4] != MAGIC || h[4] != VERSION {
        return Err(AuthError::BadMagic);
    }
    if h[5] != want as u8 {
        return Err(AuthError::Malformed("unexpected message kind"));
    }
    Ok(usize::from(u16::from_be_bytes([h[6], h[7]])))
}

/// The length field of a `len`-byte message: at most a Noise message (which fits its 2 bytes).
fn wire_len(len: usize) -> Result<u16, AuthError> {
    const TOO_LONG: AuthError = AuthError::Malformed("message longer than a Noise message");
    if len > MAX_MSG {
        return Err(TOO_LONG);
    }
    u16::try_from(len).map_err(|_| TOO_LONG)
}

/// Writes one message.
pub(crate) fn write(w: &mut impl Write, kind: Kind, body: &[u8]) -> Result<(), AuthError> {
    let len = wire_len(body.len())?;
    let mut out = Vec::with_capacity(HEAD_LEN + body.len());
    out.extend_from_slice(&head(kind, len));
    out.extend_from_slice(body);
    w.write_all(&out)?;
    Ok(())
}

/// Reads one message of kind `want`.
pub(crate) fn read(r: &mut impl Read, want: Kind) -> Result<Vec<u8>, AuthError> {
    let mut h = [0; HEAD_LEN];
    r.read_exact(&mut h)?;
    let len = parse(&h, want)?;
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

/// Writes one message (async).
pub(crate) async fn write_async(
    w: &mut (impl AsyncWriteExt + Unpin),
    kind: Kind,
    body: &[u8],
) -> Result<(), AuthError> {
    let len = wire_len(body.len())?;
    let mut out = Vec::with_capacity(HEAD_LEN + body.len());
    out.extend_from_slice(&head(kind, len));
    out.extend_from_slice(body);
    w.write_all(&out).await?;
    Ok(())
}

/// Reads one message of kind `want` (async).
pub(crate) async fn read_async(
    r: &mut (impl AsyncReadExt + Unpin),
    want: Kind,
) -> Result<Vec<u8>, AuthError> {
    let mut h = [0; HEAD_LEN];
    r.read_exact(&mut h).await?;
    let len = parse(&h, want)?;
    let mut body = vec![0; len];
    r.read_exact(&mut body).await?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_round_trips_and_other_kinds_or_protocols_are_refused() {
        let mut buf = Vec::new();
        write(&mut buf, Kind::Hello, b"abc").unwrap();
        assert_eq!(read(&mut &buf[..], Kind::Hello).unwrap(), b"abc");
        assert!(matches!(
            read(&mut &buf[..], Kind::Welcome),
            Err(AuthError::Malformed(_))
        ));
        // An old ftvm frame (or anything else) is not mistaken for a handshake.
        let old = ftvm_model::wire::encode_peer(
            ftvm_model::VmId(1),
            &ftvm_model::PeerMsg::Heartbeat {
                generation: ftvm_model::Generation(1),
                epoch: ftvm_model::Epoch(1),
            },
        );
        assert!(matches!(
            read(&mut &old[..], Kind::Hello),
            Err(AuthError::BadMagic)
        ));
        // Truncated input is an I/O error, not a panic.
        assert!(matches!(
            read(&mut &buf[..5], Kind::Hello),
            Err(AuthError::Io(_))
        ));
    }

    /// The length field is two bytes: the longest message fits it exactly, one byte more is
    /// refused before anything is written (a truncated length would desynchronise the stream).
    #[test]
    fn a_message_longer_than_its_length_field_is_refused() {
        let mut buf = Vec::new();
        let longest = vec![7u8; MAX_MSG];
        write(&mut buf, Kind::Sealed, &longest).unwrap();
        assert_eq!(read(&mut &buf[..], Kind::Sealed).unwrap(), longest);
        let mut buf = Vec::new();
        assert!(matches!(
            write(&mut buf, Kind::Sealed, &vec![7u8; MAX_MSG + 1]),
            Err(AuthError::Malformed(_))
        ));
        assert!(buf.is_empty());
    }
}
