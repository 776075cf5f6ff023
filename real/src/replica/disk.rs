//! The replica's disk: a plain raw image (inspect it with `qemu-img info`/`compare`) that holds
//! the protected VM's disk as of the last applied checkpoint. Only committed journals write it
//! (see the parent module): a checkpoint's disk blocks land together with its RAM pages, by the
//! same redo step, so a crash leaves the disk of the previous epoch or of the new one.
//!
//! A full checkpoint (a sync) carries only the blocks of the primary's disk that hold data; the
//! rest of the disk is zeroes. One streamed into the sync files (`super::sync`) replaces the
//! image by a rename; one spooled (another sync held the sync files) is applied by first
//! punching the whole image back to zeroes — which a replay after a crash repeats, harmlessly.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ftvm_model::wire::DISK_BLOCK_SIZE;

use super::{io, ReplicaError, StagedCheckpoint};
use crate::secure_fs::{self, Durability};

/// Most blocks one write applies (4 MiB).
const MAX_RUN_BLOCKS: usize = 1024;

/// Where the replica disk is and how big it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The raw image (created sparse if absent).
    pub path: PathBuf,
    /// Its size in blocks of [`DISK_BLOCK_SIZE`] bytes.
    pub blocks: u64,
}

impl DiskSpec {
    /// Bytes of the disk (the configuration validated that they fit a u64).
    pub fn bytes(&self) -> u64 {
        self.blocks.saturating_mul(u64::from(DISK_BLOCK_SIZE))
    }
}

/// The open replica disk.
#[derive(Debug)]
pub(super) struct ReplicaDisk {
    spec: DiskSpec,
    file: File,
    /// The image was missing (or empty) and made here: it holds no replica's disk.
    pub(super) fresh: bool,
}

impl ReplicaDisk {
    /// Opens (or creates, sparse) the image; an image of another size is refused, never resized:
    /// it may be a disk someone cares about.
    pub(super) fn open(spec: &DiskSpec) -> Result<ReplicaDisk, ReplicaError> {
        let (file, created) = secure_fs::open_or_create_private(&spec.path)?;
        let found = file.metadata().map_err(io(&spec.path, "stat disk"))?.len();
        if created || found == 0 {
            file.set_len(spec.bytes())
                .map_err(io(&spec.path, "size disk image"))?;
        } else if found != spec.bytes() {
            return Err(ReplicaError::DiskSizeMismatch {
                path: spec.path.clone(),
                found,
                expected: spec.bytes(),
            });
        }
        Ok(ReplicaDisk {
            spec: spec.clone(),
            file,
            fresh: created || found == 0,
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.spec.path
    }

    pub(super) fn spec(&self) -> &DiskSpec {
        &self.spec
    }

    /// Puts the image a full sync streamed into in place of this one, and reopens it (see
    /// `super::sync`).
    pub(super) fn install(&mut self, durability: Durability) -> Result<(), ReplicaError> {
        self.file = super::sync::install(&self.spec.path, self.spec.bytes(), durability)?;
        self.fresh = false;
        Ok(())
    }

    /// Refuses a checkpoint whose disk part does not fit this disk (the driver's staging already
    /// did; this guards journals read back from disk).
    pub(super) fn check(&self, staged: &StagedCheckpoint) -> Result<(), ReplicaError> {
        let bs = DISK_BLOCK_SIZE as usize;
        let bad = |index| ReplicaError::BadDiskBlock {
            index,
            blocks: self.spec.blocks,
        };
        if Some(staged.disk_data.len()) != staged.disk_indices.len().checked_mul(bs) {
            return Err(bad(u64::MAX));
        }
        match staged.disk_indices.iter().find(|&&i| i >= self.spec.blocks) {
            Some(&index) => Err(bad(index)),
            None => Ok(()),
        }
    }

    /// Writes the checkpoint's blocks (after zeroing the image for a full checkpoint).
    pub(super) fn apply(&mut self, staged: &StagedCheckpoint) -> Result<(), ReplicaError> {
        if staged.full {
            self.zero()?;
        }
        // Runs of consecutive blocks (a sync is mostly runs) go out in one write each.
        let path = &self.spec.path;
        let bs = DISK_BLOCK_SIZE as usize;
        let (idx, data) = (&staged.disk_indices, &staged.disk_data);
        let mut i = 0;
        while i < idx.len() {
            let mut j = i + 1;
            while j < idx.len() && idx[j] == idx[j - 1] + 1 && j - i < MAX_RUN_BLOCKS {
                j += 1;
            }
            let run = data.get(i * bs..j * bs).ok_or(ReplicaError::BadDiskBlock {
                index: u64::MAX,
                blocks: self.spec.blocks,
            })?;
            self.file
                .write_all_at(run, idx[i] * u64::from(DISK_BLOCK_SIZE))
                .map_err(io(path, "write disk blocks"))?;
            i = j;
        }
        Ok(())
    }

    /// Punches the whole image back to zeroes (sparse).
    pub(super) fn zero(&mut self) -> Result<(), ReplicaError> {
        let path = &self.spec.path;
        self.file.set_len(0).map_err(io(path, "truncate disk"))?;
        self.file
            .set_len(self.spec.bytes())
            .map_err(io(path, "size disk image"))
    }

    /// A digest (xxh3-64) of the whole image, comparable with the primary's disk digest.
    pub(super) fn digest(&self) -> Result<u64, ReplicaError> {
        crate::disk::digest_file(&self.file, self.spec.bytes())
            .map_err(io(&self.spec.path, "read disk"))
    }

    /// Makes the applied blocks durable (for a replica opened as durable).
    pub(super) fn sync(&self) -> Result<(), ReplicaError> {
        self.file
            .sync_data()
            .map_err(io(&self.spec.path, "sync disk"))
    }
}
