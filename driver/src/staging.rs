//! Staging of arriving checkpoints on a backup: the link reader feeds it the
//! decoder's checkpoint items and gets back a whole [`StagedCheckpoint`] or a typed reason to
//! drop it. Everything a peer claims is checked against this VM before it costs memory:
//!
//! - at `CheckpointBegin`: the page size is the VM's, the page count is at most the VM's RAM
//!   pages, the device state is at most [`StagingLimits::max_device_bytes`];
//! - at `CheckpointBegin`, for disk blocks: the VM has a protected disk at all, and the block
//!   count is at most the disk's blocks ([`StagingLimits::disk_blocks`]);
//! - per page: its index lies in guest RAM and was not sent before in the same checkpoint (the
//!   wire encoder does not order pages, so duplicates are refused with a bitmap of RAM pages,
//!   one bit per page, allocated once per link from the VM's size, never from the wire);
//! - per disk block, the same against the disk: index in range, not repeated (a second
//!   bitmap, one bit per disk block, allocated from the disk's size the first time a
//!   checkpoint with disk blocks begins);
//! - buffers grow as bytes arrive, geometrically and never past what was claimed: a peer that
//!   claims a big checkpoint and sends nothing holds at most [`INITIAL_PAGES`] pages,
//!   [`INITIAL_DISK_BLOCKS`] disk blocks and [`INITIAL_DEVICE_BYTES`].
//!
//! So a checkpoint that passes staging always fits the replica (`Replica::commit` cannot fail on
//! its shape). A violation drops the checkpoint and the link (the reader stops), never the
//! agent. Nothing staged is applied anywhere before the decoder's `CheckpointEnd` verified the
//! checksum: the assembler only fills a [`StagedCheckpoint`], the executor commits it later.

// Values here come off the wire (or go onto it): a cast that drops bits must be a checked
// conversion, or say why it cannot lose anything.

use ftvm_model::wire::{CheckpointMeta, Item, DISK_BLOCK_SIZE};
use ftvm_model::{Epoch, Generation};

use crate::checkpoint::StagedCheckpoint;

/// Default cap on a checkpoint's device state (QEMU's migration stream without guest RAM).
/// The agent's QEMU (`-nodefaults`, virtio-net, no display) sends 42 KB for the test guest
/// (`real/tests/qemu_checkpoint.rs`, 256 MiB of RAM); 32 MiB leaves room for machines with
/// many more devices, even a 16 MiB VGA framebuffer added by hand, while a peer can no longer
/// make a backup buffer gigabytes of it.
pub const DEFAULT_MAX_DEVICE_BYTES: u64 = 32 << 20;

/// Pages reserved at `CheckpointBegin` at most, whatever the peer claims.
pub const INITIAL_PAGES: usize = 64;

/// Disk blocks reserved at `CheckpointBegin` at most, whatever the peer claims.
pub const INITIAL_DISK_BLOCKS: usize = 16;

/// Device-state bytes reserved at `CheckpointBegin` at most, whatever the peer claims.
pub const INITIAL_DEVICE_BYTES: usize = 128 << 10;

/// What this VM accepts from a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagingLimits {
    /// The VM's page size.
    pub page_size: u32,
    /// Pages of guest RAM.
    pub ram_pages: u64,
    /// Largest device state accepted.
    pub max_device_bytes: u64,
    /// The replica disk's size in blocks of [`DISK_BLOCK_SIZE`] bytes; 0: this VM has no
    /// protected disk, and a checkpoint carrying disk blocks is refused.
    pub disk_blocks: u64,
}

/// Why a checkpoint was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StagingError {
    /// The frame's page size is not the VM's.
    #[error("checkpoint {epoch}: page size {got}, this VM's is {want}")]
    PageSize {
        /// Epoch claimed.
        epoch: u64,
        /// Page size claimed.
        got: u32,
        /// The VM's.
        want: u32,
    },
    /// More pages than guest RAM has.
    #[error("checkpoint {epoch}: {count} pages, guest RAM has {ram_pages}")]
    PageCount {
        /// Epoch claimed.
        epoch: u64,
        /// Pages claimed.
        count: u64,
        /// The VM's.
        ram_pages: u64,
    },
    /// Device state above the cap.
    #[error("checkpoint {epoch}: {len} bytes of device state, the cap is {cap}")]
    DeviceLen {
        /// Epoch claimed.
        epoch: u64,
        /// Bytes claimed.
        len: u64,
        /// The cap.
        cap: u64,
    },
    /// A page index outside guest RAM.
    #[error("checkpoint {epoch}: page {index} is outside guest RAM ({ram_pages} pages)")]
    PageIndex {
        /// Epoch.
        epoch: u64,
        /// Index sent.
        index: u64,
        /// The VM's.
        ram_pages: u64,
    },
    /// The same page twice in one checkpoint.
    #[error("checkpoint {epoch}: page {index} sent twice")]
    DuplicatePage {
        /// Epoch.
        epoch: u64,
        /// Index sent.
        index: u64,
    },
    /// Disk blocks for a VM without a protected disk.
    #[error("checkpoint {epoch}: {count} disk blocks, this VM has no protected disk")]
    NoDisk {
        /// Epoch claimed.
        epoch: u64,
        /// Disk blocks claimed.
        count: u64,
    },
    /// More disk blocks than the disk has.
    #[error("checkpoint {epoch}: {count} disk blocks, the disk has {disk_blocks}")]
    DiskBlockCount {
        /// Epoch claimed.
        epoch: u64,
        /// Disk blocks claimed.
        count: u64,
        /// The VM's.
        disk_blocks: u64,
    },
    /// A disk block index outside the disk.
    #[error("checkpoint {epoch}: disk block {index} is outside the disk ({disk_blocks} blocks)")]
    DiskBlockIndex {
        /// Epoch.
        epoch: u64,
        /// Index sent.
        index: u64,
        /// The VM's.
        disk_blocks: u64,
    },
    /// The same disk block twice in one checkpoint.
    #[error("checkpoint {epoch}: disk block {index} sent twice")]
    DuplicateDiskBlock {
        /// Epoch.
        epoch: u64,
        /// Index sent.
        index: u64,
    },
    /// A checkpoint item out of place (the decoder never produces one; kept as an error rather
    /// than a panic).
    #[error("checkpoint item out of place: {0}")]
    OutOfPlace(&'static str),
}

/// What feeding an item produced.
#[derive(Debug)]
pub enum Staged {
    /// Nothing to report yet.
    Nothing,
    /// A checkpoint passed its `CheckpointBegin` checks and starts arriving.
    Started(Epoch),
    /// A checkpoint arrived whole, its checksum matched (the decoder's `CheckpointEnd`).
    Complete(Epoch, StagedCheckpoint),
}

/// Assembles the checkpoints of one link.
#[derive(Debug)]
pub struct CheckpointAssembler {
    limits: StagingLimits,
    /// The checkpoint being received, with its claimed shape.
    cur: Option<(CheckpointMeta, StagedCheckpoint)>,
    /// Epoch of a checkpoint that began and was neither completed nor reported dropped.
    open: Option<Epoch>,
    /// One bit per guest page: sent in the current checkpoint.
    seen: Vec<u64>,
    /// One bit per disk block: sent in the current checkpoint (empty until a checkpoint with
    /// disk blocks begins).
    disk_seen: Vec<u64>,
    /// What arrived of the last checkpoint dropped on an error, until [`Self::abort`].
    partial: Option<StagedCheckpoint>,
}

/// A checkpoint given up before its end.
#[derive(Debug)]
pub struct Aborted {
    /// Its epoch.
    pub epoch: Epoch,
    /// What of it arrived (none when its beginning was already refused).
    pub partial: Option<StagedCheckpoint>,
}

impl CheckpointAssembler {
    /// An assembler for a VM of `limits`.
    pub fn new(limits: StagingLimits) -> CheckpointAssembler {
        CheckpointAssembler {
            limits,
            cur: None,
            open: None,
            seen: Vec::new(),
            disk_seen: Vec::new(),
            partial: None,
        }
    }

    /// Feeds one checkpoint item (peer and witness frames are not the assembler's; they are
    /// refused as out of place). On an error the checkpoint is dropped; [`Self::abort`] then
    /// names its epoch.
    pub fn feed(&mut self, item: Item<'_>) -> Result<Staged, StagingError> {
        match item {
            Item::CheckpointBegin { generation, meta } => self.begin(generation, meta),
            Item::Page { index, data } => self.page(index, data).map(|()| Staged::Nothing),
            Item::DiskBlock { index, data } => {
                self.disk_block(index, data).map(|()| Staged::Nothing)
            }
            Item::Device { offset, data } => self.device(offset, data).map(|()| Staged::Nothing),
            Item::CheckpointEnd { epoch } => self.end(epoch),
            Item::Peer(_) | Item::WitnessRequest(_) | Item::WitnessReply(_) => Err(
                StagingError::OutOfPlace("a message is not a checkpoint item"),
            ),
        }
    }

    /// The link ends (or failed): gives up the checkpoint in progress, if one began, with what
    /// of it arrived. The caller reports it as received damaged (`ok: false`); the partial
    /// contents are kept beside it so that a model that wrongly commits it (a planted bug)
    /// leaves a visibly wrong replica instead of a missing one.
    pub fn abort(&mut self) -> Option<Aborted> {
        self.drop_current();
        let epoch = self.open.take()?;
        let partial = self.partial.take().filter(|p| p.epoch == epoch.0);
        Some(Aborted { epoch, partial })
    }

    /// The checkpoint being received, as far as it arrived (an executor may copy its bytes
    /// elsewhere as they arrive).
    pub fn in_progress(&self) -> Option<&StagedCheckpoint> {
        self.cur.as_ref().map(|(_, s)| s)
    }

    fn begin(
        &mut self,
        generation: Generation,
        meta: CheckpointMeta,
    ) -> Result<Staged, StagingError> {
        if self.cur.is_some() {
            self.drop_current();
            return Err(StagingError::OutOfPlace(
                "a checkpoint began inside another",
            ));
        }
        // From here on the checkpoint is open: whatever happens to it is reported.
        self.open = Some(meta.epoch);
        let l = self.limits;
        let epoch = meta.epoch.0;
        if meta.page_size != l.page_size {
            return Err(StagingError::PageSize {
                epoch,
                got: meta.page_size,
                want: l.page_size,
            });
        }
        if meta.page_count > l.ram_pages {
            return Err(StagingError::PageCount {
                epoch,
                count: meta.page_count,
                ram_pages: l.ram_pages,
            });
        }
        if meta.device_len > l.max_device_bytes {
            return Err(StagingError::DeviceLen {
                epoch,
                len: meta.device_len,
                cap: l.max_device_bytes,
            });
        }
        if meta.disk_blocks > 0 && l.disk_blocks == 0 {
            return Err(StagingError::NoDisk {
                epoch,
                count: meta.disk_blocks,
            });
        }
        if meta.disk_blocks > l.disk_blocks {
            return Err(StagingError::DiskBlockCount {
                epoch,
                count: meta.disk_blocks,
                disk_blocks: l.disk_blocks,
            });
        }
        let words = usize::try_from(l.ram_pages.div_ceil(64)).unwrap_or(usize::MAX);
        if self.seen.len() != words {
            // Once per link: sized by this VM, not by the peer.
            self.seen = vec![0; words];
        }
        let disk_words = usize::try_from(l.disk_blocks.div_ceil(64)).unwrap_or(usize::MAX);
        if meta.disk_blocks > 0 && self.disk_seen.len() != disk_words {
            // Once per link, and only for a peer that sends disk blocks: sized by this VM's
            // disk, not by the peer.
            self.disk_seen = vec![0; disk_words];
        }
        // Bounded by the checks above.
        let pages = usize::try_from(meta.page_count).unwrap_or(usize::MAX);
        let blocks = usize::try_from(meta.disk_blocks).unwrap_or(usize::MAX);
        let device = usize::try_from(meta.device_len).unwrap_or(usize::MAX);
        let first = pages.min(INITIAL_PAGES);
        let first_blocks = blocks.min(INITIAL_DISK_BLOCKS);
        let staged = StagedCheckpoint {
            generation: generation.0,
            epoch,
            full: meta.full,
            indices: Vec::with_capacity(first),
            data: Vec::with_capacity(first * l.page_size as usize),
            disk_indices: Vec::with_capacity(first_blocks),
            disk_data: Vec::with_capacity(first_blocks * DISK_BLOCK_SIZE as usize),
            device: Vec::with_capacity(device.min(INITIAL_DEVICE_BYTES)),
            spooled: 0,
        };
        self.cur = Some((meta, staged));
        Ok(Staged::Started(meta.epoch))
    }

    fn page(&mut self, index: u64, data: &[u8]) -> Result<(), StagingError> {
        let ram_pages = self.limits.ram_pages;
        let Some((meta, s)) = self.cur.as_mut() else {
            return Err(StagingError::OutOfPlace("a page outside a checkpoint"));
        };
        let epoch = s.epoch;
        if data.len() != meta.page_size as usize || s.indices.len() as u64 >= meta.page_count {
            return Err(StagingError::OutOfPlace(
                "a page beyond the checkpoint's shape",
            ));
        }
        if index >= ram_pages {
            return Err(StagingError::PageIndex {
                epoch,
                index,
                ram_pages,
            });
        }
        // In range: `seen` has a bit for every page below `ram_pages`.
        let bit = 1u64 << (index % 64);
        match self.seen.get_mut((index / 64) as usize) {
            Some(w) if *w & bit != 0 => {
                return Err(StagingError::DuplicatePage { epoch, index });
            }
            Some(w) => *w |= bit,
            None => {
                return Err(StagingError::OutOfPlace(
                    "a page before its checkpoint began",
                ))
            }
        }
        // `begin` bounded the count by guest RAM; a count this host cannot address is refused
        // all the same rather than truncated.
        let claimed_pages =
            usize::try_from(meta.page_count).map_err(|_| StagingError::PageCount {
                epoch,
                count: meta.page_count,
                ram_pages,
            })?;
        grow_within(&mut s.indices, 1, claimed_pages);
        s.indices.push(index);
        grow_within(
            &mut s.data,
            data.len(),
            claimed_pages.saturating_mul(data.len()),
        );
        s.data.extend_from_slice(data);
        Ok(())
    }

    fn disk_block(&mut self, index: u64, data: &[u8]) -> Result<(), StagingError> {
        let disk_blocks = self.limits.disk_blocks;
        let Some((meta, s)) = self.cur.as_mut() else {
            return Err(StagingError::OutOfPlace(
                "a disk block outside a checkpoint",
            ));
        };
        let epoch = s.epoch;
        if s.indices.len() as u64 != meta.page_count {
            return Err(StagingError::OutOfPlace(
                "a disk block before the last page",
            ));
        }
        if data.len() != DISK_BLOCK_SIZE as usize || s.disk_indices.len() as u64 >= meta.disk_blocks
        {
            return Err(StagingError::OutOfPlace(
                "a disk block beyond the checkpoint's shape",
            ));
        }
        if index >= disk_blocks {
            return Err(StagingError::DiskBlockIndex {
                epoch,
                index,
                disk_blocks,
            });
        }
        // In range: `disk_seen` has a bit for every block below `disk_blocks`.
        let bit = 1u64 << (index % 64);
        match self.disk_seen.get_mut((index / 64) as usize) {
            Some(w) if *w & bit != 0 => {
                return Err(StagingError::DuplicateDiskBlock { epoch, index });
            }
            Some(w) => *w |= bit,
            None => {
                return Err(StagingError::OutOfPlace(
                    "a disk block before its checkpoint began",
                ))
            }
        }
        // `begin` bounded the count by the disk's size.
        let claimed =
            usize::try_from(meta.disk_blocks).map_err(|_| StagingError::DiskBlockCount {
                epoch,
                count: meta.disk_blocks,
                disk_blocks,
            })?;
        grow_within(&mut s.disk_indices, 1, claimed);
        s.disk_indices.push(index);
        grow_within(
            &mut s.disk_data,
            data.len(),
            claimed.saturating_mul(data.len()),
        );
        s.disk_data.extend_from_slice(data);
        Ok(())
    }

    fn device(&mut self, offset: u64, data: &[u8]) -> Result<(), StagingError> {
        let max_device = self.limits.max_device_bytes;
        let Some((meta, s)) = self.cur.as_mut() else {
            return Err(StagingError::OutOfPlace(
                "device state outside a checkpoint",
            ));
        };
        let end = offset.saturating_add(data.len() as u64);
        if offset != s.device.len() as u64 || end > meta.device_len {
            return Err(StagingError::OutOfPlace(
                "device state beyond the checkpoint's shape",
            ));
        }
        let device_len = usize::try_from(meta.device_len).map_err(|_| StagingError::DeviceLen {
            epoch: s.epoch,
            len: meta.device_len,
            cap: max_device,
        })?;
        grow_within(&mut s.device, data.len(), device_len);
        s.device.extend_from_slice(data);
        Ok(())
    }

    fn end(&mut self, epoch: Epoch) -> Result<Staged, StagingError> {
        let complete = self.cur.as_ref().is_some_and(|(meta, s)| {
            meta.epoch == epoch
                && s.indices.len() as u64 == meta.page_count
                && s.disk_indices.len() as u64 == meta.disk_blocks
                && s.device.len() as u64 == meta.device_len
        });
        if !complete {
            self.drop_current();
            return Err(StagingError::OutOfPlace(
                "a checkpoint ended short of its shape",
            ));
        }
        self.clear_seen();
        self.open = None;
        match self.cur.take() {
            Some((_, s)) => Ok(Staged::Complete(epoch, s)),
            None => Err(StagingError::OutOfPlace("a checkpoint end without a begin")),
        }
    }

    fn drop_current(&mut self) {
        self.clear_seen();
        // Keep what a checkpoint dropped earlier (on a short end) left for `abort`.
        if let Some((_, s)) = self.cur.take() {
            self.partial = Some(s);
        }
    }

    /// Unmarks the pages and disk blocks of the current checkpoint (cheaper than clearing all
    /// of RAM's and the disk's bits).
    fn clear_seen(&mut self) {
        if let Some((_, s)) = &self.cur {
            unmark(&mut self.seen, &s.indices);
            unmark(&mut self.disk_seen, &s.disk_indices);
        }
    }
}

/// Clears the bits of `indices` in `bitmap`.
fn unmark(bitmap: &mut [u64], indices: &[u64]) {
    for &index in indices {
        if let Some(w) = bitmap.get_mut((index / 64) as usize) {
            *w &= !(1u64 << (index % 64));
        }
    }
}

/// Makes room for `more` elements in `v`, growing geometrically but never beyond `claimed`
/// elements in total (which the caller checked against the VM).
fn grow_within<T>(v: &mut Vec<T>, more: usize, claimed: usize) {
    if v.capacity() - v.len() >= more {
        return;
    }
    let target = v.len().saturating_mul(2).max(v.len() + more).min(claimed);
    v.reserve_exact(target.saturating_sub(v.len()).max(more));
}

#[cfg(test)]
#[path = "staging_tests.rs"]
mod tests;
