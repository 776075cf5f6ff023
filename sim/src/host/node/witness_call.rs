//! One witness request: connect, send, wait for the reply, hand it to the main loop. Each
//! request gets its own connection (a stalled stream after a partition then costs nothing);
//! the model resends on its own, so a call that fails or takes too long is simply dropped.
//!
//! Because every exchange rides its own connection, the network may also deliver a request
//! twice (a stale copy over another connection, later), deliver it only late (overtaken by the
//! resends made meanwhile), and do the same to replies; the run's witness disorder
//! (`crate::net::disorder`) decides, from the seed.

use std::time::Duration;

use ftvm_model::wire::{encode_witness_request, Expect, Item, StreamDecoder};
use ftvm_model::{Generation, NodeId, VmId, WitnessReply, WitnessRequest};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::spawn_local;
use turmoil::net::TcpStream;

use super::event::HostEvent;
use crate::net::disorder::Delivery;
use crate::net::{write_shaped, WITNESS_PORT};
use crate::trace::{HostId, TraceKind};
use crate::world::{now, Shared};

pub(crate) async fn call_witness(
    w: Shared,
    me: NodeId,
    vm: VmId,
    request: WitnessRequest,
    limit: Duration,
    tx: UnboundedSender<HostEvent>,
) {
    let delivery = w.borrow_mut().shaper.disorder.delivery();
    match delivery {
        Delivery::Now => {}
        Delivery::AlsoLater(late) => {
            note(
                &w,
                me,
                format!("{request:?} will arrive again, {late:?} late"),
            );
            let copy = delayed(w.clone(), me, vm, request, late, limit, tx.clone());
            spawn_local(copy);
        }
        Delivery::OnlyLater(late) => {
            note(
                &w,
                me,
                format!("{request:?} held back {late:?} in the network"),
            );
            return delayed(w, me, vm, request, late, limit, tx).await;
        }
    }
    exchange(w, me, vm, request, limit, tx).await;
}

/// The exchange `late` from now, over a connection of its own.
async fn delayed(
    w: Shared,
    me: NodeId,
    vm: VmId,
    request: WitnessRequest,
    late: Duration,
    limit: Duration,
    tx: UnboundedSender<HostEvent>,
) {
    tokio::time::sleep(late).await;
    note(
        &w,
        me,
        format!("late delivery of {request:?} to the witness"),
    );
    exchange(w, me, vm, request, limit, tx).await;
}

async fn exchange(
    w: Shared,
    me: NodeId,
    vm: VmId,
    request: WitnessRequest,
    limit: Duration,
    tx: UnboundedSender<HostEvent>,
) {
    let call = async {
        let stream = TcpStream::connect(("witness", WITNESS_PORT)).await.ok()?;
        let (mut rd, mut wr) = stream.into_split();
        let bytes = encode_witness_request(vm, &request);
        write_shaped(&w, &mut wr, HostId::Node(me), HostId::Witness, &bytes)
            .await
            .ok()?;
        let mut dec = StreamDecoder::new(Expect::vm(vm));
        let mut buf = [0u8; 256];
        loop {
            let n = rd.read(&mut buf).await.ok().filter(|n| *n > 0)?;
            let mut pos = 0;
            while pos < n {
                let (used, item) = dec.decode(&buf[pos..n]).ok()?;
                pos += used;
                match item {
                    Some(Item::WitnessReply(r)) => return Some::<WitnessReply>(r),
                    Some(_) => return None,
                    None if used == 0 => break,
                    None => {}
                }
            }
        }
    };
    if let Ok(Some(mut reply)) = tokio::time::timeout(limit, call).await {
        let forge = w.borrow_mut().shaper.take_reply_forgery(HostId::Node(me));
        if forge {
            // A forged answer: the register one generation ahead of the witness's.
            reply.state.generation = Generation(reply.state.generation.0.saturating_add(1));
            note(&w, me, format!("forged witness reply: {:?}", reply.state));
        }
        deliver(&w, me, reply, &tx);
    }
}

/// Hand `reply` to the main loop, now, later, or both, as the disorder says.
fn deliver(w: &Shared, me: NodeId, reply: WitnessReply, tx: &UnboundedSender<HostEvent>) {
    let delivery = w.borrow_mut().shaper.disorder.delivery();
    let later = |late: Duration, what: &str| {
        note(
            w,
            me,
            format!("reply to {:?} {what} {late:?} late", reply.request),
        );
        let (w, tx) = (w.clone(), tx.clone());
        spawn_local(async move {
            tokio::time::sleep(late).await;
            note(&w, me, format!("late reply to {:?}", reply.request));
            let _ = tx.send(HostEvent::Witness(reply));
        });
    };
    match delivery {
        Delivery::Now => {
            let _ = tx.send(HostEvent::Witness(reply));
        }
        Delivery::AlsoLater(late) => {
            let _ = tx.send(HostEvent::Witness(reply));
            later(late, "arrives again");
        }
        Delivery::OnlyLater(late) => later(late, "held back"),
    }
}

fn note(w: &Shared, me: NodeId, what: String) {
    w.borrow_mut()
        .note(now(), HostId::Node(me), TraceKind::Note(what));
}
