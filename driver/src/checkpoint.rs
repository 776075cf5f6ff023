//! A checkpoint as both executors hold it between the wire and the replica: page indices with
//! their contents in one buffer, disk block indices with theirs in another, and the device
//! state.

use ftvm_model::wire::DISK_BLOCK_SIZE;

/// One checkpoint received (or captured), not yet applied to a replica.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StagedCheckpoint {
    /// Generation it belongs to.
    pub generation: u64,
    /// Epoch it captures.
    pub epoch: u64,
    /// A full checkpoint (all of RAM: a sync), not only the pages dirtied in its epoch.
    pub full: bool,
    /// Page indices, in the order of `data`.
    pub indices: Vec<u64>,
    /// Page contents, `indices.len() * page_size` bytes.
    pub data: Vec<u8>,
    /// Disk block indices (in [`DISK_BLOCK_SIZE`] units), in the order of `disk_data`: the
    /// guest disk writes of the epoch (the whole disk for a full checkpoint). Empty for a VM
    /// without a protected disk. Applied to the replica disk at commit, with the pages.
    pub disk_indices: Vec<u64>,
    /// Disk block contents, `disk_indices.len() * DISK_BLOCK_SIZE` bytes.
    pub disk_data: Vec<u8>,
    /// Device state (QEMU's migration stream without shared RAM, or the simulated VM's).
    pub device: Vec<u8>,
    /// The executor's handle on a copy of this checkpoint it keeps outside this value (the real
    /// backup: the replica journal its link reader wrote as the pages arrived, so that a commit
    /// does not write them again); 0: none. The driver core only carries it.
    pub spooled: u64,
}

impl StagedCheckpoint {
    /// The pages as `(index, contents)` pairs of `page_size` bytes each.
    pub fn pages(&self, page_size: usize) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        self.indices
            .iter()
            .copied()
            .zip(self.data.chunks(page_size.max(1)))
    }

    /// The disk blocks as `(block index, contents)` pairs of [`DISK_BLOCK_SIZE`] bytes each.
    pub fn disk_blocks(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        self.disk_indices
            .iter()
            .copied()
            .zip(self.disk_data.chunks(DISK_BLOCK_SIZE as usize))
    }
}
