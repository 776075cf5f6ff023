//! Checkpoint frames and the zero-copy encoder.
//!
//! ```text
//! header (kind Checkpoint, body_len)            36 bytes, see `header`
//! meta: epoch u64, full u8, page_size u32,
//!       page_count u64, device_len u64,
//!       disk_blocks u64                         37 bytes
//! page_count × { page index u64, page bytes }
//! disk_blocks × { block index u64, 4096 bytes } (DISK_BLOCK_SIZE)
//! device state                                  device_len bytes
//! crc32 of meta + records + device state        4 bytes
//! ```
//! The encoder never touches page or block bytes except to checksum them, so the driver can
//! hand the kernel iovecs that point straight into guest RAM (or a disk staging buffer):
//! prefix, then for each page its 8-byte record header and the page slice, then the same for
//! each disk block, then the device state, then the trailer.
//!
//! Disk blocks are the guest disk writes of the checkpoint's epoch (the whole disk for a full
//! checkpoint). They sit inside the same frame, under the same checksum, as the epoch's pages
//! and device state, so a backup commits an epoch's disk writes atomically with its RAM.

use super::bytes::{Reader, Writer};
use super::error::WireError;
use super::header::{FrameKind, Header, HEADER_LEN, TRAILER_LEN};
use crate::ids::{Epoch, Generation, VmId};

/// Meta block length.
pub const META_LEN: usize = 37;
/// Record header length (page or disk block index).
pub const RECORD_HEADER_LEN: usize = 8;
/// Bytes per disk block record, whatever the guest page size.
///
/// The guest's (and QEMU's, and the agent's NBD server's) write granularity is a 512-byte
/// sector, but tracking sectors would make the dirty bitmap eight times larger and the records
/// eight times more numerous; 4 KiB blocks keep the bitmap small (one bit per 4 KiB of disk)
/// and match the host page cache, which reads and writes the disk image in 4 KiB pages anyway.
/// It is fixed rather than tied to `page_size` because the disk's geometry does not change
/// with the guest's RAM pages (2 MiB huge pages would make every disk write a 2 MiB record).
pub const DISK_BLOCK_SIZE: u32 = 4096;
/// Largest page size a frame may declare (2 MiB huge pages).
pub const MAX_PAGE_SIZE: u32 = 1 << 21;

/// Shape of one checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CheckpointMeta {
    /// Epoch this checkpoint closes.
    pub epoch: Epoch,
    /// All of RAM (sync) rather than the dirty pages.
    pub full: bool,
    /// Bytes per page record.
    pub page_size: u32,
    /// Number of page records.
    pub page_count: u64,
    /// Bytes of device state.
    pub device_len: u64,
    /// Number of disk block records ([`DISK_BLOCK_SIZE`] bytes each); 0 for a VM without a
    /// protected disk.
    pub disk_blocks: u64,
}

impl CheckpointMeta {
    /// Body length (meta + records + device state), `None` on overflow or a bad page size.
    pub fn body_len(&self) -> Option<u64> {
        if !self.page_size.is_power_of_two() || self.page_size > MAX_PAGE_SIZE {
            return None;
        }
        let record = RECORD_HEADER_LEN as u64 + u64::from(self.page_size);
        let disk_record = RECORD_HEADER_LEN as u64 + u64::from(DISK_BLOCK_SIZE);
        self.page_count
            .checked_mul(record)?
            .checked_add(self.disk_blocks.checked_mul(disk_record)?)?
            .checked_add(META_LEN as u64)?
            .checked_add(self.device_len)
    }

    /// Bytes of the whole frame on the wire.
    pub fn frame_len(&self) -> Option<u64> {
        self.body_len()?
            .checked_add((HEADER_LEN + TRAILER_LEN) as u64)
    }

    pub(crate) fn encode(&self) -> [u8; META_LEN] {
        let mut v = Vec::with_capacity(META_LEN);
        let mut w = Writer { buf: &mut v };
        w.u64(self.epoch.0);
        w.bool(self.full);
        w.u32(self.page_size);
        w.u64(self.page_count);
        w.u64(self.device_len);
        w.u64(self.disk_blocks);
        let mut out = [0u8; META_LEN];
        out.copy_from_slice(&v);
        out
    }

    /// Parse meta and check it against the header's body length.
    pub(crate) fn decode(bytes: &[u8], body_len: u64) -> Result<CheckpointMeta, WireError> {
        let mut r = Reader::new(bytes);
        let meta = CheckpointMeta {
            epoch: Epoch(r.u64()?),
            full: r.bool()?,
            page_size: r.u32()?,
            page_count: r.u64()?,
            device_len: r.u64()?,
            disk_blocks: r.u64()?,
        };
        r.end()?;
        match meta.body_len() {
            None => Err(WireError::Malformed(
                "bad checkpoint page size or size overflow",
            )),
            Some(len) if len != body_len => Err(WireError::Malformed(
                "checkpoint length disagrees with its meta",
            )),
            Some(_) => Ok(meta),
        }
    }
}

/// Streams one checkpoint frame out without copying page bytes.
///
/// ```
/// use ftvm_model::wire::{CheckpointEncoder, CheckpointMeta};
/// use ftvm_model::{Epoch, Generation, VmId};
/// let page = [7u8; 4096];
/// let block = [9u8; 4096];
/// let meta = CheckpointMeta {
///     epoch: Epoch(3), full: false, page_size: 4096, page_count: 1, device_len: 2, disk_blocks: 1,
/// };
/// let (mut enc, prefix) = CheckpointEncoder::new(VmId(1), Generation(1), meta).unwrap();
/// let record = enc.page(42, &page).unwrap();          // send `record`, then `page` itself
/// let disk = enc.disk_block(5, &block).unwrap();      // send `disk`, then `block` itself
/// enc.device(b"dv").unwrap();                         // send the device bytes
/// let trailer = enc.finish().unwrap();         // send the trailer
/// # let _ = (prefix, record, trailer);
/// ```
#[derive(Clone, Debug)]
pub struct CheckpointEncoder {
    meta: CheckpointMeta,
    pages_left: u64,
    disk_left: u64,
    device_left: u64,
    crc: crc32fast::Hasher,
}

/// Header + meta: the first bytes of a checkpoint frame.
pub type CheckpointPrefix = [u8; HEADER_LEN + META_LEN];

impl CheckpointEncoder {
    /// Start a checkpoint; returns the encoder and the frame prefix to send first.
    pub fn new(
        vm: VmId,
        generation: Generation,
        meta: CheckpointMeta,
    ) -> Result<(CheckpointEncoder, CheckpointPrefix), WireError> {
        let body_len = meta.body_len().ok_or(WireError::EncoderMisuse(
            "bad page size or checkpoint too large",
        ))?;
        let header = Header {
            kind: FrameKind::Checkpoint,
            vm,
            generation,
            body_len,
        };
        let meta_bytes = meta.encode();
        let mut crc = crc32fast::Hasher::new();
        crc.update(&meta_bytes);
        let mut prefix = [0u8; HEADER_LEN + META_LEN];
        prefix[..HEADER_LEN].copy_from_slice(&header.encode());
        prefix[HEADER_LEN..].copy_from_slice(&meta_bytes);
        let enc = CheckpointEncoder {
            meta,
            pages_left: meta.page_count,
            disk_left: meta.disk_blocks,
            device_left: meta.device_len,
            crc,
        };
        Ok((enc, prefix))
    }

    /// Account for one page; returns its record header, to be sent right before `page`.
    pub fn page(&mut self, index: u64, page: &[u8]) -> Result<[u8; RECORD_HEADER_LEN], WireError> {
        if self.pages_left == 0 {
            return Err(WireError::EncoderMisuse("more pages than page_count"));
        }
        if page.len() as u64 != u64::from(self.meta.page_size) {
            return Err(WireError::EncoderMisuse(
                "page length differs from page_size",
            ));
        }
        self.pages_left -= 1;
        let record = index.to_le_bytes();
        self.crc.update(&record);
        self.crc.update(page);
        Ok(record)
    }

    /// Account for one disk block (after all pages, before the device state); returns its
    /// record header, to be sent right before `block`.
    pub fn disk_block(
        &mut self,
        index: u64,
        block: &[u8],
    ) -> Result<[u8; RECORD_HEADER_LEN], WireError> {
        if self.pages_left != 0 {
            return Err(WireError::EncoderMisuse("disk block before the last page"));
        }
        if self.disk_left == 0 {
            return Err(WireError::EncoderMisuse(
                "more disk blocks than disk_blocks",
            ));
        }
        if block.len() as u64 != u64::from(DISK_BLOCK_SIZE) {
            return Err(WireError::EncoderMisuse(
                "disk block length differs from DISK_BLOCK_SIZE",
            ));
        }
        self.disk_left -= 1;
        let record = index.to_le_bytes();
        self.crc.update(&record);
        self.crc.update(block);
        Ok(record)
    }

    /// Account for the next chunk of device state (after all pages and disk blocks).
    pub fn device(&mut self, chunk: &[u8]) -> Result<(), WireError> {
        if self.pages_left != 0 {
            return Err(WireError::EncoderMisuse(
                "device state before the last page",
            ));
        }
        if self.disk_left != 0 {
            return Err(WireError::EncoderMisuse(
                "device state before the last disk block",
            ));
        }
        if chunk.len() as u64 > self.device_left {
            return Err(WireError::EncoderMisuse(
                "more device state than device_len",
            ));
        }
        self.device_left -= chunk.len() as u64;
        self.crc.update(chunk);
        Ok(())
    }

    /// The trailer, once every declared page and device byte went through the encoder.
    pub fn finish(self) -> Result<[u8; TRAILER_LEN], WireError> {
        if self.pages_left != 0 {
            return Err(WireError::EncoderMisuse("fewer pages than page_count"));
        }
        if self.disk_left != 0 {
            return Err(WireError::EncoderMisuse(
                "fewer disk blocks than disk_blocks",
            ));
        }
        if self.device_left != 0 {
            return Err(WireError::EncoderMisuse(
                "less device state than device_len",
            ));
        }
        Ok(self.crc.finalize().to_le_bytes())
    }
}

/// A checkpoint decoded into owned buffers (tests, simulator; the real driver streams).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Sender's generation.
    pub generation: Generation,
    /// Shape.
    pub meta: CheckpointMeta,
    /// `(page index, page bytes)` in frame order.
    pub pages: Vec<(u64, Vec<u8>)>,
    /// `(disk block index, DISK_BLOCK_SIZE bytes)` in frame order.
    pub disk: Vec<(u64, Vec<u8>)>,
    /// Device state.
    pub device: Vec<u8>,
}

/// Encode a whole checkpoint without disk blocks into one buffer (copies; for tests and the
/// simulator).
pub fn encode_checkpoint(
    vm: VmId,
    generation: Generation,
    epoch: Epoch,
    full: bool,
    page_size: u32,
    pages: &[(u64, &[u8])],
    device: &[u8],
) -> Result<Vec<u8>, WireError> {
    encode_checkpoint_with_disk(vm, generation, epoch, full, page_size, pages, &[], device)
}

/// Encode a whole checkpoint with disk blocks (each [`DISK_BLOCK_SIZE`] bytes) into one
/// buffer (copies; for tests and the simulator).
#[allow(clippy::too_many_arguments)] // the frame's fields, in frame order
pub fn encode_checkpoint_with_disk(
    vm: VmId,
    generation: Generation,
    epoch: Epoch,
    full: bool,
    page_size: u32,
    pages: &[(u64, &[u8])],
    disk: &[(u64, &[u8])],
    device: &[u8],
) -> Result<Vec<u8>, WireError> {
    let meta = CheckpointMeta {
        epoch,
        full,
        page_size,
        page_count: pages.len() as u64,
        device_len: device.len() as u64,
        disk_blocks: disk.len() as u64,
    };
    let (mut enc, prefix) = CheckpointEncoder::new(vm, generation, meta)?;
    let cap = usize::try_from(meta.frame_len().unwrap_or(0)).unwrap_or(0);
    let mut out = Vec::with_capacity(cap);
    out.extend_from_slice(&prefix);
    for &(index, page) in pages {
        out.extend_from_slice(&enc.page(index, page)?);
        out.extend_from_slice(page);
    }
    for &(index, block) in disk {
        out.extend_from_slice(&enc.disk_block(index, block)?);
        out.extend_from_slice(block);
    }
    enc.device(device)?;
    out.extend_from_slice(device);
    out.extend_from_slice(&enc.finish()?);
    Ok(out)
}
