//! Fuzz-style test of the wire decoders (`StreamDecoder` and `wire::decode`), for a fixed wall
//! time: random byte streams, forged headers with valid checksums, and valid streams of every
//! frame kind (peer messages, checkpoints with pages, disk blocks and device state, witness
//! requests and replies) damaged by bit flips, truncations, splices, huge length fields and
//! garbage, each fed whole and cut into chunks at random points; and checkpoints damaged or cut
//! inside their disk section, which must be refused exactly like damage to their pages.
//!
//! Every case asserts: no panic; every call makes progress; a frame is reported verified (a peer
//! message, a witness request or reply, a checkpoint's end) only if its bytes on the wire are
//! exactly the encoding of what was decoded, so checksums held and nothing was read loosely;
//! the decoder's buffer stays within twice the largest piece it gathers (a page of the size
//! the frame declared, a disk block, or a small fixed-size piece); the items do not depend on where the
//! stream was cut; `wire::decode` agrees with the stream decoder on the first frame; and after
//! an error the decoder is dead (the same error for any later input and at `finish`), as
//! `StreamDecoder` documents. Mutations with a known outcome (a bit flip, a cut, garbage at a
//! frame boundary, an impossible body length) assert that outcome exactly.
//!
//! `FTVM_FUZZ_SECS` sets the time (default 5 s), `FTVM_FUZZ_SEED` the seed (printed), and
//! `FTVM_FUZZ_CASE=STRATEGY:SEED` replays the one case a failure names.

use std::time::{Duration, Instant};

use ftvm_model::wire::{
    self, CheckpointMeta, Expect, Frame, Item, Part, StreamDecoder, WireError, DISK_BLOCK_SIZE,
    HEADER_LEN, MAGIC, MAX_PAGE_SIZE, META_LEN, VERSION,
};
use ftvm_model::{
    Epoch, Generation, NodeId, PeerMsg, Registration, RejectReason, VmId, WitnessReply,
    WitnessRequest, WitnessState,
};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const VM: VmId = VmId(0x0f7e);
const MIN_GEN: Generation = Generation(3);

fn expect() -> Expect {
    Expect {
        vm: VM,
        min_generation: MIN_GEN,
    }
}

/// The largest piece other than a page or disk block the decoder gathers: a header (36 bytes),
/// a checkpoint meta (37) or a fixed-size body with its trailer (a witness reply's 80 + 4),
/// rounded up.
const SMALL_PIECE: usize = 128;

/// Wire codes of the frame kinds.
const KIND_CODES: [u8; 8] = [1, 2, 3, 4, 5, 16, 32, 33];
const CHECKPOINT_CODE: u8 = 16;

// ---------------------------------------------------------------------------------------------
// Valid frames of every kind.

fn generation(rng: &mut StdRng, stale_ok: bool) -> Generation {
    match rng.gen_range(0..10) {
        0 if stale_ok => Generation(rng.gen_range(0..MIN_GEN.0)),
        1 => Generation(u64::MAX),
        _ => Generation(rng.gen_range(MIN_GEN.0..MIN_GEN.0 + 4)),
    }
}

fn epoch(rng: &mut StdRng) -> Epoch {
    if rng.gen_bool(0.2) {
        Epoch(rng.gen())
    } else {
        Epoch(rng.gen_range(0..1000))
    }
}

fn node(rng: &mut StdRng) -> NodeId {
    NodeId(rng.gen_range(0..6))
}

fn registration(rng: &mut StdRng) -> Registration {
    Registration {
        node: node(rng),
        since: epoch(rng),
    }
}

fn peer_msg(rng: &mut StdRng, stale_ok: bool) -> PeerMsg {
    let generation = generation(rng, stale_ok);
    match rng.gen_range(0..5) {
        0 => PeerMsg::Join {
            vm: VM,
            node: node(rng),
            ram_pages: rng.gen_range(0..1 << 20),
            page_size: 4096,
            // Exempt from the generation check: any, the unknown one included.
            known: Generation(rng.gen_range(0..6)),
            disk_blocks: if rng.gen_bool(0.5) { 0 } else { rng.gen() },
            replica: rng.gen_bool(0.5).then(|| ftvm_model::ReplicaAt {
                generation: Generation(rng.gen_range(1..6)),
                lineage: rng.gen(),
                since: epoch(rng),
                epoch: epoch(rng),
            }),
        },
        1 => PeerMsg::Reject {
            generation,
            reason: [
                RejectReason::WrongVm,
                RejectReason::RamSizeMismatch,
                RejectReason::PageSizeMismatch,
                RejectReason::HaveBackup,
                RejectReason::Busy,
                RejectReason::NotPrimary,
                RejectReason::DiskSizeMismatch,
            ][rng.gen_range(0..7)],
        },
        2 => PeerMsg::SyncStart {
            generation,
            epoch: epoch(rng),
            base: rng.gen_bool(0.5).then(|| epoch(rng)),
            lineage: rng.gen(),
            continues: rng.gen_bool(0.5),
        },
        3 => PeerMsg::Ack {
            generation,
            epoch: epoch(rng),
        },
        _ => PeerMsg::Heartbeat {
            generation,
            epoch: epoch(rng),
        },
    }
}

fn request(rng: &mut StdRng) -> WitnessRequest {
    let generation = Generation(rng.gen_range(0..8));
    match rng.gen_range(0..4) {
        0 => WitnessRequest::Query,
        1 => WitnessRequest::RegisterBackup {
            generation,
            primary: node(rng),
            backup: registration(rng),
        },
        2 => WitnessRequest::DropBackup {
            generation,
            primary: node(rng),
            backup: registration(rng),
        },
        _ => WitnessRequest::Takeover {
            generation,
            backup: registration(rng),
        },
    }
}

fn reply(rng: &mut StdRng) -> WitnessReply {
    WitnessReply {
        request: request(rng),
        granted: rng.gen(),
        state: WitnessState {
            vm: VM,
            generation: Generation(rng.gen_range(1..8)),
            primary: node(rng),
            backup: rng.gen_bool(0.5).then(|| registration(rng)),
            floor: epoch(rng),
            promoted: rng.gen_bool(0.5).then(|| registration(rng)),
        },
    }
}

fn random_bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

fn checkpoint(rng: &mut StdRng, stale_ok: bool) -> Vec<u8> {
    let page_size: u32 = match rng.gen_range(0..60) {
        0 => MAX_PAGE_SIZE,
        1..=5 => 1,
        6..=15 => 64,
        _ => 4096,
    };
    let count = if page_size == MAX_PAGE_SIZE {
        rng.gen_range(0..2)
    } else {
        rng.gen_range(0..5)
    };
    let pages: Vec<(u64, Vec<u8>)> = (0..count)
        .map(|_| {
            (
                rng.gen_range(0..1 << 16),
                random_bytes(rng, page_size as usize),
            )
        })
        .collect();
    let device_len = if rng.gen_bool(0.3) {
        0
    } else {
        rng.gen_range(1..300)
    };
    let device = random_bytes(rng, device_len);
    let blocks = if rng.gen_bool(0.5) {
        0
    } else {
        rng.gen_range(1..4)
    };
    let disk: Vec<(u64, Vec<u8>)> = (0..blocks)
        .map(|_| {
            (
                rng.gen_range(0..1 << 30),
                random_bytes(rng, DISK_BLOCK_SIZE as usize),
            )
        })
        .collect();
    let refs: Vec<(u64, &[u8])> = pages.iter().map(|(i, p)| (*i, p.as_slice())).collect();
    let disk_refs: Vec<(u64, &[u8])> = disk.iter().map(|(i, b)| (*i, b.as_slice())).collect();
    wire::encode_checkpoint_with_disk(
        VM,
        generation(rng, stale_ok),
        epoch(rng),
        rng.gen(),
        page_size,
        &refs,
        &disk_refs,
        &device,
    )
    .expect("a valid checkpoint encodes")
}

/// One valid frame of a random kind (with `stale_ok`, maybe of a generation too old for the
/// decoder, which refuses it).
fn valid_frame(rng: &mut StdRng, stale_ok: bool) -> Vec<u8> {
    match rng.gen_range(0..10) {
        0..=3 => wire::encode_peer(VM, &peer_msg(rng, stale_ok)),
        4 => wire::encode_witness_request(VM, &request(rng)),
        5 => wire::encode_witness_reply(&reply(rng)),
        _ => checkpoint(rng, stale_ok),
    }
}

/// A stream of `n` valid frames the decoder accepts, and where each frame ends.
fn valid_stream(rng: &mut StdRng, n: usize) -> (Vec<u8>, Vec<usize>) {
    let mut bytes = Vec::new();
    let mut ends = Vec::new();
    for _ in 0..n {
        bytes.extend(valid_frame(rng, false));
        ends.push(bytes.len());
    }
    (bytes, ends)
}

/// A header with a correct checksum and the given fields.
fn sealed_header(kind: u8, flags: u8, vm: VmId, generation: u64, body_len: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.push(kind);
    h.push(flags);
    h.extend_from_slice(&vm.0.to_le_bytes());
    h.extend_from_slice(&generation.to_le_bytes());
    h.extend_from_slice(&body_len.to_le_bytes());
    let crc = crc32fast::hash(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

/// Checkpoint meta bytes.
fn meta_bytes(
    epoch: u64,
    full: u8,
    page_size: u32,
    page_count: u64,
    device_len: u64,
    disk_blocks: u64,
) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&epoch.to_le_bytes());
    m.push(full);
    m.extend_from_slice(&page_size.to_le_bytes());
    m.extend_from_slice(&page_count.to_le_bytes());
    m.extend_from_slice(&device_len.to_le_bytes());
    m.extend_from_slice(&disk_blocks.to_le_bytes());
    m
}

// ---------------------------------------------------------------------------------------------
// Feeding a stream and checking what comes out.

/// What the decoder said, in a form that does not depend on how the stream was cut.
#[derive(Clone, Debug, PartialEq)]
enum Event {
    Peer(PeerMsg),
    Request(WitnessRequest),
    Reply(WitnessReply),
    Begin(Generation, CheckpointMeta),
    Page(u64, Vec<u8>),
    DiskBlock(u64, Vec<u8>),
    /// Device chunks merged (their split follows the input's).
    Device(Vec<u8>),
    End(Epoch),
}

#[derive(Debug, PartialEq)]
struct Outcome {
    events: Vec<Event>,
    /// Where each frame reported verified ends in the stream.
    frame_ends: Vec<usize>,
    /// The decoder's error, if it gave one.
    error: Option<WireError>,
    /// What `finish` said after the last input.
    finish: Result<(), WireError>,
}

/// A checkpoint being received.
struct Partial {
    generation: Generation,
    meta: CheckpointMeta,
    pages: Vec<(u64, Vec<u8>)>,
    disk: Vec<(u64, Vec<u8>)>,
    device: Vec<u8>,
}

/// The bytes of the frame that `event` closes (the canonical encoding of what was decoded).
fn encoding_of(event: &Event, partial: Option<&Partial>, ctx: &str) -> Vec<u8> {
    match event {
        Event::Peer(m) => wire::encode_peer(VM, m),
        Event::Request(r) => wire::encode_witness_request(VM, r),
        Event::Reply(r) => wire::encode_witness_reply(r),
        Event::End(epoch) => {
            let p = partial.unwrap_or_else(|| panic!("{ctx}: checkpoint end without a begin"));
            assert_eq!(*epoch, p.meta.epoch, "{ctx}: end names another epoch");
            let refs: Vec<(u64, &[u8])> = p.pages.iter().map(|(i, d)| (*i, d.as_slice())).collect();
            let disk: Vec<(u64, &[u8])> = p.disk.iter().map(|(i, d)| (*i, d.as_slice())).collect();
            wire::encode_checkpoint_with_disk(
                VM,
                p.generation,
                p.meta.epoch,
                p.meta.full,
                p.meta.page_size,
                &refs,
                &disk,
                &p.device,
            )
            .unwrap_or_else(|e| panic!("{ctx}: a verified checkpoint does not encode: {e}"))
        }
        _ => unreachable!("only verified items close a frame"),
    }
}

/// Feeds `stream` to a fresh decoder in chunks cut at `cuts` (ascending offsets), checking every
/// step, and returns what it said.
fn feed(stream: &[u8], cuts: &[usize], ctx: &str) -> Outcome {
    let mut dec = StreamDecoder::new(expect());
    let mut events: Vec<Event> = Vec::new();
    let mut frame_ends = Vec::new();
    let mut frame_start = 0usize;
    let mut partial: Option<Partial> = None;
    let mut largest_page = 0usize;
    let mut pos = 0usize;
    let mut error = None;
    let mut bounds: Vec<usize> = cuts.iter().copied().filter(|&c| c < stream.len()).collect();
    bounds.push(stream.len());
    let mut chunk_start = 0;
    'chunks: for &chunk_end in &bounds {
        let mut input = &stream[chunk_start.max(pos)..chunk_end.max(pos)];
        chunk_start = chunk_end;
        while !input.is_empty() {
            let r = dec.decode(input).map(|(used, item)| {
                let event = item.map(|it| match it {
                    Item::Peer(m) => Event::Peer(m),
                    Item::WitnessRequest(r) => Event::Request(r),
                    Item::WitnessReply(r) => Event::Reply(r),
                    Item::CheckpointBegin { generation, meta } => Event::Begin(generation, meta),
                    Item::Page { index, data } => Event::Page(index, data.to_vec()),
                    Item::DiskBlock { index, data } => Event::DiskBlock(index, data.to_vec()),
                    Item::Device { data, .. } => Event::Device(data.to_vec()),
                    Item::CheckpointEnd { epoch } => Event::End(epoch),
                });
                (used, event)
            });
            let cap = dec.buffered_capacity();
            let bound = 2 * largest_page.max(SMALL_PIECE);
            assert!(
                cap <= bound,
                "{ctx}: the decoder buffers {cap} bytes, more than twice the largest piece \
                 ({bound}) at offset {pos}"
            );
            let (used, event) = match r {
                Ok(x) => x,
                Err(e) => {
                    error = Some(e);
                    break 'chunks;
                }
            };
            assert!(used <= input.len(), "{ctx}: used more than it was given");
            assert!(
                used > 0 || event.is_some(),
                "{ctx}: no progress at offset {pos}"
            );
            pos += used;
            input = &input[used..];
            let Some(event) = event else { continue };
            match &event {
                Event::Begin(generation, meta) => {
                    assert!(
                        *generation >= MIN_GEN,
                        "{ctx}: checkpoint of stale generation {generation:?} began"
                    );
                    assert!(
                        partial.is_none(),
                        "{ctx}: a checkpoint began inside another"
                    );
                    largest_page = largest_page.max(meta.page_size as usize);
                    if meta.disk_blocks > 0 {
                        largest_page = largest_page.max(DISK_BLOCK_SIZE as usize);
                    }
                    partial = Some(Partial {
                        generation: *generation,
                        meta: *meta,
                        pages: Vec::new(),
                        disk: Vec::new(),
                        device: Vec::new(),
                    });
                }
                Event::Page(index, data) => {
                    let p = partial
                        .as_mut()
                        .unwrap_or_else(|| panic!("{ctx}: page outside a checkpoint"));
                    assert_eq!(data.len(), p.meta.page_size as usize, "{ctx}: page length");
                    assert!(
                        (p.pages.len() as u64) < p.meta.page_count,
                        "{ctx}: extra page"
                    );
                    assert!(p.disk.is_empty(), "{ctx}: a page after a disk block");
                    p.pages.push((*index, data.clone()));
                }
                Event::DiskBlock(index, data) => {
                    let p = partial
                        .as_mut()
                        .unwrap_or_else(|| panic!("{ctx}: disk block outside a checkpoint"));
                    assert_eq!(data.len(), DISK_BLOCK_SIZE as usize, "{ctx}: block length");
                    assert_eq!(
                        p.pages.len() as u64,
                        p.meta.page_count,
                        "{ctx}: a disk block before the last page"
                    );
                    assert!(
                        (p.disk.len() as u64) < p.meta.disk_blocks,
                        "{ctx}: extra disk block"
                    );
                    assert!(
                        p.device.is_empty(),
                        "{ctx}: a disk block after device state"
                    );
                    p.disk.push((*index, data.clone()));
                }
                Event::Device(data) => {
                    let p = partial
                        .as_mut()
                        .unwrap_or_else(|| panic!("{ctx}: device state outside a checkpoint"));
                    p.device.extend_from_slice(data);
                    assert!(
                        p.device.len() as u64 <= p.meta.device_len,
                        "{ctx}: extra device"
                    );
                }
                verified => {
                    // The whole frame, from where the last one ended to here, must be exactly
                    // the encoding of what was decoded: checksums held, no loose parsing.
                    let want = encoding_of(verified, partial.as_ref(), ctx);
                    assert!(
                        stream[frame_start..pos] == want[..],
                        "{ctx}: {verified:?} reported from bytes {frame_start}..{pos} that are \
                         not its encoding"
                    );
                    match verified {
                        Event::Peer(PeerMsg::Join { vm, .. }) => {
                            assert_eq!(*vm, VM, "{ctx}: join of another VM")
                        }
                        Event::Peer(m) => {
                            assert!(m.generation() >= MIN_GEN, "{ctx}: stale peer message {m:?}")
                        }
                        _ => {}
                    }
                    assert!(
                        dec.at_frame_boundary(),
                        "{ctx}: not at a boundary after a frame"
                    );
                    partial = None;
                    frame_start = pos;
                    frame_ends.push(pos);
                }
            }
            match (&event, events.last_mut()) {
                (Event::Device(more), Some(Event::Device(seen))) => seen.extend_from_slice(more),
                _ => events.push(event),
            }
        }
    }
    let finish = dec.finish();
    match &error {
        Some(e) => {
            // Dead after an error: the same error for valid input and at the end.
            assert_eq!(&finish, &Err(e.clone()), "{ctx}: finish after an error");
            let good = wire::encode_peer(
                VM,
                &PeerMsg::Heartbeat {
                    generation: MIN_GEN,
                    epoch: Epoch(1),
                },
            );
            assert_eq!(
                dec.decode(&good).map(|(n, _)| n),
                Err(e.clone()),
                "{ctx}: a decoder took input after an error"
            );
        }
        None => {
            assert_eq!(pos, stream.len(), "{ctx}: input left over without an error");
            match &finish {
                Ok(()) => assert_eq!(frame_start, pos, "{ctx}: finish ok inside a frame"),
                Err(WireError::Truncated { needed }) => {
                    assert!(frame_start < pos, "{ctx}: truncated between frames");
                    assert!(*needed > 0, "{ctx}: truncated by nothing");
                }
                Err(e) => panic!("{ctx}: finish gave {e:?} with no decode error"),
            }
        }
    }
    Outcome {
        events,
        frame_ends,
        error,
        finish,
    }
}

/// Random cut points: none, a few, or (short streams) every byte.
fn cuts(rng: &mut StdRng, len: usize) -> Vec<usize> {
    if len == 0 {
        return Vec::new();
    }
    let mut v: Vec<usize> = match rng.gen_range(0..4) {
        0 if len <= 600 => (1..len).collect(),
        0 | 1 => Vec::new(),
        _ => (0..rng.gen_range(1..12))
            .map(|_| rng.gen_range(0..len))
            .collect(),
    };
    v.sort_unstable();
    v.dedup();
    v
}

/// Decodes `stream` whole and in random chunks, checks the two agree with each other and with
/// `wire::decode`, and returns the outcome.
fn check(rng: &mut StdRng, stream: &[u8], ctx: &str) -> Outcome {
    let whole = feed(stream, &[], ctx);
    let cut_at = cuts(rng, stream.len());
    let chunked = feed(stream, &cut_at, ctx);
    assert_eq!(
        whole, chunked,
        "{ctx}: the result depends on where the stream was cut ({cut_at:?})"
    );
    match (wire::decode(stream, &expect()), whole.frame_ends.first()) {
        (Ok((frame, used)), Some(&end)) => {
            assert_eq!(used, end, "{ctx}: wire::decode's frame length");
            let again = match &frame {
                Frame::Peer(m) => wire::encode_peer(VM, m),
                Frame::WitnessRequest(r) => wire::encode_witness_request(VM, r),
                Frame::WitnessReply(r) => wire::encode_witness_reply(r),
                Frame::Checkpoint(c) => {
                    let refs: Vec<(u64, &[u8])> =
                        c.pages.iter().map(|(i, d)| (*i, d.as_slice())).collect();
                    let disk: Vec<(u64, &[u8])> =
                        c.disk.iter().map(|(i, d)| (*i, d.as_slice())).collect();
                    wire::encode_checkpoint_with_disk(
                        VM,
                        c.generation,
                        c.meta.epoch,
                        c.meta.full,
                        c.meta.page_size,
                        &refs,
                        &disk,
                        &c.device,
                    )
                    .unwrap_or_else(|e| panic!("{ctx}: decoded checkpoint does not encode: {e}"))
                }
            };
            assert!(again[..] == stream[..used], "{ctx}: wire::decode's frame");
        }
        (Ok((frame, _)), None) => {
            panic!("{ctx}: wire::decode accepted {frame:?}, the stream decoder did not")
        }
        (Err(e), Some(_)) => panic!("{ctx}: wire::decode refused a verified frame: {e}"),
        (Err(e), None) => match &whole.error {
            Some(stream_err) => assert_eq!(&e, stream_err, "{ctx}: the decoders' errors differ"),
            None => assert!(
                matches!(e, WireError::Truncated { .. }),
                "{ctx}: wire::decode gave {e:?} on a stream that only ended early"
            ),
        },
    }
    whole
}

// ---------------------------------------------------------------------------------------------
// The strategies.

/// The errors a damaged byte can cause (never a stale generation or another VM: the header
/// checksum is checked before those fields are believed).
fn damage_error(e: &WireError) -> bool {
    matches!(
        e,
        WireError::BadMagic
            | WireError::WrongVersion { .. }
            | WireError::Corrupted { .. }
            | WireError::Malformed(_)
    )
}

/// Valid frames of every kind decode, exactly, in any chunking.
fn valid(rng: &mut StdRng, ctx: &str) {
    let n = rng.gen_range(1..6);
    let (stream, ends) = valid_stream(rng, n);
    let o = check(rng, &stream, ctx);
    assert_eq!(o.error, None, "{ctx}");
    assert_eq!(
        o.frame_ends, ends,
        "{ctx}: every valid frame, and nothing else"
    );
    assert_eq!(o.finish, Ok(()), "{ctx}");
}

/// One flipped bit in frame k: the frames before it decode, frame k is refused as damaged.
fn bit_flip(rng: &mut StdRng, ctx: &str) {
    let n = rng.gen_range(1..5);
    let (mut stream, ends) = valid_stream(rng, n);
    let k = rng.gen_range(0..n);
    let start = if k == 0 { 0 } else { ends[k - 1] };
    let at = rng.gen_range(start..ends[k]);
    stream[at] ^= 1 << rng.gen_range(0..8);
    let ctx = format!("{ctx} (bit flipped at {at} in frame {k})");
    let o = check(rng, &stream, &ctx);
    assert_eq!(o.frame_ends, ends[..k], "{ctx}: frames before the flip");
    let e = o
        .error
        .unwrap_or_else(|| panic!("{ctx}: a damaged frame was not refused"));
    assert!(damage_error(&e), "{ctx}: {e:?}");
}

/// A stream cut anywhere: whole frames decode, the cut frame is `Truncated` by its missing
/// bytes (exactly, once its header is in; at most the rest of the frame before).
fn truncate(rng: &mut StdRng, ctx: &str) {
    let n = rng.gen_range(1..5);
    let (stream, ends) = valid_stream(rng, n);
    let cut = rng.gen_range(0..stream.len());
    let ctx = format!("{ctx} (cut at {cut})");
    let o = check(rng, &stream[..cut], &ctx);
    let whole: Vec<usize> = ends.iter().copied().filter(|&e| e <= cut).collect();
    assert_eq!(o.frame_ends, whole, "{ctx}: the frames before the cut");
    assert_eq!(o.error, None, "{ctx}");
    let start = whole.last().copied().unwrap_or(0);
    if start == cut {
        assert_eq!(o.finish, Ok(()), "{ctx}");
        return;
    }
    let end = ends[whole.len()];
    let Err(WireError::Truncated { needed }) = o.finish else {
        panic!("{ctx}: finish said {:?}", o.finish)
    };
    let missing = (end - cut) as u64;
    if cut - start >= HEADER_LEN {
        assert_eq!(needed, missing, "{ctx}: missing bytes");
    } else {
        assert!(
            needed >= 1 && needed <= missing,
            "{ctx}: {needed} of {missing}"
        );
    }
}

/// Valid frames, garbage, valid frames: the first ones decode, the garbage is refused
/// (`BadMagic`: it starts where a header should) and nothing after it is taken.
fn garbage_then_valid(rng: &mut StdRng, ctx: &str) {
    let before = rng.gen_range(0..3);
    let (mut stream, ends) = valid_stream(rng, before);
    let len = rng.gen_range(1..200);
    let mut garbage = random_bytes(rng, len);
    if garbage[0] == MAGIC[0] {
        garbage[0] ^= 0x80;
    }
    stream.extend(&garbage);
    let n = rng.gen_range(1..4);
    let (after, _) = valid_stream(rng, n);
    stream.extend(after);
    let o = check(rng, &stream, ctx);
    assert_eq!(
        o.frame_ends, ends,
        "{ctx}: only the frames before the garbage"
    );
    assert_eq!(o.error, Some(WireError::BadMagic), "{ctx}");
}

/// The head of one stream spliced onto the tail of another, maybe with random bytes between.
fn splice(rng: &mut StdRng, ctx: &str) {
    let (n, m) = (rng.gen_range(1..4), rng.gen_range(1..4));
    let (a, _) = valid_stream(rng, n);
    let (b, _) = valid_stream(rng, m);
    let mut stream = a[..rng.gen_range(0..=a.len())].to_vec();
    if rng.gen_bool(0.3) {
        let len = rng.gen_range(1..40);
        stream.extend(random_bytes(rng, len));
    }
    stream.extend(&b[rng.gen_range(0..b.len())..]);
    check(rng, &stream, ctx);
}

/// Headers with valid checksums claiming huge or impossible lengths: refused at the header or
/// the meta, or (a consistent checkpoint) streamed page by page without buffering more than a
/// page, and never completed.
fn huge_length(rng: &mut StdRng, ctx: &str) {
    let body_len = match rng.gen_range(0..5) {
        0 => u64::MAX,
        1 => 1 << 63,
        2 => 1 << 41,
        3 => (1 << 32) + 1,
        _ => rng.gen_range(1 << 20..1 << 40),
    };
    let kind = KIND_CODES[rng.gen_range(0..KIND_CODES.len())];
    let generation = generation(rng, false).0;
    let mut stream;
    if kind == CHECKPOINT_CODE && rng.gen_bool(0.7) {
        // A meta that agrees with the header: a checkpoint of 2^k-byte pages, many of them,
        // or (sometimes) of no pages and many disk blocks.
        let page_size = 1u32 << rng.gen_range(0..=21);
        let record = 8 + u64::from(page_size);
        let disk_record = 8 + u64::from(DISK_BLOCK_SIZE);
        let device_len = rng.gen_range(0..1000);
        // At least 8 MiB: more than the longest tail below, so it never completes.
        let (page_count, disk_blocks) = if rng.gen_bool(0.3) {
            (0, (1u64 << rng.gen_range(23..40)) / disk_record + 1)
        } else {
            (
                (1u64 << rng.gen_range(23..40)) / record + 1,
                rng.gen_range(0..3),
            )
        };
        let body = META_LEN as u64 + page_count * record + disk_blocks * disk_record + device_len;
        stream = sealed_header(kind, 0, VM, generation, body);
        stream.extend(meta_bytes(
            1,
            0,
            page_size,
            page_count,
            device_len,
            disk_blocks,
        ));
    } else {
        stream = sealed_header(kind, 0, VM, generation, body_len);
        if kind == CHECKPOINT_CODE {
            stream.extend(meta_bytes(1, 0, 4096, rng.gen(), rng.gen(), rng.gen()));
        }
    }
    let header_only = stream.len() == HEADER_LEN;
    let most = if rng.gen_bool(0.1) { 5 << 20 } else { 20_000 };
    let tail = rng.gen_range(0..most);
    stream.extend(random_bytes(rng, tail));
    let o = check(rng, &stream, ctx);
    assert!(
        o.frame_ends.is_empty(),
        "{ctx}: a frame that cannot be complete was"
    );
    if header_only {
        assert_eq!(
            o.error,
            Some(WireError::Malformed("wrong body length for kind")),
            "{ctx}"
        );
    }
    if o.error.is_none() {
        assert!(
            matches!(o.finish, Err(WireError::Truncated { needed }) if needed > 0),
            "{ctx}: {:?}",
            o.finish
        );
    }
}

/// Random bytes.
fn random(rng: &mut StdRng, ctx: &str) {
    let len = rng.gen_range(0..2000);
    let stream = random_bytes(rng, len);
    let o = check(rng, &stream, ctx);
    if len >= HEADER_LEN && stream[..4] != MAGIC {
        assert_eq!(o.error, Some(WireError::BadMagic), "{ctx}");
    }
}

/// Frames whose header and body checksums are right but whose fields are random: every kind
/// code (and unknown ones), flags, VMs, generations, lengths (mostly the kind's own), and
/// random bodies, so the field decoders see arbitrary values behind valid checksums.
fn forged(rng: &mut StdRng, ctx: &str) {
    let mut stream = Vec::new();
    let frames = rng.gen_range(1..4);
    for _ in 0..frames {
        let kind = if rng.gen_bool(0.9) {
            KIND_CODES[rng.gen_range(0..KIND_CODES.len())]
        } else {
            rng.gen()
        };
        let flags = if rng.gen_bool(0.95) { 0 } else { rng.gen() };
        let vm = if rng.gen_bool(0.9) {
            VM
        } else {
            VmId(rng.gen())
        };
        let generation = generation(rng, true).0;
        let mut body = if kind == CHECKPOINT_CODE {
            let page_size = if rng.gen_bool(0.8) { 16 } else { rng.gen() };
            let count = rng.gen_range(0..3);
            let device_len = rng.gen_range(0..40);
            let blocks = if rng.gen_bool(0.8) {
                0
            } else {
                rng.gen_range(0..2)
            };
            let mut b = meta_bytes(
                rng.gen(),
                rng.gen_range(0..3),
                page_size,
                count,
                device_len,
                blocks,
            );
            let rest = count as usize * (8 + page_size as usize % 64)
                + blocks as usize * (8 + DISK_BLOCK_SIZE as usize)
                + device_len as usize;
            b.extend(random_bytes(rng, rest));
            b
        } else {
            let len = match kind {
                1 => 24,
                2 => 1,
                3..=5 => 8,
                32 => 25,
                33 => 80,
                _ => rng.gen_range(0..100),
            };
            let mut b = random_bytes(rng, len);
            // Small values make the tags, flags and node fields decodable more often.
            for byte in b.iter_mut() {
                if rng.gen_bool(0.6) {
                    *byte = rng.gen_range(0..3);
                }
            }
            b
        };
        if rng.gen_bool(0.1) {
            body.push(rng.gen());
        }
        stream.extend(sealed_header(
            kind,
            flags,
            vm,
            generation,
            body.len() as u64,
        ));
        let crc = crc32fast::hash(&body);
        stream.extend(&body);
        stream.extend(crc.to_le_bytes());
    }
    check(rng, &stream, ctx);
}

/// A valid checkpoint with disk blocks, as the only frame or after others, damaged inside its
/// disk section (a block's index or contents): refused as `Corrupted` body, exactly as damage to
/// a page is, after handing out at most the records before the checksum; or cut inside its disk
/// section: `Truncated` by exactly the missing bytes, and never reported verified.
fn disk_damage(rng: &mut StdRng, ctx: &str) {
    let before = rng.gen_range(0..3);
    let (mut stream, ends) = valid_stream(rng, before);
    let start = stream.len();
    let page_size = 64u32;
    let pages: Vec<(u64, Vec<u8>)> = (0..rng.gen_range(0..3))
        .map(|i| (i, random_bytes(rng, page_size as usize)))
        .collect();
    let disk: Vec<(u64, Vec<u8>)> = (0..rng.gen_range(1..4))
        .map(|i| (i * 7, random_bytes(rng, DISK_BLOCK_SIZE as usize)))
        .collect();
    let device_len = rng.gen_range(0..50);
    let device = random_bytes(rng, device_len);
    let refs: Vec<(u64, &[u8])> = pages.iter().map(|(i, p)| (*i, p.as_slice())).collect();
    let disk_refs: Vec<(u64, &[u8])> = disk.iter().map(|(i, b)| (*i, b.as_slice())).collect();
    let frame = wire::encode_checkpoint_with_disk(
        VM,
        MIN_GEN,
        Epoch(5),
        false,
        page_size,
        &refs,
        &disk_refs,
        &device,
    )
    .unwrap();
    stream.extend(&frame);
    let disk_start = start + HEADER_LEN + META_LEN + pages.len() * (8 + page_size as usize);
    let disk_end = disk_start + disk.len() * (8 + DISK_BLOCK_SIZE as usize);
    let at = rng.gen_range(disk_start..disk_end);
    if rng.gen_bool(0.5) {
        stream[at] ^= 1 << rng.gen_range(0..8);
        let ctx = format!("{ctx} (disk bit flipped at {at})");
        let o = check(rng, &stream, &ctx);
        assert_eq!(o.frame_ends, ends, "{ctx}: frames before the damaged one");
        assert_eq!(
            o.error,
            Some(WireError::Corrupted { part: Part::Body }),
            "{ctx}"
        );
    } else {
        let ctx = format!("{ctx} (cut in the disk section at {at})");
        let o = check(rng, &stream[..at], &ctx);
        assert_eq!(o.frame_ends, ends, "{ctx}: frames before the cut one");
        assert_eq!(o.error, None, "{ctx}");
        assert_eq!(
            o.finish,
            Err(WireError::Truncated {
                needed: (stream.len() - at) as u64
            }),
            "{ctx}"
        );
    }
}

type Strategy = (&'static str, fn(&mut StdRng, &str));

const STRATEGIES: [Strategy; 9] = [
    ("valid", valid),
    ("bit-flip", bit_flip),
    ("truncate", truncate),
    ("garbage-then-valid", garbage_then_valid),
    ("splice", splice),
    ("huge-length", huge_length),
    ("random", random),
    ("forged", forged),
    ("disk-damage", disk_damage),
];

fn run_case(strategy: usize, seed: u64) {
    let (name, f) = STRATEGIES[strategy];
    let ctx = format!("case {name}:{seed} (replay with FTVM_FUZZ_CASE={name}:{seed})");
    f(&mut StdRng::seed_from_u64(seed), &ctx);
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

#[test]
fn decoders_survive_random_and_mutated_streams() {
    if let Ok(case) = std::env::var("FTVM_FUZZ_CASE") {
        let (name, seed) = case
            .split_once(':')
            .unwrap_or_else(|| panic!("FTVM_FUZZ_CASE={case:?}: want STRATEGY:SEED"));
        let strategy = STRATEGIES
            .iter()
            .position(|s| s.0 == name)
            .unwrap_or_else(|| panic!("no strategy {name:?}"));
        run_case(strategy, seed.parse().expect("a u64 seed"));
        return;
    }
    let secs: f64 = env_or("FTVM_FUZZ_SECS", 5.0);
    let seed: u64 = env_or("FTVM_FUZZ_SEED", 0x00f7_f022);
    eprintln!("wire_fuzz: seed {seed} (FTVM_FUZZ_SEED), {secs} s (FTVM_FUZZ_SECS)");
    let mut master = StdRng::seed_from_u64(seed);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut counts = [0u64; STRATEGIES.len()];
    let mut i = 0usize;
    // Round robin, so that every strategy runs; at least a few rounds even when time is short.
    while Instant::now() < deadline || i < 20 * STRATEGIES.len() {
        let strategy = i % STRATEGIES.len();
        run_case(strategy, master.next_u64());
        counts[strategy] += 1;
        i += 1;
    }
    let summary: Vec<String> = STRATEGIES
        .iter()
        .zip(counts)
        .map(|(s, n)| format!("{} {n}", s.0))
        .collect();
    eprintln!("wire_fuzz: {i} cases: {}", summary.join(", "));
}

/// A checkpoint claiming 2^30 pages of 2 MiB costs the decoder nothing until bytes arrive, and
/// then no more than the bytes of the page being gathered (amortised growth: under twice them).
#[test]
fn a_huge_claim_is_buffered_only_as_its_bytes_arrive() {
    let page_size = MAX_PAGE_SIZE;
    let count = 1u64 << 30;
    let body = META_LEN as u64 + count * (8 + u64::from(page_size));
    let mut head = sealed_header(CHECKPOINT_CODE, 0, VM, MIN_GEN.0, body);
    head.extend(meta_bytes(1, 0, page_size, count, 0, 0));
    let mut dec = StreamDecoder::new(expect());
    let mut input = &head[..];
    let mut began = false;
    while !input.is_empty() {
        let (used, item) = dec.decode(input).unwrap();
        began |= matches!(item, Some(Item::CheckpointBegin { .. }));
        input = &input[used..];
    }
    assert!(began);
    assert!(dec.buffered_capacity() <= SMALL_PIECE);
    let mut rng = StdRng::seed_from_u64(3);
    let chunk = random_bytes(&mut rng, 64 << 10);
    let mut fed = 0usize;
    let mut pages = 0;
    while fed < 5 << 20 {
        let mut input = &chunk[..];
        while !input.is_empty() {
            let (used, item) = dec.decode(input).unwrap();
            if matches!(item, Some(Item::Page { .. })) {
                pages += 1;
            }
            input = &input[used..];
        }
        fed += chunk.len();
        // Until the first page is complete, what is buffered follows what arrived (the
        // 8-byte record header aside); after it, the buffer keeps a page's capacity.
        if pages == 0 {
            let gathering = fed - 8;
            assert!(
                dec.buffered_capacity() <= 2 * gathering.max(SMALL_PIECE),
                "{} bytes buffered for {gathering} bytes of a page",
                dec.buffered_capacity()
            );
        }
        assert!(dec.buffered_capacity() <= 2 * page_size as usize);
    }
    assert_eq!(pages, 2, "two whole 2 MiB pages in 5 MiB");
    assert!(dec.needed() > 1 << 40);
}
