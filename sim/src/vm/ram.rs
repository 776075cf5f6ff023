//! Guest RAM of the simulated VM (and of a replica): fixed-size pages with an incrementally
//! maintained content hash, so comparing a replica with a captured epoch costs O(1).

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Pages plus a running hash: the wrapping sum over pages of `xxh3(page bytes, seed = index)`.
/// Equal hashes ⇔ equal contents (up to 64-bit collisions); the sum updates in O(page) per write.
#[derive(Clone, Debug)]
pub(crate) struct Ram {
    bytes: Vec<u8>,
    page_size: usize,
    page_hash: Vec<u64>,
    sum: u64,
}

impl Ram {
    /// `pages` zeroed pages of `page_size` bytes.
    pub fn new(pages: u64, page_size: u32) -> Ram {
        let page_size = page_size as usize;
        let n = usize::try_from(pages).unwrap_or(0);
        let zero = vec![0u8; page_size];
        let page_hash: Vec<u64> = (0..n as u64).map(|i| xxh3_64_with_seed(&zero, i)).collect();
        let sum = page_hash.iter().fold(0u64, |a, h| a.wrapping_add(*h));
        Ram {
            bytes: vec![0; n * page_size],
            page_size,
            page_hash,
            sum,
        }
    }

    pub fn pages(&self) -> u64 {
        self.page_hash.len() as u64
    }

    fn range(&self, i: u64) -> Option<std::ops::Range<usize>> {
        let i = usize::try_from(i)
            .ok()
            .filter(|i| *i < self.page_hash.len())?;
        Some(i * self.page_size..(i + 1) * self.page_size)
    }

    /// Page `i` (empty if out of range).
    pub fn page(&self, i: u64) -> &[u8] {
        self.range(i).map_or(&[][..], |r| &self.bytes[r])
    }

    fn rehash(&mut self, i: u64) {
        let Some(r) = self.range(i) else { return };
        let h = xxh3_64_with_seed(&self.bytes[r], i);
        let slot = &mut self.page_hash[i as usize];
        self.sum = self.sum.wrapping_sub(*slot).wrapping_add(h);
        *slot = h;
    }

    /// Little-endian u64 at byte `offset` of page `i` (0 if out of range).
    pub fn read_u64(&self, i: u64, offset: usize) -> u64 {
        let p = self.page(i);
        p.get(offset..offset + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    }

    /// Store `v` at byte `offset` of page `i`; false if out of range.
    pub fn write_u64(&mut self, i: u64, offset: usize, v: u64) -> bool {
        let Some(r) = self.range(i) else { return false };
        if offset + 8 > self.page_size {
            return false;
        }
        let at = r.start + offset;
        self.bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
        self.rehash(i);
        true
    }

    /// Replace page `i`; false if out of range or `data` is not one page long.
    pub fn set_page(&mut self, i: u64, data: &[u8]) -> bool {
        let Some(r) = self.range(i) else { return false };
        if data.len() != self.page_size {
            return false;
        }
        self.bytes[r].copy_from_slice(data);
        self.rehash(i);
        true
    }

    /// Content hash of all pages.
    pub fn hash(&self) -> u64 {
        self.sum
    }
}

/// Hash of a whole machine state: RAM plus device state.
pub(crate) fn state_hash(ram: &Ram, device: &[u8]) -> u64 {
    xxh3_64_with_seed(device, ram.hash())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_tracks_contents_not_history() {
        let mut a = Ram::new(8, 64);
        let b = Ram::new(8, 64);
        assert_eq!(a.hash(), b.hash());
        assert!(a.write_u64(3, 8, 42));
        assert_ne!(a.hash(), b.hash());
        assert_eq!(a.read_u64(3, 8), 42);
        assert!(a.write_u64(3, 8, 0));
        assert_eq!(a.hash(), b.hash());
        // Same bytes in another page must hash differently (position matters).
        let mut c = Ram::new(8, 64);
        let mut d = Ram::new(8, 64);
        c.write_u64(1, 0, 7);
        d.write_u64(2, 0, 7);
        assert_ne!(c.hash(), d.hash());
        assert!(!c.write_u64(8, 0, 1));
        assert!(!c.write_u64(0, 60, 1));
        assert!(!c.set_page(0, &[0; 3]));
        let page = c.page(1).to_vec();
        assert!(d.set_page(1, &page));
        assert!(d.set_page(2, &[0; 64]));
        assert_eq!(c.hash(), d.hash());
        assert_ne!(state_hash(&c, b"x"), state_hash(&c, b"y"));
    }
}
