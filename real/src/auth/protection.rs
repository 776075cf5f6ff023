//! What protects the frames of a checkpoint link after its handshake: a tag per frame (the
//! default), encryption (`--encrypt`), or — for benchmarks only, never offered on the command
//! line — nothing, to measure what the other two cost.

use ftvm_model::wire::{Item, StreamDecoder};
use ftvm_model::Generation;

use super::crypt::{Decryptor, Encryptor};
use super::handshake::Accepted;
use super::seal::{FrameOpener, FrameSealer, OpenError};

/// How a link's frames are protected. Both ends must agree: the mode is part of the handshake's
/// prologue, so a mismatch (or a downgrade by someone in the middle) fails the handshake.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protection {
    /// GMAC tag per frame: integrity and authenticity, pages still sent zero-copy.
    #[default]
    Mac,
    /// AES-256-GCM over the whole stream: confidentiality too, pages copied.
    Encrypt,
    /// Authenticated handshake, then nothing: benchmarks only (the baseline of the other two).
    Unprotected,
}

impl Protection {
    /// Its name in logs, prologues and benchmark tables.
    pub fn name(self) -> &'static str {
        match self {
            Protection::Mac => "mac",
            Protection::Encrypt => "encrypt",
            Protection::Unprotected => "none",
        }
    }
}

/// The sending half.
pub enum LinkSealer {
    /// Tags.
    Mac(FrameSealer),
    /// Encryption.
    Encrypt(Box<Encryptor>),
    /// Nothing (benchmarks).
    Unprotected,
}

/// The receiving half.
pub enum LinkOpener {
    /// Tags.
    Mac(Box<FrameOpener>),
    /// Encryption.
    Encrypt(Box<Decryptor>),
    /// Nothing (benchmarks).
    Unprotected(StreamDecoder),
}

/// The two halves for a finished handshake.
pub fn halves(p: Protection, acc: Accepted, dec: StreamDecoder) -> (LinkSealer, LinkOpener) {
    match p {
        Protection::Mac => (
            LinkSealer::Mac(FrameSealer::new(acc.send_key)),
            LinkOpener::Mac(Box::new(FrameOpener::new(dec, acc.recv_key))),
        ),
        Protection::Encrypt => {
            // Each direction keeps its own message counter: the writer and reader threads
            // share no state.
            (
                LinkSealer::Encrypt(Box::new(Encryptor::new(acc.tx))),
                LinkOpener::Encrypt(Box::new(Decryptor::new(acc.rx, dec))),
            )
        }
        Protection::Unprotected => (LinkSealer::Unprotected, LinkOpener::Unprotected(dec)),
    }
}

impl LinkOpener {
    /// Whether it holds decoded-but-unread input: call [`LinkOpener::decode`] while there is
    /// input or this is true.
    pub fn pending(&self) -> bool {
        match self {
            LinkOpener::Encrypt(d) => d.pending(),
            LinkOpener::Mac(_) | LinkOpener::Unprotected(_) => false,
        }
    }

    /// Consumes a prefix of `input` (or decrypted plaintext it holds) and yields at most one
    /// item.
    pub fn decode<'a>(
        &'a mut self,
        input: &'a [u8],
    ) -> Result<(usize, Option<Item<'a>>), OpenError> {
        match self {
            LinkOpener::Mac(o) => o.decode(input),
            LinkOpener::Encrypt(d) => d.decode(input),
            LinkOpener::Unprotected(d) => Ok(d.decode(input)?),
        }
    }

    /// Raises the generation floor.
    pub fn set_min_generation(&mut self, g: Generation) {
        match self {
            LinkOpener::Mac(o) => o.set_min_generation(g),
            LinkOpener::Encrypt(d) => d.set_min_generation(g),
            LinkOpener::Unprotected(d) => d.set_min_generation(g),
        }
    }

    /// The stream ended: fine only between frames.
    pub fn finish(&self) -> Result<(), OpenError> {
        match self {
            LinkOpener::Mac(o) => o.finish(),
            LinkOpener::Encrypt(d) => d.finish(),
            LinkOpener::Unprotected(d) => Ok(d.finish()?),
        }
    }
}

/// The real links' frames reach the driver's `LinkReader` through their opener: authenticated
/// (or decrypted) first, decoded after.
impl ftvm_driver::ItemDecoder for LinkOpener {
    type Error = OpenError;

    fn decode<'a>(
        &'a mut self,
        input: &'a [u8],
    ) -> Result<(usize, Option<ftvm_model::wire::Item<'a>>), OpenError> {
        LinkOpener::decode(self, input)
    }

    fn pending(&self) -> bool {
        LinkOpener::pending(self)
    }

    fn set_min_generation(&mut self, generation: Generation) {
        LinkOpener::set_min_generation(self, generation)
    }

    fn finish(&self) -> Result<(), OpenError> {
        LinkOpener::finish(self)
    }
}
