//! Full syncs stream into fresh replica files. A full checkpoint (a backup joining or
//! re-joining) carries every page of RAM and every disk block that holds data (pages and
//! blocks it leaves out are zero on the primary): copying it into a spool journal and then
//! again into the RAM file and disk image would write the VM twice and hold it twice on tmpfs.
//! Instead its link reader writes each page at its place in a fresh RAM file beside the
//! replica's (`<ram>.sync`, sparse, the RAM size: pages not sent stay holes, which read as
//! zeroes) and each disk block at its place in a fresh sparse image beside the replica disk
//! (`<disk>.sync`, the same for blocks). Its sealed journal holds only the header and
//! the device state, with the header's `full` word saying "the contents are in the sync files".
//!
//! Crash atomicity (the parent module's steps, for such a journal):
//! - before the commit point (the journal's rename), the sync files are no replica state: a
//!   sync cut short deletes them, and [`super::Replica::open`] deletes any it finds once a
//!   committed journal has been replayed; the replica's files were never touched;
//! - the sync files are complete (and, durable, synced) before the journal is sealed, so a
//!   committed journal always has its contents in them or already in place;
//! - applying renames `<ram>.sync` over the RAM file and `<disk>.sync` over the disk image
//!   (each rename atomic), then writes the device blob and `committed` as any apply does. A
//!   replay after a crash renames the sync files still there and takes a missing one as renamed
//!   already: only an apply removes a sync file while a committed journal names it, and
//!   `committed` is written after both renames, so the replay is idempotent.
//!
//! The names are fixed, so one sync at a time owns them: the spool hands them to the first full
//! checkpoint that begins and takes them back when it is dropped, or when its committed journal
//! was applied. A full checkpoint that begins while they are taken is spooled as before.
//!
//! Every index comes off the wire: one outside RAM or the disk never touches any file (the
//! sync is then dropped, and its commit, written whole, refuses it).
//!
//! The renamed files are new inodes: the replica reopens its handles after the renames, and
//! everything else (QEMU's RAM file, the NBD export of the disk at failover) opens them by path
//! after [`super::Replica::settle`].

use std::ffi::OsString;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ftvm_model::wire::DISK_BLOCK_SIZE;

use super::{io, DiskSpec, ReplicaError};
use crate::secure_fs::{self, Durability, PRIVATE_FILE_MODE};

/// Bytes one write of a run carries at most (runs of consecutive pages or blocks).
const MAX_RUN_BYTES: usize = 4 << 20;

/// The replica files a full sync replaces, and their shapes.
#[derive(Debug, Clone)]
pub(super) struct SyncTargets {
    pub(super) ram: PathBuf,
    pub(super) ram_bytes: u64,
    pub(super) page_size: usize,
    pub(super) disk: Option<DiskSpec>,
}

/// Where the sync file that replaces `target` is written: beside it, so that the rename stays
/// within one file system.
pub(super) fn sync_path(target: &Path) -> PathBuf {
    let mut name = target
        .file_name()
        .map_or_else(OsString::new, OsString::from);
    name.push(".sync");
    target.with_file_name(name)
}

impl SyncTargets {
    fn ram_pages(&self) -> u64 {
        self.ram_bytes / self.page_size as u64
    }

    /// Deletes the sync files (a sync cut short, or left by a crash before its commit point).
    pub(super) fn remove(&self) -> Result<(), ReplicaError> {
        secure_fs::remove_stale(&sync_path(&self.ram))?;
        if let Some(d) = &self.disk {
            secure_fs::remove_stale(&sync_path(&d.path))?;
        }
        Ok(())
    }
}

/// The open sync files of a full checkpoint being received.
#[derive(Debug)]
pub(super) struct SyncFiles {
    ram: File,
    disk: Option<File>,
}

impl SyncFiles {
    /// Fresh sparse files of the replica's sizes (any earlier ones are replaced).
    pub(super) fn create(t: &SyncTargets) -> Result<SyncFiles, ReplicaError> {
        let fresh = |path: &Path, len: u64| -> Result<File, ReplicaError> {
            let f = secure_fs::replace(path, PRIVATE_FILE_MODE)?;
            f.set_len(len).map_err(io(path, "size sync file"))?;
            Ok(f)
        };
        let ram = fresh(&sync_path(&t.ram), t.ram_bytes)?;
        let disk = match &t.disk {
            Some(d) => Some(fresh(&sync_path(&d.path), d.bytes())?),
            None => None,
        };
        Ok(SyncFiles { ram, disk })
    }

    /// Writes pages (`data` holds `indices.len()` of them) at their places in the RAM file.
    pub(super) fn write_pages(
        &self,
        t: &SyncTargets,
        indices: &[u64],
        data: &[u8],
    ) -> Result<(), ReplicaError> {
        let pages = t.ram_pages();
        let bad = |index| ReplicaError::BadPage {
            index,
            pages,
            page_size: t.page_size,
        };
        let path = sync_path(&t.ram);
        write_runs(&self.ram, &path, indices, data, t.page_size, pages).map_err(bad)?
    }

    /// Writes disk blocks (`data` holds `indices.len()` of them) at their places in the image.
    pub(super) fn write_blocks(
        &self,
        t: &SyncTargets,
        indices: &[u64],
        data: &[u8],
    ) -> Result<(), ReplicaError> {
        let (Some(file), Some(d)) = (&self.disk, &t.disk) else {
            return match indices.is_empty() {
                true => Ok(()),
                false => Err(ReplicaError::NoDisk),
            };
        };
        let bad = |index| ReplicaError::BadDiskBlock {
            index,
            blocks: d.blocks,
        };
        let path = sync_path(&d.path);
        let bs = DISK_BLOCK_SIZE as usize;
        write_runs(file, &path, indices, data, bs, d.blocks).map_err(bad)?
    }

    /// Makes the files durable (before the journal naming them is sealed).
    pub(super) fn sync(&self, t: &SyncTargets) -> Result<(), ReplicaError> {
        self.ram
            .sync_data()
            .map_err(io(&sync_path(&t.ram), "sync"))?;
        if let (Some(f), Some(d)) = (&self.disk, &t.disk) {
            f.sync_data().map_err(io(&sync_path(&d.path), "sync"))?;
        }
        Ok(())
    }
}

/// Writes `data` (units of `unit` bytes, one per index) at `index * unit` of `file`, runs of
/// consecutive indices in one write each. Every index is checked against `limit` before anything
/// is written: `Err(index)` names the first one out of range (`u64::MAX`: data and indices
/// disagree), `Ok(Err(_))` an I/O failure.
fn write_runs(
    file: &File,
    path: &Path,
    indices: &[u64],
    data: &[u8],
    unit: usize,
    limit: u64,
) -> Result<Result<(), ReplicaError>, u64> {
    if Some(data.len()) != indices.len().checked_mul(unit) {
        return Err(u64::MAX);
    }
    if let Some(&bad) = indices.iter().find(|&&i| i >= limit) {
        return Err(bad);
    }
    let max_run = (MAX_RUN_BYTES / unit).max(1);
    let mut i = 0;
    while i < indices.len() {
        let mut j = i + 1;
        while j < indices.len() && indices[j] == indices[j - 1] + 1 && j - i < max_run {
            j += 1;
        }
        // In range: checked above (indices below `limit`, data of the indices' length).
        let run = &data[i * unit..j * unit];
        if let Err(e) = file.write_all_at(run, indices[i] * unit as u64) {
            return Ok(Err(io(path, "write sync file")(e)));
        }
        i = j;
    }
    Ok(Ok(()))
}

/// Puts the sync file of `target` in its place (step 2 for a journal whose contents are in the
/// sync files), or finds it already there: a missing sync file was renamed by an apply a crash
/// cut short. A sync file of another size than `len` is refused. Returns the target, reopened.
pub(super) fn install(
    target: &Path,
    len: u64,
    durability: Durability,
) -> Result<File, ReplicaError> {
    let from = sync_path(target);
    match secure_fs::open_existing(&from, false) {
        Ok(f) => {
            let found = f.metadata().map_err(io(&from, "stat"))?.len();
            if found != len {
                return Err(ReplicaError::Corrupt(from));
            }
            fs::rename(&from, target).map_err(io(target, "rename sync file"))?;
            if durability == Durability::Durable {
                secure_fs::sync_parent(target)?;
            }
        }
        Err(secure_fs::SecureFsError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    Ok(secure_fs::open_existing(target, true)?)
}
