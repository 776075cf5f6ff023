//! A small, strict NBD server (and a test client) for serving one disk image to QEMU's built-in
//! NBD client over a unix socket.
//!
//! Why not the `nbd` crate (vi/rust-nbd 0.3.1, the maintained-looking Rust server): its server
//! neither range-checks requests nor bounds their effects — a `CMD_WRITE` at any offset seeks
//! there and writes, growing a file-backed export without limit; a failed write replies without
//! consuming the payload, leaving the stream out of step; it has no `OPT_GO`/`OPT_INFO`, no
//! `CMD_WRITE_ZEROES`/`CMD_TRIM`; and it serves through `Read + Write + Seek`, hiding the offsets
//! the dirty-block tracking needs. What QEMU needs is small: the fixed newstyle handshake,
//! `OPT_GO`, and READ/WRITE/FLUSH/TRIM/WRITE_ZEROES/DISC with simple replies — written here,
//! with every length bounded and every range checked against the export (an error reply, never
//! a panic or an allocation sized by the client).

pub mod client;
pub mod error;
pub mod handshake;
pub mod proto;
pub mod transmission;

pub use client::NbdClient;
pub use error::NbdError;
pub use handshake::{negotiate, Export, Negotiated};
pub use transmission::{serve, Backend};
