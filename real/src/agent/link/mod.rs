//! A checkpoint link: one TCP connection to a peer agent. It opens with the authentication
//! handshake ([`crate::auth::handshake`]) under a deadline; only then is it announced to the
//! event loop, bound to the node the peer proved to be, and served by two threads. The writer
//! sends control frames and checkpoints through a [`crate::transport`], each followed by its
//! tag ([`crate::auth::seal`]); the reader decodes and authenticates the byte stream
//! incrementally and stages arriving checkpoints. Both report to the agent's event loop through
//! a channel. [`frames`] builds and sends checkpoint frames; [`read`] is the reader.

// Values here come off the wire (or go onto it): a cast that drops bits must be a checked
// conversion, or say why it cannot lose anything.
#![warn(clippy::cast_possible_truncation)]

mod frames;
mod progress;
mod read;
pub mod socket_buffer;

pub use progress::{SyncProgress, SyncReport};

use std::io::IoSlice;
use std::net::{Shutdown, TcpStream};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ftvm_model::wire::{
    self, CheckpointPrefix, Expect, StreamDecoder, RECORD_HEADER_LEN, TRAILER_LEN,
};
use ftvm_model::{Epoch, Generation, NodeId, PeerMsg, VmId};
use tokio::sync::mpsc::UnboundedSender;

use crate::auth::handshake::{self, Purpose};
use crate::auth::{protection, Identity, LinkSealer, Protection, PublicKey, TAG_LEN};

use super::accept::Admission;
use super::cow::CowCheckpoint;
use super::event::{ConnId, Event};
use super::staging::StagingLimits;
use crate::dirty::GuestRam;
use crate::replica::{JournalSpool, StagedCheckpoint};
use crate::transport::{self, Transport, TransportKind, TransportOptions};
use frames::{encrypted, send_checkpoint, send_encrypted_checkpoint, DiskBlocks, Frame, Pages};
use read::read_loop;

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
        /// Whether it starts a backup's stream (a full sync or a catch-up): its send's progress
        /// is reported ([`SyncProgress`]).
        sync: bool,
        /// Pages and device state.
        staged: StagedCheckpoint,
        /// A full checkpoint's disk blocks, read from a snapshot as they are sent (None: they
        /// are in `staged`).
        disk: Option<DiskSync>,
    },
    /// A checkpoint whose pages are sent straight from guest RAM (paused-send).
    PausedSend(Box<PausedPages>),
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
    /// See [`Outgoing::Checkpoint`].
    pub disk: Option<DiskSync>,
    /// See [`Outgoing::Checkpoint`].
    pub sync: bool,
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
            disk: None,
            sync: false,
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
    /// See [`Outgoing::Checkpoint`].
    pub disk: Option<DiskSync>,
    /// See [`Outgoing::Checkpoint`].
    pub sync: bool,
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
            disk: None,
            sync: false,
        }
    }
}

/// A sync checkpoint's disk part (full or catch-up), read from the VM's disk as it goes out: the snapshot keeps
/// what the guest overwrites meanwhile (`crate::disk::DiskSnapshot`). Its blocks are the
/// checkpoint's `disk_indices`.
pub struct DiskSync {
    /// The blocks and the old contents of those overwritten since the capture.
    pub snapshot: Arc<crate::disk::DiskSnapshot>,
    /// Reads them from the disk image.
    pub reader: crate::disk::SnapshotReader,
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
    // The error is the value itself, handed back for reuse, and moves only on the rare refusal.
    // (`StagedCheckpoint` grew two disk vectors; whether to box `Outgoing::Checkpoint`
    // instead is the agent's call.)
    #[allow(clippy::result_large_err)]
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
    /// Where the reader writes each arriving checkpoint's replica journal as its pages come
    /// (none: the commit writes it whole).
    pub spool: Option<Arc<JournalSpool>>,
    /// Where the writer reports how far a full checkpoint (a sync) has got.
    pub progress: Arc<SyncProgress>,
    /// Cap on each of the socket's kernel buffers, in bytes (`None`: the kernel's autotuning;
    /// see [`socket_buffer`] for why there is one).
    pub socket_buffer: Option<usize>,
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
    socket_buffer::cap(&stream, setup.socket_buffer)
        .map_err(|e| format!("capping the socket buffers: {e}"))?;
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
    let progress = setup.progress.clone();
    std::thread::Builder::new()
        .name(format!("link{}-tx", conn.0))
        .spawn(move || writer(stream, conn, vm, ps, kind, sealer, rx, ev, progress))
        .map_err(io)?;
    announce(Link { tx, socket }, peer);
    let stage = setup.spool.as_ref().map(|s| s.writer());
    read_loop(
        reader,
        conn,
        opener,
        setup.staging,
        stage,
        admission,
        events,
    );
    Ok(())
}

/// The small buffers of a checkpoint frame that a transport may read until release. They live
/// in the writer, outside [`serve`], so they outlive the transport on every path.
struct FrameBufs {
    prefix: CheckpointPrefix,
    records: Vec<[u8; RECORD_HEADER_LEN]>,
    /// Record headers of the disk blocks, like `records` for pages.
    disk_records: Vec<[u8; RECORD_HEADER_LEN]>,
    /// A batch of disk blocks read from a snapshot, until the transport released it.
    disk_batch: Vec<u8>,
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
    progress: Arc<SyncProgress>,
) {
    let mut bufs = FrameBufs {
        prefix: [0; std::mem::size_of::<CheckpointPrefix>()],
        records: Vec::new(),
        disk_records: Vec::new(),
        disk_batch: Vec::new(),
        trailer: [0; TRAILER_LEN],
        tag: [0; TAG_LEN],
    };
    let why = match transport::open(kind, stream, TransportOptions::default()) {
        Ok(t) => serve(
            t,
            vm,
            page_size,
            &mut sealer,
            &rx,
            &events,
            &mut bufs,
            &progress,
        ),
        Err(e) => {
            tracing::warn!(conn = conn.0, %kind, error = %e, "checkpoint transport unavailable");
            format!("transport: {e}")
        }
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
#[allow(clippy::too_many_arguments)]
fn serve(
    mut t: Box<dyn Transport>,
    vm: VmId,
    page_size: u32,
    sealer: &mut LinkSealer,
    rx: &mpsc::Receiver<Outgoing>,
    events: &UnboundedSender<Event>,
    bufs: &mut FrameBufs,
    progress: &SyncProgress,
) -> String {
    while let Ok(out) = rx.recv() {
        let (generation, full, sync, staged, ram, cow, disk) = match out {
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
                sync,
                staged,
                disk,
            } => (generation, full, sync, staged, None, None, disk),
            Outgoing::PausedSend(p) => {
                let p = *p;
                let sync = p.sync;
                (
                    p.generation,
                    p.full,
                    sync,
                    p.staged,
                    Some(p.ram),
                    None,
                    p.disk,
                )
            }
            Outgoing::Cow(c) => {
                let c = *c;
                let sync = c.sync;
                (
                    c.generation,
                    c.full,
                    sync,
                    c.staged,
                    None,
                    Some(c.cow),
                    c.disk,
                )
            }
        };
        let disk = match &disk {
            Some(d) => DiskBlocks::Snapshot(d),
            None => DiskBlocks::Staged(&staged.disk_data),
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
        let watch = (full || sync).then_some(progress);
        if let (Some(p), Some(total)) = (watch, frame.meta(&staged).frame_len()) {
            p.begin(total);
        }
        let sent = match sealer {
            LinkSealer::Mac(s) => send_checkpoint(
                t.as_mut(),
                &frame,
                Some(s),
                &staged,
                pages,
                disk,
                bufs,
                watch,
            ),
            LinkSealer::Unprotected => {
                send_checkpoint(t.as_mut(), &frame, None, &staged, pages, disk, bufs, watch)
            }
            LinkSealer::Encrypt(e) => {
                send_encrypted_checkpoint(t.as_mut(), &frame, e, &staged, pages, disk, watch)
            }
        };
        if let Some(p) = watch {
            p.end();
        }
        match sent {
            Ok(bytes) => {
                // Everything is released: the buffer may be reused and the VM may run (and
                // write the pages of a cow checkpoint without waiting).
                drop(ram);
                let cow = cow.map(CowCheckpoint::finish).unwrap_or_default();
                let _ = events.send(Event::CheckpointSent {
                    epoch: Epoch(staged.epoch),
                    bytes,
                    send_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                    stats: t.stats(),
                    cow,
                    staged,
                });
            }
            Err(e) => {
                // The transport goes first: it may still hold zero-copy references to the
                // pages. Then the buffer goes back to the loop, which would otherwise fault a
                // fresh RAM-sized one in at its next capture (0.4 s per GiB, VM paused).
                let why = fail(t, format!("checkpoint send: {e}"));
                drop(ram);
                drop(cow);
                let _ = events.send(Event::BufferBack { staged });
                return why;
            }
        }
    }
    "dropped by the agent".to_string()
}
