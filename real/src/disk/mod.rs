//! The VM's disk, served by the agent: QEMU's built-in NBD client talks to [`DiskServer`] over a
//! unix socket, so every guest write passes through the agent, lands in a raw image file and
//! marks the 4096-byte blocks it touched. At a checkpoint (VM stopped: QEMU drains and flushes
//! its block I/O before `stop` returns) [`DiskServer::take_dirty`] names the blocks written since
//! the previous checkpoint and [`DiskServer::read_blocks`] reads them for the backup.

mod dirty;
mod error;
mod image;
pub mod nbd;
mod server;
mod snapshot;
mod stats;

pub use dirty::DirtyBlocks;
pub use error::DiskError;
pub use image::{digest_file, DiskImage};
pub use server::{DiskServer, DiskServerConfig, SnapshotReader, DEFAULT_MAX_PAYLOAD};
pub use snapshot::DiskSnapshot;
pub use stats::DiskStats;

/// The unit of dirty tracking and capture.
pub const BLOCK_SIZE: u64 = 4096;
