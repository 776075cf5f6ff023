//! QEMU's `-netdev stream` framing: each Ethernet frame travels as a 4-byte big-endian length
//! followed by the frame (docs/ARCHITECTURE.md, Output commit).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame we accept; anything larger means the stream is out of sync.
pub const MAX_FRAME: usize = 65_536 + 64;

/// Errors of the stream framing.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer sent a length no Ethernet frame can have.
    #[error("netdev stream frame of {0} bytes is out of range (1..={MAX_FRAME})")]
    BadLength(usize),
    /// The socket failed.
    #[error("netdev stream i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(FrameError::BadLength(len));
    }
    let mut frame = vec![0u8; len];
    r.read_exact(&mut frame).await?;
    Ok(Some(frame))
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) -> Result<(), FrameError> {
    if frame.is_empty() || frame.len() > MAX_FRAME {
        return Err(FrameError::BadLength(frame.len()));
    }
    let mut buf = Vec::with_capacity(4 + frame.len());
    buf.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    buf.extend_from_slice(frame);
    w.write_all(&buf).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_and_clean_eof() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write_frame(&mut a, &[1, 2, 3]).await.unwrap();
        write_frame(&mut a, &[4; 1500]).await.unwrap();
        drop(a);
        assert_eq!(read_frame(&mut b).await.unwrap(), Some(vec![1, 2, 3]));
        assert_eq!(read_frame(&mut b).await.unwrap(), Some(vec![4; 1500]));
        assert_eq!(read_frame(&mut b).await.unwrap(), None);
    }

    #[tokio::test]
    async fn rejects_insane_length() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, &u32::MAX.to_be_bytes())
            .await
            .unwrap();
        assert!(matches!(
            read_frame(&mut b).await,
            Err(FrameError::BadLength(_))
        ));
    }
}
