//! A checkpoint link: one TCP connection to a peer agent. It opens with the authentication
//! handshake ([`crate::auth::handshake`]) under a deadline; only then is it announced to the
//! event loop, bound to the node the peer proved to be, and served by two threads. The writer
//! sends control frames and checkpoints through a [`crate::transport`], each followed by its
//! tag ([`crate::auth::seal`]); the reader decodes and authenticates the byte stream
//! incrementally and stages arriving checkpoints. Both report to the agent's event loop through
//! a channel.

use std::collections::VecDeque;
use std::io::{IoSlice, Read};
use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ftvm_model::wire::{
    self, CheckpointEncoder, CheckpointMeta, CheckpointPrefix, Expect, Item, StreamDecoder,
    RECORD_HEADER_LEN, TRAILER_LEN,
};
use ftvm_model::{Epoch, Generation, NodeId, PeerMsg, VmId};
use tokio::sync::mpsc::UnboundedSender;

use crate::auth::crypt::Encryptor;
use crate::auth::handshake::{self, Purpose};
use crate::auth::{protection, FrameSealer, Identity, LinkOpener, LinkSealer, Protection};
use crate::auth::{PublicKey, TAG_LEN};

use super::accept::Admission;
use super::cow::CowCheckpoint;
use super::event::{ConnId, Event};
use super::staging::{CheckpointAssembler, Staged, StagingLimits};
use crate::dirty::GuestRam;
use crate::replica::StagedCheckpoint;
use crate::transport::{self, SendTicket, Transport, TransportKind, TransportOptions};

/// Something to send on a link.
pub enum Outgoing {
    /// A control message.
    Peer(PeerMsg),
    /// A captured checkpoint with its pages in the staging buffer; the buffer comes back in
    /// [`Event::CheckpointSent`].
    Checkpoint {
        /// Generation for the frame header.
        generation: Generation,
        /// Whether it is a full sync.
        full: bool,
        /// Pages and device state.
        staged: StagedCheckpoint,
    },
    /// A checkpoint whose pages are sent straight from guest RAM (paused-send).
    PausedSend(PausedPages),
    /// A copy-on-write checkpoint: pages sent from write-protected guest RAM while the VM runs,
    /// or from the copies its fault handler made.
    Cow(Box<CowPages>),
}

impl Outgoing {
    /// The checkpoint buffer inside, for reuse when the link refused it.
    pub fn into_staged(self) -> Option<StagedCheckpoint> {
        match self {
            Outgoing::Peer(_) => None,
            Outgoing::Checkpoint { staged, .. } => Some(staged),
            Outgoing::PausedSend(p) => Some(p.staged),
            Outgoing::Cow(c) => Some(c.staged),
        }
    }
}

/// A checkpoint of a paused VM whose pages are read from the guest RAM mapping at send time.
/// `staged` holds the page indices and the device state (its `data` is unused); it comes back
/// in [`Event::CheckpointSent`].
pub struct PausedPages {
    generation: Generation,
    full: bool,
    staged: StagedCheckpoint,
    ram: Arc<GuestRam>,
}

impl PausedPages {
    /// A checkpoint of the pages `staged.indices` of `ram`.
    ///
    /// # Safety
    /// Those pages must not change from now until the link reports this checkpoint done:
    /// [`Event::CheckpointSent`] for its epoch (the writer sends it only after the transport
    /// released every buffer), or the link is gone ([`Event::LinkClosed`], or its [`Link`]
    /// dropped, which shuts the socket down). In practice: the VM stays paused until then. A
    /// change earlier ships bytes the checkpoint's checksum does not cover, so the backup
    /// rejects the frame; this process's memory is not at risk either way (the mapping is kept
    /// alive by the `Arc`).
    pub unsafe fn new(
        generation: Generation,
        full: bool,
        staged: StagedCheckpoint,
        ram: Arc<GuestRam>,
    ) -> PausedPages {
        PausedPages {
            generation,
            full,
            staged,
            ram,
        }
    }
}

/// A copy-on-write checkpoint: `staged` holds the page indices (those of `cow`) and the device
/// state; the pages come from `cow`. Dropping it finishes the checkpoint (writes to its pages no
/// longer wait), which the writer does only after the transport released them or was dropped.
pub struct CowPages {
    generation: Generation,
    full: bool,
    staged: StagedCheckpoint,
    cow: CowCheckpoint,
}

impl CowPages {
    /// A checkpoint of the pages of `cow` (whose indices `staged.indices` must equal).
    pub fn new(
        generation: Generation,
        full: bool,
        staged: StagedCheckpoint,
        cow: CowCheckpoint,
    ) -> CowPages {
        CowPages {
            generation,
            full,
            staged,
            cow,
        }
    }
}

/// The agent's handle on a link. Dropping it closes the connection.
pub struct Link {
    tx: mpsc::Sender<Outgoing>,
    socket: TcpStream,
}

impl Link {
    /// Queues `out` for the writer thread. A closed link drops it silently: the reader reports
    /// the closure.
    pub fn send(&self, out: Outgoing) {
        let _ = self.try_send(out);
    }

    /// Queues `out` for the writer thread, or gives it back if the writer is gone (then no
    /// event will ever report on it; a [`Event::LinkClosed`] was or will be sent).
    pub fn try_send(&self, out: Outgoing) -> Result<(), Outgoing> {
        self.tx.send(out).map_err(|e| e.0)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Wakes the reader (read returns 0) and fails the writer's next send.
        let _ = self.socket.shutdown(Shutdown::Both);
    }
}

/// Which end of the handshake this host plays.
#[derive(Clone, Copy, Debug)]
pub enum Side {
    /// We dialled `peer`, whose public key is `key`.
    Dial {
        /// The node.
        peer: NodeId,
        /// Its public key.
        key: PublicKey,
    },
    /// We accepted the connection: the handshake tells who it is.
    Listen,
}

/// What every link of an agent shares.
#[derive(Clone, Debug)]
pub struct LinkSetup {
    /// The protected VM.
    pub vm: VmId,
    /// What arriving checkpoints are checked against (the VM's shape).
    pub staging: StagingLimits,
    /// How checkpoints leave this host.
    pub kind: TransportKind,
    /// This node's keys and the others' public keys.
    pub identity: Arc<Identity>,
    /// How long the handshake may take before the connection is dropped.
    pub handshake_deadline: Duration,
    /// How frames are protected after the handshake.
    pub protection: Protection,
}

/// Authenticates a connected stream (under the setup's deadline), then starts its threads.
/// Runs on a thread of its own, so a slow or silent peer holds nothing but that thread and its
/// socket. `announce` receives the link and the node it is bound to (to post them to the event
/// loop) before the reader starts, so the loop always knows a link before any of its messages
/// arrive; `refused` hears why a handshake or the thread start failed.
/// An accepted connection comes with its `admission`, which the reader holds until it ends and
/// marks established once the handshake succeeded.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    stream: TcpStream,
    conn: ConnId,
    side: Side,
    setup: LinkSetup,
    admission: Option<Admission>,
    events: UnboundedSender<Event>,
    announce: impl FnOnce(Link, NodeId) + Send + 'static,
    refused: impl FnOnce(String) + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(format!("link{}-hs", conn.0))
        .spawn(move || {
            if let Err(why) = start(stream, conn, side, setup, admission, events, announce) {
                refused(why);
            }
        })?;
    Ok(())
}

fn start(
    mut stream: TcpStream,
    conn: ConnId,
    side: Side,
    setup: LinkSetup,
    admission: Option<Admission>,
    events: UnboundedSender<Event>,
    announce: impl FnOnce(Link, NodeId),
) -> Result<(), String> {
    let io = |e: std::io::Error| e.to_string();
    stream.set_nodelay(true).map_err(io)?;
    stream
        .set_read_timeout(Some(setup.handshake_deadline))
        .map_err(io)?;
    stream
        .set_write_timeout(Some(setup.handshake_deadline))
        .map_err(io)?;
    let id = &setup.identity;
    let (vm, purpose) = (setup.vm, Purpose::Link(setup.protection));
    let (acc, peer) = match side {
        Side::Dial { peer, key } => (handshake::dial(&mut stream, id, &key, purpose, vm), peer),
        Side::Listen => {
            let acc = handshake::listen(&mut stream, id, purpose, vm);
            let peer = acc.as_ref().ok().and_then(|a| a.peer);
            (acc, peer.unwrap_or(NodeId(0)))
        }
    };
    let acc = acc.map_err(|e| e.to_string())?;
    // Authenticated: the listener's handshake deadline no longer applies.
    if let Some(a) = &admission {
        a.established();
    }
    stream.set_read_timeout(None).map_err(io)?;
    stream.set_write_timeout(None).map_err(io)?;
    let reader = stream.try_clone().map_err(io)?;
    let socket = stream.try_clone().map_err(io)?;
    let (tx, rx) = mpsc::channel();
    let ev = events.clone();
    let dec = StreamDecoder::new(Expect::vm(vm));
    let (sealer, opener) = protection::halves(setup.protection, acc, dec);
    let (ps, kind) = (setup.staging.page_size, setup.kind);
    std::thread::Builder::new()
        .name(format!("link{}-tx", conn.0))
        .spawn(move || writer(stream, conn, vm, ps, kind, sealer, rx, ev))
        .map_err(io)?;
    announce(Link { tx, socket }, peer);
    read_loop(reader, conn, opener, setup.staging, admission, events);
    Ok(())
}

/// The small buffers of a checkpoint frame that a transport may read until release. They live
/// in the writer, outside [`serve`], so they outlive the transport on every path.
struct FrameBufs {
    prefix: CheckpointPrefix,
    records: Vec<[u8; RECORD_HEADER_LEN]>,
    trailer: [u8; TRAILER_LEN],
    tag: [u8; TAG_LEN],
}

#[allow(clippy::too_many_arguments)]
fn writer(
    stream: TcpStream,
    conn: ConnId,
    vm: VmId,
    page_size: u32,
    kind: TransportKind,
    mut sealer: LinkSealer,
    rx: mpsc::Receiver<Outgoing>,
    events: UnboundedSender<Event>,
) {
    let mut bufs = FrameBufs {
        prefix: [0; std::mem::size_of::<CheckpointPrefix>()],
        records: Vec::new(),
        trailer: [0; TRAILER_LEN],
        tag: [0; TAG_LEN],
    };
    let why = match transport::open(kind, stream, TransportOptions::default()) {
        Ok(t) => serve(t, vm, page_size, &mut sealer, &rx, &events, &mut bufs),
        Err(e) => format!("transport: {e}"),
    };
    // Only now, with the transport dropped (it waits for outstanding releases), may the loop
    // treat this link's buffers as free.
    let _ = events.send(Event::LinkClosed { conn, why });
}

/// Drops the transport — waiting (bounded) for its outstanding releases — before the caller's
/// buffers go away, and returns why the link ends.
fn fail(t: Box<dyn Transport>, why: String) -> String {
    drop(t);
    why
}

/// Sends what the loop queues until the link fails or the loop drops it; returns why it ended.
fn serve(
    mut t: Box<dyn Transport>,
    vm: VmId,
    page_size: u32,
    sealer: &mut LinkSealer,
    rx: &mpsc::Receiver<Outgoing>,
    events: &UnboundedSender<Event>,
    bufs: &mut FrameBufs,
) -> String {
    while let Ok(out) = rx.recv() {
        let (generation, full, staged, ram, cow) = match out {
            Outgoing::Peer(msg) => {
                let frame = wire::encode_peer(vm, &msg);
                let sent = match sealer {
                    LinkSealer::Mac(s) => {
                        let tag = s.seal(&frame);
                        t.send_and_wait(&[IoSlice::new(&frame), IoSlice::new(&tag)])
                            .map(drop)
                            .map_err(|e| e.to_string())
                    }
                    LinkSealer::Encrypt(e) => encrypted(t.as_mut(), e, &[&frame]),
                    LinkSealer::Unprotected => t
                        .send_and_wait(&[IoSlice::new(&frame)])
                        .map(drop)
                        .map_err(|e| e.to_string()),
                };
                if let Err(e) = sent {
                    return fail(t, format!("send: {e}"));
                }
                continue;
            }
            Outgoing::Checkpoint {
                generation,
                full,
                staged,
            } => (generation, full, staged, None, None),
            Outgoing::PausedSend(p) => (p.generation, p.full, p.staged, Some(p.ram), None),
            Outgoing::Cow(c) => (c.generation, c.full, c.staged, None, Some(c.cow)),
        };
        let pages = match (&ram, &cow) {
            (Some(ram), _) => Pages::Ram(ram),
            (None, Some(cow)) => Pages::Cow(cow),
            (None, None) => Pages::Staged(&staged.data),
        };
        let started = Instant::now();
        let frame = Frame {
            vm,
            generation,
            full,
            page_size,
        };
        let sent = match sealer {
            LinkSealer::Mac(s) => {
                send_checkpoint(t.as_mut(), &frame, Some(s), &staged, pages, bufs)
            }
            LinkSealer::Unprotected => {
                send_checkpoint(t.as_mut(), &frame, None, &staged, pages, bufs)
            }
            LinkSealer::Encrypt(e) => {
                send_encrypted_checkpoint(t.as_mut(), &frame, e, &staged, pages)
            }
        };
        match sent {
            Ok(bytes) => {
                // Everything is released: the buffer may be reused and the VM may run (and
                // write the pages of a cow checkpoint without waiting).
                drop(ram);
                let cow = cow.map(CowCheckpoint::finish).unwrap_or_default();
                let _ = events.send(Event::CheckpointSent {
                    epoch: Epoch(staged.epoch),
                    bytes,
                    send_us: started.elapsed().as_micros() as u64,
                    stats: t.stats(),
                    cow,
                    staged,
                });
            }
            // `staged`, `ram` and `cow` are dropped after the transport.
            Err(e) => return fail(t, format!("checkpoint send: {e}")),
        }
    }
    "dropped by the agent".to_string()
}

/// Where a checkpoint's page contents are.
enum Pages<'a> {
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
    fn get(&self, i: usize, index: u64, ps: usize) -> Result<&[u8], String> {
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

/// The frame header fields of a checkpoint.
struct Frame {
    vm: VmId,
    generation: Generation,
    full: bool,
    page_size: u32,
}

/// Sends one checkpoint frame — prefix, page records each followed by its page, device state,
/// trailer, then the frame's tag — as a pipeline of vectored sends, then waits until the
/// transport released all of it. The tag runs over each page in the same pass as the checksum,
/// over the very bytes handed to the transport. Returns bytes sent (the tag included). On error the transport is broken and must be dropped before the page
/// memory and `bufs` are released (see [`fail`]).
fn send_checkpoint(
    t: &mut dyn Transport,
    frame: &Frame,
    sealer: Option<&mut FrameSealer>,
    staged: &StagedCheckpoint,
    pages: Pages<'_>,
    bufs: &mut FrameBufs,
) -> Result<u64, String> {
    let ps = frame.page_size as usize;
    let n = staged.indices.len();
    let meta = CheckpointMeta {
        epoch: Epoch(staged.epoch),
        full: frame.full,
        page_size: frame.page_size,
        page_count: n as u64,
        device_len: staged.device.len() as u64,
    };
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
fn encrypted(t: &mut dyn Transport, e: &mut Encryptor, pieces: &[&[u8]]) -> Result<(), String> {
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
fn send_encrypted_checkpoint(
    t: &mut dyn Transport,
    frame: &Frame,
    e: &mut Encryptor,
    staged: &StagedCheckpoint,
    pages: Pages<'_>,
) -> Result<u64, String> {
    let ps = frame.page_size as usize;
    let n = staged.indices.len();
    let meta = CheckpointMeta {
        epoch: Epoch(staged.epoch),
        full: frame.full,
        page_size: frame.page_size,
        page_count: n as u64,
        device_len: staged.device.len() as u64,
    };
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
        // The batch's pages are copied into ciphertext: the guest may write them again.
        if let Pages::Cow(cow) = &pages {
            cow.released(first..last);
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

/// Minimum spacing of `Heard` events: liveness needs no more.
const HEARD_EVERY: Duration = Duration::from_millis(5);

fn read_loop(
    mut stream: TcpStream,
    conn: ConnId,
    mut dec: LinkOpener,
    limits: StagingLimits,
    // Held until the reader ends: it frees the connection's slot under the listener's cap.
    admission: Option<Admission>,
    events: UnboundedSender<Event>,
) {
    let mut buf = vec![0u8; 1 << 20];
    let mut assembler = CheckpointAssembler::new(limits);
    let mut last_heard = Instant::now() - HEARD_EVERY;
    let why = loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => {
                break match dec.finish() {
                    Ok(()) => "closed by peer".to_string(),
                    Err(e) => format!("closed mid-frame: {e}"),
                }
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break format!("read: {e}"),
        };
        if last_heard.elapsed() >= HEARD_EVERY {
            last_heard = Instant::now();
            let _ = events.send(Event::Heard { conn });
        }
        let mut input = &buf[..n];
        let mut failed = None;
        // An encrypted stream also yields items from plaintext it already decrypted.
        while !input.is_empty() || dec.pending() {
            let (used, item) = match dec.decode(input) {
                Ok(r) => r,
                Err(e) => {
                    failed = Some(format!("bad frame: {e}"));
                    break;
                }
            };
            match item {
                None => {}
                Some(Item::Peer(msg)) => {
                    let _ = events.send(Event::Message { conn, msg });
                }
                // Witness frames have no business on a checkpoint link.
                Some(Item::WitnessRequest(_)) | Some(Item::WitnessReply(_)) => {
                    failed = Some("witness frame on a checkpoint link".to_string());
                    break;
                }
                Some(item) => match assembler.feed(item) {
                    Ok(Staged::Nothing) => {}
                    Ok(Staged::Started(epoch)) => {
                        let _ = events.send(Event::CheckpointStarted { conn, epoch });
                    }
                    Ok(Staged::Complete(epoch, staged)) => {
                        let _ = events.send(Event::CheckpointReceived {
                            conn,
                            epoch,
                            staged,
                        });
                    }
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                },
            }
            input = &input[used..];
        }
        if let Some(f) = failed {
            break f;
        }
    };
    let _ = stream.shutdown(Shutdown::Both);
    // A checkpoint cut short — bad bytes, refused by staging, or the stream ended — is
    // reported as received damaged before the link closes, as the simulator does.
    if let Some(epoch) = assembler.abort() {
        let _ = events.send(Event::CheckpointDamaged {
            conn,
            epoch,
            why: why.clone(),
        });
    }
    drop(admission);
    let _ = events.send(Event::LinkClosed { conn, why });
}
