//! Incremental decoder: feed it whatever the socket returned, get frames, page records, disk
//! block records and device-state chunks as soon as they are complete. Whole records that sit
//! in the input are lent out without copying; only pieces split across reads are gathered in a
//! small buffer.

use super::bytes::Reader;
use super::checkpoint::{CheckpointMeta, DISK_BLOCK_SIZE, META_LEN, RECORD_HEADER_LEN};
use super::error::{Part, WireError};
use super::header::{Expect, FrameKind, Header, HEADER_LEN, TRAILER_LEN};
use super::message;
use crate::ids::{Epoch, Generation};
use crate::msg::PeerMsg;
use crate::witness_msg::{WitnessReply, WitnessRequest};

/// One thing decoded from the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Item<'a> {
    /// A complete, verified peer message.
    Peer(PeerMsg),
    /// A complete, verified witness request.
    WitnessRequest(WitnessRequest),
    /// A complete, verified witness reply.
    WitnessReply(WitnessReply),
    /// A checkpoint starts (header checked; the body checksum comes at `CheckpointEnd`).
    CheckpointBegin {
        /// Sender's generation.
        generation: Generation,
        /// Shape.
        meta: CheckpointMeta,
    },
    /// One page record (not yet verified: stage it, apply only after `CheckpointEnd`).
    Page {
        /// Guest page index.
        index: u64,
        /// `page_size` bytes.
        data: &'a [u8],
    },
    /// One disk block record (not yet verified: stage it, apply only after `CheckpointEnd`).
    /// Disk blocks come after every page and before the device state.
    DiskBlock {
        /// Block index on the guest disk (in [`DISK_BLOCK_SIZE`] units).
        index: u64,
        /// [`DISK_BLOCK_SIZE`] bytes.
        data: &'a [u8],
    },
    /// A chunk of device state at `offset` (not yet verified).
    Device {
        /// Offset within the device state.
        offset: u64,
        /// The chunk.
        data: &'a [u8],
    },
    /// The checkpoint's checksum matched: everything since `CheckpointBegin` is genuine.
    CheckpointEnd {
        /// Its epoch.
        epoch: Epoch,
    },
}

#[derive(Clone, Copy, Debug)]
enum State {
    Header,
    Message(Header),
    Meta(Header),
    RecordHeader(Section),
    Record { index: u64, section: Section },
    Device,
    Trailer,
}

/// Which run of records of a checkpoint is being read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Section {
    /// Guest RAM pages (`page_size` bytes each).
    Ram,
    /// Disk blocks ([`DISK_BLOCK_SIZE`] bytes each).
    Disk,
}

/// Where a finished step's item lives (resolved to borrows after error handling).
enum Ready {
    Owned(OwnedItem),
    RecordInInput {
        index: u64,
        len: usize,
        section: Section,
    },
    RecordInBuf {
        index: u64,
        section: Section,
    },
    DeviceInInput {
        offset: u64,
        len: usize,
    },
}

enum OwnedItem {
    Peer(PeerMsg),
    Request(WitnessRequest),
    Reply(WitnessReply),
    Begin {
        generation: Generation,
        meta: CheckpointMeta,
    },
    End {
        epoch: Epoch,
    },
}

/// Incremental frame decoder for one connection. After an error it is poisoned (returns the
/// same error forever): drop the connection, a stream is never resynchronised.
#[derive(Clone, Debug)]
pub struct StreamDecoder {
    expect: Expect,
    state: State,
    buf: Vec<u8>,
    clear_buf: bool,
    crc: crc32fast::Hasher,
    meta: Option<CheckpointMeta>,
    pages_left: u64,
    disk_left: u64,
    device_off: u64,
    poisoned: Option<WireError>,
}

impl StreamDecoder {
    /// A decoder accepting frames of `expect.vm` not older than `expect.min_generation`.
    pub fn new(expect: Expect) -> StreamDecoder {
        StreamDecoder {
            expect,
            state: State::Header,
            buf: Vec::new(),
            clear_buf: false,
            crc: crc32fast::Hasher::new(),
            meta: None,
            pages_left: 0,
            disk_left: 0,
            device_off: 0,
            poisoned: None,
        }
    }

    /// Raise the generation floor (e.g. after a `SyncStart` of a newer generation).
    pub fn set_min_generation(&mut self, generation: Generation) {
        self.expect.min_generation = generation;
    }

    /// Consume a prefix of `input`: returns how many bytes were used and at most one item.
    /// Call again with the rest; with non-empty input every call makes progress (consumes
    /// bytes or yields an item).
    pub fn decode<'a>(
        &'a mut self,
        input: &'a [u8],
    ) -> Result<(usize, Option<Item<'a>>), WireError> {
        if let Some(e) = &self.poisoned {
            return Err(e.clone());
        }
        if self.clear_buf {
            self.buf.clear();
            self.clear_buf = false;
        }
        let (used, ready) = match self.step(input) {
            Ok(r) => r,
            Err(e) => {
                self.poisoned = Some(e.clone());
                return Err(e);
            }
        };
        let item = ready.map(|r| match r {
            Ready::Owned(OwnedItem::Peer(m)) => Item::Peer(m),
            Ready::Owned(OwnedItem::Request(r)) => Item::WitnessRequest(r),
            Ready::Owned(OwnedItem::Reply(r)) => Item::WitnessReply(r),
            Ready::Owned(OwnedItem::Begin { generation, meta }) => {
                Item::CheckpointBegin { generation, meta }
            }
            Ready::Owned(OwnedItem::End { epoch }) => Item::CheckpointEnd { epoch },
            Ready::RecordInInput {
                index,
                len,
                section,
            } => record_item(section, index, &input[..len]),
            Ready::RecordInBuf { index, section } => record_item(section, index, &self.buf),
            Ready::DeviceInInput { offset, len } => Item::Device {
                offset,
                data: &input[..len],
            },
        });
        Ok((used, item))
    }

    /// The stream ended: fine between frames, `Truncated` inside one.
    pub fn finish(&self) -> Result<(), WireError> {
        if let Some(e) = &self.poisoned {
            return Err(e.clone());
        }
        match self.needed() {
            0 => Ok(()),
            needed => Err(WireError::Truncated { needed }),
        }
    }

    /// True between frames.
    pub fn at_frame_boundary(&self) -> bool {
        self.poisoned.is_none() && self.needed() == 0
    }

    /// Heap bytes this decoder holds for pieces split across reads (its buffer's capacity).
    /// It grows only as bytes arrive and never beyond twice the largest piece it gathers: a
    /// page (at most [`MAX_PAGE_SIZE`](super::MAX_PAGE_SIZE), as the frame's meta declares),
    /// a disk block, a header, a checkpoint meta or a small frame's fixed-size body. Records
    /// and device state that sit whole in the input are lent out, not buffered.
    pub fn buffered_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Bytes still missing from the current frame (0 between frames).
    pub fn needed(&self) -> u64 {
        let buffered = if self.clear_buf {
            0
        } else {
            self.buf.len() as u64
        };
        let trailer = TRAILER_LEN as u64;
        // Bytes after the current point: `pages` whole page records and `blocks` whole disk
        // block records, `extra` bytes of the record being read, the rest of the device state,
        // the trailer.
        let rest_of_checkpoint = |pages: u64, blocks: u64, extra: u64| -> u64 {
            let Some(meta) = self.meta else { return 0 };
            let record = RECORD_HEADER_LEN as u64 + u64::from(meta.page_size);
            let disk_record = RECORD_HEADER_LEN as u64 + u64::from(DISK_BLOCK_SIZE);
            pages
                .saturating_mul(record)
                .saturating_add(blocks.saturating_mul(disk_record))
                .saturating_add(extra)
                .saturating_add(meta.device_len.saturating_sub(self.device_off))
                .saturating_add(trailer)
        };
        match self.state {
            State::Header if buffered == 0 => 0,
            State::Header => HEADER_LEN as u64 - buffered,
            State::Message(h) => h.body_len.saturating_add(trailer).saturating_sub(buffered),
            State::Meta(h) => h.body_len.saturating_add(trailer).saturating_sub(buffered),
            State::RecordHeader(_) => {
                rest_of_checkpoint(self.pages_left, self.disk_left, 0).saturating_sub(buffered)
            }
            State::Record { section, .. } => {
                let size = self.record_size(section) as u64;
                let (pages, blocks) = match section {
                    Section::Ram => (self.pages_left.saturating_sub(1), self.disk_left),
                    Section::Disk => (0, self.disk_left.saturating_sub(1)),
                };
                rest_of_checkpoint(pages, blocks, size).saturating_sub(buffered)
            }
            State::Device => rest_of_checkpoint(0, 0, 0),
            State::Trailer => trailer - buffered,
        }
    }

    /// Bytes of one record's contents in `section`.
    fn record_size(&self, section: Section) -> usize {
        match section {
            Section::Ram => self.meta.map_or(0, |m| m.page_size as usize),
            Section::Disk => DISK_BLOCK_SIZE as usize,
        }
    }

    /// Move up to `need - buf.len()` bytes into `buf`; returns (used, complete).
    fn fill(&mut self, input: &[u8], need: usize) -> (usize, bool) {
        let take = need.saturating_sub(self.buf.len()).min(input.len());
        self.buf.extend_from_slice(&input[..take]);
        (take, self.buf.len() == need)
    }

    fn step(&mut self, input: &[u8]) -> Result<(usize, Option<Ready>), WireError> {
        match self.state {
            State::Header => {
                let (used, done) = self.fill(input, HEADER_LEN);
                if !done {
                    return Ok((used, None));
                }
                let mut raw = [0u8; HEADER_LEN];
                raw.copy_from_slice(&self.buf);
                self.buf.clear();
                let header = Header::decode(&raw, &self.expect)?;
                match message::body_len(header.kind) {
                    Some(len) if len == header.body_len => self.state = State::Message(header),
                    Some(_) => return Err(WireError::Malformed("wrong body length for kind")),
                    None if header.body_len < META_LEN as u64 => {
                        return Err(WireError::Malformed(
                            "checkpoint body shorter than its meta",
                        ))
                    }
                    None => self.state = State::Meta(header),
                }
                Ok((used, None))
            }
            State::Message(header) => {
                // Bounded by `message::body_len`, so this buffer stays small.
                let body_len = usize::try_from(header.body_len)
                    .map_err(|_| WireError::Malformed("body length beyond this host's memory"))?;
                let need = body_len + TRAILER_LEN;
                let (used, done) = self.fill(input, need);
                if !done {
                    return Ok((used, None));
                }
                let (body, trailer) = self.buf.split_at(need - TRAILER_LEN);
                let stored = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
                if crc32fast::hash(body) != stored {
                    return Err(WireError::Corrupted { part: Part::Body });
                }
                let item = decode_message(header, body)?;
                self.buf.clear();
                self.state = State::Header;
                Ok((used, Some(Ready::Owned(item))))
            }
            State::Meta(header) => {
                let (used, done) = self.fill(input, META_LEN);
                if !done {
                    return Ok((used, None));
                }
                let meta = CheckpointMeta::decode(&self.buf, header.body_len)?;
                self.crc = crc32fast::Hasher::new();
                self.crc.update(&self.buf);
                self.buf.clear();
                self.meta = Some(meta);
                self.pages_left = meta.page_count;
                self.disk_left = meta.disk_blocks;
                self.device_off = 0;
                self.after_page();
                let begin = OwnedItem::Begin {
                    generation: header.generation,
                    meta,
                };
                Ok((used, Some(Ready::Owned(begin))))
            }
            State::RecordHeader(section) => {
                let (used, done) = self.fill(input, RECORD_HEADER_LEN);
                if done {
                    self.crc.update(&self.buf);
                    let index = Reader::new(&self.buf).u64()?;
                    self.buf.clear();
                    self.state = State::Record { index, section };
                }
                Ok((used, None))
            }
            State::Record { index, section } => {
                let size = self.record_size(section);
                if self.buf.is_empty() && input.len() >= size {
                    self.crc.update(&input[..size]);
                    self.record_done(section);
                    return Ok((
                        size,
                        Some(Ready::RecordInInput {
                            index,
                            len: size,
                            section,
                        }),
                    ));
                }
                let (used, done) = self.fill(input, size);
                if !done {
                    return Ok((used, None));
                }
                self.crc.update(&self.buf);
                self.clear_buf = true;
                self.record_done(section);
                Ok((used, Some(Ready::RecordInBuf { index, section })))
            }
            State::Device => {
                let left = self.meta.map_or(0, |m| m.device_len) - self.device_off;
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                if take == 0 {
                    return Ok((0, None));
                }
                self.crc.update(&input[..take]);
                let offset = self.device_off;
                self.device_off += take as u64;
                if self.device_off == self.meta.map_or(0, |m| m.device_len) {
                    self.state = State::Trailer;
                }
                Ok((take, Some(Ready::DeviceInInput { offset, len: take })))
            }
            State::Trailer => {
                let (used, done) = self.fill(input, TRAILER_LEN);
                if !done {
                    return Ok((used, None));
                }
                let stored =
                    u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
                self.buf.clear();
                let crc = std::mem::take(&mut self.crc).finalize();
                if crc != stored {
                    return Err(WireError::Corrupted { part: Part::Body });
                }
                let epoch = self.meta.take().map_or(Epoch::NONE, |m| m.epoch);
                self.state = State::Header;
                Ok((used, Some(Ready::Owned(OwnedItem::End { epoch }))))
            }
        }
    }

    /// Counts a finished record of `section` and moves on.
    fn record_done(&mut self, section: Section) {
        match section {
            Section::Ram => self.pages_left -= 1,
            Section::Disk => self.disk_left -= 1,
        }
        self.after_page();
    }

    /// Next state once a record (or the meta) is through: pages, then disk blocks, then the
    /// device state, then the trailer.
    fn after_page(&mut self) {
        let device_len = self.meta.map_or(0, |m| m.device_len);
        self.state = if self.pages_left > 0 {
            State::RecordHeader(Section::Ram)
        } else if self.disk_left > 0 {
            State::RecordHeader(Section::Disk)
        } else if device_len > 0 {
            State::Device
        } else {
            State::Trailer
        };
    }
}

/// The item for a finished record of `section`.
fn record_item(section: Section, index: u64, data: &[u8]) -> Item<'_> {
    match section {
        Section::Ram => Item::Page { index, data },
        Section::Disk => Item::DiskBlock { index, data },
    }
}

fn decode_message(header: Header, body: &[u8]) -> Result<OwnedItem, WireError> {
    Ok(match header.kind {
        FrameKind::WitnessRequest => {
            let mut r = Reader::new(body);
            let req = message::decode_request(&mut r)?;
            r.end()?;
            if request_generation(&req) != header.generation {
                return Err(WireError::Malformed(
                    "witness request header disagrees with body",
                ));
            }
            OwnedItem::Request(req)
        }
        FrameKind::WitnessReply => {
            OwnedItem::Reply(message::decode_reply(header.vm, header.generation, body)?)
        }
        kind => OwnedItem::Peer(message::decode_peer(
            kind,
            header.vm,
            header.generation,
            body,
        )?),
    })
}

/// Generation the header of a witness request carries (0 for `Query`).
pub(crate) fn request_generation(req: &WitnessRequest) -> Generation {
    match *req {
        WitnessRequest::Query => Generation(0),
        WitnessRequest::RegisterBackup { generation, .. }
        | WitnessRequest::DropBackup { generation, .. }
        | WitnessRequest::Takeover { generation, .. } => generation,
    }
}
