//! Which 4096-byte blocks the guest wrote since the last checkpoint.

use std::sync::Mutex;

use super::BLOCK_SIZE;

/// A bitmap of dirty blocks, one bit per block. Writers mark under a mutex held for a few word
/// operations; [`DirtyBlocks::take`] swaps in a fresh bitmap, so the checkpoint never scans
/// under the lock and no mark can fall between scan and clear.
#[derive(Debug)]
pub struct DirtyBlocks {
    blocks: u64,
    words: Mutex<Vec<u64>>,
}

impl DirtyBlocks {
    /// A clean bitmap for `blocks` blocks.
    pub fn new(blocks: u64) -> DirtyBlocks {
        DirtyBlocks {
            blocks,
            words: Mutex::new(vec![0; word_count(blocks)]),
        }
    }

    /// Blocks covered.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Marks every block the byte range `offset..offset + len` touches (clamped to the bitmap;
    /// an empty range marks nothing).
    pub fn mark_range(&self, offset: u64, len: u64) {
        if len == 0 || self.blocks == 0 {
            return;
        }
        let first = offset / BLOCK_SIZE;
        let last = (offset.saturating_add(len - 1) / BLOCK_SIZE).min(self.blocks - 1);
        if first > last {
            return;
        }
        let mut words = self.words.lock().unwrap_or_else(|p| p.into_inner());
        let (first_word, last_word) = ((first / 64) as usize, (last / 64) as usize);
        for (i, word) in words
            .iter_mut()
            .enumerate()
            .take(last_word + 1)
            .skip(first_word)
        {
            let lo = if i == first_word { first % 64 } else { 0 };
            let hi = if i == last_word { last % 64 } else { 63 };
            // Bits lo..=hi set.
            *word |= (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
        }
    }

    /// The dirty blocks, ascending, leaving the bitmap clean.
    pub fn take(&self) -> Vec<u64> {
        let fresh = vec![0u64; word_count(self.blocks)];
        let taken = {
            let mut words = self.words.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *words, fresh)
        };
        let mut out = Vec::with_capacity(taken.iter().map(|w| w.count_ones() as usize).sum());
        for (i, &word) in taken.iter().enumerate() {
            let mut w = word;
            while w != 0 {
                out.push(i as u64 * 64 + u64::from(w.trailing_zeros()));
                w &= w - 1;
            }
        }
        out
    }

    /// Dirty blocks right now (without clearing).
    pub fn count(&self) -> u64 {
        let words = self.words.lock().unwrap_or_else(|p| p.into_inner());
        words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

fn word_count(blocks: u64) -> usize {
    blocks.div_ceil(64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_marks_every_block_it_touches() {
        let d = DirtyBlocks::new(200);
        d.mark_range(4095, 2); // blocks 0 and 1
        d.mark_range(10 * BLOCK_SIZE, BLOCK_SIZE); // exactly block 10
        d.mark_range(60 * BLOCK_SIZE + 1, 70 * BLOCK_SIZE); // 60..=130, across words
        d.mark_range(5 * BLOCK_SIZE, 0); // nothing
        d.mark_range(199 * BLOCK_SIZE, u64::MAX); // clamped to the last block
        d.mark_range(u64::MAX - 1, 1); // beyond the end: nothing
        assert_eq!(d.count(), 2 + 1 + 71 + 1);
        let mut want = vec![0, 1, 10];
        want.extend(60..=130);
        want.push(199);
        assert_eq!(d.take(), want);
        assert!(d.take().is_empty());
        assert_eq!(d.count(), 0);
    }

    #[test]
    fn concurrent_marks_are_never_lost_across_takes() {
        let d = std::sync::Arc::new(DirtyBlocks::new(1 << 16));
        let writers: Vec<_> = (0..4u64)
            .map(|t| {
                let d = d.clone();
                std::thread::spawn(move || {
                    for i in 0..(1u64 << 14) {
                        d.mark_range((i * 4 + t) * BLOCK_SIZE, 1);
                    }
                })
            })
            .collect();
        let mut seen = std::collections::BTreeSet::new();
        while writers.iter().any(|w| !w.is_finished()) {
            seen.extend(d.take());
        }
        for w in writers {
            w.join().unwrap();
        }
        seen.extend(d.take());
        assert_eq!(seen.len(), 1 << 16);
    }
}
