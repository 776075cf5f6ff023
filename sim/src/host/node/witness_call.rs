//! One witness request: connect, send, wait for the reply, hand it to the main loop. Each
//! request gets its own connection (a stalled stream after a partition then costs nothing);
//! the model resends on its own, so a call that fails or takes too long is simply dropped.

use std::time::Duration;

use ftvm_model::wire::{encode_witness_request, Expect, Item, StreamDecoder};
use ftvm_model::{Generation, NodeId, VmId, WitnessReply, WitnessRequest};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc::UnboundedSender;
use turmoil::net::TcpStream;

use super::event::HostEvent;
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
            w.borrow_mut().note(
                now(),
                HostId::Node(me),
                TraceKind::Note(format!("forged witness reply: {:?}", reply.state)),
            );
        }
        let _ = tx.send(HostEvent::Witness(reply));
    }
}
