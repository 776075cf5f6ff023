//! The witness (fencing party) as a TCP service, and the agents' client of it. The decisions are
//! `ftvm_model::Witness`'s; this file only persists its register before every reply (a restarted
//! witness must not forget a grant; see `witness_store`) and moves frames.

use std::net::SocketAddr;
use std::time::Duration;

use ftvm_model::wire::{self, Expect, Item, StreamDecoder};
use ftvm_model::{Time, VmId, Witness, WitnessReply, WitnessRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

use super::witness_store::{StoreError, WitnessStore};

/// Errors of the witness service.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    /// The state file could not be read or written.
    #[error(transparent)]
    State(#[from] StoreError),
    /// The listening socket failed.
    #[error("witness listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// A request failed (client side).
    #[error("witness at {addr}: {detail}")]
    Request {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        detail: String,
    },
}

/// Serves the witness of `vm` on `addr` until the task is dropped.
pub async fn serve(
    addr: SocketAddr,
    store: WitnessStore,
    witness: Witness,
    log: bool,
) -> Result<(), WitnessError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| WitnessError::Listen { addr, source })?;
    let vm = witness.state().vm;
    let shared = std::sync::Arc::new(Mutex::new(witness));
    let origin = std::time::Instant::now();
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        let store = store.clone();
        tokio::spawn(async move {
            let mut dec = StreamDecoder::new(Expect::vm(vm));
            let mut buf = vec![0u8; 4096];
            loop {
                let n = match sock.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut input = &buf[..n];
                while !input.is_empty() {
                    let Ok((used, item)) = dec.decode(input) else {
                        return;
                    };
                    if let Some(Item::WitnessRequest(req)) = item {
                        let mut w = shared.lock().await;
                        let now = Time::from_duration(origin.elapsed());
                        let reply = w.handle(now, req);
                        // Persist before answering: a grant the caller acts on must survive us.
                        if let Err(e) = store.save(w.state()) {
                            eprintln!("witness: {e}; not answering");
                            return;
                        }
                        drop(w);
                        if log {
                            eprintln!(
                                "witness: {:?} -> {} (generation {}, primary {}, backup {:?})",
                                req,
                                if reply.granted { "granted" } else { "denied" },
                                reply.state.generation,
                                reply.state.primary,
                                reply.state.backup.map(|b| b.node)
                            );
                        }
                        if sock
                            .write_all(&wire::encode_witness_reply(&reply))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    input = &input[used..];
                }
            }
        });
    }
}

/// Sends one request to the witness and waits for its reply.
pub async fn request(
    addr: SocketAddr,
    vm: VmId,
    req: WitnessRequest,
    timeout: Duration,
) -> Result<WitnessReply, WitnessError> {
    let fail = |detail: String| WitnessError::Request { addr, detail };
    let exchange = async {
        let mut sock = TcpStream::connect(addr)
            .await
            .map_err(|e| fail(format!("connect: {e}")))?;
        sock.write_all(&wire::encode_witness_request(vm, &req))
            .await
            .map_err(|e| fail(format!("send: {e}")))?;
        let mut dec = StreamDecoder::new(Expect::vm(vm));
        let mut buf = vec![0u8; 4096];
        loop {
            let n = sock
                .read(&mut buf)
                .await
                .map_err(|e| fail(format!("read: {e}")))?;
            if n == 0 {
                return Err(fail("closed without a reply".into()));
            }
            let mut input = &buf[..n];
            while !input.is_empty() {
                let (used, item) = dec.decode(input).map_err(|e| fail(e.to_string()))?;
                if let Some(Item::WitnessReply(r)) = item {
                    return Ok(r);
                }
                input = &input[used..];
            }
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| fail(format!("no reply within {timeout:?}")))?
}
