//! The backup's replica: the guest RAM file QEMU will map at failover plus the device-state blob
//! and the (generation, epoch) they belong to. A checkpoint is committed through a redo journal
//! so that a crash of the backup process at any moment leaves either the previous or the new
//! checkpoint, never a mix:
//!
//! 0. while the checkpoint arrives, its link reader copies its pages into a spool file of the
//!    replica directory ([`StageWriter`]); when it ends whole, the reader writes the page indices,
//!    the device state and a header with the lengths and an xxh3 checksum of it all: a *sealed*
//!    journal (a checkpoint that arrived without one is written whole at step 1). A full
//!    checkpoint (a sync) streams into fresh sync files beside the RAM file and disk image
//!    instead, and its journal holds only the header and the device state ([`sync`]'s docs
//!    give its crash argument);
//! 1. [`Replica::commit_point`] writes the commit's record (the [`ReplicaAt`] the replica is
//!    once it lands) into the sealed journal's header and renames the journal to `journal` —
//!    the commit point (rename is atomic within a file system). The checkpoint is committed:
//!    the agent reports it and the ack goes to the primary now;
//! 2. [`Replica::apply_committed`] (right after, off the ack's path: the agent runs it on a
//!    thread of lower priority) applies its pages to the RAM file (a full checkpoint lists only
//!    the primary's non-zero pages: the RAM file is punched back to zeroes first; a synced one
//!    renames the sync files over the RAM file and disk image) and writes the device blob and
//!    `committed` metadata (each via a temporary file and `rename`): the commit's record and a
//!    digest of the device blob;
//! 3. the journal goes back to the spool as a spare file for a later checkpoint.
//!
//! [`Replica::open`] replays a `journal` left by a crash between 1 and 3 (one of an epoch at or
//! before the committed one of the same stream was already applied and is dropped); spool files
//! and a torn `journal.tmp` are discarded (they never reached the commit point). Until step 2 ran, the RAM
//! file and device blob still hold the previous checkpoint: everything that reads them
//! ([`Replica::device_state`], [`Replica::ram_digest`], [`Replica::settle`], and the agent before
//! it hands the RAM file to QEMU at failover) first applies the committed journal from disk.
//!
//! Why this shape (issue 13: the ack within 2 ms + 1 ms per 100 MB of the send's end). Measured
//! on the 2-core development machine with 10,000 pages (40 MB) on tmpfs: writing the whole
//! journal at the end with one `write`, unsynced, costs 17–28 ms into a new file and 7–13 ms
//! into a reused one (xxh3 over it 1.5 ms), so the cheapest option at the end is already far over
//! budget; applying the pages (10,000 `pwrite`s) costs 13–27 ms. Written as the pages arrive,
//! what is left at the end is the last chunk, the indices, the device state and the rename: the
//! backup's end of the checkpoint → ack is 0.7–0.8 ms (p50) in every capture mode, and the apply
//! runs after the ack. Spool files are reused (no tmpfs allocation per checkpoint), and there
//! are as many as checkpoints in flight (one being received, one committed and being applied).
//! The cost moves to the link reader, which copies each page once more: 10–20 ms more send time
//! per 40 MB where the reader is the slower end of the transfer (docs/bench/README.md).
//!
//! **Durability.** By default ([`Durability::Atomic`]) nothing is synced: the RAM file lives on
//! tmpfs, which a host reboot loses anyway (the replica directory is best put there too), and a
//! crash of the process loses nothing it wrote. [`Durability::Durable`] (`ftvm agent
//! --durable-replica`, `AgentConfig::replica_durable`, for a replica directory on persistent
//! storage) also `fsync`s the journal before its rename, the directory after it, and the device
//! blob and metadata, as every commit did before.
//!
//! **Resuming.** A backup restarted with its replica kept offers it to the primary, which then
//! sends only what changed since ([`Replica::replica_at`]). Only a replica whose files are
//! whole counts: [`Replica::open`] discards the committed state ([`Discarded`]) when the RAM
//! file or the disk image is missing (the RAM file lives on tmpfs, which a reboot empties) or
//! the device blob is not the one committed, and a `committed` file of the older format
//! (generation and epoch only) is kept for failover but not offered.
//!
//! `committed` holds `v2 generation epoch lineage since device-xxh3` (the [`ReplicaAt`] and a
//! digest of the device blob); a journal whose record was lost is applied as before and leaves
//! the older `generation epoch`.
//!
//! Journal layout: a [`HEADER_LEN`]-byte header (magic, generation, epoch, page count, page
//! bytes, device bytes, disk block count, full flag, checksum; the commit's record at byte
//! [`RECORD_OFFSET`], with its own checksum; the rest zero), then the page
//! contents, the disk blocks' contents, the page indices and disk block indices (u64
//! little-endian) and the device state. The checksum is xxh3-64 of all of that followed by the
//! header's first 64 bytes. Bytes past the device state are ignored (a reused file may hold an
//! older, longer journal there).
//!
//! **Disks.** A VM with a protected disk has a replica disk image ([`DiskSpec`]) beside the RAM
//! file; a checkpoint's disk blocks travel in the same journal as its pages and are applied by
//! the same step 2, so the commit point covers RAM, disk and device state at once.

// Values here come off the wire (or go onto it): a cast that drops bits must be a checked
// conversion, or say why it cannot lose anything.
#![warn(clippy::cast_possible_truncation)]

mod disk;
#[cfg(test)]
mod disk_tests;
mod spool;
mod sync;
#[cfg(test)]
mod sync_tests;

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ftvm_model::wire::DISK_BLOCK_SIZE;
use ftvm_model::{Epoch, Generation, ReplicaAt};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

pub use crate::secure_fs::Durability;
use crate::secure_fs::{self, SecureFsError, PRIVATE_FILE_MODE};
pub use disk::DiskSpec;
use disk::ReplicaDisk;
pub use spool::{JournalSpool, StageWriter};
use spool::{SpoolFile, STAGE_PREFIX};
use sync::SyncTargets;

/// Errors of the replica store.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// A file operation failed.
    #[error("replica {path}: {what}: {source}")]
    Io {
        /// File involved.
        path: PathBuf,
        /// Step that failed.
        what: &'static str,
        /// OS error.
        source: std::io::Error,
    },
    /// A page index lies outside guest RAM, or a page has the wrong size.
    #[error("checkpoint page {index} does not fit a RAM of {pages} pages of {page_size} bytes")]
    BadPage {
        /// Offending page index.
        index: u64,
        /// Pages in RAM.
        pages: u64,
        /// Page size.
        page_size: usize,
    },
    /// A disk block index lies outside the replica disk, or the disk part is malformed.
    #[error("checkpoint disk block {index} does not fit a disk of {blocks} blocks")]
    BadDiskBlock {
        /// Offending block index (`u64::MAX`: data and index list disagree).
        index: u64,
        /// Blocks of the disk.
        blocks: u64,
    },
    /// A checkpoint carries disk blocks but this replica has no disk.
    #[error("checkpoint carries disk blocks but this replica has no disk")]
    NoDisk,
    /// The replica disk image has another size than the VM's disk.
    #[error("replica disk {path} is {found} bytes, the VM's disk is {expected}")]
    DiskSizeMismatch {
        /// The image.
        path: PathBuf,
        /// Size found.
        found: u64,
        /// Size configured.
        expected: u64,
    },
    /// The replica on disk belongs to another RAM size.
    #[error("replica RAM file is {found} bytes, expected {expected}")]
    SizeMismatch {
        /// Size found.
        found: u64,
        /// Size configured.
        expected: u64,
    },
    /// A replica file is a symbolic link, not ours, or open to others.
    #[error("replica: {0}")]
    File(#[from] SecureFsError),
    /// A journal or metadata file is corrupt.
    #[error("replica {0} is corrupt")]
    Corrupt(PathBuf),
}

/// Why [`Replica::open`] threw the committed state away: a replica whose files are not whole is
/// no state the VM was ever in. A full sync refills it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Discarded {
    /// The RAM file was missing or empty (a reboot emptied its tmpfs).
    #[error("replica RAM file missing: discarding the committed replica, a full sync follows")]
    RamMissing,
    /// The disk image was missing or empty.
    #[error("replica disk image missing: discarding the committed replica, a full sync follows")]
    DiskMissing,
    /// The device blob is missing or its digest is not the one committed.
    #[error(
        "replica device state missing or not the one committed: discarding the committed \
         replica, a full sync follows"
    )]
    DeviceMismatch,
}

/// A checkpoint fully received and verified, not yet applied (the driver core's type).
pub use ftvm_driver::StagedCheckpoint;

/// What the replica holds: the last committed checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Committed {
    /// Generation.
    pub generation: u64,
    /// Epoch.
    pub epoch: u64,
}

/// What the `committed` file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CommitRecord {
    committed: Committed,
    /// What the replica is (None: an older file, not resumable).
    at: Option<ReplicaAt>,
    /// xxh3-64 of the device blob committed with it.
    device: Option<u64>,
}

/// A committed journal whose pages are not in the RAM file yet.
#[derive(Debug)]
struct Unapplied {
    committed: Committed,
    /// The commit's record.
    at: Option<ReplicaAt>,
    /// The journal's file, to recycle once applied (none: replayed from its name).
    file: Option<File>,
    /// Its contents are in the sync files (applying it renames them into place).
    synced: bool,
}

/// The replica directory plus the RAM file.
pub struct Replica {
    dir: PathBuf,
    ram_path: PathBuf,
    ram: File,
    ram_bytes: u64,
    page_size: usize,
    committed: Option<Committed>,
    /// What the committed replica is, if a restart can offer it.
    at: Option<ReplicaAt>,
    /// Why `open` threw the committed state away, if it did.
    discarded: Option<Discarded>,
    durability: Durability,
    spool: Arc<JournalSpool>,
    unapplied: Option<Unapplied>,
    /// The protected disk's replica, if the VM has one.
    disk: Option<ReplicaDisk>,
}

fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> ReplicaError {
    let path = path.to_path_buf();
    move |source| ReplicaError::Io { path, what, source }
}

/// Bytes before a journal's pages.
pub const HEADER_LEN: usize = 4096;
const JOURNAL_MAGIC: &[u8; 8] = b"FTVMJRN3";
/// Header bytes the checksum covers (magic and the seven words: names, lengths, full flag).
const HEADER_FIELDS: usize = 64;
/// Where a journal's header keeps the commit's record (a [`ReplicaAt`]), written at the commit
/// point: a journal is sealed before the model says what the commit makes of the replica.
pub const RECORD_OFFSET: usize = 128;
const RECORD_MAGIC: &[u8; 8] = b"FTVMRAT1";
/// Magic, generation, lineage, since, epoch, then an xxh3-64 of those.
const RECORD_LEN: usize = 48;

/// The commit record of `at` as the journal header holds it.
fn encode_record(at: &ReplicaAt) -> [u8; RECORD_LEN] {
    let mut b = [0u8; RECORD_LEN];
    b[..8].copy_from_slice(RECORD_MAGIC);
    let words = [at.generation.0, at.lineage, at.since.0, at.epoch.0];
    for (i, v) in words.into_iter().enumerate() {
        b[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_le_bytes());
    }
    let sum = xxh3_64(&b[..RECORD_LEN - 8]);
    b[RECORD_LEN - 8..].copy_from_slice(&sum.to_le_bytes());
    b
}

/// The commit record in a journal's header, if it holds a whole one.
fn parse_record(header: &[u8]) -> Option<ReplicaAt> {
    let b = header.get(RECORD_OFFSET..RECORD_OFFSET + RECORD_LEN)?;
    let word = |i: usize| -> Option<u64> {
        Some(u64::from_le_bytes(
            b.get(i * 8..i * 8 + 8)?.try_into().ok()?,
        ))
    };
    if b.get(..8)? != RECORD_MAGIC || word(5)? != xxh3_64(&b[..RECORD_LEN - 8]) {
        return None;
    }
    Some(ReplicaAt {
        generation: Generation(word(1)?),
        lineage: word(2)?,
        since: Epoch(word(3)?),
        epoch: Epoch(word(4)?),
    })
}

/// Whether `at` describes the checkpoint `c` (a record that does not is not kept: the replica
/// then cannot be offered, which costs a full sync, never a wrong catch-up).
fn record_fits(at: ReplicaAt, c: Committed) -> bool {
    at.generation.0 == c.generation && at.epoch.0 == c.epoch && at.since <= at.epoch
}

/// What a journal's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct JournalHeader {
    generation: u64,
    epoch: u64,
    pages: u64,
    data_len: u64,
    device_len: u64,
    /// Disk blocks (their contents follow the pages', their indices the pages' indices).
    disk_blocks: u64,
    /// A full checkpoint: applying it zeroes the replica disk first.
    full: bool,
    /// A full checkpoint whose pages and blocks are in the sync files, not in the journal
    /// (whose counts are then zero): the `full` word is 2.
    synced: bool,
}

impl JournalHeader {
    fn of(s: &StagedCheckpoint) -> JournalHeader {
        JournalHeader {
            generation: s.generation,
            epoch: s.epoch,
            pages: s.indices.len() as u64,
            data_len: s.data.len() as u64,
            device_len: s.device.len() as u64,
            disk_blocks: s.disk_indices.len() as u64,
            full: s.full,
            synced: false,
        }
    }

    /// The header of this full checkpoint's journal when its contents are in the sync files.
    fn in_sync_files(self) -> JournalHeader {
        JournalHeader {
            pages: 0,
            data_len: 0,
            disk_blocks: 0,
            full: true,
            synced: true,
            ..self
        }
    }

    fn committed(&self) -> Committed {
        Committed {
            generation: self.generation,
            epoch: self.epoch,
        }
    }

    fn fields(&self) -> [u8; HEADER_FIELDS] {
        let mut b = [0u8; HEADER_FIELDS];
        b[..8].copy_from_slice(JOURNAL_MAGIC);
        for (i, v) in [
            self.generation,
            self.epoch,
            self.pages,
            self.data_len,
            self.device_len,
            self.disk_blocks,
            match (self.synced, self.full) {
                (true, _) => 2,
                (false, full) => u64::from(full),
            },
        ]
        .into_iter()
        .enumerate()
        {
            b[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// The header's bytes, given a hasher that saw the journal's body: the checksum covers the
    /// body and the header's fields.
    fn seal(&self, body: &mut Xxh3) -> Vec<u8> {
        let fields = self.fields();
        body.update(&fields);
        let mut b = vec![0u8; HEADER_LEN];
        b[..HEADER_FIELDS].copy_from_slice(&fields);
        b[HEADER_FIELDS..HEADER_FIELDS + 8].copy_from_slice(&body.digest().to_le_bytes());
        b
    }

    /// Parses a header: the fields and the checksum it claims.
    fn parse(b: &[u8]) -> Option<(JournalHeader, u64)> {
        if b.get(..8)? != JOURNAL_MAGIC {
            return None;
        }
        let word = |i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(
                b.get(8 + i * 8..16 + i * 8)?.try_into().ok()?,
            ))
        };
        let h = JournalHeader {
            generation: word(0)?,
            epoch: word(1)?,
            pages: word(2)?,
            data_len: word(3)?,
            device_len: word(4)?,
            disk_blocks: word(5)?,
            full: word(6)? != 0,
            synced: match word(6)? {
                0 | 1 => false,
                2 => true,
                _ => return None,
            },
        };
        if h.synced && (h.pages, h.data_len, h.disk_blocks) != (0, 0, 0) {
            return None;
        }
        Some((h, word(7)?))
    }

    /// Bytes of the disk blocks' contents.
    fn disk_data_len(&self) -> Option<usize> {
        usize::try_from(self.disk_blocks)
            .ok()?
            .checked_mul(DISK_BLOCK_SIZE as usize)
    }

    /// Bytes of the body (pages, disk blocks, indices, device state), if this host can address
    /// them.
    fn body_len(&self) -> Option<usize> {
        let pages = usize::try_from(self.pages).ok()?;
        let blocks = usize::try_from(self.disk_blocks).ok()?;
        let data = usize::try_from(self.data_len).ok()?;
        let device = usize::try_from(self.device_len).ok()?;
        data.checked_add(self.disk_data_len()?)?
            .checked_add(pages.checked_add(blocks)?.checked_mul(8)?)?
            .checked_add(device)
    }
}

impl Replica {
    /// Opens (creating if absent) the replica in `dir` with its RAM file at `ram_path` of
    /// `ram_bytes`, replaying a journal that a crash left behind; commits are not synced
    /// ([`Durability::Atomic`], for a replica on tmpfs).
    pub fn open(
        dir: &Path,
        ram_path: &Path,
        ram_bytes: u64,
        page_size: usize,
    ) -> Result<Replica, ReplicaError> {
        Replica::open_with(dir, ram_path, ram_bytes, page_size, Durability::Atomic)
    }

    /// [`Replica::open`] with the commits' `durability` (see the module docs).
    pub fn open_with(
        dir: &Path,
        ram_path: &Path,
        ram_bytes: u64,
        page_size: usize,
        durability: Durability,
    ) -> Result<Replica, ReplicaError> {
        Replica::open_with_disk(dir, ram_path, ram_bytes, page_size, durability, None)
    }

    /// [`Replica::open_with`] for a VM with a protected disk (`disk`), whose replica image is
    /// created sparse if absent and refused if it has another size.
    pub fn open_with_disk(
        dir: &Path,
        ram_path: &Path,
        ram_bytes: u64,
        page_size: usize,
        durability: Durability,
        disk: Option<&DiskSpec>,
    ) -> Result<Replica, ReplicaError> {
        secure_fs::private_dir(dir)?;
        let disk = disk.map(ReplicaDisk::open).transpose()?;
        let (ram, _) = secure_fs::open_or_create_private(ram_path)?;
        let found = ram.metadata().map_err(io(ram_path, "stat"))?.len();
        // Only a committed checkpoint or a journal to replay gives the RAM file's contents a
        // meaning; without them it is a leftover (say, of a VM of another size that used the
        // same name) and is reset rather than refused.
        let holds_state = dir.join("committed").exists() || dir.join("journal").exists();
        // Committed state whose RAM or disk is gone is no replica at all (and claiming its
        // epoch with zeroes in their place would hand a primary a wrong base).
        let discarded = match (holds_state, &disk) {
            (false, _) => None,
            _ if found == 0 => Some(Discarded::RamMissing),
            (_, Some(d)) if d.fresh => Some(Discarded::DiskMissing),
            _ => None,
        };
        if let Some(why) = discarded {
            discard_files(dir, why)?;
        }
        let holds_state = holds_state && discarded.is_none();
        if found != ram_bytes && !holds_state {
            ram.set_len(0).map_err(io(ram_path, "truncate RAM file"))?;
        }
        if found == 0 || (found != ram_bytes && !holds_state) {
            // A sparse file: pages never written read as zeroes, as fresh guest RAM does.
            ram.set_len(ram_bytes)
                .map_err(io(ram_path, "size RAM file"))?;
        } else if found != ram_bytes {
            return Err(ReplicaError::SizeMismatch {
                found,
                expected: ram_bytes,
            });
        }
        let targets = SyncTargets {
            ram: ram_path.to_path_buf(),
            ram_bytes,
            page_size,
            disk: disk.as_ref().map(|d| d.spec().clone()),
        };
        let mut r = Replica {
            dir: dir.to_path_buf(),
            ram_path: ram_path.to_path_buf(),
            ram,
            ram_bytes,
            page_size,
            committed: None,
            at: None,
            discarded,
            durability,
            spool: JournalSpool::new(dir.to_path_buf(), durability, targets),
            unapplied: None,
            disk,
        };
        // Nothing that never reached the commit point counts.
        secure_fs::remove_stale(&r.dir.join("journal.tmp"))?;
        let entries = fs::read_dir(&r.dir).map_err(io(&r.dir, "list"))?;
        for entry in entries {
            let entry = entry.map_err(io(&r.dir, "list"))?;
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(STAGE_PREFIX)
            {
                secure_fs::remove_stale(&entry.path())?;
            }
        }
        r.replay_journal()?;
        // Sync files no committed journal names (a sync cut short by the crash, or whose
        // journal was applied already) never reached the commit point.
        r.spool.targets().remove()?;
        let record = r.read_committed()?;
        r.committed = record.map(|c| c.committed);
        r.at = record.and_then(|c| c.at);
        if let Some(expected) = record.and_then(|c| c.device) {
            if !r.device_matches(expected)? {
                r.discard(Discarded::DeviceMismatch)?;
            }
        }
        if let (Some(c), None) = (r.committed, r.at) {
            tracing::info!(
                dir = %r.dir.display(),
                generation = c.generation,
                epoch = c.epoch,
                "the replica's commit record has the older format (no lineage): it is kept for \
                 a takeover but not offered to a primary; a full sync follows a rejoin"
            );
        }
        Ok(r)
    }

    /// Applies a `journal` a crash left between the commit point and its removal, unless it
    /// was applied already: its checkpoint is the committed one, or an older one of the same
    /// stream. (A journal of another stream is newer than `committed`, whatever its epoch: the
    /// metadata is only written from the journal being applied.)
    fn replay_journal(&mut self) -> Result<(), ReplicaError> {
        let journal = self.journal_path();
        if !journal.exists() {
            return Ok(());
        }
        let (staged, at, synced) = read_journal(&journal)?;
        let c = JournalHeader::of(&staged).committed();
        let record = self.read_committed()?;
        let applied = match (at, record.and_then(|r| r.at)) {
            (Some(j), Some(old)) if (j.generation, j.lineage) == (old.generation, old.lineage) => {
                j.epoch <= old.epoch
            }
            (Some(_), Some(_)) => false,
            _ => record.is_some_and(|old| c <= old.committed),
        };
        if applied {
            // Applied before the crash; only its removal was missing.
            return remove_if_present(&journal);
        }
        self.check(&staged)?;
        self.apply_contents(&staged, synced)?;
        self.finish(&staged, None, at)
    }

    /// Whether the device blob is the one committed (its digest is `expected`).
    fn device_matches(&self, expected: u64) -> Result<bool, ReplicaError> {
        let device = read_private(&self.dir.join("device"))?;
        Ok(device.is_some_and(|d| xxh3_64(&d) == expected))
    }

    /// Throws the committed state away (see [`Discarded`]): a full sync refills the replica.
    fn discard(&mut self, why: Discarded) -> Result<(), ReplicaError> {
        discard_files(&self.dir, why)?;
        self.committed = None;
        self.at = None;
        self.unapplied = None;
        self.discarded = Some(why);
        Ok(())
    }

    /// Forgets everything: the replica must be filled by a full checkpoint before use.
    pub fn reset(&mut self) -> Result<(), ReplicaError> {
        for name in ["journal", "committed", "device"] {
            let _ = fs::remove_file(self.dir.join(name));
        }
        if self.unapplied.take().is_some_and(|u| u.synced) {
            self.spool.targets().remove()?;
            self.spool.release_sync();
        }
        self.at = None;
        self.zero_ram()?;
        self.committed = None;
        if let Some(d) = self.disk.as_mut() {
            d.zero()?;
        }
        Ok(())
    }

    /// Path of the replica disk image, if the VM has a disk (a failover serves it to the
    /// restored VM: call [`Replica::settle`] first).
    pub fn disk_path(&self) -> Option<&Path> {
        self.disk.as_ref().map(ReplicaDisk::path)
    }

    /// The last committed checkpoint, if any (possibly not applied yet: see [`Replica::settle`]).
    pub fn committed(&self) -> Option<Committed> {
        self.committed
    }

    /// What the committed replica is, if a restarted backup can offer it to the primary
    /// (`Start::Resume`): None without a committed checkpoint, with one whose record has the
    /// older format, or after [`Replica::open`] discarded it.
    pub fn replica_at(&self) -> Option<ReplicaAt> {
        self.at
    }

    /// Why [`Replica::open`] threw the committed state away, if it did.
    pub fn discarded(&self) -> Option<Discarded> {
        self.discarded
    }

    /// Path of the RAM file (QEMU maps it at failover: call [`Replica::settle`] first).
    pub fn ram_path(&self) -> &Path {
        &self.ram_path
    }

    /// The spool the link readers write journals into ([`JournalSpool::writer`]).
    pub fn spool(&self) -> Arc<JournalSpool> {
        self.spool.clone()
    }

    /// Whether a committed checkpoint is not in the RAM file yet.
    pub fn unapplied(&self) -> bool {
        self.unapplied.is_some()
    }

    /// A digest (xxh3-64) of the whole RAM file, comparable with the primary's RAM digest.
    pub fn ram_digest(&mut self) -> Result<u64, ReplicaError> {
        self.settle()?;
        let mut h = Xxh3::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0u64;
        while off < self.ram_bytes {
            let n =
                usize::try_from(self.ram_bytes - off).map_or(buf.len(), |left| left.min(buf.len()));
            self.ram
                .read_exact_at(&mut buf[..n], off)
                .map_err(io(&self.ram_path, "read RAM file"))?;
            h.update(&buf[..n]);
            off += n as u64;
        }
        Ok(h.digest())
    }

    /// A digest (xxh3-64) of the replica disk, if the VM has one, comparable with the primary's
    /// disk digest.
    pub fn disk_digest(&mut self) -> Result<Option<u64>, ReplicaError> {
        self.settle()?;
        self.disk.as_ref().map(ReplicaDisk::digest).transpose()
    }

    /// The committed device state.
    pub fn device_state(&mut self) -> Result<Vec<u8>, ReplicaError> {
        self.settle()?;
        let p = self.dir.join("device");
        read_private(&p)?.ok_or_else(|| ReplicaError::Io {
            path: p,
            what: "read device state",
            source: std::io::ErrorKind::NotFound.into(),
        })
    }

    /// Commits `staged`, which makes the replica `at`, and applies it (see the module docs).
    pub fn commit(&mut self, staged: &StagedCheckpoint, at: ReplicaAt) -> Result<(), ReplicaError> {
        self.commit_point(staged, at)?;
        self.apply_committed(staged)
    }

    /// Steps 0–1 of the module docs: once this returns, `staged` is committed (a restart replays
    /// it), though not applied yet, and the replica is `at` (the model's `Commit` says so). Uses
    /// the journal sealed for it (`staged.spooled`) when there is one, else writes it whole.
    pub fn commit_point(
        &mut self,
        staged: &StagedCheckpoint,
        at: ReplicaAt,
    ) -> Result<(), ReplicaError> {
        self.settle()?;
        self.check(staged)?;
        let header = JournalHeader::of(staged);
        let journal = self.journal_path();
        let (file, synced) = match self.spool.take(staged.spooled) {
            Some(p) if p.header == header => (p.file, p.synced),
            other => {
                if let Some(p) = other {
                    self.spool.drop_prepared(p);
                }
                (self.write_journal(staged)?, false)
            }
        };
        let c = header.committed();
        let at = record_fits(at, c).then_some(at);
        if at.is_none() {
            tracing::warn!(
                epoch = c.epoch,
                "the commit's replica record does not describe its checkpoint: not kept, the \
                 replica will not be offered after a restart"
            );
        }
        let file = self.write_record(file, at)?;
        fs::rename(&file.path, &journal).map_err(io(&journal, "rename journal"))?;
        if self.durability == Durability::Durable {
            secure_fs::sync_parent(&journal)?;
        }
        self.committed = Some(c);
        self.at = at;
        self.unapplied = Some(Unapplied {
            committed: c,
            at,
            file: Some(file.file),
            synced,
        });
        self.spool.discard_through(c);
        Ok(())
    }

    /// Steps 2–3 of the module docs for the checkpoint just committed, from `staged` in memory
    /// (or from the journal on disk if `staged` is not the one committed).
    pub fn apply_committed(&mut self, staged: &StagedCheckpoint) -> Result<(), ReplicaError> {
        let matches = self
            .unapplied
            .as_ref()
            .is_some_and(|u| u.committed == JournalHeader::of(staged).committed());
        if !matches {
            return self.settle();
        }
        let synced = self.unapplied.as_ref().is_some_and(|u| u.synced);
        self.apply_contents(staged, synced)?;
        self.finish_unapplied(staged)
    }

    /// Applies a committed journal not applied yet, reading it back from disk: after this the
    /// RAM file and device blob are the committed checkpoint's.
    pub fn settle(&mut self) -> Result<(), ReplicaError> {
        let Some(u) = &self.unapplied else {
            return Ok(());
        };
        let journal = self.journal_path();
        let (staged, _, synced) = read_journal(&journal)?;
        if JournalHeader::of(&staged).committed() != u.committed {
            return Err(ReplicaError::Corrupt(journal));
        }
        self.check(&staged)?;
        self.apply_contents(&staged, synced)?;
        self.finish_unapplied(&staged)
    }

    /// Puts a committed checkpoint's pages and disk blocks in place: written from `staged`, or,
    /// for a journal whose contents are in the sync files (`synced`), by renaming those over the
    /// RAM file and disk image (see `sync`).
    fn apply_contents(
        &mut self,
        staged: &StagedCheckpoint,
        synced: bool,
    ) -> Result<(), ReplicaError> {
        if !synced {
            self.write_pages(staged)?;
        } else {
            self.ram = sync::install(&self.ram_path, self.ram_bytes, self.durability)?;
            if let Some(d) = self.disk.as_mut() {
                d.install(self.durability)?;
            }
            self.spool.release_sync();
        }
        if staged.full {
            self.allocate_ram_behind();
        }
        Ok(())
    }

    /// After a full checkpoint, whose zero pages were not sent and are holes in the RAM file:
    /// allocates them on a thread of their own at the lowest priority, off the commit lock,
    /// [`ALLOCATE_CHUNK`] at a time (`posix_fallocate` only fills holes, so commits writing
    /// pages meanwhile are unaffected; tmpfs holds the file's lock for a whole call, so one
    /// call for all of RAM would stall those writes for as long). The file is then whole
    /// again, as a QEMU restored from it at failover expects: its guest and the next sync's
    /// pre-copy would otherwise allocate each page in a fault, and a full tmpfs would fail the
    /// guest with SIGBUS rather than show up here.
    fn allocate_ram_behind(&self) {
        let Ok(file) = self.ram.try_clone() else {
            return;
        };
        let (len, path) = (self.ram_bytes, self.ram_path.clone());
        let spawned = std::thread::Builder::new()
            .name("replica-alloc".into())
            .spawn(move || {
                // SAFETY: setpriority only reads its integer arguments; `who` 0 with
                // PRIO_PROCESS is the calling thread on Linux. Failing leaves the default
                // priority, which is harmless.
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, 0, 19);
                }
                if let Err(e) = allocate_in_chunks(&file, len) {
                    tracing::warn!(
                        path = %path.display(),
                        error = %e,
                        "replica: allocating the RAM file after a full sync failed (too small \
                         a file system?); a restored VM may fail touching a page that was zero"
                    );
                }
            });
        if let Err(e) = spawned {
            tracing::debug!(error = %e, "replica: no thread to allocate the RAM file");
        }
    }

    /// Step 2's end for the committed journal `staged` whose pages are written: metadata, and
    /// the journal's file back to the spool.
    fn finish_unapplied(&mut self, staged: &StagedCheckpoint) -> Result<(), ReplicaError> {
        let (at, file) = self
            .unapplied
            .take()
            .map_or((None, None), |u| (u.at, u.file));
        self.finish(staged, file, at)
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.join("journal")
    }

    /// Writes the commit's record into the header of journal `f` (zeroes for none, so that a
    /// reused file never carries an older one), synced with the journal when durable.
    fn write_record(&self, f: SpoolFile, at: Option<ReplicaAt>) -> Result<SpoolFile, ReplicaError> {
        let record = at.as_ref().map_or([0; RECORD_LEN], encode_record);
        let offset = RECORD_OFFSET as u64;
        self.write_spooled(f, &record, offset, "write the journal's commit record")
    }

    /// Writes `staged` whole into a spool file (a checkpoint without a sealed journal).
    fn write_journal(&self, staged: &StagedCheckpoint) -> Result<SpoolFile, ReplicaError> {
        let f = self.spool.file()?;
        self.write_spooled(f, &encode_journal(staged), 0, "write journal")
    }

    /// Writes `bytes` at `offset` of spool file `f`, synced when durable. On failure the file
    /// goes back to the spool.
    fn write_spooled(
        &self,
        f: SpoolFile,
        bytes: &[u8],
        offset: u64,
        what: &'static str,
    ) -> Result<SpoolFile, ReplicaError> {
        let written = f
            .file
            .write_all_at(bytes, offset)
            .map_err(io(&f.path, what))
            .and_then(|()| match self.durability {
                Durability::Durable => f.file.sync_data().map_err(io(&f.path, "sync journal")),
                Durability::Atomic => Ok(()),
            });
        match written {
            Ok(()) => Ok(f),
            Err(e) => {
                self.spool.recycle(f);
                Err(e)
            }
        }
    }

    fn check(&self, staged: &StagedCheckpoint) -> Result<(), ReplicaError> {
        let pages = self.ram_bytes / self.page_size as u64;
        if staged.data.len() != staged.indices.len() * self.page_size {
            return Err(ReplicaError::BadPage {
                index: u64::MAX,
                pages,
                page_size: self.page_size,
            });
        }
        if let Some(&index) = staged.indices.iter().find(|&&i| i >= pages) {
            return Err(ReplicaError::BadPage {
                index,
                pages,
                page_size: self.page_size,
            });
        }
        match &self.disk {
            Some(d) => d.check(staged),
            None if staged.disk_indices.is_empty() && staged.disk_data.is_empty() => Ok(()),
            None => Err(ReplicaError::NoDisk),
        }
    }

    /// Punches the whole RAM file back to zeroes (same inode, same size).
    fn zero_ram(&self) -> Result<(), ReplicaError> {
        self.ram
            .set_len(0)
            .map_err(io(&self.ram_path, "truncate"))?;
        self.ram
            .set_len(self.ram_bytes)
            .map_err(io(&self.ram_path, "size RAM file"))
    }

    /// Writes the pages of a checkpoint that passed [`Replica::check`] into the RAM file. A
    /// full checkpoint lists only the pages that are not zero on the primary: the RAM file is
    /// punched back to zeroes first (a replay after a crash does it again, harmlessly, as for
    /// the disk).
    fn write_pages(&mut self, staged: &StagedCheckpoint) -> Result<(), ReplicaError> {
        if staged.full {
            self.zero_ram()?;
        }
        for (index, page) in staged.pages(self.page_size) {
            self.ram
                .write_all_at(page, index * self.page_size as u64)
                .map_err(io(&self.ram_path, "write page"))?;
        }
        if let Some(d) = self.disk.as_mut() {
            d.apply(staged)?;
            if self.durability == Durability::Durable {
                d.sync()?;
            }
        }
        Ok(())
    }

    /// After the pages: the device blob, the metadata (the commit's record `at` and the
    /// device blob's digest), and the journal recycled (`file`, its open file) or removed.
    fn finish(
        &mut self,
        staged: &StagedCheckpoint,
        file: Option<File>,
        at: Option<ReplicaAt>,
    ) -> Result<(), ReplicaError> {
        let mode = PRIVATE_FILE_MODE;
        secure_fs::write_replace(
            &self.dir.join("device"),
            &staged.device,
            mode,
            self.durability,
        )?;
        let meta = match at {
            Some(a) => format!(
                "v2 {} {} {} {} {}\n",
                staged.generation,
                staged.epoch,
                a.lineage,
                a.since.0,
                xxh3_64(&staged.device)
            ),
            None => format!("{} {}\n", staged.generation, staged.epoch),
        };
        let committed = self.dir.join("committed");
        secure_fs::write_replace(&committed, meta.as_bytes(), mode, self.durability)?;
        let journal = self.journal_path();
        if let Some(file) = file {
            let path = self.spool.fresh_path();
            if fs::rename(&journal, &path).is_ok() {
                self.spool.recycle(SpoolFile { path, file });
                return Ok(());
            }
        }
        remove_if_present(&journal)
    }

    fn read_committed(&self) -> Result<Option<CommitRecord>, ReplicaError> {
        let p = self.dir.join("committed");
        let Some(bytes) = read_private(&p)? else {
            return Ok(None);
        };
        let text = String::from_utf8(bytes).map_err(|_| ReplicaError::Corrupt(p.clone()))?;
        parse_committed(&text)
            .map(Some)
            .ok_or(ReplicaError::Corrupt(p))
    }
}

/// Bytes [`Replica::allocate_ram_behind`] allocates per call.
const ALLOCATE_CHUNK: u64 = 2 << 20;

/// Allocates the holes of `file`'s first `len` bytes, a chunk per call (a file system that
/// cannot allocate ahead is left as it is).
fn allocate_in_chunks(file: &File, len: u64) -> Result<(), nix::errno::Errno> {
    let mut at = 0;
    while at < len {
        let n = ALLOCATE_CHUNK.min(len - at);
        let (Ok(off), Ok(n)) = (i64::try_from(at), i64::try_from(n)) else {
            return Ok(());
        };
        match nix::fcntl::posix_fallocate(file, off, n) {
            Ok(()) => {}
            Err(nix::errno::Errno::EOPNOTSUPP) => return Ok(()),
            Err(e) => return Err(e),
        }
        at += ALLOCATE_CHUNK;
        std::thread::yield_now();
    }
    Ok(())
}

/// A `committed` file's contents: `v2 generation epoch lineage since device-xxh3`, or the
/// older `generation epoch` (no record: not resumable).
fn parse_committed(text: &str) -> Option<CommitRecord> {
    let mut words = text.split_whitespace();
    let v2 = text.starts_with("v2 ");
    if v2 {
        words.next();
    }
    let numbers: Vec<u64> = words.map(str::parse).collect::<Result<_, _>>().ok()?;
    match (v2, &numbers[..]) {
        (false, &[generation, epoch]) => Some(CommitRecord {
            committed: Committed { generation, epoch },
            at: None,
            device: None,
        }),
        (true, &[generation, epoch, lineage, since, device]) => {
            let committed = Committed { generation, epoch };
            let at = ReplicaAt {
                generation: Generation(generation),
                lineage,
                since: Epoch(since),
                epoch: Epoch(epoch),
            };
            Some(CommitRecord {
                committed,
                at: record_fits(at, committed).then_some(at),
                device: Some(device),
            })
        }
        _ => None,
    }
}

/// Removes the files of the committed state in `dir` (see [`Discarded`]), saying why.
fn discard_files(dir: &Path, why: Discarded) -> Result<(), ReplicaError> {
    tracing::warn!(dir = %dir.display(), "{why}");
    for name in ["journal", "committed", "device"] {
        remove_if_present(&dir.join(name))?;
    }
    Ok(())
}

fn remove_if_present(path: &Path) -> Result<(), ReplicaError> {
    fs::remove_file(path)
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Ok(()),
            _ => Err(e),
        })
        .map_err(io(path, "remove"))
}

/// A whole journal of `s` (see the module docs for the layout).
fn encode_journal(s: &StagedCheckpoint) -> Vec<u8> {
    let mut b = vec![0u8; HEADER_LEN];
    b.reserve(
        s.data.len()
            + s.disk_data.len()
            + (s.indices.len() + s.disk_indices.len()) * 8
            + s.device.len(),
    );
    b.extend_from_slice(&s.data);
    b.extend_from_slice(&s.disk_data);
    b.extend_from_slice(&journal_tail(s));
    let mut h = Xxh3::new();
    h.update(&b[HEADER_LEN..]);
    let header = JournalHeader::of(s).seal(&mut h);
    b[..HEADER_LEN].copy_from_slice(&header);
    b
}

/// What follows the page and disk block contents in a journal: the page indices, the disk block
/// indices (u64 little-endian) and the device state.
fn journal_tail(s: &StagedCheckpoint) -> Vec<u8> {
    let mut tail =
        Vec::with_capacity((s.indices.len() + s.disk_indices.len()) * 8 + s.device.len());
    for i in s.indices.iter().chain(&s.disk_indices) {
        tail.extend_from_slice(&i.to_le_bytes());
    }
    tail.extend_from_slice(&s.device);
    tail
}

/// The contents of a replica file (never through a symbolic link, only a file of ours), or None
/// when it does not exist.
fn read_private(path: &Path) -> Result<Option<Vec<u8>>, ReplicaError> {
    let mut f = match secure_fs::open_existing(path, false) {
        Ok(f) => f,
        Err(SecureFsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None)
        }
        Err(e) => return Err(e.into()),
    };
    let mut b = Vec::new();
    f.read_to_end(&mut b).map_err(io(path, "read"))?;
    Ok(Some(b))
}

/// Reads a committed journal back (never through a symbolic link, only a file of ours), with
/// its commit record if it holds one that fits it.
/// Also says whether its contents are in the sync files.
fn read_journal(path: &Path) -> Result<(StagedCheckpoint, Option<ReplicaAt>, bool), ReplicaError> {
    let corrupt = || ReplicaError::Corrupt(path.to_path_buf());
    let f = secure_fs::open_existing(path, false)?;
    let mut head = vec![0u8; HEADER_LEN];
    f.read_exact_at(&mut head, 0).map_err(|_| corrupt())?;
    let (header, sum) = JournalHeader::parse(&head).ok_or_else(corrupt)?;
    let len = header.body_len().ok_or_else(corrupt)?;
    // The claimed length must be there before it is allocated.
    let size = f.metadata().map_err(io(path, "stat"))?.len();
    if size < (HEADER_LEN as u64).saturating_add(len as u64) {
        return Err(corrupt());
    }
    let mut body = vec![0u8; len];
    f.read_exact_at(&mut body, HEADER_LEN as u64)
        .map_err(io(path, "read journal"))?;
    let staged = decode_body(header, sum, body).ok_or_else(corrupt)?;
    let at = parse_record(&head).filter(|&at| record_fits(at, header.committed()));
    Ok((staged, at, header.synced))
}

fn decode_body(h: JournalHeader, sum: u64, mut body: Vec<u8>) -> Option<StagedCheckpoint> {
    let mut hasher = Xxh3::new();
    hasher.update(&body);
    hasher.update(&h.fields());
    if hasher.digest() != sum {
        return None;
    }
    let data_len = usize::try_from(h.data_len).ok()?;
    let pages = usize::try_from(h.pages).ok()?;
    let blocks = usize::try_from(h.disk_blocks).ok()?;
    let mut disk_data = body.split_off(data_len);
    let rest = disk_data.split_off(h.disk_data_len()?);
    let (index_bytes, rest) = rest.split_at_checked(pages.checked_mul(8)?)?;
    let (disk_index_bytes, device) = rest.split_at_checked(blocks.checked_mul(8)?)?;
    let words = |b: &[u8]| {
        b.chunks_exact(8)
            .map(|c| c.try_into().map(u64::from_le_bytes))
            .collect::<Result<Vec<u64>, _>>()
            .ok()
    };
    let indices = words(index_bytes)?;
    let disk_indices = words(disk_index_bytes)?;
    Some(StagedCheckpoint {
        generation: h.generation,
        epoch: h.epoch,
        // Applying a full checkpoint zeroes the replica disk first.
        full: h.full,
        indices,
        data: body,
        device: device.to_vec(),
        spooled: 0,
        disk_data,
        disk_indices,
    })
}

#[cfg(test)]
impl Replica {
    /// What the model's `Commit` says of `s` in a stream of generation `s.generation`, lineage
    /// 1, synced at epoch 1.
    pub(crate) fn stream_at(s: &StagedCheckpoint) -> ReplicaAt {
        ReplicaAt {
            generation: Generation(s.generation),
            lineage: 1,
            since: Epoch(s.epoch.min(1)),
            epoch: Epoch(s.epoch),
        }
    }

    /// [`Replica::commit`] with [`Replica::stream_at`].
    pub(crate) fn commit_in_stream(&mut self, s: &StagedCheckpoint) -> Result<(), ReplicaError> {
        self.commit(s, Replica::stream_at(s))
    }

    /// [`Replica::commit_point`] with [`Replica::stream_at`].
    pub(crate) fn commit_point_in_stream(
        &mut self,
        s: &StagedCheckpoint,
    ) -> Result<(), ReplicaError> {
        self.commit_point(s, Replica::stream_at(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: usize = 4096;

    const RAM_PAGES: u64 = 100;

    /// What passes the driver's staging fits the replica: `Replica::commit` cannot refuse its
    /// shape.
    #[test]
    fn whatever_passes_staging_commits() {
        use ftvm_driver::staging::{CheckpointAssembler, Staged, StagingLimits};
        use ftvm_model::wire::{encode_checkpoint, Expect, StreamDecoder};
        use ftvm_model::{Epoch, Generation, VmId};
        let dir = tempfile::tempdir().unwrap();
        let mut replica = Replica::open(
            &dir.path().join("r"),
            &dir.path().join("ram"),
            RAM_PAGES * PS as u64,
            PS,
        )
        .unwrap();
        let mut asm = CheckpointAssembler::new(StagingLimits {
            page_size: 4096u32,
            ram_pages: RAM_PAGES,
            max_device_bytes: 1000,
            disk_blocks: 0,
        });
        let p = vec![5u8; PS];
        let last = RAM_PAGES - 1;
        let bytes = encode_checkpoint(
            VmId(1),
            Generation(1),
            Epoch(1),
            false,
            4096u32,
            &[(last, &p[..]), (0, &p[..])],
            b"d",
        )
        .unwrap();
        let mut dec = StreamDecoder::new(Expect::vm(VmId(1)));
        let (mut pos, mut whole) = (0, None);
        while pos < bytes.len() {
            let (used, item) = dec.decode(&bytes[pos..]).unwrap();
            pos += used;
            if let Some(item) = item {
                if let Staged::Complete(_, s) = asm.feed(item).unwrap() {
                    whole = Some(s);
                }
            }
        }
        let s = whole.expect("the checkpoint passes staging");
        replica.commit_in_stream(&s).unwrap();
        assert_eq!(replica.committed().map(|c| c.epoch), Some(1));
    }

    /// Names of the spool files in `dir`.
    fn stage_files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(STAGE_PREFIX))
            .collect();
        v.sort();
        v
    }

    /// A checkpoint fed through staging with a [`StageWriter`] following it, as a link reader
    /// does: its journal is sealed when it ends, and the commit only renames it.
    fn receive(w: &mut StageWriter, epoch: u64, pages: &[(u64, u8)]) -> StagedCheckpoint {
        use ftvm_driver::staging::{CheckpointAssembler, Staged, StagingLimits};
        use ftvm_model::wire::{encode_checkpoint, Expect, StreamDecoder};
        use ftvm_model::{Epoch, Generation, VmId};
        let mut asm = CheckpointAssembler::new(StagingLimits {
            page_size: 4096u32,
            ram_pages: RAM_PAGES,
            max_device_bytes: 1000,
            disk_blocks: 0,
        });
        let contents: Vec<Vec<u8>> = pages.iter().map(|p| vec![p.1; PS]).collect();
        let list: Vec<(u64, &[u8])> = pages
            .iter()
            .zip(&contents)
            .map(|(p, c)| (p.0, &c[..]))
            .collect();
        let device = vec![epoch.to_le_bytes()[0]; 100];
        let bytes = encode_checkpoint(
            VmId(1),
            Generation(1),
            Epoch(epoch),
            false,
            4096u32,
            &list,
            &device,
        )
        .unwrap();
        let mut dec = StreamDecoder::new(Expect::vm(VmId(1)));
        let mut pos = 0;
        while pos < bytes.len() {
            let (used, item) = dec.decode(&bytes[pos..]).unwrap();
            pos += used;
            if let Some(item) = item {
                if let Staged::Complete(_, mut s) = asm.feed(item).unwrap() {
                    w.seal(&mut s);
                    return s;
                }
            }
            w.follow(asm.in_progress());
        }
        panic!("the checkpoint never ended");
    }

    #[test]
    fn a_journal_written_as_pages_arrive_is_committed_by_a_rename_and_its_file_reused() {
        let d = tempfile::tempdir().unwrap();
        let ram = d.path().join("ram");
        let mut r = Replica::open(d.path(), &ram, RAM_PAGES * PS as u64, PS).unwrap();
        let mut w = r.spool().writer();
        // More than a chunk of pages, so that some are written before the end.
        let pages: Vec<(u64, u8)> = (0..90).map(|i| (i, 3)).collect();
        let s = receive(&mut w, 1, &pages);
        assert_ne!(s.spooled, 0, "sealed");
        let sealed = stage_files(d.path());
        assert_eq!(sealed.len(), 1);
        {
            use std::os::unix::fs::MetadataExt;
            let mode = fs::metadata(d.path().join(&sealed[0])).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        // Its bytes are exactly what a whole journal of the checkpoint holds.
        let on_disk = fs::read(d.path().join(&sealed[0])).unwrap();
        assert_eq!(on_disk, encode_journal(&s));
        r.commit_point_in_stream(&s).unwrap();
        assert!(stage_files(d.path()).is_empty(), "renamed to the journal");
        assert!(d.path().join("journal").exists());
        assert_eq!(r.committed().map(|c| c.epoch), Some(1));
        assert!(r.unapplied());
        assert_eq!(page(&r, 5), vec![0; PS], "not applied yet");
        r.apply_committed(&s).unwrap();
        assert!(!r.unapplied());
        assert_eq!(page(&r, 5), vec![3; PS]);
        assert!(!d.path().join("journal").exists());
        assert_eq!(stage_files(d.path()).len(), 1, "kept as a spare");
        // The next checkpoint, shorter, reuses the spare: the older bytes past it are ignored.
        let s2 = receive(&mut w, 2, &[(7, 4)]);
        assert_eq!(stage_files(d.path()).len(), 1, "the spare was reused");
        r.commit_point_in_stream(&s2).unwrap();
        drop(r);
        // A crash before the apply: the journal, read back from the reused file, is replayed.
        let r = Replica::open(d.path(), &ram, RAM_PAGES * PS as u64, PS).unwrap();
        assert_eq!(r.committed().map(|c| c.epoch), Some(2));
        assert_eq!(page(&r, 7), vec![4; PS]);
        assert_eq!(page(&r, 5), vec![3; PS]);
        assert!(!d.path().join("journal").exists());
    }

    #[test]
    fn committed_but_unapplied_is_settled_before_anything_reads_the_replica() {
        let d = tempfile::tempdir().unwrap();
        let ram = d.path().join("ram");
        let mut r = Replica::open(d.path(), &ram, 8 * PS as u64, PS).unwrap();
        r.commit_in_stream(&staged(1, &[(1, 1)])).unwrap();
        // Committed without its apply (say, the apply failed): reads apply it from the journal.
        r.commit_point_in_stream(&staged(2, &[(1, 2)])).unwrap();
        assert_eq!(page(&r, 1), vec![1; PS]);
        assert_eq!(r.device_state().unwrap(), vec![2; 100]);
        assert_eq!(page(&r, 1), vec![2; PS]);
        assert!(!r.unapplied());
        // The next commit settles an unapplied one first, as does the digest.
        r.commit_point_in_stream(&staged(3, &[(2, 3)])).unwrap();
        r.commit_point_in_stream(&staged(4, &[(3, 4)])).unwrap();
        assert_eq!(page(&r, 2), vec![3; PS]);
        let digest = r.ram_digest().unwrap();
        assert_eq!(page(&r, 3), vec![4; PS]);
        let mut expected = vec![0u8; 8 * PS];
        for (i, v) in [(1, 2u8), (2, 3), (3, 4)] {
            expected[i * PS..(i + 1) * PS].fill(v);
        }
        assert_eq!(digest, xxhash_rust::xxh3::xxh3_64(&expected));
        // Applying the wrong checkpoint applies the committed one from disk instead.
        r.commit_point_in_stream(&staged(5, &[(4, 5)])).unwrap();
        r.apply_committed(&staged(9, &[(4, 9)])).unwrap();
        assert_eq!(page(&r, 4), vec![5; PS]);
    }

    #[test]
    fn a_sealed_journal_of_another_checkpoint_is_not_committed_in_its_place() {
        let d = tempfile::tempdir().unwrap();
        let ram = d.path().join("ram");
        let mut r = Replica::open(d.path(), &ram, RAM_PAGES * PS as u64, PS).unwrap();
        let mut w = r.spool().writer();
        let sealed = receive(&mut w, 1, &[(1, 1)]);
        // Same token, other contents: the spool's journal does not match, the commit writes
        // this checkpoint whole.
        let mut other = staged(1, &[(1, 1), (2, 2)]);
        other.spooled = sealed.spooled;
        r.commit_in_stream(&other).unwrap();
        assert_eq!(page(&r, 2), vec![2; PS]);
        // A token nobody sealed, or one already used, falls back the same way.
        let mut again = staged(2, &[(3, 3)]);
        again.spooled = sealed.spooled;
        r.commit_in_stream(&again).unwrap();
        assert_eq!(page(&r, 3), vec![3; PS]);
    }

    #[test]
    fn spool_files_are_discarded_and_an_already_applied_journal_ignored_on_open() {
        let d = tempfile::tempdir().unwrap();
        let ram = d.path().join("ram");
        let mut r = Replica::open(d.path(), &ram, 8 * PS as u64, PS).unwrap();
        r.commit_in_stream(&staged(2, &[(1, 2)])).unwrap();
        drop(r);
        // A crash after the metadata, before the journal's removal: its epoch is the committed
        // one (an older one alike): not replayed over what came after.
        fs::write(
            d.path().join("journal"),
            encode_journal(&staged(1, &[(1, 1)])),
        )
        .unwrap();
        // And spool files a crash left: a sealed journal that never reached the commit point
        // and a torn one.
        fs::write(
            d.path().join("stage.1"),
            encode_journal(&staged(3, &[(1, 3)])),
        )
        .unwrap();
        fs::write(d.path().join("stage.2"), b"torn").unwrap();
        let r = Replica::open(d.path(), &ram, 8 * PS as u64, PS).unwrap();
        assert_eq!(r.committed().map(|c| c.epoch), Some(2));
        assert_eq!(page(&r, 1), vec![2; PS]);
        assert!(!d.path().join("journal").exists());
        assert!(stage_files(d.path()).is_empty());
    }

    fn staged(epoch: u64, pages: &[(u64, u8)]) -> StagedCheckpoint {
        StagedCheckpoint {
            generation: 1,
            epoch,
            full: false,
            indices: pages.iter().map(|p| p.0).collect(),
            data: pages.iter().flat_map(|p| vec![p.1; PS]).collect(),
            // Device state that differs by epoch: its low byte will do.
            device: vec![epoch.to_le_bytes()[0]; 100],
            spooled: 0,
            disk_data: Vec::new(),
            disk_indices: Vec::new(),
        }
    }

    fn page(r: &Replica, index: u64) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0; PS];
        r.ram.read_exact_at(&mut b, index * PS as u64).unwrap();
        b
    }

    #[test]
    fn a_leftover_ram_file_of_another_size_is_reset_but_a_committed_one_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let ram = d.path().join("ram");
        std::fs::write(&ram, vec![7u8; 4 * PS]).unwrap();
        // Nothing committed: the leftover is reset to zeroes at the new size.
        let mut r = Replica::open(&d.path().join("r"), &ram, 16 * PS as u64, PS).unwrap();
        assert_eq!(std::fs::metadata(&ram).unwrap().len(), 16 * PS as u64);
        assert_eq!(page(&r, 0), vec![0; PS]);
        r.commit_in_stream(&staged(1, &[(3, 9)])).unwrap();
        drop(r);
        // Committed state at 16 pages: opening it as 32 pages is a configuration error.
        match Replica::open(&d.path().join("r"), &ram, 32 * PS as u64, PS) {
            Err(ReplicaError::SizeMismatch { found, expected }) => {
                assert_eq!((found, expected), (16 * PS as u64, 32 * PS as u64))
            }
            Err(e) => panic!("expected a size mismatch, got {e}"),
            Ok(_) => panic!("expected a size mismatch, the replica opened"),
        }
        // And the committed replica is untouched.
        let r = Replica::open(&d.path().join("r"), &ram, 16 * PS as u64, PS).unwrap();
        assert_eq!(page(&r, 3), vec![9; PS]);
    }

    #[test]
    fn replica_files_are_private_and_planted_links_are_not_followed() {
        use std::os::unix::fs::{symlink, MetadataExt};
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("r");
        let ram = d.path().join("ram");
        let mut r = Replica::open(&dir, &ram, 8 * PS as u64, PS).unwrap();
        r.commit_in_stream(&staged(1, &[(1, 1)])).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        for p in [ram.clone(), dir.join("device"), dir.join("committed")] {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
        drop(r);
        // A link planted at a temporary file's name is removed, not written through.
        let victim = d.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        symlink(&victim, dir.join("journal.tmp")).unwrap();
        symlink(&victim, dir.join("device.tmp")).unwrap();
        let mut r = Replica::open(&dir, &ram, 8 * PS as u64, PS).unwrap();
        r.commit_in_stream(&staged(2, &[(1, 2)])).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(r.device_state().unwrap(), vec![2; 100]);
        drop(r);
        // A link planted where the RAM file goes is refused.
        let planted = d.path().join("planted.ram");
        symlink(&victim, &planted).unwrap();
        assert!(matches!(
            Replica::open(&d.path().join("r2"), &planted, 8 * PS as u64, PS),
            Err(ReplicaError::File(SecureFsError::Symlink(_)))
        ));
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn commit_applies_pages_device_and_metadata() {
        let d = tempfile::tempdir().unwrap();
        let ram = d.path().join("ram");
        let mut r = Replica::open(d.path(), &ram, 16 * PS as u64, PS).unwrap();
        assert_eq!(r.committed(), None);
        r.commit_in_stream(&staged(1, &[(0, 1), (15, 2)])).unwrap();
        r.commit_in_stream(&staged(2, &[(15, 3)])).unwrap();
        assert_eq!(page(&r, 0), vec![1; PS]);
        assert_eq!(page(&r, 15), vec![3; PS]);
        assert_eq!(page(&r, 7), vec![0; PS]);
        assert_eq!(r.device_state().unwrap(), vec![2; 100]);
        drop(r);
        let r = Replica::open(d.path(), &ram, 16 * PS as u64, PS).unwrap();
        assert_eq!(
            r.committed(),
            Some(Committed {
                generation: 1,
                epoch: 2
            })
        );
    }

    #[test]
    fn a_journal_left_by_a_crash_is_replayed_and_a_torn_one_ignored() {
        let d = tempfile::tempdir().unwrap();
        let ram = d.path().join("ram");
        let mut r = Replica::open(d.path(), &ram, 8 * PS as u64, PS).unwrap();
        r.commit_in_stream(&staged(1, &[(1, 1)])).unwrap();
        drop(r);
        // Crash after the commit point, before the pages were applied.
        fs::write(
            d.path().join("journal"),
            encode_journal(&staged(2, &[(1, 9)])),
        )
        .unwrap();
        // And a torn temporary journal of a later epoch that never reached the commit point.
        fs::write(
            d.path().join("journal.tmp"),
            &encode_journal(&staged(3, &[(1, 7)]))[..50],
        )
        .unwrap();
        let r = Replica::open(d.path(), &ram, 8 * PS as u64, PS).unwrap();
        assert_eq!(
            r.committed(),
            Some(Committed {
                generation: 1,
                epoch: 2
            })
        );
        assert_eq!(page(&r, 1), vec![9; PS]);
        assert!(!d.path().join("journal").exists());
    }

    #[test]
    fn corrupt_journal_and_bad_pages_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let ram = d.path().join("ram");
        let mut r = Replica::open(d.path(), &ram, 8 * PS as u64, PS).unwrap();
        assert!(matches!(
            r.commit_in_stream(&staged(1, &[(8, 1)])),
            Err(ReplicaError::BadPage { index: 8, .. })
        ));
        assert_eq!(r.committed(), None);
        drop(r);
        let mut j = encode_journal(&staged(2, &[(1, 9)]));
        j[20] ^= 1;
        fs::write(d.path().join("journal"), j).unwrap();
        assert!(matches!(
            Replica::open(d.path(), &ram, 8 * PS as u64, PS),
            Err(ReplicaError::Corrupt(_))
        ));
        assert!(matches!(
            Replica::open(d.path(), &ram, 4 * PS as u64, PS),
            Err(ReplicaError::Corrupt(_)) | Err(ReplicaError::SizeMismatch { .. })
        ));
    }

    fn at(lineage: u64, since: u64, epoch: u64) -> ReplicaAt {
        ReplicaAt {
            generation: Generation(1),
            lineage,
            since: Epoch(since),
            epoch: Epoch(epoch),
        }
    }

    /// The replica a commit makes is what a reopened replica offers: whether the commit was
    /// applied before the restart or replayed from its journal at open.
    #[test]
    fn the_commits_replica_record_survives_a_restart_applied_or_replayed() {
        let d = tempfile::tempdir().unwrap();
        let ram = d.path().join("ram");
        let open = || Replica::open(d.path(), &ram, 8 * PS as u64, PS).unwrap();
        let mut r = open();
        assert_eq!(r.replica_at(), None);
        r.commit(&staged(3, &[(1, 3)]), at(77, 3, 3)).unwrap();
        assert_eq!(r.replica_at(), Some(at(77, 3, 3)));
        drop(r);
        let text = fs::read_to_string(d.path().join("committed")).unwrap();
        assert!(text.starts_with("v2 1 3 77 3 "), "{text}");
        let mut r = open();
        assert_eq!(r.replica_at(), Some(at(77, 3, 3)));
        assert_eq!(r.discarded(), None);
        // Committed, not applied: the journal's header carries the record.
        r.commit_point(&staged(4, &[(2, 4)]), at(77, 3, 4)).unwrap();
        drop(r);
        let r = open();
        assert_eq!(r.replica_at(), Some(at(77, 3, 4)));
        assert_eq!(page(&r, 2), vec![4; PS]);
        // A record that does not describe its checkpoint is not kept.
        let mut r = r;
        r.commit(&staged(5, &[(2, 5)]), at(77, 3, 9)).unwrap();
        assert_eq!(r.replica_at(), None);
        assert_eq!(r.committed().map(|c| c.epoch), Some(5));
        drop(r);
        assert_eq!(open().replica_at(), None);
    }

    /// A `committed` file of the older format (generation and epoch) keeps the checkpoint for a
    /// takeover but offers no replica; garbage is still corrupt, not a panic.
    #[test]
    fn an_older_commit_record_is_not_resumable() {
        let d = tempfile::tempdir().unwrap();
        let ram = d.path().join("ram");
        let mut r = Replica::open(d.path(), &ram, 8 * PS as u64, PS).unwrap();
        r.commit(&staged(2, &[(1, 2)]), at(5, 1, 2)).unwrap();
        drop(r);
        fs::write(d.path().join("committed"), "1 2\n").unwrap();
        let r = Replica::open(d.path(), &ram, 8 * PS as u64, PS).unwrap();
        assert_eq!(r.committed().map(|c| c.epoch), Some(2));
        assert_eq!(r.replica_at(), None);
        assert_eq!(r.discarded(), None);
        drop(r);
        for bad in ["v2 1 2 3\n", "v3 1 2 3 4 5\n", "one two\n", "1 2 3\n"] {
            fs::write(d.path().join("committed"), bad).unwrap();
            assert!(
                matches!(
                    Replica::open(d.path(), &ram, 8 * PS as u64, PS),
                    Err(ReplicaError::Corrupt(_))
                ),
                "{bad:?}"
            );
        }
    }

    /// Committed state without its RAM file (a reboot emptied the tmpfs), or with a device blob
    /// that is not the one committed, is thrown away: no epoch is claimed for it.
    #[test]
    fn a_replica_missing_its_ram_or_with_another_device_state_is_discarded() {
        let d = tempfile::tempdir().unwrap();
        let ram = d.path().join("ram");
        let dir = d.path().join("r");
        let open = || Replica::open(&dir, &ram, 8 * PS as u64, PS).unwrap();
        let mut r = open();
        r.commit(&staged(2, &[(1, 2)]), at(5, 1, 2)).unwrap();
        drop(r);
        fs::remove_file(&ram).unwrap();
        let r = open();
        assert_eq!(r.discarded(), Some(Discarded::RamMissing));
        assert_eq!((r.committed(), r.replica_at()), (None, None));
        assert!(!dir.join("committed").exists());
        assert!(!dir.join("device").exists());
        let mut r = r;
        r.commit(&staged(3, &[(1, 3)]), at(6, 3, 3)).unwrap();
        // A committed journal (not applied) goes too: it applies on top of the lost RAM.
        r.commit_point(&staged(4, &[(1, 4)]), at(6, 3, 4)).unwrap();
        drop(r);
        fs::write(&ram, b"").unwrap();
        let r = open();
        assert_eq!(r.discarded(), Some(Discarded::RamMissing));
        assert!(!dir.join("journal").exists());
        assert_eq!(r.committed(), None);
        let mut r = r;
        r.commit(&staged(5, &[(1, 5)]), at(7, 5, 5)).unwrap();
        drop(r);
        fs::write(dir.join("device"), b"tampered").unwrap();
        let r = open();
        assert_eq!(r.discarded(), Some(Discarded::DeviceMismatch));
        assert_eq!((r.committed(), r.replica_at()), (None, None));
        drop(r);
        let r = open();
        assert_eq!(r.discarded(), None, "nothing left to discard");
        assert_eq!(r.committed(), None);
    }

    /// A journal of another stream than the committed one is newer, whatever its epoch (a
    /// full sync of another primary's run): it is replayed, not taken for an applied one.
    #[test]
    fn a_journal_of_another_stream_is_replayed_whatever_its_epoch() {
        let d = tempfile::tempdir().unwrap();
        let ram = d.path().join("ram");
        let mut r = Replica::open(d.path(), &ram, 8 * PS as u64, PS).unwrap();
        r.commit(&staged(9, &[(1, 9)]), at(5, 1, 9)).unwrap();
        r.commit_point(&staged(2, &[(1, 2)]), at(6, 2, 2)).unwrap();
        drop(r);
        let r = Replica::open(d.path(), &ram, 8 * PS as u64, PS).unwrap();
        assert_eq!(r.replica_at(), Some(at(6, 2, 2)));
        assert_eq!(page(&r, 1), vec![2; PS]);
        // The commit record sits in the header, past the checksummed fields: parsed back whole,
        // and a damaged one is no record.
        let mut head = encode_journal(&staged(2, &[]));
        head[RECORD_OFFSET..RECORD_OFFSET + RECORD_LEN]
            .copy_from_slice(&encode_record(&at(6, 2, 2)));
        assert_eq!(parse_record(&head), Some(at(6, 2, 2)));
        head[RECORD_OFFSET + 20] ^= 1;
        assert_eq!(parse_record(&head), None);
        assert_eq!(parse_record(&head[..RECORD_OFFSET + 4]), None);
    }
}
