//! A checkpoint link: one TCP connection to a peer agent, served by two threads. The writer
//! sends control frames and checkpoints through a [`crate::transport`]; the reader decodes the
//! byte stream incrementally (`ftvm_model::wire::StreamDecoder`) and stages arriving checkpoints.
//! Both report to the agent's event loop through a channel.

use std::io::{IoSlice, Read};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ftvm_model::wire::{self, CheckpointEncoder, CheckpointMeta, Expect, Item, StreamDecoder};
use ftvm_model::{Epoch, Generation, PeerMsg, VmId};
use tokio::sync::mpsc::UnboundedSender;

use super::event::{ConnId, Event};
use crate::replica::StagedCheckpoint;
use crate::transport::{self, TransportKind, TransportOptions};

/// Something to send on a link.
pub enum Outgoing {
    /// A control message.
    Peer(PeerMsg),
    /// A captured checkpoint; the buffer comes back in [`Event::CheckpointSent`].
    Checkpoint {
        /// Generation for the frame header.
        generation: Generation,
        /// Whether it is a full sync.
        full: bool,
        /// Pages and device state.
        staged: StagedCheckpoint,
    },
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
        let _ = self.tx.send(out);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Wakes the reader (read returns 0) and fails the writer's next send.
        let _ = self.socket.shutdown(Shutdown::Both);
    }
}

/// Starts the threads of a connected stream. `announce` receives the link (to post it to the
/// event loop) before the reader starts, so the loop always knows a link before any of its
/// messages arrive.
pub fn spawn(
    stream: TcpStream,
    conn: ConnId,
    vm: VmId,
    page_size: u32,
    kind: TransportKind,
    events: UnboundedSender<Event>,
    announce: impl FnOnce(Link),
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let reader = stream.try_clone()?;
    let socket = stream.try_clone()?;
    let (tx, rx) = mpsc::channel();
    let ev = events.clone();
    std::thread::Builder::new()
        .name(format!("link{}-tx", conn.0))
        .spawn(move || writer(stream, conn, vm, page_size, kind, rx, ev))?;
    announce(Link { tx, socket });
    std::thread::Builder::new()
        .name(format!("link{}-rx", conn.0))
        .spawn(move || read_loop(reader, conn, vm, events))?;
    Ok(())
}

fn writer(
    stream: TcpStream,
    conn: ConnId,
    vm: VmId,
    page_size: u32,
    kind: TransportKind,
    rx: mpsc::Receiver<Outgoing>,
    events: UnboundedSender<Event>,
) {
    let closed = |why: String| {
        let _ = events.send(Event::LinkClosed { conn, why });
    };
    let mut t = match transport::open(kind, stream, TransportOptions::default()) {
        Ok(t) => t,
        Err(e) => return closed(format!("transport: {e}")),
    };
    while let Ok(out) = rx.recv() {
        match out {
            Outgoing::Peer(msg) => {
                let frame = wire::encode_peer(vm, &msg);
                if let Err(e) = t.send_and_wait(&[IoSlice::new(&frame)]) {
                    return closed(format!("send: {e}"));
                }
            }
            Outgoing::Checkpoint {
                generation,
                full,
                staged,
            } => {
                let started = Instant::now();
                match send_checkpoint(t.as_mut(), vm, generation, full, page_size, &staged) {
                    Ok(bytes) => {
                        let _ = events.send(Event::CheckpointSent {
                            epoch: Epoch(staged.epoch),
                            bytes,
                            send_us: started.elapsed().as_micros() as u64,
                            stats: t.stats(),
                            staged,
                        });
                    }
                    Err(e) => return closed(format!("checkpoint send: {e}")),
                }
            }
        }
    }
}

/// Sends one checkpoint frame: prefix, page records pointing into the staging buffer, device
/// state, trailer — as few vectored calls as the transport allows. Returns bytes sent.
fn send_checkpoint(
    t: &mut dyn transport::Transport,
    vm: VmId,
    generation: Generation,
    full: bool,
    page_size: u32,
    staged: &StagedCheckpoint,
) -> Result<u64, String> {
    let ps = page_size as usize;
    let meta = CheckpointMeta {
        epoch: Epoch(staged.epoch),
        full,
        page_size,
        page_count: staged.indices.len() as u64,
        device_len: staged.device.len() as u64,
    };
    let bytes = meta.frame_len().ok_or("checkpoint too large")?;
    let (mut enc, prefix) =
        CheckpointEncoder::new(vm, generation, meta).map_err(|e| e.to_string())?;
    t.send_and_wait(&[IoSlice::new(&prefix)])
        .map_err(|e| e.to_string())?;
    // Pages go out in batches as the checksum runs over them, so bytes start flowing at once
    // (the receiver counts them as signs of life) instead of after a pass over every page.
    let mut records = Vec::with_capacity(PAGES_PER_BATCH);
    for (b, batch) in staged.indices.chunks(PAGES_PER_BATCH).enumerate() {
        records.clear();
        let first = b * PAGES_PER_BATCH;
        for (i, &index) in batch.iter().enumerate() {
            let page = page_at(staged, first + i, ps)?;
            records.push(enc.page(index, page).map_err(|e| e.to_string())?);
        }
        let mut segs = Vec::with_capacity(2 * batch.len());
        for (i, rec) in records.iter().enumerate() {
            segs.push(IoSlice::new(rec));
            segs.push(IoSlice::new(page_at(staged, first + i, ps)?));
        }
        t.send_and_wait(&segs).map_err(|e| e.to_string())?;
    }
    enc.device(&staged.device).map_err(|e| e.to_string())?;
    let trailer = enc.finish().map_err(|e| e.to_string())?;
    t.send_and_wait(&[IoSlice::new(&staged.device), IoSlice::new(&trailer)])
        .map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// Pages per vectored send of a checkpoint (2 iovecs each, within IOV_MAX).
const PAGES_PER_BATCH: usize = 256;

fn page_at(staged: &StagedCheckpoint, i: usize, ps: usize) -> Result<&[u8], String> {
    staged
        .data
        .get(i * ps..(i + 1) * ps)
        .ok_or_else(|| "staged page data shorter than its index list".to_string())
}

/// Minimum spacing of `Heard` events: liveness needs no more.
const HEARD_EVERY: Duration = Duration::from_millis(5);

fn read_loop(mut stream: TcpStream, conn: ConnId, vm: VmId, events: UnboundedSender<Event>) {
    let mut dec = StreamDecoder::new(Expect::vm(vm));
    let mut buf = vec![0u8; 1 << 20];
    let mut staged: Option<StagedCheckpoint> = None;
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
        while !input.is_empty() {
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
                Some(Item::CheckpointBegin { generation, meta }) => {
                    let _ = events.send(Event::CheckpointStarted {
                        conn,
                        epoch: meta.epoch,
                    });
                    let cap = meta.page_count.min(1 << 20) as usize;
                    staged = Some(StagedCheckpoint {
                        generation: generation.0,
                        epoch: meta.epoch.0,
                        indices: Vec::with_capacity(cap),
                        data: Vec::with_capacity(cap * meta.page_size as usize),
                        device: Vec::with_capacity(meta.device_len.min(1 << 24) as usize),
                    });
                }
                Some(Item::Page { index, data }) => {
                    if let Some(s) = staged.as_mut() {
                        s.indices.push(index);
                        s.data.extend_from_slice(data);
                    }
                }
                Some(Item::Device { data, .. }) => {
                    if let Some(s) = staged.as_mut() {
                        s.device.extend_from_slice(data);
                    }
                }
                Some(Item::CheckpointEnd { epoch }) => {
                    if let Some(s) = staged.take() {
                        let _ = events.send(Event::CheckpointReceived {
                            conn,
                            epoch,
                            staged: s,
                        });
                    }
                }
                // Witness frames have no business on a checkpoint link.
                Some(Item::WitnessRequest(_)) | Some(Item::WitnessReply(_)) => {
                    failed = Some("witness frame on a checkpoint link".to_string());
                    break;
                }
            }
            input = &input[used..];
        }
        if let Some(f) = failed {
            break f;
        }
    };
    let _ = stream.shutdown(Shutdown::Both);
    let _ = events.send(Event::LinkClosed { conn, why });
}
