//! The witness host: `ftvm_model::Witness` behind a TCP port. Requests are handled one at a
//! time (the host is single-threaded: that is the linearization point) and the register is
//! written to the simulated disk before the reply is sent, so a restart forgets no grant. The
//! run's witness disorder may lose a reply after the register changed (the sender then learns
//! the outcome from a resend).

use std::net::{IpAddr, Ipv4Addr};

use ftvm_model::wire::{encode_witness_reply, Expect, Item, StreamDecoder};
use ftvm_model::{NodeId, Witness};
use tokio::io::AsyncReadExt;
use tokio::task::spawn_local;
use turmoil::net::{TcpListener, TcpStream};

use crate::net::{write_shaped, WITNESS_PORT};
use crate::runner::HeldTokens;
use crate::scenario::VM_ID;
use crate::trace::{HostId, TraceKind};
use crate::world::{now, Shared};

pub(crate) async fn run_witness(w: Shared) -> turmoil::Result {
    let listener = TcpListener::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), WITNESS_PORT)).await?;
    loop {
        let (stream, addr) = listener.accept().await?;
        let from = turmoil::reverse_lookup(addr.ip())
            .and_then(|n| n.strip_prefix('n').and_then(|k| k.parse().ok()))
            .map_or(HostId::Runner, |k| HostId::Node(NodeId(k)));
        spawn_local(serve(w.clone(), stream, from));
    }
}

async fn serve(w: Shared, stream: TcpStream, from: HostId) {
    let (mut rd, mut wr) = stream.into_split();
    let mut dec = StreamDecoder::new(Expect::vm(VM_ID));
    let mut buf = [0u8; 512];
    loop {
        let n = match rd.read(&mut buf).await {
            Ok(n) if n > 0 => n,
            _ => return,
        };
        let mut pos = 0;
        while pos < n {
            let request = match dec.decode(&buf[pos..n]) {
                Ok((used, item)) => {
                    pos += used;
                    match item {
                        Some(Item::WitnessRequest(r)) => r,
                        None if used > 0 => continue,
                        None => break,
                        Some(_) => return, // not witness traffic: drop the connection
                    }
                }
                Err(_) => return,
            };
            let reply = {
                let mut world = w.borrow_mut();
                let witness = Witness::from_state(world.witness_disk);
                #[cfg(feature = "mutants")]
                let witness = witness.with_mutant(world.config.mutant);
                let mut witness = witness;
                let t = now();
                // The simulated network tells who sent it, as the real witness's authenticated
                // connections do; the same authorization applies.
                let reply = match from {
                    HostId::Node(node) => witness.handle_from(t, node, request),
                    _ => witness.handle(t, request),
                };
                world.witness_disk = *witness.state();
                world.obs.witness_handled(&reply);
                HeldTokens::check(&mut world, t);
                world.note(t, HostId::Witness, TraceKind::Witness(reply));
                reply
            };
            let lost = w.borrow_mut().shaper.disorder.reply_lost();
            if lost {
                w.borrow_mut().note(
                    now(),
                    HostId::Witness,
                    TraceKind::Note(format!("reply to {from}'s {:?} lost", reply.request)),
                );
                continue;
            }
            let bytes = encode_witness_reply(&reply);
            if write_shaped(&w, &mut wr, HostId::Witness, from, &bytes)
                .await
                .is_err()
            {
                return;
            }
        }
    }
}
