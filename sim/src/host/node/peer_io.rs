//! Reading a checkpoint link: the model's streaming decoder turns bytes into control
//! messages and checkpoint pieces; checkpoint pages are staged as they arrive and handed to
//! the main loop in one piece when the checksum verifies (or cut short when the stream ends or
//! the checksum fails: the contract's `CheckpointReceived { ok: false }`).

use ftvm_model::wire::{Expect, Item, StreamDecoder};
use ftvm_model::{Generation, NodeId, PeerMsg, VmId};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc::UnboundedSender;
use turmoil::net::tcp::OwnedReadHalf;

use super::event::{ConnId, HostEvent};
use crate::vm::replica::Staged;
use crate::world::now;

const READ_BUF: usize = 16 * 1024;

pub(crate) async fn read_peer(
    mut rd: OwnedReadHalf,
    conn: ConnId,
    from: NodeId,
    vm: VmId,
    tx: UnboundedSender<HostEvent>,
) {
    let mut dec = StreamDecoder::new(Expect::vm(vm));
    let mut floor = Generation::UNKNOWN;
    let mut buf = vec![0u8; READ_BUF];
    let mut cur: Option<Staged> = None;
    // `Heard` only marks life; one per millisecond is plenty.
    let mut heard_at = None;
    let send = |ev| {
        let _ = tx.send(ev);
    };
    loop {
        let n = rd.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            // EOF or reset: a checkpoint in progress is truncated.
            if let Some(cp) = cur.take() {
                send(HostEvent::CheckpointDone {
                    conn,
                    cp: Box::new(cp),
                });
            }
            return send(HostEvent::Closed { conn });
        }
        // Like the real agent, any bytes are a `Heard`, whole frames included, and it comes
        // before the frames they carry: the model must not take the bytes of a node that
        // stopped its VM (a refusal, say) for life.
        let t = now();
        if heard_at != Some(t) {
            heard_at = Some(t);
            send(HostEvent::Heard { conn });
        }
        let mut pos = 0;
        while pos < n {
            let mut new_floor = None;
            let step = match dec.decode(&buf[pos..n]) {
                Ok((used, item)) => {
                    pos += used;
                    match item {
                        None => Ok(used > 0),
                        Some(Item::Peer(msg)) => {
                            if let PeerMsg::SyncStart { generation, .. } = msg {
                                new_floor = Some(generation);
                            }
                            send(HostEvent::Peer { conn, msg });
                            Ok(true)
                        }
                        Some(Item::CheckpointBegin { generation, meta }) => {
                            let cap = usize::try_from(meta.page_count.min(1 << 12)).unwrap_or(0);
                            cur = Some(Staged {
                                from,
                                generation,
                                epoch: meta.epoch,
                                full: meta.full,
                                pages: Vec::with_capacity(cap),
                                device: Vec::new(),
                                complete: false,
                            });
                            send(HostEvent::CheckpointStarted {
                                conn,
                                epoch: meta.epoch,
                            });
                            Ok(true)
                        }
                        Some(Item::Page { index, data }) => {
                            if let Some(c) = cur.as_mut() {
                                c.pages.push((index, data.to_vec()));
                            }
                            Ok(true)
                        }
                        Some(Item::Device { data, .. }) => {
                            if let Some(c) = cur.as_mut() {
                                c.device.extend_from_slice(data);
                            }
                            Ok(true)
                        }
                        Some(Item::CheckpointEnd { .. }) => {
                            if let Some(mut cp) = cur.take() {
                                cp.complete = true;
                                send(HostEvent::CheckpointDone {
                                    conn,
                                    cp: Box::new(cp),
                                });
                            }
                            Ok(true)
                        }
                        // Witness traffic has no business on a checkpoint link.
                        Some(Item::WitnessRequest(_) | Item::WitnessReply(_)) => Err(()),
                    }
                }
                Err(_) => Err(()),
            };
            match step {
                Ok(true) => {}
                Ok(false) => break,
                Err(()) => {
                    // Damaged, foreign or stale bytes: the stream cannot be resynchronised.
                    if let Some(cp) = cur.take() {
                        send(HostEvent::CheckpointDone {
                            conn,
                            cp: Box::new(cp),
                        });
                    }
                    return send(HostEvent::Closed { conn });
                }
            }
            if let Some(g) = new_floor.filter(|g| *g > floor) {
                floor = g;
                dec.set_min_generation(g);
            }
        }
    }
}
