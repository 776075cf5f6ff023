//! A point-in-time view of the disk for a full checkpoint, read while the guest runs on.
//!
//! A sync sends every block of the disk that holds data; copying them all while the VM is paused
//! would pause it for seconds on a disk of a few GiB (and hold them all in memory). Instead the
//! capture only lists the blocks (an extent scan) and installs a snapshot; the link writer then
//! reads each block as it sends it. A guest write to a listed block not sent yet first saves
//! the block's old contents here, so what goes out is the disk as it was at the capture.
//!
//! Ordering: a writer takes the snapshot's lock, saves the old block if it is still pending,
//! releases the lock, then writes the image. A reader takes the lock, and either takes the saved
//! copy or reads the image while holding the lock (so no writer can save-and-overwrite that block
//! meanwhile), then marks the block sent. Either way it sees the contents as of the capture.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::error::DiskError;
use super::image::DiskImage;
use super::BLOCK_SIZE;

const BS: usize = BLOCK_SIZE as usize;

/// The blocks of a full checkpoint and the old contents of those the guest overwrote since.
#[derive(Debug)]
pub struct DiskSnapshot {
    /// Blocks to send, sorted.
    blocks: Vec<u64>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// One bit per entry of `blocks`: not read yet.
    pending: Vec<u64>,
    /// Old contents of pending blocks the guest overwrote, by block index.
    saved: HashMap<u64, Box<[u8]>>,
}

impl DiskSnapshot {
    /// A snapshot of `blocks` (sorted, no repeats), all pending.
    pub fn new(blocks: Vec<u64>) -> DiskSnapshot {
        let mut pending = vec![u64::MAX; blocks.len().div_ceil(64)];
        if let Some(last) = pending.last_mut() {
            let used = blocks.len() % 64;
            if used != 0 {
                *last = (1u64 << used) - 1;
            }
        }
        DiskSnapshot {
            blocks,
            state: Mutex::new(State {
                pending,
                saved: HashMap::new(),
            }),
        }
    }

    /// The blocks, in the order they are sent.
    pub fn blocks(&self) -> &[u64] {
        &self.blocks
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called before the guest writes `len` bytes at `offset`: saves every pending block the
    /// write touches.
    pub fn before_write(&self, image: &DiskImage, offset: u64, len: u64) -> std::io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = offset / BLOCK_SIZE;
        let last = (offset.saturating_add(len) - 1) / BLOCK_SIZE;
        let start = self.blocks.partition_point(|&b| b < first);
        let mut st = self.lock();
        for (pos, &block) in self.blocks.iter().enumerate().skip(start) {
            if block > last {
                break;
            }
            let (w, bit) = (pos / 64, 1u64 << (pos % 64));
            if st.pending[w] & bit != 0 && !st.saved.contains_key(&block) {
                let mut old = vec![0u8; BS].into_boxed_slice();
                image.read_at(&mut old, block * BLOCK_SIZE)?;
                st.saved.insert(block, old);
            }
        }
        Ok(())
    }

    /// Reads the `pos`-th block of the snapshot into `out` (`BLOCK_SIZE` bytes) as it was at the
    /// capture, and marks it sent.
    pub fn read(&self, image: &DiskImage, pos: usize, out: &mut [u8]) -> Result<(), DiskError> {
        let block = *self.blocks.get(pos).ok_or(DiskError::BlockOutOfRange {
            index: pos as u64,
            blocks: self.blocks.len() as u64,
        })?;
        let mut st = self.lock();
        match st.saved.remove(&block) {
            Some(old) => out.copy_from_slice(&old),
            None => image.read_at(out, block * BLOCK_SIZE)?,
        }
        st.pending[pos / 64] &= !(1u64 << (pos % 64));
        Ok(())
    }

    /// Blocks whose old contents are kept (the guest overwrote them before they were sent).
    pub fn saved(&self) -> usize {
        self.lock().saved.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_give_the_disk_as_it_was_at_the_capture() {
        let dir = tempfile::tempdir().unwrap();
        let img = DiskImage::create(dir.path().join("d"), 8 * BLOCK_SIZE).unwrap();
        for b in 0..8u8 {
            img.write_block(u64::from(b), &[b; BS]).unwrap();
        }
        let snap = DiskSnapshot::new(vec![1, 2, 3, 6]);
        let mut out = vec![0u8; BS];
        snap.read(&img, 0, &mut out).unwrap();
        assert_eq!(out, vec![1; BS]);
        // The guest writes block 1 (sent already), blocks 2-3 (pending) and 5 (not listed).
        for (b, off) in [(1u64, 0u64), (2, 0), (3, 100), (5, 0)] {
            snap.before_write(&img, b * BLOCK_SIZE + off, 50).unwrap();
            img.write_at(&[0xEE; 50], b * BLOCK_SIZE + off).unwrap();
        }
        assert_eq!(snap.saved(), 2, "only pending blocks are saved");
        // A write spanning blocks 5..7 saves 6 (pending), once.
        snap.before_write(&img, 5 * BLOCK_SIZE + 10, 2 * BLOCK_SIZE)
            .unwrap();
        img.write_at(&vec![0xDD; 2 * BS], 5 * BLOCK_SIZE + 10)
            .unwrap();
        assert_eq!(snap.saved(), 3);
        for (pos, want) in [(1usize, 2u8), (2, 3), (3, 6)] {
            snap.read(&img, pos, &mut out).unwrap();
            assert_eq!(out, vec![want; BS], "block at {pos}");
        }
        assert_eq!(snap.saved(), 0, "saved copies go with their send");
        assert!(snap.read(&img, 4, &mut out).is_err());
    }
}
