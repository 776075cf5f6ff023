//! Errors of the disk backend.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use super::nbd::NbdError;
use super::BLOCK_SIZE;

/// What can go wrong with the disk image or its server.
#[derive(Debug, Error)]
pub enum DiskError {
    /// Opening, creating or sizing the image file failed.
    #[error("disk image {path}: {source}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Images are whole blocks (QEMU itself wants 512-byte sectors; blocks are what is tracked).
    #[error("disk image size {0} is not a positive multiple of {BLOCK_SIZE} bytes")]
    BadSize(u64),
    /// A block index past the image's end.
    #[error("block {index} is beyond the image's {blocks} blocks")]
    BlockOutOfRange {
        /// The index asked for.
        index: u64,
        /// Blocks in the image.
        blocks: u64,
    },
    /// Reading or writing the image failed.
    #[error("disk image I/O: {0}")]
    Io(#[from] io::Error),
    /// The listening socket could not be set up.
    #[error("disk socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The export name cannot be sent in the protocol (empty, over 4096 bytes, or a comma,
    /// which QEMU's option syntax would split).
    #[error("export name {0:?} must be 1..=4096 bytes without commas")]
    BadExportName(String),
    /// The server thread could not be started.
    #[error("cannot start a disk server thread: {0}")]
    Thread(#[source] io::Error),
    /// An NBD connection failed.
    #[error(transparent)]
    Nbd(#[from] NbdError),
}
