//! Confidentiality for checkpoint links (`--encrypt`): the byte stream of wire frames is cut
//! into Noise transport messages (AES-256-GCM under the handshake's keys, each with its
//! own nonce, so order and completeness are checked too), each sent as a 2-byte length and the
//! ciphertext.
//!
//! Encrypting writes every page into a new buffer, so an encrypted link cannot send pages by
//! zero-copy: the sender copies (and encrypts) while it sends, whatever transport is configured.

use ftvm_model::wire::{Item, StreamDecoder};

use super::handshake::Channel;
use super::seal::OpenError;

/// Noise's limit on one message, and its tag.
const MAX_MSG: usize = 65_535;
const AEAD_TAG: usize = 16;
/// Plaintext bytes per message.
pub const MAX_PLAIN: usize = MAX_MSG - AEAD_TAG;
/// Sealed messages gathered before one send.
const SEND_BATCH: usize = 1 << 20;

/// The sending side: gathers plaintext, seals full messages, hands batches to `flush`.
pub struct Encryptor {
    t: Channel,
    plain: Vec<u8>,
    out: Vec<u8>,
}

impl Encryptor {
    /// An encryptor on a finished handshake's transport.
    pub fn new(t: Channel) -> Encryptor {
        Encryptor {
            t,
            plain: Vec::with_capacity(MAX_PLAIN),
            out: Vec::with_capacity(SEND_BATCH + MAX_MSG + 2),
        }
    }

    fn seal(&mut self) -> Result<(), snow::Error> {
        let at = self.out.len();
        self.out.resize(at + 2 + MAX_MSG, 0);
        let n = self.t.seal(&self.plain, &mut self.out[at + 2..])?;
        // At most MAX_MSG (= u16::MAX) bytes fit the slice; a longer one would not fit the
        // 2-byte length and is refused rather than sent with a wrong one.
        let len = u16::try_from(n).map_err(|_| snow::Error::Input)?;
        self.out[at..at + 2].copy_from_slice(&len.to_be_bytes());
        self.out.truncate(at + 2 + n);
        self.plain.clear();
        Ok(())
    }

    /// Adds `bytes` to the stream; calls `flush` with sealed bytes whenever a batch is full.
    pub fn push<E: From<snow::Error>>(
        &mut self,
        mut bytes: &[u8],
        flush: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        while !bytes.is_empty() {
            let n = (MAX_PLAIN - self.plain.len()).min(bytes.len());
            self.plain.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.plain.len() == MAX_PLAIN {
                self.seal()?;
                if self.out.len() >= SEND_BATCH {
                    flush(&self.out)?;
                    self.out.clear();
                }
            }
        }
        Ok(())
    }

    /// Seals what is left and flushes everything: the end of a frame.
    pub fn finish<E: From<snow::Error>>(
        &mut self,
        flush: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        if !self.plain.is_empty() {
            self.seal()?;
        }
        if !self.out.is_empty() {
            flush(&self.out)?;
            self.out.clear();
        }
        Ok(())
    }
}

/// The receiving side: reassembles messages, decrypts them, decodes the plaintext.
pub struct Decryptor {
    t: Channel,
    dec: StreamDecoder,
    head: [u8; 2],
    head_got: usize,
    msg: Vec<u8>,
    need: usize,
    plain: Vec<u8>,
    pos: usize,
    dead: Option<OpenError>,
}

impl Decryptor {
    /// A decryptor on a finished handshake's transport, decoding with `dec`.
    pub fn new(t: Channel, dec: StreamDecoder) -> Decryptor {
        Decryptor {
            t,
            dec,
            head: [0; 2],
            head_got: 0,
            msg: Vec::with_capacity(MAX_MSG),
            need: 0,
            plain: Vec::with_capacity(MAX_MSG),
            pos: 0,
            dead: None,
        }
    }

    /// Raises the decoder's generation floor.
    pub fn set_min_generation(&mut self, g: ftvm_model::Generation) {
        self.dec.set_min_generation(g);
    }

    /// Whether decrypted plaintext is waiting to be decoded: call [`Decryptor::decode`] while
    /// there is input or this is true.
    pub fn pending(&self) -> bool {
        self.pos < self.plain.len()
    }

    /// Decodes some plaintext already decrypted (then it consumes no input and may yield
    /// nothing), or consumes a prefix of `input`.
    pub fn decode<'a>(
        &'a mut self,
        input: &'a [u8],
    ) -> Result<(usize, Option<Item<'a>>), OpenError> {
        if let Some(e) = &self.dead {
            return Err(e.clone());
        }
        if self.pos < self.plain.len() {
            let (used, item) = self.dec.decode(&self.plain[self.pos..])?;
            self.pos += used;
            return Ok((0, item));
        }
        let mut used = 0;
        if self.head_got < 2 {
            let n = (2 - self.head_got).min(input.len());
            self.head[self.head_got..self.head_got + n].copy_from_slice(&input[..n]);
            self.head_got += n;
            used += n;
            if self.head_got < 2 {
                return Ok((used, None));
            }
            self.need = usize::from(u16::from_be_bytes(self.head));
            self.msg.clear();
        }
        let n = (self.need - self.msg.len()).min(input.len() - used);
        self.msg.extend_from_slice(&input[used..used + n]);
        used += n;
        if self.msg.len() == self.need {
            self.plain.resize(MAX_MSG, 0);
            match self.t.open(&self.msg, &mut self.plain) {
                Ok(len) => self.plain.truncate(len),
                Err(_) => {
                    let e = OpenError::Decrypt;
                    self.dead = Some(e.clone());
                    return Err(e);
                }
            }
            self.pos = 0;
            self.head_got = 0;
        }
        Ok((used, None))
    }

    /// The stream ended: fine only between frames.
    pub fn finish(&self) -> Result<(), OpenError> {
        if let Some(e) = &self.dead {
            return Err(e.clone());
        }
        if self.head_got > 0 || self.pos < self.plain.len() {
            return Err(OpenError::Decrypt);
        }
        self.dec.finish()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use ftvm_model::wire::{encode_checkpoint, encode_peer, Expect};
    use ftvm_model::{Epoch, Generation, NodeId, PeerMsg, VmId};

    use super::*;
    use crate::auth::handshake::{self, Purpose};
    use crate::auth::{Identity, Protection};

    /// A connected pair of channels (dialler's tx feeds listener's rx).
    fn channels() -> (Channel, Channel) {
        let (_, mut ids) = Identity::generate_set(&[NodeId(1), NodeId(2)]).unwrap();
        let (a, b) = (
            ids.remove(&NodeId(1)).unwrap(),
            ids.remove(&NodeId(2)).unwrap(),
        );
        let (mut sa, mut sb) = std::os::unix::net::UnixStream::pair().unwrap();
        let them = b.me.public;
        let p = Purpose::Link(Protection::Encrypt);
        let t = std::thread::spawn(move || handshake::listen(&mut sb, &b, p, VmId(1)).unwrap());
        let d = handshake::dial(&mut sa, &a, &them, p, VmId(1)).unwrap();
        let l = t.join().unwrap();
        (d.tx, l.rx)
    }

    fn frames() -> Vec<u8> {
        let big = vec![0x3cu8; 4096];
        let pages: Vec<(u64, &[u8])> = (0..40).map(|i| (i, &big[..])).collect();
        let mut out = encode_peer(
            VmId(1),
            &PeerMsg::Heartbeat {
                generation: Generation(1),
                epoch: Epoch(1),
            },
        );
        out.extend(
            encode_checkpoint(VmId(1), Generation(1), Epoch(2), false, 4096, &pages, b"d").unwrap(),
        );
        out
    }

    fn sealed(tx: Channel, plain: &[u8]) -> Vec<u8> {
        let mut e = Encryptor::new(tx);
        let mut wire = Vec::new();
        let mut flush = |b: &[u8]| -> Result<(), snow::Error> {
            wire.extend_from_slice(b);
            Ok(())
        };
        e.push(plain, &mut flush).unwrap();
        e.finish(&mut flush).unwrap();
        wire
    }

    /// Decodes `wire` in `chunk`-byte reads; returns the epochs of completed items.
    fn open(rx: Channel, wire: &[u8], chunk: usize) -> Result<Vec<u64>, OpenError> {
        let mut d = Decryptor::new(rx, StreamDecoder::new(Expect::vm(VmId(1))));
        let mut out = Vec::new();
        for mut piece in wire.chunks(chunk) {
            loop {
                let (used, item) = d.decode(piece)?;
                match item {
                    Some(Item::Peer(PeerMsg::Heartbeat { epoch, .. })) => out.push(epoch.0),
                    Some(Item::CheckpointEnd { epoch }) => out.push(epoch.0),
                    _ => {}
                }
                piece = &piece[used..];
                if piece.is_empty() && !d.pending() {
                    break;
                }
            }
        }
        d.finish()?;
        Ok(out)
    }

    #[test]
    fn an_encrypted_stream_decodes_in_any_chunking_and_hides_the_pages() {
        let plain = frames();
        for chunk in [1, 100, 70_000, 1 << 20] {
            let (tx, rx) = channels();
            let wire = sealed(tx, &plain);
            assert!(
                !wire.windows(64).any(|w| w.iter().all(|&b| b == 0x3c)),
                "page visible"
            );
            assert_eq!(open(rx, &wire, chunk).unwrap(), vec![1, 2], "chunk {chunk}");
        }
    }

    #[test]
    fn a_flipped_bit_or_a_cut_stream_is_refused() {
        let plain = frames();
        let (tx, _) = channels();
        let wire = sealed(tx, &plain);
        for at in [0, 1, 2, 500, wire.len() - 1] {
            let (tx, rx) = channels();
            let mut bad = sealed(tx, &plain);
            bad[at] ^= 0x01;
            assert!(open(rx, &bad, 4096).is_err(), "flip at {at}");
        }
        let (tx, rx) = channels();
        let w = sealed(tx, &plain);
        assert_eq!(open(rx, &w[..w.len() - 3], 4096), Err(OpenError::Decrypt));
    }
}
