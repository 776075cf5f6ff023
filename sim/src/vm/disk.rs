//! The simulated VM's disk (and a replica's): blocks of the wire's `DISK_BLOCK_SIZE` with the
//! same incrementally maintained content hash as guest RAM, so comparing a replica's disk with
//! the disk a primary captured at an epoch costs O(1).

use ftvm_model::wire::DISK_BLOCK_SIZE;

use super::ram::Ram;

/// A disk of fixed-size blocks. It is RAM's shape under another name: the checks compare the
/// two separately, so a disk that diverges is named as such.
#[derive(Clone, Debug)]
pub(crate) struct Disk(Ram);

impl Disk {
    /// `blocks` zeroed blocks (0: the VM has no protected disk).
    pub fn new(blocks: u64) -> Disk {
        Disk(Ram::new(blocks, DISK_BLOCK_SIZE))
    }

    pub fn blocks(&self) -> u64 {
        self.0.pages()
    }

    /// Block `i` (empty if out of range).
    pub fn block(&self, i: u64) -> &[u8] {
        self.0.page(i)
    }

    /// Store `v` at byte `offset` of block `i` (a guest write); false if out of range.
    pub fn write_u64(&mut self, i: u64, offset: usize, v: u64) -> bool {
        self.0.write_u64(i, offset, v)
    }

    /// Replace block `i`; false if out of range or `data` is not one block long.
    pub fn set_block(&mut self, i: u64, data: &[u8]) -> bool {
        self.0.set_page(i, data)
    }

    /// Content hash of the whole disk.
    pub fn hash(&self) -> u64 {
        self.0.hash()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_disk_block_size_and_the_hash_follows_contents() {
        let mut a = Disk::new(4);
        let b = Disk::new(4);
        assert_eq!(a.blocks(), 4);
        assert_eq!(a.block(3).len(), DISK_BLOCK_SIZE as usize);
        assert!(a.block(4).is_empty());
        assert!(a.write_u64(2, 4088, 9));
        assert_eq!(a.block(2)[4088..], 9u64.to_le_bytes());
        assert_ne!(a.hash(), b.hash());
        let block = a.block(2).to_vec();
        let mut c = Disk::new(4);
        assert!(c.set_block(2, &block));
        assert_eq!(c.hash(), a.hash());
        assert!(!c.set_block(4, &block), "out of range");
        assert!(!c.set_block(0, &block[..512]), "a sector is not a block");
        assert_eq!(Disk::new(0).blocks(), 0);
    }
}
