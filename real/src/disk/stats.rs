//! What the disk server did, for logs and benchmarks.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters since the server started (a snapshot from [`super::DiskServer::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// `CMD_READ` served.
    pub reads: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// `CMD_WRITE` served.
    pub writes: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// `CMD_WRITE_ZEROES` and `CMD_TRIM` served.
    pub zeroes: u64,
    /// Bytes zeroed or discarded.
    pub bytes_zeroed: u64,
    /// `CMD_FLUSH` served.
    pub flushes: u64,
    /// Requests answered with an error (out of range, too large, unknown, I/O error).
    pub refused: u64,
    /// Connections accepted.
    pub connections: u64,
    /// Connections that ended by a protocol or socket error (not a clean disconnect).
    pub failed_connections: u64,
}

/// The live counters.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub reads: AtomicU64,
    pub bytes_read: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_written: AtomicU64,
    pub zeroes: AtomicU64,
    pub bytes_zeroed: AtomicU64,
    pub flushes: AtomicU64,
    pub refused: AtomicU64,
    pub connections: AtomicU64,
    pub failed_connections: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn snapshot(&self) -> DiskStats {
        DiskStats {
            reads: self.reads.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            writes: self.writes.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            zeroes: self.zeroes.load(Relaxed),
            bytes_zeroed: self.bytes_zeroed.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            refused: self.refused.load(Relaxed),
            connections: self.connections.load(Relaxed),
            failed_connections: self.failed_connections.load(Relaxed),
        }
    }
}
