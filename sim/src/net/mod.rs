//! Simulated sockets: well-known ports, and the shaped writer every host uses so bandwidth,
//! loss, corruption and forgery faults apply to all traffic alike.

pub(crate) mod disorder;
pub(crate) mod shaper;

use std::time::Duration;

use ftvm_model::{Epoch, NodeId};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc::UnboundedReceiver;
use turmoil::net::tcp::OwnedWriteHalf;

use crate::trace::{HostId, TraceKind};
use crate::world::{now, Shared};

/// Checkpoint links (nodes listen, backups/joiners connect).
pub(crate) const PEER_PORT: u16 = 7000;
/// The witness.
pub(crate) const WITNESS_PORT: u16 = 7100;
/// The VM's counter service on every node host (answered only where the VM runs).
pub(crate) const SERVICE_PORT: u16 = 8000;

/// Something to write on a connection, in order.
pub(crate) enum Job {
    /// Plain bytes (frames).
    Bytes(Vec<u8>),
    /// A whole checkpoint frame; its end is reported as [`WriterNote::Sent`].
    Checkpoint { epoch: Epoch, bytes: Vec<u8> },
}

/// What a writer reports back.
pub(crate) enum WriterNote {
    /// The checkpoint's last byte went to the socket.
    Sent(Epoch),
    /// A write failed: the connection is gone.
    Failed,
}

/// Publishes a node's checkpoint progress for as long as it lives (so a writer cancelled
/// mid-checkpoint by a crash or a disconnect does not leave it behind).
struct Sending {
    w: Shared,
    node: NodeId,
}

impl Sending {
    fn start(w: &Shared, from: HostId, total: usize) -> Option<Sending> {
        let HostId::Node(node) = from else {
            return None;
        };
        w.borrow_mut().sending.insert(node, (0, total as u64));
        Some(Sending { w: w.clone(), node })
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        if let Ok(mut world) = self.w.try_borrow_mut() {
            world.sending.remove(&self.node);
        }
    }
}

/// Write `bytes` in segments of at most `chunk` bytes, each when the shaper lets it go.
pub(crate) async fn write_shaped(
    w: &Shared,
    wr: &mut OwnedWriteHalf,
    from: HostId,
    to: HostId,
    bytes: &[u8],
) -> std::io::Result<()> {
    let chunk = w.borrow().shaper.chunk;
    for c in bytes.chunks(chunk) {
        let t = now();
        let at = {
            let mut world = w.borrow_mut();
            world.bytes_sent += c.len() as u64;
            world.shaper.plan(from, to, t, c.len())
        };
        // Sub-millisecond waits are below the simulation's timer resolution; the shaper still
        // counts them, so a busy link falls behind and waits in whole milliseconds.
        let wait = at.saturating_since(t);
        if wait >= Duration::from_millis(1) {
            tokio::time::sleep(wait).await;
        }
        wr.write_all(c).await?;
        if let HostId::Node(n) = from {
            if let Some(p) = w.borrow_mut().sending.get_mut(&n) {
                p.0 += c.len() as u64;
            }
        }
    }
    Ok(())
}

/// Drain `rx` onto the connection until it closes or a write fails.
pub(crate) async fn write_loop(
    w: Shared,
    mut wr: OwnedWriteHalf,
    mut rx: UnboundedReceiver<Job>,
    from: HostId,
    to: HostId,
    mut note: impl FnMut(WriterNote),
) {
    while let Some(job) = rx.recv().await {
        // A forged frame armed on this link goes out first, at a frame boundary.
        let forged = w.borrow_mut().shaper.take_forgery(from, to);
        if let Some(frame) = forged {
            w.borrow_mut().note(
                now(),
                from,
                TraceKind::Note(format!("forged frame slipped in ahead, {from} -> {to}")),
            );
            if write_shaped(&w, &mut wr, from, to, &frame).await.is_err() {
                note(WriterNote::Failed);
                return;
            }
        }
        let (bytes, epoch) = match job {
            Job::Bytes(b) => (b, None),
            Job::Checkpoint { epoch, bytes } => (bytes, Some(epoch)),
        };
        let sending = epoch.and_then(|_| Sending::start(&w, from, bytes.len()));
        if write_shaped(&w, &mut wr, from, to, &bytes).await.is_err() {
            note(WriterNote::Failed);
            return;
        }
        drop(sending);
        if let Some(e) = epoch {
            note(WriterNote::Sent(e));
        }
    }
}
