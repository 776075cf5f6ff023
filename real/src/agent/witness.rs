//! The witness (fencing party) as a TCP service, and the agents' client of it. The decisions are
//! `ftvm_model::Witness`'s; this file authenticates each connection (the Noise handshake of
//! [`crate::auth`]: only configured nodes get in, and each request is checked against the node
//! that sent it), persists the register before every reply (a restarted witness must not forget
//! a grant; see `witness_store`) and moves frames. Requests and replies travel as Noise transport messages, so an
//! agent acts only on its own witness's answer to its own request.

use std::net::SocketAddr;
use std::time::Duration;

use std::sync::Arc;

use ftvm_model::wire::{self, Frame};
use ftvm_model::{Time, VmId, Witness, WitnessReply, WitnessRequest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Semaphore};

use crate::auth::handshake::{self, Purpose};
use crate::auth::{AuthError, Identity};
use crate::journal_file::{clock_us, JournalWriter};
use ftvm_driver::journal::WitnessEntry;

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
    /// The witness's authentication failed (client side): wrong key, or not configured there.
    #[error("witness at {addr}: authentication failed: {source}")]
    Auth {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: AuthError,
    },
    /// The witness has no public key configured (client side).
    #[error("no public key for the witness in the key directory")]
    NoWitnessKey,
    /// A request failed (client side).
    #[error("witness at {addr}: {detail}")]
    Request {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        detail: String,
    },
}

/// Limits of the witness service: a hostile client can hold at most these.
#[derive(Clone, Copy, Debug)]
pub struct ServeLimits {
    /// Connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Time a connection has to authenticate and send its request.
    pub deadline: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_connections: 64,
            deadline: Duration::from_secs(2),
        }
    }
}

/// Serves the witness of `vm` on `addr` until the task is dropped.
pub async fn serve(
    addr: SocketAddr,
    store: WitnessStore,
    witness: Witness,
    identity: Arc<Identity>,
    limits: ServeLimits,
    log: bool,
) -> Result<(), WitnessError> {
    serve_journaled(addr, store, witness, identity, limits, log, None).await
}

/// The witness and the journal of its decisions, under one lock: journal lines are in the
/// order the decisions were made.
struct Decider {
    witness: Witness,
    journal: Option<JournalWriter>,
}

/// As [`serve`], and with `journal` every decision is appended to it (a
/// [`WitnessEntry`] line, written before the reply is sent) for checking the run afterwards.
pub async fn serve_journaled(
    addr: SocketAddr,
    store: WitnessStore,
    witness: Witness,
    identity: Arc<Identity>,
    limits: ServeLimits,
    log: bool,
    journal: Option<JournalWriter>,
) -> Result<(), WitnessError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| WitnessError::Listen { addr, source })?;
    let vm = witness.state().vm;
    let shared = Arc::new(Mutex::new(Decider { witness, journal }));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let origin = std::time::Instant::now();
    let mut backoff = Duration::ZERO;
    loop {
        // A slot first: beyond the cap, connections wait in the backlog instead of each getting
        // a task.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let (sock, from) = match listener.accept().await {
            Ok(a) => {
                backoff = Duration::ZERO;
                a
            }
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                tracing::warn!(error = %e, ?backoff, "witness: accept failed; retrying");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        let (shared, store, identity) = (shared.clone(), store.clone(), identity.clone());
        tokio::spawn(async move {
            let served = tokio::time::timeout(
                limits.deadline,
                serve_one(sock, vm, &identity, &shared, &store, origin, log),
            )
            .await;
            match served {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(peer = %from, error = %e, "witness: connection failed")
                }
                Err(_) => tracing::warn!(
                    peer = %from,
                    deadline = ?limits.deadline,
                    "witness: connection closed: no request in time"
                ),
            }
            drop(slot);
        });
    }
}

/// Why one connection to the witness ended early.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("refused: {0}")]
    Auth(#[from] AuthError),
    #[error("not a witness request")]
    NotARequest,
    #[error("not answering: {0}")]
    Persist(#[from] WitnessError),
}

/// Authenticates one connection and answers its one request.
async fn serve_one(
    mut sock: TcpStream,
    vm: VmId,
    identity: &Identity,
    shared: &Mutex<Decider>,
    store: &WitnessStore,
    origin: std::time::Instant,
    log: bool,
) -> Result<(), ServeError> {
    let mut acc = handshake::listen_async(&mut sock, identity, Purpose::Witness, vm).await?;
    let from = acc.peer.ok_or(AuthError::UnknownKey)?;
    let body = handshake::recv_sealed(&mut sock, &mut acc.rx).await?;
    let req = match wire::decode(&body, &wire::Expect::vm(vm)) {
        Ok((Frame::WitnessRequest(req), used)) if used == body.len() => req,
        _ => return Err(ServeError::NotARequest),
    };
    let reply = {
        let mut d = shared.lock().await;
        let now = Time::from_duration(origin.elapsed());
        let reply = d.witness.handle_from(now, from, req);
        // Persist before answering: a grant the caller acts on must survive us.
        store.save(d.witness.state()).map_err(WitnessError::from)?;
        if let Some(journal) = d.journal.as_mut() {
            let line = WitnessEntry {
                wall_us: clock_us(),
                reply,
            };
            // The journal is for checking the run afterwards: losing it must not stop the
            // witness answering (the check then fails loudly on the gap).
            if let Err(e) = journal.append([line]) {
                tracing::error!(error = %e, "witness: journal write failed; journal stopped");
                d.journal = None;
            }
        }
        reply
    };
    if log {
        let verdict = match (reply.granted, req.sender()) {
            (true, _) => "granted",
            (false, Some(s)) if s != from => "denied (not its request to make)",
            (false, _) => "denied",
        };
        tracing::info!(
            request = ?req,
            node = from.0,
            verdict,
            generation = reply.state.generation.0,
            primary = reply.state.primary.0,
            backup = ?reply.state.backup.map(|b| b.node.0),
            "witness: {verdict}"
        );
    }
    let frame = wire::encode_witness_reply(&reply);
    handshake::send_sealed(&mut sock, &mut acc.tx, &frame).await?;
    Ok(())
}

/// Sends one request to the witness and waits for its reply: the witness is authenticated by
/// its key, and the reply travels on the exchange's own keys, so it answers this request.
pub async fn request(
    addr: SocketAddr,
    identity: &Identity,
    vm: VmId,
    req: WitnessRequest,
    timeout: Duration,
) -> Result<WitnessReply, WitnessError> {
    let fail = |detail: String| WitnessError::Request { addr, detail };
    let key = identity.trust.witness.ok_or(WitnessError::NoWitnessKey)?;
    let exchange = async {
        let mut sock = TcpStream::connect(addr)
            .await
            .map_err(|e| fail(format!("connect: {e}")))?;
        let auth = |source| WitnessError::Auth { addr, source };
        let mut acc = handshake::dial_async(&mut sock, identity, &key, Purpose::Witness, vm)
            .await
            .map_err(auth)?;
        let frame = wire::encode_witness_request(vm, &req);
        handshake::send_sealed(&mut sock, &mut acc.tx, &frame)
            .await
            .map_err(|e| fail(format!("send: {e}")))?;
        let body = handshake::recv_sealed(&mut sock, &mut acc.rx)
            .await
            .map_err(|e| fail(format!("reply: {e}")))?;
        match wire::decode(&body, &wire::Expect::vm(vm)) {
            Ok((Frame::WitnessReply(r), _)) if r.request == req => Ok(r),
            Ok(_) => Err(fail("answered something else".into())),
            Err(e) => Err(fail(e.to_string())),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| fail(format!("no reply within {timeout:?}")))?
}
