//! Which pages (or disk blocks) a capture sends, for each [`Scope`] the model can ask for.
//!
//! An ordinary epoch sends what the dirty log says was written since the previous capture; a
//! full sync sends everything. A catch-up (`Scope::Since(base)`) must send everything written
//! after `base` was captured, although the dirty logs of the epochs in between are long gone.
//! [`WriteHistory`] keeps for each index the last epoch that wrote it, stamped at every capture
//! from that capture's dirty log, so a catch-up is one pass over the table. It costs 8 bytes
//! per index (4 MiB per GiB of 4 KiB pages), whatever the age of the base, which is why the
//! model can catch up from any epoch of this VM's run (see `Primary`'s `catch_up_base`).
//!
//! The table covers one VM run on one host: a VM restored by a takeover starts with an empty
//! one, and the model only catches up replicas made after that restore, which hold every
//! index the table has not stamped (the restore's own contents came to them in their sync).
//! Both executors use it: the simulated VM for pages and blocks, the real agent for guest RAM
//! and the disk.

use ftvm_model::{Epoch, Scope};

/// The last capturing epoch of every index (0: not written since this run began).
#[derive(Clone, Debug)]
pub struct WriteHistory {
    last: Vec<u64>,
}

impl WriteHistory {
    /// A table for `len` indices, none written yet.
    pub fn new(len: u64) -> WriteHistory {
        WriteHistory {
            last: vec![0; usize::try_from(len).unwrap_or(0)],
        }
    }

    /// Number of indices covered.
    pub fn len(&self) -> u64 {
        self.last.len() as u64
    }

    /// Whether the table covers no index.
    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }

    /// Stamps `dirty` (the indices written since the previous capture) with `epoch`, and
    /// returns the indices, in increasing order, that a capture of `epoch` with `scope` sends.
    /// Indices beyond the table are never stamped but are passed on (at the end, the largest),
    /// unless the capture is full: a dirty log naming one is broken, and the caller's range
    /// check must see it, as it did before the table existed.
    pub fn capture(&mut self, epoch: Epoch, scope: Scope, dirty: Vec<u64>) -> Vec<u64> {
        // Sorted first, so that the indices beyond the table come last.
        let mut dirty = dirty;
        dirty.sort_unstable();
        dirty.dedup();
        let beyond = dirty.partition_point(|&i| i < self.len());
        for &i in &dirty[..beyond] {
            // In range: below `len`, which came from a usize.
            if let Some(e) = usize::try_from(i).ok().and_then(|k| self.last.get_mut(k)) {
                *e = epoch.0;
            }
        }
        match scope {
            Scope::Epoch => dirty,
            Scope::Full => (0..self.len()).collect(),
            Scope::Since(base) => {
                let mut picked = self.written_after(base);
                picked.extend_from_slice(&dirty[beyond..]);
                picked
            }
        }
    }

    /// Indices last written by a capture after `base`, in increasing order.
    pub fn written_after(&self, base: Epoch) -> Vec<u64> {
        (0..self.len())
            .zip(&self.last)
            .filter(|&(_, &e)| e > base.0)
            .map(|(i, _)| i)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_catch_up_names_every_index_written_after_its_base_and_nothing_else() {
        let mut h = WriteHistory::new(8);
        assert_eq!(
            h.capture(Epoch(1), Scope::Full, vec![0, 5]),
            (0..8).collect::<Vec<_>>()
        );
        assert_eq!(h.capture(Epoch(2), Scope::Epoch, vec![3, 1, 3]), vec![1, 3]);
        assert_eq!(h.capture(Epoch(3), Scope::Epoch, vec![6]), vec![6]);
        assert_eq!(h.capture(Epoch(4), Scope::Epoch, vec![1]), vec![1]);
        // The writes of 3 and 4, and those not captured yet (2, written while degraded).
        assert_eq!(
            h.capture(Epoch(5), Scope::Since(Epoch(2)), vec![2]),
            vec![1, 2, 6]
        );
        // From the sync on, everything written counts, including index 0 and 5 of epoch 1.
        assert_eq!(h.written_after(Epoch(0)), vec![0, 1, 2, 3, 5, 6]);
        assert_eq!(h.written_after(Epoch(5)), Vec::<u64>::new());
    }

    #[test]
    fn indices_beyond_the_table_are_passed_on_for_the_range_check_never_stamped() {
        let mut h = WriteHistory::new(4);
        assert_eq!(
            h.capture(Epoch(1), Scope::Epoch, vec![u64::MAX, 2, 4]),
            vec![2, 4, u64::MAX]
        );
        assert_eq!(h.written_after(Epoch(0)), vec![2]);
        assert_eq!(
            h.capture(Epoch(2), Scope::Since(Epoch(0)), vec![5]),
            vec![2, 5]
        );
        assert_eq!(h.capture(Epoch(3), Scope::Full, vec![5]), vec![0, 1, 2, 3]);
        assert!(WriteHistory::new(0).is_empty());
    }
}
