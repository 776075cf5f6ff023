//! Journals written while a checkpoint arrives: a link reader copies each checkpoint's bytes
//! into a `stage.N` file of the replica directory as they come (in chunks of [`CHUNK`]), with a
//! running checksum, and seals it (indices, device state, header) when the checkpoint ends
//! whole. The commit then only renames the sealed file to `journal` (see the parent module).
//!
//! A full checkpoint streams into the sync files instead, when it can have them (see
//! `super::sync`): its journal then holds only the header and the device state.
//!
//! Files are reused: a journal whose pages were applied goes back to the spool as a spare
//! (renamed to a fresh `stage.N`), so a checkpoint overwrites tmpfs pages that already exist
//! instead of allocating them. Bytes past a journal's contents (an older, longer checkpoint's)
//! are ignored: the header gives the lengths.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ftvm_model::wire::DISK_BLOCK_SIZE;
use xxhash_rust::xxh3::Xxh3;

use super::sync::{SyncFiles, SyncTargets};
use super::{
    io, journal_tail, Committed, JournalHeader, ReplicaError, StagedCheckpoint, HEADER_LEN,
};
use crate::secure_fs::{self, Durability, PRIVATE_FILE_MODE};

/// Name prefix of spool files in the replica directory.
pub(super) const STAGE_PREFIX: &str = "stage.";
/// Page bytes gathered before a write: big enough to amortise the call, small enough that the
/// write left at the end of a checkpoint is short.
const CHUNK: usize = 256 << 10;
/// Spare files kept for reuse.
const MAX_SPARES: usize = 2;
/// A file larger than this (say, once a full sync's journal) is deleted rather than kept as a
/// spare, so that a big VM's tmpfs does not hold its RAM size twice more for nothing.
const SPARE_MAX_BYTES: u64 = 128 << 20;
/// Sealed journals kept for a commit at most; the oldest ones beyond are recycled (their
/// checkpoint, if it is committed after all, is then written whole at the commit).
const MAX_PREPARED: usize = 4;

/// Tokens of sealed journals (the `spooled` field of a staged checkpoint), unique in the
/// process.
static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

/// A spool file and where it is.
#[derive(Debug)]
pub(super) struct SpoolFile {
    pub(super) path: PathBuf,
    pub(super) file: File,
}

/// A sealed journal waiting for its commit.
#[derive(Debug)]
pub(super) struct Prepared {
    pub(super) file: SpoolFile,
    /// The checkpoint's header (its page and block counts, whatever the journal holds).
    pub(super) header: JournalHeader,
    /// Its contents are in the sync files, which it owns.
    pub(super) synced: bool,
}

#[derive(Debug, Default)]
struct Inner {
    spares: Vec<SpoolFile>,
    prepared: BTreeMap<u64, Prepared>,
    /// The sync files belong to a full checkpoint: being received, sealed, or committed and
    /// not applied yet.
    sync_taken: bool,
}

/// The replica's journal files: spares, and journals sealed by link readers until a commit
/// takes them. Shared by the replica and every link reader of the agent.
#[derive(Debug)]
pub struct JournalSpool {
    dir: PathBuf,
    durability: Durability,
    targets: SyncTargets,
    next_name: AtomicU64,
    inner: Mutex<Inner>,
}

impl JournalSpool {
    pub(super) fn new(
        dir: PathBuf,
        durability: Durability,
        targets: SyncTargets,
    ) -> Arc<JournalSpool> {
        Arc::new(JournalSpool {
            dir,
            durability,
            targets,
            next_name: AtomicU64::new(1),
            inner: Mutex::new(Inner::default()),
        })
    }

    /// A writer for one link's checkpoints.
    pub fn writer(self: &Arc<Self>) -> StageWriter {
        StageWriter {
            spool: self.clone(),
            cur: None,
            failed: None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state is a list and a map updated in single steps: still consistent after a panic.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A fresh name for a spool file.
    pub(super) fn fresh_path(&self) -> PathBuf {
        let n = self.next_name.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("{STAGE_PREFIX}{n}"))
    }

    /// A file to write a journal into: a spare, or a new one (0600, never through a link).
    pub(super) fn file(&self) -> Result<SpoolFile, ReplicaError> {
        if let Some(f) = self.lock().spares.pop() {
            return Ok(f);
        }
        let path = self.fresh_path();
        let file = secure_fs::replace(&path, PRIVATE_FILE_MODE)?;
        Ok(SpoolFile { path, file })
    }

    /// Takes back a file no longer needed: kept as a spare, or deleted.
    pub(super) fn recycle(&self, f: SpoolFile) {
        let small = f.file.metadata().is_ok_and(|m| m.len() <= SPARE_MAX_BYTES);
        {
            let mut inner = self.lock();
            if small && inner.spares.len() < MAX_SPARES {
                inner.spares.push(f);
                return;
            }
        }
        let _ = fs::remove_file(&f.path);
    }

    /// Takes the sync files for a full checkpoint, if no other one has them.
    fn take_sync(&self) -> bool {
        let mut inner = self.lock();
        !std::mem::replace(&mut inner.sync_taken, true)
    }

    /// Gives the sync files back once their contents are in place (renamed) or thrown away.
    pub(super) fn release_sync(&self) {
        self.lock().sync_taken = false;
    }

    /// Deletes the sync files of a full checkpoint that will not be committed from them, and
    /// gives them back.
    fn drop_sync(&self) {
        if let Err(e) = self.targets.remove() {
            tracing::warn!(error = %e, "replica: removing the sync files failed");
        }
        self.release_sync();
    }

    /// The replica files a full sync replaces.
    pub(super) fn targets(&self) -> &SyncTargets {
        &self.targets
    }

    /// Takes back a sealed journal that will not be committed (with its sync files, if any).
    pub(super) fn drop_prepared(&self, p: Prepared) {
        if p.synced {
            self.drop_sync();
        }
        self.recycle(p.file);
    }

    fn prepare(&self, p: Prepared) -> u64 {
        let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
        let mut evicted = Vec::new();
        {
            let mut inner = self.lock();
            inner.prepared.insert(token, p);
            while inner.prepared.len() > MAX_PREPARED {
                if let Some((_, old)) = inner.prepared.pop_first() {
                    evicted.push(old);
                }
            }
        }
        for p in evicted {
            self.drop_prepared(p);
        }
        token
    }

    /// The sealed journal of `token`, if it is still kept.
    pub(super) fn take(&self, token: u64) -> Option<Prepared> {
        if token == 0 {
            return None;
        }
        self.lock().prepared.remove(&token)
    }

    /// Recycles the sealed journals of checkpoints at or before `c`: the model commits in
    /// order, so they will never be committed.
    pub(super) fn discard_through(&self, c: Committed) {
        let old: Vec<Prepared> = {
            let mut inner = self.lock();
            let tokens: Vec<u64> = inner
                .prepared
                .iter()
                .filter(|(_, p)| p.header.committed() <= c)
                .map(|(&t, _)| t)
                .collect();
            tokens
                .iter()
                .filter_map(|t| inner.prepared.remove(t))
                .collect()
        };
        for p in old {
            self.drop_prepared(p);
        }
    }
}

/// The checkpoint a writer is copying.
struct Stage {
    generation: u64,
    epoch: u64,
    file: SpoolFile,
    /// Page bytes written so far.
    written: usize,
    /// Disk block bytes written so far (they follow the pages, which are complete once the
    /// first block arrived).
    disk_written: usize,
    hasher: Xxh3,
    /// A full checkpoint streaming into the sync files (the spool file then gets only the
    /// header and device state).
    sync: Option<SyncFiles>,
}

/// Copies one link's arriving checkpoints into spool files (in the link's reader thread).
pub struct StageWriter {
    spool: Arc<JournalSpool>,
    cur: Option<Stage>,
    /// The (generation, epoch) whose journal failed: not tried again (its commit writes it).
    failed: Option<(u64, u64)>,
}

impl StageWriter {
    /// Follows the checkpoint being received (`None`: none is, or the one in progress was
    /// dropped): writes the page bytes that arrived since the last call once they make a chunk.
    /// A failure only costs the speed-up: the commit writes the checkpoint whole instead.
    pub fn follow(&mut self, in_progress: Option<&StagedCheckpoint>) {
        let Some(s) = in_progress.filter(|s| self.failed != Some((s.generation, s.epoch))) else {
            self.drop_current();
            return;
        };
        if let Err(e) = self.write_pages(s, CHUNK) {
            tracing::warn!(error = %e, epoch = s.epoch, "replica: writing the journal ahead failed");
            self.failed = Some((s.generation, s.epoch));
            self.drop_current();
        }
    }

    /// The checkpoint arrived whole: writes the rest of it and the header, hands the sealed
    /// journal to the spool and marks `s` with its token (0 if it failed).
    pub fn seal(&mut self, s: &mut StagedCheckpoint) {
        if self.failed == Some((s.generation, s.epoch)) {
            s.spooled = 0;
            return;
        }
        s.spooled = match self.seal_inner(s) {
            Ok(token) => token,
            Err(e) => {
                tracing::warn!(error = %e, epoch = s.epoch, "replica: sealing the journal failed");
                self.drop_current();
                0
            }
        };
    }

    fn seal_inner(&mut self, s: &StagedCheckpoint) -> Result<u64, ReplicaError> {
        self.write_pages(s, 0)?;
        let Some(mut c) = self.cur.take() else {
            return Err(ReplicaError::Corrupt(self.spool.dir.clone()));
        };
        let synced = c.sync.is_some();
        // A synced journal's body is the device state alone; the sync files hold the rest and
        // are whole (and durable, if asked) before the header makes the journal sealed.
        let (tail, at, written) = match &c.sync {
            Some(files) => {
                let durable = match self.spool.durability {
                    Durability::Durable => files.sync(self.spool.targets()),
                    Durability::Atomic => Ok(()),
                };
                (s.device.clone(), HEADER_LEN as u64, durable)
            }
            None => {
                let at = (HEADER_LEN + c.written + c.disk_written) as u64;
                (journal_tail(s), at, Ok(()))
            }
        };
        let f = &c.file;
        let written = written.and_then(|()| {
            f.file
                .write_all_at(&tail, at)
                .map_err(io(&f.path, "write journal"))
        });
        if let Err(e) = written {
            self.abandon(c);
            return Err(e);
        }
        c.hasher.update(&tail);
        let header = JournalHeader::of(s);
        let bytes = match synced {
            true => header.in_sync_files().seal(&mut c.hasher),
            false => header.seal(&mut c.hasher),
        };
        let done = f
            .file
            .write_all_at(&bytes, 0)
            .map_err(io(&f.path, "write journal header"))
            .and_then(|()| match self.spool.durability {
                Durability::Durable => f.file.sync_data().map_err(io(&f.path, "sync journal")),
                Durability::Atomic => Ok(()),
            });
        match done {
            Ok(()) => Ok(self.spool.prepare(Prepared {
                file: c.file,
                header,
                synced,
            })),
            Err(e) => {
                self.abandon(c);
                Err(e)
            }
        }
    }

    /// Throws a stage away: its spool file back to the spool, its sync files deleted.
    fn abandon(&self, c: Stage) {
        if c.sync.is_some() {
            self.spool.drop_sync();
        }
        self.spool.recycle(c.file);
    }

    /// Writes the page bytes of `s` not written yet, if there are at least `min` of them
    /// (starting a new file when `s` is another checkpoint than the current one).
    fn write_pages(&mut self, s: &StagedCheckpoint, min: usize) -> Result<(), ReplicaError> {
        let same = self.cur.as_ref().is_some_and(|c| {
            (c.generation, c.epoch) == (s.generation, s.epoch)
                && c.written <= s.data.len()
                && c.disk_written <= s.disk_data.len()
        });
        if !same {
            self.drop_current();
            let file = self.spool.file()?;
            let sync = match s.full && self.spool.take_sync() {
                true => match SyncFiles::create(self.spool.targets()) {
                    Ok(files) => Some(files),
                    Err(e) => {
                        self.spool.drop_sync();
                        self.spool.recycle(file);
                        return Err(e);
                    }
                },
                false => None,
            };
            self.cur = Some(Stage {
                generation: s.generation,
                epoch: s.epoch,
                file,
                written: 0,
                disk_written: 0,
                hasher: Xxh3::new(),
                sync,
            });
        }
        let Some(c) = self.cur.as_mut() else {
            return Ok(());
        };
        if c.sync.is_some() {
            return Self::write_synced(self.spool.targets(), c, s, min);
        }
        // Disk blocks arriving means the pages are complete: write what is left of them first
        // (the journal's body is pages, then disk blocks).
        let disk_begun = !s.disk_data.is_empty();
        let new = &s.data[c.written..];
        if !new.is_empty() && (disk_begun || new.len() >= min) {
            c.file
                .file
                .write_all_at(new, (HEADER_LEN + c.written) as u64)
                .map_err(io(&c.file.path, "write journal"))?;
            c.hasher.update(new);
            c.written = s.data.len();
        }
        let Some(new) = s.disk_data.get(c.disk_written..) else {
            return Ok(());
        };
        if new.is_empty() || new.len() < min {
            return Ok(());
        }
        let at = HEADER_LEN + s.data.len() + c.disk_written;
        c.file
            .file
            .write_all_at(new, at as u64)
            .map_err(io(&c.file.path, "write journal"))?;
        c.hasher.update(new);
        c.disk_written = s.disk_data.len();
        Ok(())
    }

    /// [`StageWriter::write_pages`] for a full checkpoint: the pages and blocks that arrived
    /// since the last call go to their places in the sync files (bounds checked there).
    fn write_synced(
        t: &SyncTargets,
        c: &mut Stage,
        s: &StagedCheckpoint,
        min: usize,
    ) -> Result<(), ReplicaError> {
        let Some(files) = &c.sync else {
            return Ok(());
        };
        let ps = t.page_size;
        let shape = |index| ReplicaError::BadPage {
            index,
            pages: t.ram_bytes / ps as u64,
            page_size: ps,
        };
        let disk_begun = !s.disk_data.is_empty();
        let new = s.data.len() - c.written.min(s.data.len());
        if new > 0 && (disk_begun || new >= min) {
            let first = c.written / ps;
            let indices = s.indices.get(first..).ok_or(shape(u64::MAX))?;
            files.write_pages(t, indices, &s.data[c.written..])?;
            c.written = s.data.len();
        }
        let bs = DISK_BLOCK_SIZE as usize;
        let new = s.disk_data.len() - c.disk_written.min(s.disk_data.len());
        if new > 0 && new >= min {
            let first = c.disk_written / bs;
            let bad = ReplicaError::BadDiskBlock {
                index: u64::MAX,
                blocks: 0,
            };
            let indices = s.disk_indices.get(first..).ok_or(bad)?;
            files.write_blocks(t, indices, &s.disk_data[c.disk_written..])?;
            c.disk_written = s.disk_data.len();
        }
        Ok(())
    }

    fn drop_current(&mut self) {
        if let Some(c) = self.cur.take() {
            self.abandon(c);
        }
    }
}

impl Drop for StageWriter {
    fn drop(&mut self) {
        self.drop_current();
    }
}
