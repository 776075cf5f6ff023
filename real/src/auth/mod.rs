//! Who may talk to an agent or a witness, and proof that every frame came from them.
//!
//! Every node (agent) and the witness has a static X25519 key pair; each knows the public keys
//! of the others from its key directory ([`keys`]). A connection starts with a Noise `IK`
//! handshake ([`handshake`], via the `snow` crate): the dialler proves it holds the private key
//! of one configured node, the listener proves it holds the key the dialler expected, and both
//! learn fresh per-direction frame keys sent inside the handshake's encrypted payloads. The
//! connection is then bound to the node its key belongs to: it can speak only as that node.
//!
//! After the handshake, checkpoint links carry the ordinary wire frames, each followed by a
//! GMAC tag over the frame's bytes, with its sequence number as nonce ([`seal`], [`gmac`]). The tag is
//! computed while the frame is sent, over the very bytes handed to the transport, so pages still
//! go out of guest RAM or the staging buffer by zero-copy sends: integrity costs a pass over the
//! pages, not a copy. With `--encrypt` the link's whole byte stream travels as Noise transport
//! messages instead ([`crypt`]), which costs a copy of every page. Witness exchanges are small
//! and always travel as Noise transport messages.

// Values here come off the wire (or go onto it): a cast that drops bits must be a checked
// conversion, or say why it cannot lose anything.
#![warn(clippy::cast_possible_truncation)]

pub mod crypt;
pub mod gmac;
pub mod handshake;
pub mod keys;
mod msg_io;
pub mod protection;
pub mod seal;

pub use handshake::{Accepted, Purpose};
pub use keys::{Identity, KeyError, PublicKey, Trust};
pub use protection::{LinkOpener, LinkSealer, Protection};
pub use seal::{FrameOpener, FrameSealer, OpenError, TAG_LEN};

/// Errors of authentication.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The Noise handshake failed (wrong key, damaged or forged message).
    #[error("handshake: {0}")]
    Noise(#[from] snow::Error),
    /// The other side's static key is not one of the configured nodes'.
    #[error("unknown key: the peer is not a configured node")]
    UnknownKey,
    /// The other side authenticated as a node that may not use this purpose.
    #[error("node {0} may not connect here")]
    NotAllowed(ftvm_model::NodeId),
    /// The other side does not speak this protocol (or not this version).
    #[error("not an ftvm authenticated connection (bad magic or version)")]
    BadMagic,
    /// A handshake message was of the wrong kind or size.
    #[error("malformed handshake message: {0}")]
    Malformed(&'static str),
    /// The connection failed or timed out during the handshake.
    #[error("handshake I/O: {0}")]
    Io(#[from] std::io::Error),
}
