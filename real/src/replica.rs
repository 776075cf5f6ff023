//! The backup's replica: the guest RAM file QEMU will map at failover plus the device-state blob
//! and the (generation, epoch) they belong to. A checkpoint is committed through a redo journal so
//! that a crash at any moment leaves either the previous or the new checkpoint, never a mix:
//!
//! 1. write the staged checkpoint to `journal.tmp`, then `rename` it to `journal` — the commit
//!    point (rename is atomic within a file system);
//! 2. apply its pages to the RAM file and write the device blob and `committed` metadata (each via
//!    a temporary file and `rename`);
//! 3. delete `journal`.
//!
//! [`Replica::open`] replays a `journal` left by a crash between 1 and 3; a torn `journal.tmp` is
//! discarded (it never reached the commit point).

// Values here come off the wire (or go onto it): a cast that drops bits must be a checked
// conversion, or say why it cannot lose anything.
#![warn(clippy::cast_possible_truncation)]

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64;

use crate::secure_fs::{self, SecureFsError, PRIVATE_FILE_MODE};

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

/// A checkpoint fully received and verified, not yet applied (the driver core's type).
pub use ftvm_driver::StagedCheckpoint;

/// What the replica holds: the last committed checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// Generation.
    pub generation: u64,
    /// Epoch.
    pub epoch: u64,
}

/// The replica directory plus the RAM file.
pub struct Replica {
    dir: PathBuf,
    ram_path: PathBuf,
    ram: File,
    ram_bytes: u64,
    page_size: usize,
    committed: Option<Committed>,
}

fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> ReplicaError {
    let path = path.to_path_buf();
    move |source| ReplicaError::Io { path, what, source }
}

/// Writes `bytes` to `path` through a temporary file and an atomic rename. The temporary file is
/// created 0600 with `O_EXCL|O_NOFOLLOW` (a stale one of ours removed first), so nothing planted
/// at its name is written through.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ReplicaError> {
    let tmp = secure_fs::temp_path(path);
    let mut f = secure_fs::replace(&tmp, PRIVATE_FILE_MODE)?;
    f.write_all(bytes).map_err(io(&tmp, "write"))?;
    f.sync_data().map_err(io(&tmp, "sync"))?;
    fs::rename(&tmp, path).map_err(io(path, "rename"))
}

impl Replica {
    /// Opens (creating if absent) the replica in `dir` with its RAM file at `ram_path` of
    /// `ram_bytes`, replaying a journal that a crash left behind.
    pub fn open(
        dir: &Path,
        ram_path: &Path,
        ram_bytes: u64,
        page_size: usize,
    ) -> Result<Replica, ReplicaError> {
        secure_fs::private_dir(dir)?;
        let (ram, _) = secure_fs::open_or_create_private(ram_path)?;
        let found = ram.metadata().map_err(io(ram_path, "stat"))?.len();
        // Only a committed checkpoint or a journal to replay gives the RAM file's contents a
        // meaning; without them it is a leftover (say, of a VM of another size that used the
        // same name) and is reset rather than refused.
        let holds_state = dir.join("committed").exists() || dir.join("journal").exists();
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
        let mut r = Replica {
            dir: dir.to_path_buf(),
            ram_path: ram_path.to_path_buf(),
            ram,
            ram_bytes,
            page_size,
            committed: None,
        };
        secure_fs::remove_stale(&r.dir.join("journal.tmp"))?;
        let journal = r.dir.join("journal");
        if journal.exists() {
            let staged = read_journal(&journal)?;
            r.apply(&staged)?;
        }
        r.committed = r.read_committed()?;
        Ok(r)
    }

    /// Forgets everything: the replica must be filled by a full checkpoint before use.
    pub fn reset(&mut self) -> Result<(), ReplicaError> {
        for name in ["journal", "committed", "device"] {
            let _ = fs::remove_file(self.dir.join(name));
        }
        // Punch the whole file back to zeroes.
        self.ram
            .set_len(0)
            .map_err(io(&self.ram_path, "truncate"))?;
        self.ram
            .set_len(self.ram_bytes)
            .map_err(io(&self.ram_path, "size RAM file"))?;
        self.committed = None;
        Ok(())
    }

    /// The last committed checkpoint, if any.
    pub fn committed(&self) -> Option<Committed> {
        self.committed
    }

    /// Path of the RAM file (QEMU maps it at failover).
    pub fn ram_path(&self) -> &Path {
        &self.ram_path
    }

    /// A digest (xxh3-64) of the whole RAM file, comparable with the primary's RAM digest.
    pub fn ram_digest(&self) -> Result<u64, ReplicaError> {
        use std::os::unix::fs::FileExt;
        let mut h = xxhash_rust::xxh3::Xxh3::new();
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

    /// The committed device state.
    pub fn device_state(&self) -> Result<Vec<u8>, ReplicaError> {
        let p = self.dir.join("device");
        read_private(&p)?.ok_or_else(|| ReplicaError::Io {
            path: p,
            what: "read device state",
            source: std::io::ErrorKind::NotFound.into(),
        })
    }

    /// Commits `staged` atomically (see the module docs).
    pub fn commit(&mut self, staged: &StagedCheckpoint) -> Result<(), ReplicaError> {
        self.check(staged)?;
        let journal = self.dir.join("journal");
        write_atomic(&journal, &encode_journal(staged))?;
        self.apply(staged)?;
        self.committed = Some(Committed {
            generation: staged.generation,
            epoch: staged.epoch,
        });
        Ok(())
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
        Ok(())
    }

    fn apply(&mut self, staged: &StagedCheckpoint) -> Result<(), ReplicaError> {
        use std::os::unix::fs::FileExt;
        self.check(staged)?;
        for (i, &index) in staged.indices.iter().enumerate() {
            let page = &staged.data[i * self.page_size..(i + 1) * self.page_size];
            self.ram
                .write_all_at(page, index * self.page_size as u64)
                .map_err(io(&self.ram_path, "write page"))?;
        }
        write_atomic(&self.dir.join("device"), &staged.device)?;
        let meta = format!("{} {}\n", staged.generation, staged.epoch);
        write_atomic(&self.dir.join("committed"), meta.as_bytes())?;
        let journal = self.dir.join("journal");
        fs::remove_file(&journal)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            })
            .map_err(io(&journal, "remove journal"))
    }

    fn read_committed(&self) -> Result<Option<Committed>, ReplicaError> {
        let p = self.dir.join("committed");
        let Some(bytes) = read_private(&p)? else {
            return Ok(None);
        };
        let text = String::from_utf8(bytes).map_err(|_| ReplicaError::Corrupt(p.clone()))?;
        let mut it = text.split_whitespace().map(str::parse::<u64>);
        match (it.next(), it.next()) {
            (Some(Ok(generation)), Some(Ok(epoch))) => Ok(Some(Committed { generation, epoch })),
            _ => Err(ReplicaError::Corrupt(p)),
        }
    }
}

const JOURNAL_MAGIC: &[u8; 8] = b"FTVMJRN1";

fn encode_journal(s: &StagedCheckpoint) -> Vec<u8> {
    let mut b = Vec::with_capacity(48 + s.indices.len() * 8 + s.data.len() + s.device.len());
    b.extend_from_slice(JOURNAL_MAGIC);
    for v in [
        s.generation,
        s.epoch,
        s.indices.len() as u64,
        s.data.len() as u64,
        s.device.len() as u64,
    ] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    for i in &s.indices {
        b.extend_from_slice(&i.to_le_bytes());
    }
    b.extend_from_slice(&s.data);
    b.extend_from_slice(&s.device);
    let sum = xxh3_64(&b);
    b.extend_from_slice(&sum.to_le_bytes());
    b
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

fn read_journal(path: &Path) -> Result<StagedCheckpoint, ReplicaError> {
    let b = read_private(path)?.ok_or_else(|| ReplicaError::Corrupt(path.to_path_buf()))?;
    decode_journal(&b).ok_or_else(|| ReplicaError::Corrupt(path.to_path_buf()))
}

fn decode_journal(b: &[u8]) -> Option<StagedCheckpoint> {
    let (body, sum) = b.split_at_checked(b.len().checked_sub(8)?)?;
    if xxh3_64(body) != u64::from_le_bytes(sum.try_into().ok()?) {
        return None;
    }
    let rest = body.strip_prefix(JOURNAL_MAGIC)?;
    let word = |i: usize| -> Option<u64> {
        Some(u64::from_le_bytes(
            rest.get(i * 8..i * 8 + 8)?.try_into().ok()?,
        ))
    };
    let (generation, epoch) = (word(0)?, word(1)?);
    // Lengths this host cannot address make the journal unreadable, like any other damage.
    let len = |i: usize| usize::try_from(word(i)?).ok();
    let (n, data_len, dev_len) = (len(2)?, len(3)?, len(4)?);
    let mut off = 40;
    let mut indices = Vec::with_capacity(n.min(1 << 24));
    for _ in 0..n {
        indices.push(u64::from_le_bytes(rest.get(off..off + 8)?.try_into().ok()?));
        off += 8;
    }
    let data = rest.get(off..off.checked_add(data_len)?)?.to_vec();
    off += data_len;
    let device = rest.get(off..off.checked_add(dev_len)?)?.to_vec();
    Some(StagedCheckpoint {
        generation,
        epoch,
        // Only the replica's journal reads it back, which needs no flag.
        full: false,
        indices,
        data,
        device,
    })
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
        replica.commit(&s).unwrap();
        assert_eq!(replica.committed().map(|c| c.epoch), Some(1));
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
        r.commit(&staged(1, &[(3, 9)])).unwrap();
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
        r.commit(&staged(1, &[(1, 1)])).unwrap();
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
        r.commit(&staged(2, &[(1, 2)])).unwrap();
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
        r.commit(&staged(1, &[(0, 1), (15, 2)])).unwrap();
        r.commit(&staged(2, &[(15, 3)])).unwrap();
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
        r.commit(&staged(1, &[(1, 1)])).unwrap();
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
            r.commit(&staged(1, &[(8, 1)])),
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
}
