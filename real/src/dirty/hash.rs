//! The cross-check tracker: a page is dirty when its XXH3 hash differs from the one recorded at
//! the previous scan. Needs no help from QEMU but reads all guest RAM each scan (~58 ms per GiB
//! here), so it serves tests and small VMs. Holes of the sparse RAM file are found with
//! `SEEK_DATA`/`SEEK_HOLE` and hashed as zero pages without touching them (reading a hole through
//! the mapping would allocate it).

use std::path::Path;

use xxhash_rust::xxh3::xxh3_64;

use super::{DirtyError, DirtyPages, DirtyTracker, GuestRam};

/// Hash-diff dirty tracking over the agent's own read-only mapping of the RAM file.
#[derive(Debug)]
pub struct HashTracker {
    ram: GuestRam,
    /// Hash of each page at the last scan; `None` before the first (which reports all RAM).
    hashes: Option<Vec<u64>>,
    zero_hash: u64,
}

impl HashTracker {
    /// Maps `ram_file` (exactly `bytes` long) read-only.
    pub fn open(ram_file: &Path, bytes: u64) -> Result<HashTracker, DirtyError> {
        let ram = GuestRam::open(ram_file, bytes)?;
        let zero_hash = xxh3_64(&vec![0u8; ram.page_size()]);
        Ok(HashTracker {
            ram,
            hashes: None,
            zero_hash,
        })
    }

    /// Current hash of every page: data pages hashed through the mapping, holes as zeros.
    fn hash_all(&self) -> Result<Vec<u64>, DirtyError> {
        let pages = self.ram.pages();
        let mut h = vec![self.zero_hash; pages as usize];
        let data = self.ram.data_pages()?;
        for p in data.iter() {
            if let Some(page) = self.ram.page(p) {
                h[p as usize] = xxh3_64(page);
            }
        }
        Ok(h)
    }
}

impl DirtyTracker for HashTracker {
    fn scan(&mut self) -> Result<DirtyPages, DirtyError> {
        let now = self.hash_all()?;
        let dirty = match &self.hashes {
            None => DirtyPages::all(self.ram.pages()),
            Some(before) => DirtyPages::from_indices(
                (0..now.len())
                    .filter(|&i| now[i] != before[i])
                    .map(|i| i as u64),
            ),
        };
        self.hashes = Some(now);
        Ok(dirty)
    }

    fn pages(&self) -> u64 {
        self.ram.pages()
    }

    fn describe(&self) -> String {
        format!("page hashes of {}", self.ram.path().display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::GuestRamMut;

    #[test]
    fn reports_all_first_then_exactly_the_changed_pages() {
        let f = tempfile::NamedTempFile::new_in("/dev/shm").unwrap();
        let ps = crate::dirty::page_size();
        let bytes = 64 * ps as u64;
        f.as_file().set_len(bytes).unwrap();
        let mut w = GuestRamMut::open(f.path(), bytes).unwrap();
        let mut t = HashTracker::open(f.path(), bytes).unwrap();
        assert_eq!(t.scan().unwrap().count(), 64);
        assert!(t.scan().unwrap().is_empty());
        w.page_mut(3).unwrap()[0] = 1;
        w.page_mut(40).unwrap()[ps - 1] = 2;
        w.page_mut(41).unwrap()[5] = 0; // written with the same content: not a change
        assert_eq!(t.scan().unwrap().to_indices(), vec![3, 40]);
        w.page_mut(3).unwrap()[0] = 0; // back to zero: a change again
        assert_eq!(t.scan().unwrap().to_indices(), vec![3]);
        // Holes were never read through the mapping, so they are still holes.
        let data = t.ram.data_pages().unwrap();
        assert!(data.count() <= 3, "hash scan allocated holes: {data:?}");
    }
}
