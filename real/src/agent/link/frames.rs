//! Sending one checkpoint frame: from the staging buffer, from paused guest RAM or from cow
//! pages, tagged as it goes out, or through the encryptor.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::ops::Range;

use ftvm_model::wire::{CheckpointEncoder, CheckpointMeta, DISK_BLOCK_SIZE, RECORD_HEADER_LEN};
use ftvm_model::{Epoch, Generation, VmId};

use super::{DiskSync, FrameBufs, SyncProgress};
use crate::agent::cow::CowCheckpoint;
use crate::auth::crypt::Encryptor;
use crate::auth::{FrameSealer, TAG_LEN};
use crate::dirty::GuestRam;
use crate::replica::StagedCheckpoint;
use crate::transport::{SendTicket, Transport};

/// Where a checkpoint's page contents are.
pub(super) enum Pages<'a> {
    /// Copied into the staging buffer, in the order of the indices.
    Staged(&'a [u8]),
    /// In guest RAM, held still by the paused VM ([`PausedPages::new`]).
    Ram(&'a GuestRam),
    /// In write-protected guest RAM or in the fault handler's copies; a page must be claimed
    /// before it is read, and stays still until released.
    Cow(&'a CowCheckpoint),
}

impl Pages<'_> {
    /// The `i`-th page of the checkpoint, whose index is `index`.
    pub(super) fn get(&self, i: usize, index: u64, ps: usize) -> Result<&[u8], String> {
        match self {
            Pages::Staged(data) => data
                .get(i * ps..(i + 1) * ps)
                .ok_or_else(|| "staged page data shorter than its index list".to_string()),
            Pages::Ram(ram) => ram
                .page(index)
                .filter(|p| p.len() == ps)
                .ok_or_else(|| format!("page {index} is not a {ps}-byte page of guest RAM")),
            Pages::Cow(cow) => cow
                .page(i)
                .filter(|p| p.len() == ps && cow.indices().get(i) == Some(&index))
                .ok_or_else(|| format!("page {index} (#{i}) of the cow checkpoint is not claimed")),
        }
    }
}

/// Where a checkpoint's disk blocks are.
pub(super) enum DiskBlocks<'a> {
    /// Copied at the capture, in the order of the indices.
    Staged(&'a [u8]),
    /// A full checkpoint's: read from the disk's snapshot as they go out.
    Snapshot(&'a DiskSync),
}

impl DiskBlocks<'_> {
    /// Puts blocks `first..last` of the checkpoint into `buf` (a snapshot's are read; staged
    /// ones are copied only for the encrypted path, which copies everything anyway) and returns
    /// their bytes, `BLOCK` each.
    fn batch<'b>(
        &'b self,
        staged: &'b StagedCheckpoint,
        first: usize,
        last: usize,
        buf: &'b mut Vec<u8>,
    ) -> Result<&'b [u8], String> {
        let bs = DISK_BLOCK_SIZE as usize;
        match self {
            DiskBlocks::Staged(data) => data
                .get(first * bs..last * bs)
                .ok_or_else(|| "staged disk data shorter than its block list".to_string()),
            DiskBlocks::Snapshot(d) => {
                if d.snapshot.blocks().get(first..last) != staged.disk_indices.get(first..last) {
                    return Err("the disk snapshot lists other blocks than the checkpoint".into());
                }
                buf.resize((last - first) * bs, 0);
                for (k, out) in buf.chunks_mut(bs).enumerate() {
                    d.reader
                        .read(&d.snapshot, first + k, out)
                        .map_err(|e| format!("disk block #{}: {e}", first + k))?;
                }
                Ok(&buf[..])
            }
        }
    }
}

/// The frame header fields of a checkpoint.
pub(super) struct Frame {
    pub(super) vm: VmId,
    pub(super) generation: Generation,
    pub(super) full: bool,
    pub(super) page_size: u32,
}

impl Frame {
    /// The shape of the checkpoint frame that carries `staged`.
    pub(super) fn meta(&self, staged: &StagedCheckpoint) -> CheckpointMeta {
        CheckpointMeta {
            epoch: Epoch(staged.epoch),
            full: self.full,
            page_size: self.page_size,
            page_count: staged.indices.len() as u64,
            device_len: staged.device.len() as u64,
            disk_blocks: staged.disk_indices.len() as u64,
        }
    }
}

/// Sends one checkpoint frame — prefix, page records each followed by its page, disk block
/// records each followed by its block, device state, trailer, then the frame's tag — as a pipeline of vectored sends, then waits until the
/// transport released all of it. The tag runs over each page in the same pass as the checksum,
/// over the very bytes handed to the transport. Returns bytes sent (the tag included). On error the transport is broken and must be dropped before the page
/// memory and `bufs` are released (see `fail` in the link module).
#[allow(clippy::too_many_arguments)]
pub(super) fn send_checkpoint(
    t: &mut dyn Transport,
    frame: &Frame,
    sealer: Option<&mut FrameSealer>,
    staged: &StagedCheckpoint,
    pages: Pages<'_>,
    disk: DiskBlocks<'_>,
    bufs: &mut FrameBufs,
    progress: Option<&SyncProgress>,
) -> Result<u64, String> {
    let ps = frame.page_size as usize;
    let n = staged.indices.len();
    let meta = frame.meta(staged);
    let tag_len = if sealer.is_some() { TAG_LEN } else { 0 };
    let bytes = meta
        .frame_len()
        .and_then(|n| n.checked_add(tag_len as u64))
        .ok_or("checkpoint too large")?;
    let (mut enc, prefix) =
        CheckpointEncoder::new(frame.vm, frame.generation, meta).map_err(|e| e.to_string())?;
    bufs.prefix = prefix;
    let mut mac = sealer.map(FrameSealer::begin);
    let mut feed = |bytes: &[u8]| {
        if let Some(m) = mac.as_mut() {
            m.update(bytes);
        }
    };
    feed(&bufs.prefix);
    // Every record gets its own slot, written once before it is sent and never moved while the
    // frame is in flight (the vector is sized here, before the first send).
    bufs.records.clear();
    bufs.records.resize(n, [0; RECORD_HEADER_LEN]);
    let send = |t: &mut dyn Transport, segs: &[IoSlice<'_>]| {
        // SAFETY: every segment points into memory that stays mapped and unchanged until the
        // wait_released below (or, on error, until the transport is dropped, which `serve`
        // does before releasing anything): `bufs` is owned by the writer and each slot is written
        // only before its own send; the staging buffer is owned by this frame's `Outgoing`; guest
        // RAM pages are held still by the paused VM, as `PausedPages::new` requires of its
        // caller, and mapped as long as the `Outgoing`'s `Arc<GuestRam>` lives; cow pages are
        // claimed before this send and stay write-protected (or are the handler's immutable
        // copies) until released below, and the `CowCheckpoint` (holding the mapping and the
        // copies) is dropped only after the transport.
        unsafe { t.send(segs) }.map_err(|e| e.to_string())
    };
    send(t, &[IoSlice::new(&bufs.prefix)])?;
    // Pages go out in batches as the checksum runs over them, so bytes start flowing at once
    // (the receiver counts them as signs of life) instead of after a pass over every page; no
    // batch waits for the previous one to be released.
    // cow: batches handed to the transport and not yet released, oldest first.
    let mut in_flight: VecDeque<(SendTicket, Range<usize>)> = VecDeque::new();
    for first in (0..n).step_by(PAGES_PER_BATCH) {
        let last = (first + PAGES_PER_BATCH).min(n);
        if let Pages::Cow(cow) = &pages {
            // Before the checksum reads them: from here on a guest write to these pages waits
            // (or, for pages it already copied, the copy is what is read).
            cow.claim(first..last).map_err(|e| e.to_string())?;
        }
        for i in first..last {
            let index = staged.indices[i];
            let page = pages.get(i, index, ps)?;
            bufs.records[i] = enc.page(index, page).map_err(|e| e.to_string())?;
            feed(&bufs.records[i]);
            feed(page);
        }
        let mut segs = Vec::with_capacity(2 * (last - first));
        for i in first..last {
            segs.push(IoSlice::new(&bufs.records[i]));
            segs.push(IoSlice::new(pages.get(i, staged.indices[i], ps)?));
        }
        let ticket = send(t, &segs)?;
        if let Some(p) = progress {
            p.add(segs.iter().map(|s| s.len() as u64).sum());
        }
        if let Pages::Cow(cow) = &pages {
            // Let writes to released batches go ahead now rather than at the end of the frame.
            in_flight.push_back((ticket, first..last));
            let released = t.poll_released().map_err(|e| e.to_string())?;
            while let Some((tk, range)) = in_flight.front() {
                if *tk > released {
                    break;
                }
                cow.released(range.clone());
                in_flight.pop_front();
            }
        }
    }
    // Disk blocks come from the staging buffer (copied at capture), or for a full checkpoint
    // from the disk's snapshot, a batch at a time into `bufs.disk_batch`.
    let blocks = staged.disk_indices.len();
    let bs = DISK_BLOCK_SIZE as usize;
    bufs.disk_records.clear();
    bufs.disk_records.resize(blocks, [0; RECORD_HEADER_LEN]);
    for first in (0..blocks).step_by(PAGES_PER_BATCH) {
        let last = (first + PAGES_PER_BATCH).min(blocks);
        let data = disk.batch(staged, first, last, &mut bufs.disk_batch)?;
        for (i, block) in (first..last).zip(data.chunks(bs)) {
            bufs.disk_records[i] = enc
                .disk_block(staged.disk_indices[i], block)
                .map_err(|e| e.to_string())?;
            feed(&bufs.disk_records[i]);
            feed(block);
        }
        let mut segs = Vec::with_capacity(2 * (last - first));
        for (i, block) in (first..last).zip(data.chunks(bs)) {
            segs.push(IoSlice::new(&bufs.disk_records[i]));
            segs.push(IoSlice::new(block));
        }
        let ticket = send(t, &segs)?;
        if let Some(p) = progress {
            p.add(segs.iter().map(|s| s.len() as u64).sum());
        }
        if let DiskBlocks::Snapshot(_) = disk {
            // The batch buffer is refilled next: the transport must be done with it.
            t.wait_released(ticket).map_err(|e| e.to_string())?;
        }
    }
    enc.device(&staged.device).map_err(|e| e.to_string())?;
    bufs.trailer = enc.finish().map_err(|e| e.to_string())?;
    feed(&staged.device);
    feed(&bufs.trailer);
    bufs.tag = mac.map(|m| m.finish()).unwrap_or_default();
    let last = send(
        t,
        &[
            IoSlice::new(&staged.device),
            IoSlice::new(&bufs.trailer),
            IoSlice::new(&bufs.tag[..tag_len]),
        ],
    )?;
    t.wait_released(last).map_err(|e| e.to_string())?;
    if let Pages::Cow(cow) = &pages {
        for (_, range) in in_flight {
            cow.released(range);
        }
    }
    Ok(bytes)
}

/// Why an encrypted send failed (sealing or sending), in the link's words.
struct SendFail(String);

impl From<snow::Error> for SendFail {
    fn from(e: snow::Error) -> Self {
        SendFail(format!("encrypt: {e}"))
    }
}

/// Hands sealed bytes to the transport and waits until it is done with them (the buffer is
/// reused for the next batch).
fn send_sealed_bytes(t: &mut dyn Transport, b: &[u8]) -> Result<(), SendFail> {
    t.send_and_wait(&[IoSlice::new(b)])
        .map(drop)
        .map_err(|e| SendFail(e.to_string()))
}

/// Sends `pieces` as one frame through the encryptor (copying them).
pub(super) fn encrypted(
    t: &mut dyn Transport,
    e: &mut Encryptor,
    pieces: &[&[u8]],
) -> Result<(), String> {
    let mut flush = |b: &[u8]| send_sealed_bytes(t, b);
    let mut go = || {
        for p in pieces {
            e.push(p, &mut flush)?;
        }
        e.finish(&mut flush)
    };
    go().map_err(|f| f.0)
}

/// Sends one checkpoint frame through the encryptor: the same bytes as [`send_checkpoint`]
/// without the tag, each page copied (and encrypted) as it is read, so a cow page is released
/// as soon as its batch is encrypted. Returns the plaintext bytes sent.
pub(super) fn send_encrypted_checkpoint(
    t: &mut dyn Transport,
    frame: &Frame,
    e: &mut Encryptor,
    staged: &StagedCheckpoint,
    pages: Pages<'_>,
    disk: DiskBlocks<'_>,
    progress: Option<&SyncProgress>,
) -> Result<u64, String> {
    let ps = frame.page_size as usize;
    let n = staged.indices.len();
    let meta = frame.meta(staged);
    let bytes = meta.frame_len().ok_or("checkpoint too large")?;
    let (mut enc, prefix) =
        CheckpointEncoder::new(frame.vm, frame.generation, meta).map_err(|e| e.to_string())?;
    let mut flush = |b: &[u8]| send_sealed_bytes(t, b);
    let fail = |f: SendFail| f.0;
    e.push(&prefix, &mut flush).map_err(fail)?;
    for first in (0..n).step_by(PAGES_PER_BATCH) {
        let last = (first + PAGES_PER_BATCH).min(n);
        if let Pages::Cow(cow) = &pages {
            cow.claim(first..last).map_err(|e| e.to_string())?;
        }
        for i in first..last {
            let index = staged.indices[i];
            let page = pages.get(i, index, ps)?;
            let record = enc.page(index, page).map_err(|e| e.to_string())?;
            e.push(&record, &mut flush).map_err(fail)?;
            e.push(page, &mut flush).map_err(fail)?;
        }
        if let Some(p) = progress {
            p.add((last - first) as u64 * (RECORD_HEADER_LEN + ps) as u64);
        }
        // The batch's pages are copied into ciphertext: the guest may write them again.
        if let Pages::Cow(cow) = &pages {
            cow.released(first..last);
        }
    }
    let blocks = staged.disk_indices.len();
    let bs = DISK_BLOCK_SIZE as usize;
    let mut batch = Vec::new();
    for first in (0..blocks).step_by(PAGES_PER_BATCH) {
        let last = (first + PAGES_PER_BATCH).min(blocks);
        let data = disk.batch(staged, first, last, &mut batch)?;
        for (i, block) in (first..last).zip(data.chunks(bs)) {
            let record = enc
                .disk_block(staged.disk_indices[i], block)
                .map_err(|e| e.to_string())?;
            e.push(&record, &mut flush).map_err(fail)?;
            e.push(block, &mut flush).map_err(fail)?;
        }
        if let Some(p) = progress {
            p.add((last - first) as u64 * (RECORD_HEADER_LEN + bs) as u64);
        }
    }
    enc.device(&staged.device).map_err(|e| e.to_string())?;
    let trailer = enc.finish().map_err(|e| e.to_string())?;
    e.push(&staged.device, &mut flush).map_err(fail)?;
    e.push(&trailer, &mut flush).map_err(fail)?;
    e.finish(&mut flush).map_err(fail)?;
    Ok(bytes)
}

/// Pages per vectored send of a checkpoint (2 iovecs each, within IOV_MAX).
const PAGES_PER_BATCH: usize = 256;
