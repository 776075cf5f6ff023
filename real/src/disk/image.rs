//! A raw disk image file: the bytes the guest sees at the same offsets.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::error::DiskError;
use super::BLOCK_SIZE;

/// One raw image, opened read-write. Positional I/O only, so it can be shared by threads.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    path: PathBuf,
    size: u64,
}

impl DiskImage {
    /// Creates (or truncates) `path` as a sparse image of `size` bytes reading as zeroes,
    /// mode 0600 (it holds the guest's data).
    pub fn create(path: impl AsRef<Path>, size: u64) -> Result<DiskImage, DiskError> {
        check_size(size)?;
        let path = path.as_ref();
        let image_err = |source| DiskError::Image {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(image_err)?;
        file.set_len(size).map_err(image_err)?;
        Ok(DiskImage {
            file,
            path: path.to_path_buf(),
            size,
        })
    }

    /// Opens an existing image; its size must be whole blocks.
    pub fn open(path: impl AsRef<Path>) -> Result<DiskImage, DiskError> {
        let path = path.as_ref();
        let image_err = |source| DiskError::Image {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(image_err)?;
        let size = file.metadata().map_err(image_err)?.len();
        check_size(size)?;
        Ok(DiskImage {
            file,
            path: path.to_path_buf(),
            size,
        })
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Size in blocks of [`BLOCK_SIZE`].
    pub fn blocks(&self) -> u64 {
        self.size / BLOCK_SIZE
    }

    /// Fills `buf` from `offset` (the caller keeps the range inside the image).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Writes `data` at `offset` (the caller keeps the range inside the image).
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    /// Makes `len` bytes at `offset` read as zeroes: a hole where the file system can punch one,
    /// written zeroes where it cannot.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        use nix::fcntl::{fallocate, FallocateFlags};
        if len == 0 {
            return Ok(());
        }
        let (Ok(o), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(&self.file, punch, o, l) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EOPNOTSUPP) => {
                static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];
                let (mut at, end) = (offset, offset + len);
                while at < end {
                    let n = (end - at).min(ZEROES.len() as u64) as usize;
                    self.file.write_all_at(&ZEROES[..n], at)?;
                    at += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Reads block `index`.
    pub fn read_block(
        &self,
        index: u64,
        buf: &mut [u8; BLOCK_SIZE as usize],
    ) -> Result<(), DiskError> {
        self.check_block(index)?;
        Ok(self.read_at(buf, index * BLOCK_SIZE)?)
    }

    /// Writes block `index` (a replica applying a checkpoint).
    pub fn write_block(
        &self,
        index: u64,
        buf: &[u8; BLOCK_SIZE as usize],
    ) -> Result<(), DiskError> {
        self.check_block(index)?;
        Ok(self.write_at(buf, index * BLOCK_SIZE)?)
    }

    /// `fdatasync`.
    pub fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// The blocks that may hold data, in order: those within the file's allocated extents
    /// (`SEEK_DATA`/`SEEK_HOLE`); every other block reads as zeroes. A full checkpoint sends
    /// these and the replica zeroes the rest, so a sparse multi-GiB image syncs in proportion to
    /// what it holds. A file system without hole reporting reports one extent: every block.
    pub fn data_blocks(&self) -> io::Result<Vec<u64>> {
        let mut blocks = Vec::new();
        for extent in data_extents(&self.file, self.size)? {
            let first = extent.start / BLOCK_SIZE;
            let last = extent.end.div_ceil(BLOCK_SIZE);
            // Extents may share a partial block at their boundaries.
            let from = blocks.last().map_or(first, |&b: &u64| first.max(b + 1));
            blocks.extend(from..last);
        }
        Ok(blocks)
    }

    /// A digest (xxh3-64) of the whole image, comparable with the replica disk's.
    pub fn digest(&self) -> io::Result<u64> {
        digest_file(&self.file, self.size)
    }

    fn check_block(&self, index: u64) -> Result<(), DiskError> {
        if index < self.blocks() {
            Ok(())
        } else {
            Err(DiskError::BlockOutOfRange {
                index,
                blocks: self.blocks(),
            })
        }
    }
}

/// The byte ranges of the first `size` bytes of `file` that hold data (`SEEK_DATA` /
/// `SEEK_HOLE`); the rest are holes, which read as zeros.
fn data_extents(file: &File, size: u64) -> io::Result<Vec<Range<u64>>> {
    use nix::unistd::{lseek, Whence};
    let end_of = i64::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut extents = Vec::new();
    let mut at = 0i64;
    while at < end_of {
        let start = match lseek(file, at, Whence::SeekData) {
            Ok(s) => s,
            // No data past `at`.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = match lseek(file, start, Whence::SeekHole) {
            Ok(e) => e.min(end_of),
            Err(nix::errno::Errno::ENXIO) => end_of,
            Err(e) => return Err(e.into()),
        };
        if start >= end_of {
            break;
        }
        // Both are in 0..=end_of here, so non-negative.
        extents.push(start.unsigned_abs()..end.unsigned_abs());
        at = end.max(start + 1);
    }
    Ok(extents)
}

/// A digest (xxh3-64) of the first `size` bytes of `file` as a disk: every 4 KiB block that
/// is not all zeros, with its index. Holes are skipped without reading them, so the cost
/// follows the data, not the disk's size (a 4 GiB sparse disk read whole took over a second,
/// with the VM paused), and two files with the same contents but other holes (the primary's
/// image, a replica written block by block) digest the same.
pub fn digest_file(file: &File, size: u64) -> io::Result<u64> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let size = size - size % BLOCK_SIZE;
    for extent in data_extents(file, size)? {
        let mut off = extent.start - extent.start % BLOCK_SIZE;
        let end = extent
            .end
            .div_ceil(BLOCK_SIZE)
            .saturating_mul(BLOCK_SIZE)
            .min(size);
        while off < end {
            let n = usize::try_from(end - off).map_or(buf.len(), |left| left.min(buf.len()));
            file.read_exact_at(&mut buf[..n], off)?;
            for (i, block) in buf[..n].chunks(BLOCK_SIZE as usize).enumerate() {
                if block.iter().any(|&b| b != 0) {
                    let index = off / BLOCK_SIZE + i as u64;
                    h.update(&index.to_le_bytes());
                    h.update(block);
                }
            }
            off += n as u64;
        }
    }
    Ok(h.digest())
}

fn check_size(size: u64) -> Result<(), DiskError> {
    if size == 0 || !size.is_multiple_of(BLOCK_SIZE) {
        return Err(DiskError::BadSize(size));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_blocks_cover_every_written_block_and_skip_holes() {
        let dir = tempfile::tempdir().unwrap();
        let img = DiskImage::create(dir.path().join("d.img"), 4096 * BLOCK_SIZE).unwrap();
        assert!(
            img.data_blocks().unwrap().is_empty(),
            "a fresh image is all hole"
        );
        let written = [0u64, 1, 700, 4095];
        for &b in &written {
            img.write_block(b, &[1u8; BLOCK_SIZE as usize]).unwrap();
        }
        let data = img.data_blocks().unwrap();
        for b in written {
            assert!(data.contains(&b), "block {b} missing from {data:?}");
        }
        assert!(data.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
        // Holes are skipped (a file system may allocate a little around a write, not much).
        assert!(data.len() < 1024, "{} blocks reported", data.len());
    }

    /// The digest is of contents only: written zeros and holes digest alike; a changed byte or
    /// the same data in another block does not.
    #[test]
    fn digest_follows_contents_not_holes() {
        let dir = tempfile::tempdir().unwrap();
        let blocks = 2048;
        let sparse = DiskImage::create(dir.path().join("a.img"), blocks * BLOCK_SIZE).unwrap();
        let dense = DiskImage::create(dir.path().join("b.img"), blocks * BLOCK_SIZE).unwrap();
        let zeros = vec![0u8; (blocks * BLOCK_SIZE) as usize];
        dense.write_at(&zeros, 0).unwrap();
        assert_eq!(sparse.digest().unwrap(), dense.digest().unwrap());
        for img in [&sparse, &dense] {
            img.write_block(7, &[3u8; BLOCK_SIZE as usize]).unwrap();
            img.write_block(2047, &[4u8; BLOCK_SIZE as usize]).unwrap();
        }
        let d = sparse.digest().unwrap();
        assert_eq!(d, dense.digest().unwrap());
        dense.write_at(&[1], 7 * BLOCK_SIZE + 5).unwrap();
        assert_ne!(d, dense.digest().unwrap());
        let moved = DiskImage::create(dir.path().join("c.img"), blocks * BLOCK_SIZE).unwrap();
        moved.write_block(8, &[3u8; BLOCK_SIZE as usize]).unwrap();
        moved
            .write_block(2047, &[4u8; BLOCK_SIZE as usize])
            .unwrap();
        assert_ne!(d, moved.digest().unwrap());
    }

    #[test]
    fn create_write_read_zero() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        let img = DiskImage::create(&p, 4 * BLOCK_SIZE).unwrap();
        assert_eq!(img.blocks(), 4);
        let mut b = [0u8; BLOCK_SIZE as usize];
        img.read_block(3, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        img.write_block(2, &[9u8; BLOCK_SIZE as usize]).unwrap();
        img.zero_range(2 * BLOCK_SIZE + 100, 200).unwrap();
        img.read_block(2, &mut b).unwrap();
        assert!(b[..100].iter().all(|&x| x == 9));
        assert!(b[100..300].iter().all(|&x| x == 0));
        assert!(b[300..].iter().all(|&x| x == 9));
        assert!(matches!(
            img.read_block(4, &mut b),
            Err(DiskError::BlockOutOfRange {
                index: 4,
                blocks: 4
            })
        ));
        drop(img);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(DiskImage::open(&p).unwrap().size(), 4 * BLOCK_SIZE);
    }

    #[test]
    fn sizes_must_be_whole_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        assert!(matches!(
            DiskImage::create(&p, 0),
            Err(DiskError::BadSize(0))
        ));
        assert!(matches!(
            DiskImage::create(&p, 4095),
            Err(DiskError::BadSize(_))
        ));
        std::fs::write(&p, [0u8; 100]).unwrap();
        assert!(matches!(DiskImage::open(&p), Err(DiskError::BadSize(100))));
        assert!(matches!(
            DiskImage::open(dir.path().join("missing")),
            Err(DiskError::Image { .. })
        ));
    }
}
