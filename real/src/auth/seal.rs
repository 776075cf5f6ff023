//! Frame authentication on checkpoint links: every wire frame is followed by a tag, GMAC
//! (AES-256) over the frame's bytes with the frame's sequence number as nonce, under the sending
//! direction's key from the handshake. The sequence number makes a frame valid only at its place
//! in its stream: a frame replayed, dropped, reordered or reflected back to its sender fails its
//! tag; and since each direction has its own key, no nonce is ever used twice under a key.
//!
//! Why GMAC (`ftvm bench mac`, docs/bench/mac.md): the tag runs incrementally over the pages as
//! they are handed to the transport, so pages are never copied for it, and a sender feeds it one
//! scattered 4 KiB page at a time. Fed so, on this project's machines, GMAC ran at 1.96–3.6
//! GiB/s per core, HMAC-SHA256 (SHA extensions) at 1.15–1.26, Poly1305 at 1.9–2.1 and keyed
//! BLAKE3 at 0.85–0.98. Both ends pay it on every page of every checkpoint, and the backup's
//! reader is what an ack waits for: at 10,000 pages HMAC cost ~33 ms on each side, GMAC ~12 ms.
//! The GMAC glue around the `aes` and `ghash` crates is ours (see [`super::gmac`]), checked
//! against `aes-gcm`.
//!
//! The receiver ([`FrameOpener`]) wraps the wire's [`StreamDecoder`]: page and device items of
//! a checkpoint come out as they arrive (they are only staged, as with the checksum), but an
//! item that completes a frame — a message, a witness frame, a checkpoint's end — comes out only
//! once its tag has been read and checked. Nothing unauthenticated reaches the model.

use ftvm_model::wire::{Item, StreamDecoder, WireError};
use ftvm_model::Generation;

use super::gmac::{Gmac, GmacKey, GMAC_TAG_LEN};
use super::keys::KEY_LEN;

/// Bytes of a frame's tag.
pub const TAG_LEN: usize = GMAC_TAG_LEN;

/// Errors of an authenticated stream. After one the stream is dead: drop the connection.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    /// The frame itself is malformed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The frame's tag does not match: it was forged, damaged, replayed or reordered.
    #[error("frame {seq} failed authentication")]
    BadTag {
        /// Its sequence number.
        seq: u64,
    },
    /// An encrypted message failed to decrypt (forged, damaged, replayed or reordered), or the
    /// stream ended inside one.
    #[error("encrypted stream failed authentication or ended mid-message")]
    Decrypt,
    /// The stream ended between a frame and its tag.
    #[error("stream closed before the tag of frame {seq}")]
    Truncated {
        /// Its sequence number.
        seq: u64,
    },
}

/// The sending side: one [`FrameMac`] per frame, in send order.
pub struct FrameSealer {
    key: GmacKey,
    seq: u64,
}

impl FrameSealer {
    /// A sealer with this direction's key.
    pub fn new(key: [u8; KEY_LEN]) -> FrameSealer {
        FrameSealer {
            key: GmacKey::new(&key),
            seq: 0,
        }
    }

    /// Starts the next frame's tag: feed it every byte of the frame in order.
    pub fn begin(&mut self) -> FrameMac {
        let mac = FrameMac(self.key.begin(self.seq));
        self.seq += 1;
        mac
    }

    /// The tag of a frame held whole in memory.
    pub fn seal(&mut self, frame: &[u8]) -> [u8; TAG_LEN] {
        let mut mac = self.begin();
        mac.update(frame);
        mac.finish()
    }
}

/// The tag of one frame being sent.
pub struct FrameMac(Gmac);

impl FrameMac {
    /// Feeds the next bytes of the frame.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The tag to send right after the frame.
    pub fn finish(self) -> [u8; TAG_LEN] {
        self.0.finish()
    }
}

/// The receiving side: decodes frames and checks each one's tag before handing out what it
/// completes.
pub struct FrameOpener {
    dec: StreamDecoder,
    key: GmacKey,
    seq: u64,
    mac: Option<Gmac>,
    /// A frame waiting for its tag: the item it completes and the MAC its tag must match.
    held: Option<(Item<'static>, Gmac)>,
    tag: [u8; TAG_LEN],
    got: usize,
    dead: Option<OpenError>,
}

impl FrameOpener {
    /// An opener over `dec` with the other direction's key.
    pub fn new(dec: StreamDecoder, key: [u8; KEY_LEN]) -> FrameOpener {
        FrameOpener {
            dec,
            key: GmacKey::new(&key),
            seq: 0,
            mac: None,
            held: None,
            tag: [0; TAG_LEN],
            got: 0,
            dead: None,
        }
    }

    /// Raises the decoder's generation floor.
    pub fn set_min_generation(&mut self, generation: Generation) {
        self.dec.set_min_generation(generation);
    }

    /// Consumes a prefix of `input`; returns bytes used and at most one item. With non-empty
    /// input every call consumes at least one byte or fails; after a failure every call fails
    /// the same way.
    pub fn decode<'a>(
        &'a mut self,
        input: &'a [u8],
    ) -> Result<(usize, Option<Item<'a>>), OpenError> {
        if let Some(e) = &self.dead {
            return Err(e.clone());
        }
        if input.is_empty() {
            return Ok((0, None));
        }
        if self.held.is_some() {
            let n = (TAG_LEN - self.got).min(input.len());
            self.tag[self.got..self.got + n].copy_from_slice(&input[..n]);
            self.got += n;
            if self.got < TAG_LEN {
                return Ok((n, None));
            }
            let (item, mac) = self.held.take().expect("checked above");
            // Compared in constant time.
            if !mac.verify(&self.tag) {
                let e = OpenError::BadTag { seq: self.seq };
                self.dead = Some(e.clone());
                return Err(e);
            }
            self.got = 0;
            self.seq += 1;
            return Ok((n, Some(item)));
        }
        let (key, seq) = (&self.key, self.seq);
        let mac = self.mac.get_or_insert_with(|| key.begin(seq));
        // A decoder error poisons the decoder, which then repeats it: no need to record it.
        let (used, item) = self.dec.decode(input)?;
        mac.update(&input[..used]);
        let complete: Option<Item<'static>> = match item {
            Some(Item::Peer(m)) => Some(Item::Peer(m)),
            Some(Item::WitnessRequest(r)) => Some(Item::WitnessRequest(r)),
            Some(Item::WitnessReply(r)) => Some(Item::WitnessReply(r)),
            Some(Item::CheckpointEnd { epoch }) => Some(Item::CheckpointEnd { epoch }),
            other => return Ok((used, other)),
        };
        let mac = self.mac.take().expect("started above");
        self.held = complete.map(|item| (item, mac));
        Ok((used, None))
    }

    /// The stream ended: fine only between frames.
    pub fn finish(&self) -> Result<(), OpenError> {
        if let Some(e) = &self.dead {
            return Err(e.clone());
        }
        if self.held.is_some() {
            return Err(OpenError::Truncated { seq: self.seq });
        }
        self.dec.finish()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use ftvm_model::wire::{encode_checkpoint, encode_peer, Expect};
    use ftvm_model::{Epoch, PeerMsg, VmId};

    use super::*;

    const KEY: [u8; KEY_LEN] = [7; KEY_LEN];

    fn hb(epoch: u64) -> Vec<u8> {
        encode_peer(
            VmId(1),
            &PeerMsg::Heartbeat {
                generation: Generation(1),
                epoch: Epoch(epoch),
            },
        )
    }

    fn sealed(frames: &[Vec<u8>], key: [u8; KEY_LEN]) -> Vec<u8> {
        let mut s = FrameSealer::new(key);
        let mut out = Vec::new();
        for f in frames {
            out.extend_from_slice(f);
            out.extend_from_slice(&s.seal(f));
        }
        out
    }

    /// Decodes `stream` fed in chunks of `chunk` bytes; returns the completed items' epochs
    /// (messages and checkpoint ends) and the error, if any.
    fn open(stream: &[u8], key: [u8; KEY_LEN], chunk: usize) -> (Vec<u64>, Option<OpenError>) {
        let mut o = FrameOpener::new(StreamDecoder::new(Expect::vm(VmId(1))), key);
        let mut out = Vec::new();
        for mut piece in stream.chunks(chunk) {
            while !piece.is_empty() {
                match o.decode(piece) {
                    Ok((used, item)) => {
                        match item {
                            Some(Item::Peer(PeerMsg::Heartbeat { epoch, .. })) => out.push(epoch.0),
                            Some(Item::CheckpointEnd { epoch }) => out.push(epoch.0),
                            _ => {}
                        }
                        piece = &piece[used..];
                    }
                    Err(e) => return (out, Some(e)),
                }
            }
        }
        (out, o.finish().err())
    }

    fn checkpoint(epoch: u64) -> Vec<u8> {
        let page = vec![0xa5u8; 4096];
        encode_checkpoint(
            VmId(1),
            Generation(1),
            Epoch(epoch),
            false,
            4096,
            &[(4, &page[..]), (9, &page[..])],
            b"dev",
        )
        .unwrap()
    }

    #[test]
    fn sealed_frames_open_in_any_chunking() {
        let stream = sealed(&[hb(1), checkpoint(2), hb(3)], KEY);
        for chunk in [1, 7, 32, 100, 4096, stream.len()] {
            assert_eq!(
                open(&stream, KEY, chunk),
                (vec![1, 2, 3], None),
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_fails_before_the_frame_is_handed_out() {
        let stream = sealed(&[hb(1), checkpoint(2)], KEY);
        let first = hb(1).len() + TAG_LEN;
        // Flip bits in the second frame (its checkpoint body and its tag): the heartbeat
        // before it comes out, the checkpoint never does.
        for at in (first..stream.len()).step_by(997) {
            let mut bad = stream.clone();
            bad[at] ^= 0x10;
            let (items, err) = open(&bad, KEY, 512);
            assert_eq!(items, vec![1], "flip at {at}");
            assert!(err.is_some(), "flip at {at}");
        }
    }

    #[test]
    fn a_frame_with_a_valid_checksum_but_no_key_is_refused() {
        // An attacker can compute the wire's crc32, but not the tag.
        let mut stream = hb(1);
        stream.extend_from_slice(&[0; TAG_LEN]);
        let (items, err) = open(&stream, KEY, 64);
        assert!(items.is_empty());
        assert_eq!(err, Some(OpenError::BadTag { seq: 0 }));
    }

    #[test]
    fn replayed_reordered_or_reflected_frames_are_refused() {
        let a = hb(1);
        let b = hb(2);
        let mut s = FrameSealer::new(KEY);
        let ta = s.seal(&a);
        let tb = s.seal(&b);
        // Replay of frame 0 in slot 1.
        let replay = [a.clone(), ta.to_vec(), a.clone(), ta.to_vec()].concat();
        assert_eq!(
            open(&replay, KEY, 64),
            (vec![1], Some(OpenError::BadTag { seq: 1 }))
        );
        // Reordered.
        let reordered = [b.clone(), tb.to_vec(), a.clone(), ta.to_vec()].concat();
        assert_eq!(open(&reordered, KEY, 64).0, Vec::<u64>::new());
        // Sealed under the other direction's key (reflection).
        let other = sealed(&[a], [8; KEY_LEN]);
        assert_eq!(open(&other, KEY, 64).0, Vec::<u64>::new());
    }

    #[test]
    fn a_stream_cut_between_frame_and_tag_is_an_error() {
        let stream = sealed(&[hb(1)], KEY);
        let cut = &stream[..stream.len() - 5];
        assert_eq!(
            open(cut, KEY, 64),
            (vec![], Some(OpenError::Truncated { seq: 0 }))
        );
    }
}
