//! Reading a checkpoint link: the bytes go to the driver's `LinkReader` (the same one the real
//! agent uses), and what it delivers goes to the main loop.

use ftvm_driver::{LinkEvent, LinkReader, StagingLimits};
use ftvm_model::wire::{Expect, StreamDecoder};
use ftvm_model::VmId;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc::UnboundedSender;
use turmoil::net::tcp::OwnedReadHalf;

use super::event::{ConnId, HostEvent};
use crate::world::now;

const READ_BUF: usize = 16 * 1024;

pub(crate) async fn read_peer(
    mut rd: OwnedReadHalf,
    conn: ConnId,
    vm: VmId,
    limits: StagingLimits,
    tx: UnboundedSender<HostEvent>,
) {
    let mut reader = LinkReader::new(StreamDecoder::new(Expect::vm(vm)), limits);
    let mut buf = vec![0u8; READ_BUF];
    let mut events: Vec<LinkEvent> = Vec::new();
    // `Heard` only marks life; one per millisecond is plenty.
    let mut heard_at = None;
    let send = |ev| {
        let _ = tx.send(ev);
    };
    loop {
        let n = rd.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        // Like the real agent, any bytes are a `Heard`, whole frames included, and it comes
        // before the frames they carry: the model must not take the bytes of a node that
        // stopped its VM (a refusal, say) for life.
        let t = now();
        if heard_at != Some(t) {
            heard_at = Some(t);
            send(HostEvent::Heard { conn });
        }
        let fed = reader.feed(&buf[..n], &mut events);
        for event in events.drain(..) {
            send(HostEvent::Link { conn, event });
        }
        if fed.is_err() {
            // Damaged, foreign or stale bytes: the stream cannot be resynchronised.
            break;
        }
    }
    // EOF, reset or a bad frame: a checkpoint in progress is reported damaged.
    if let Some(event) = reader.close() {
        send(HostEvent::Link { conn, event });
    }
    send(HostEvent::Closed { conn });
}
