//! The client host: each client increments random counters one request at a time, on a
//! persistent connection to the node it last reached. A refused connection or a reply that
//! does not come in time sends it to the next node with the same request (at-least-once).
//! Every reply it receives goes to the observer.

use ftvm_model::NodeId;
use tokio::io::AsyncReadExt;
use tokio::task::spawn_local;
use turmoil::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use turmoil::net::TcpStream;

use crate::net::{write_shaped, SERVICE_PORT};
use crate::rng::SimRng;
use crate::trace::{HostId, TraceKind};
use crate::vm::service::{Reply, Request, REPLY_LEN};
use crate::world::{now, Shared};

/// Random stream ids of the clients (the workload and fault jitter use others).
const CLIENT_STREAM: u64 = 1_000;

pub(crate) async fn run_clients(w: Shared) -> turmoil::Result {
    let n = w.borrow().scenario.topology.clients;
    for c in 0..n {
        spawn_local(client(w.clone(), c));
    }
    std::future::pending::<()>().await;
    Ok(())
}

struct Link {
    node: NodeId,
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
}

fn note(w: &Shared, what: TraceKind) {
    w.borrow_mut().note(now(), HostId::Clients, what);
}

async fn client(w: Shared, c: u32) {
    let (nodes, counters, spec, seed) = {
        let world = w.borrow();
        let s = &world.scenario;
        (
            s.topology.nodes,
            s.vm.counters,
            s.clients.clone(),
            world.seed,
        )
    };
    let mut rng = SimRng::derive(seed, CLIENT_STREAM + u64::from(c));
    let mut target = NodeId(1);
    let mut link: Option<Link> = None;
    let mut req = 0u64;
    loop {
        req += 1;
        let request = Request {
            client: c,
            req,
            key: rng.below(counters) as u32,
        };
        let sent = now();
        loop {
            match attempt(&w, &mut link, target, &request, spec.timeout).await {
                Ok(reply) => {
                    let t = now();
                    let mut world = w.borrow_mut();
                    world.obs.client_saw(t, target, &reply);
                    world.obs.response(sent, t.saturating_since(sent));
                    drop(world);
                    note(
                        &w,
                        TraceKind::ClientReply {
                            reply,
                            from: target,
                        },
                    );
                    break;
                }
                Err(why) => {
                    note(
                        &w,
                        TraceKind::ClientRetry {
                            client: c,
                            req,
                            node: target,
                            why,
                        },
                    );
                    link = None;
                    target = NodeId(target.0 % nodes + 1);
                    tokio::time::sleep(spec.backoff).await;
                }
            }
        }
        let jitter = rng.below(spec.think.as_micros() as u64 + 1);
        tokio::time::sleep(spec.think / 2 + std::time::Duration::from_micros(jitter / 2)).await;
    }
}

/// One try at `target`: (re)connect if needed, send, wait for this request's reply.
async fn attempt(
    w: &Shared,
    link: &mut Option<Link>,
    target: NodeId,
    request: &Request,
    timeout: std::time::Duration,
) -> Result<Reply, &'static str> {
    let go = async {
        if link.as_ref().is_none_or(|l| l.node != target) {
            let name = format!("n{}", target.0);
            let stream = TcpStream::connect((name.as_str(), SERVICE_PORT))
                .await
                .map_err(|_| "refused")?;
            let (rd, wr) = stream.into_split();
            *link = Some(Link {
                node: target,
                rd,
                wr,
            });
        }
        let l = link.as_mut().ok_or("no link")?;
        let to = HostId::Node(target);
        write_shaped(w, &mut l.wr, HostId::Clients, to, &request.encode())
            .await
            .map_err(|_| "write failed")?;
        let mut buf = [0u8; REPLY_LEN];
        loop {
            l.rd.read_exact(&mut buf).await.map_err(|_| "closed")?;
            let reply = Reply::decode(&buf).ok_or("garbled reply")?;
            if reply.req == request.req {
                return Ok(reply);
            }
            // A reply to an earlier try of an older request on this connection: still seen.
            w.borrow_mut().obs.client_saw(now(), target, &reply);
        }
    };
    tokio::time::timeout(timeout, go)
        .await
        .unwrap_or(Err("timed out"))
}
