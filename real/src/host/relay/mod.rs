//! A fault-injecting TCP relay for the links of a local deployment: the agents dial a relay
//! on their own host's loopback instead of the peer (`--peer N=127.0.0.1:…`, `--witness
//! 127.0.0.1:…`), and the relay forwards each connection to the real address, delaying,
//! throttling, holding or damaging its bytes as the simulator's link faults would
//! ([`shaping`], [`tamper`]).
//!
//! A relay runs on its own thread inside its host's network namespace, so the forwarded leg is
//! an ordinary connection from that host: route blackholes, link cuts and nftables loss rules
//! of the namespace act on it as they would on the agent's own socket. The loopback leg is
//! inside the host and never faulted.
//!
//! What differs from the simulator: the relay terminates TCP on the loopback side, so a sender
//! sees its bytes accepted as soon as the relay's queue takes them (up to [`QUEUE_CHUNKS`]
//! chunks of [`CHUNK`] bytes per direction, then the relay stops reading and TCP pushes back);
//! a connection to a peer that is down is accepted and then closed (the dialler sees an early
//! end of stream rather than a refusal).

pub mod shaping;
pub mod tamper;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

use ftvm_model::wire::encode_peer;
use ftvm_model::{PeerMsg, VmId};

pub use shaping::{LinkEnd, Links, Shape};
use tamper::{Seen, Tamper};

/// Bytes read from one side at a time (one shaped chunk).
pub const CHUNK: usize = 16 * 1024;
/// Chunks a direction queues before the relay stops reading from its sender.
pub const QUEUE_CHUNKS: usize = 64;
/// How long the relay tries to reach the real peer for an accepted connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Errors starting a relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Entering the host's namespace failed.
    #[error("cannot enter network namespace {ns}: {source}")]
    Enter {
        /// The namespace.
        ns: String,
        /// Why.
        source: std::io::Error,
    },
    /// A listening address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The relay's runtime could not be built.
    #[error("cannot start the relay's runtime: {0}")]
    Runtime(std::io::Error),
    /// The relay's thread ended before it was ready.
    #[error("the relay thread ended before it was ready")]
    Died,
}

/// One relayed path: connections accepted on `listen` are forwarded to `upstream`; the bytes
/// the acceptor sends travel `local → remote`.
#[derive(Clone, Debug)]
pub struct Route {
    /// Where the agent dials (loopback of its host).
    pub listen: SocketAddr,
    /// The real peer.
    pub upstream: SocketAddr,
    /// The host the dialler runs on.
    pub local: LinkEnd,
    /// The host the peer runs on.
    pub remote: LinkEnd,
    /// A checkpoint link (handshake then tagged wire frames): corruption can find its
    /// checkpoints. Witness exchanges are not.
    pub checkpoint_link: bool,
}

/// The faults of every relayed link, shared by all relays of a deployment and the code that
/// changes them.
#[derive(Clone)]
pub struct FaultLinks {
    links: Arc<Mutex<Links>>,
    /// Bumped whenever a hold is released, so held writers look again.
    released: Arc<watch::Sender<()>>,
    notes: Arc<Mutex<Vec<String>>>,
}

impl FaultLinks {
    /// Links that all start as `defaults`.
    pub fn new(defaults: Shape) -> FaultLinks {
        FaultLinks {
            links: Arc::new(Mutex::new(Links::new(defaults))),
            released: Arc::new(watch::channel(()).0),
            notes: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Links> {
        // The state is a table of plain values, consistent after any panic mid-update.
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the latency range of `a ↔ b`.
    pub fn set_latency(&self, a: LinkEnd, b: LinkEnd, min: Duration, max: Duration) {
        self.lock().set_latency(a, b, min, max);
    }

    /// Sets the bandwidth of `a ↔ b` (`None` or 0: unlimited).
    pub fn set_bandwidth(&self, a: LinkEnd, b: LinkEnd, bytes_per_ms: Option<u64>) {
        self.lock().set_bandwidth(a, b, bytes_per_ms);
    }

    /// Holds or releases `a ↔ b`.
    pub fn set_hold(&self, a: LinkEnd, b: LinkEnd, held: bool) {
        self.lock().set_hold(a, b, held);
        self.released.send_replace(());
    }

    /// Releases every hold.
    pub fn release_all(&self) {
        self.lock().release_all();
        self.released.send_replace(());
    }

    /// Damages the next checkpoint `from → to`.
    pub fn arm_corruption(&self, from: LinkEnd, to: LinkEnd) {
        self.lock().arm_corruption(from, to);
    }

    /// Slips `msg` into the checkpoint link `from → to` at its next frame boundary.
    pub fn arm_forgery(&self, from: LinkEnd, to: LinkEnd, msg: PeerMsg) {
        self.lock().arm_forgery(from, to, msg);
    }

    /// Damages the next witness reply to `node` (a reply the relay cannot forge: witness
    /// exchanges are sealed).
    pub fn arm_reply_damage(&self, node: LinkEnd) {
        self.lock().arm_reply_damage(LinkEnd::Witness, node);
    }

    /// How far the checkpoint a sender is writing on `from → to` has come: bytes it has
    /// written (the relay has read), and the frame's whole length. `None` between checkpoints
    /// (and on links the relay does not follow).
    pub fn checkpoint_progress(&self, from: LinkEnd, to: LinkEnd) -> Option<(u64, u64)> {
        self.lock().checkpoint_progress(from, to)
    }

    /// What the relays did that the run should report (damaged checkpoints), since last asked.
    pub fn take_notes(&self) -> Vec<String> {
        std::mem::take(&mut *self.notes.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn note(&self, what: String) {
        tracing::info!("relay: {what}");
        self.notes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(what);
    }

    async fn wait_released(&self, from: LinkEnd, to: LinkEnd) {
        let mut rx = self.released.subscribe();
        while self.lock().held(from, to) {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

/// A running relay; stops (closing every relayed connection) when dropped.
pub struct Relay {
    addrs: Vec<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Starts a relay for `routes` inside network namespace `ns` (`None`: this one).
    pub fn start(
        ns: Option<&str>,
        routes: Vec<Route>,
        links: FaultLinks,
    ) -> Result<Relay, RelayError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let ns = ns.map(str::to_string);
        let thread = std::thread::spawn(move || {
            let setup = (|| {
                if let Some(ns) = &ns {
                    enter(ns)?;
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(RelayError::Runtime)?;
                let listeners = routes
                    .iter()
                    .map(|r| {
                        let l = std::net::TcpListener::bind(r.listen)
                            .and_then(|l| l.set_nonblocking(true).map(|()| l))
                            .map_err(|source| RelayError::Bind {
                                addr: r.listen,
                                source,
                            })?;
                        let bound = l.local_addr().map_err(|source| RelayError::Bind {
                            addr: r.listen,
                            source,
                        })?;
                        Ok((l, r.clone(), bound))
                    })
                    .collect::<Result<Vec<_>, RelayError>>()?;
                Ok((rt, listeners))
            })();
            let (rt, listeners) = match setup {
                Ok(x) => x,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let bound: Vec<SocketAddr> = listeners.iter().map(|(_, _, a)| *a).collect();
            rt.block_on(async move {
                for (l, route, _) in listeners {
                    match TcpListener::from_std(l) {
                        Ok(l) => {
                            tokio::spawn(accept_loop(l, route, links.clone()));
                        }
                        Err(source) => {
                            let _ = ready_tx.send(Err(RelayError::Bind {
                                addr: route.listen,
                                source,
                            }));
                            return;
                        }
                    }
                }
                let _ = ready_tx.send(Ok(bound));
                let _ = stop_rx.await;
            });
        });
        match ready_rx.recv() {
            Ok(Ok(addrs)) => Ok(Relay {
                addrs,
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(RelayError::Died)
            }
        }
    }
}

impl Relay {
    /// The addresses it listens on, in the order of its routes (a route asking for port 0
    /// gets one chosen by the system).
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Moves this thread into network namespace `ns` (sockets it creates afterwards live there).
fn enter(ns: &str) -> Result<(), RelayError> {
    let err = |source| RelayError::Enter {
        ns: ns.to_string(),
        source,
    };
    let fd = std::fs::File::open(format!("/var/run/netns/{ns}")).map_err(err)?;
    nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| err(e.into()))
}

async fn accept_loop(listener: TcpListener, route: Route, links: FaultLinks) {
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                tokio::spawn(relay_connection(sock, route.clone(), links.clone()));
            }
            Err(e) => {
                tracing::warn!("relay {}: accept failed: {e}", route.listen);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn relay_connection(local: TcpStream, route: Route, links: FaultLinks) {
    let upstream =
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(route.upstream)).await {
            Ok(Ok(s)) => s,
            // The peer is down or cut off: the dialler sees its connection end.
            _ => return,
        };
    let _ = local.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (lr, lw) = local.into_split();
    let (ur, uw) = upstream.into_split();
    let tamper = |msgs| route.checkpoint_link.then(|| Tamper::new(msgs));
    let forged: Forged = Arc::default();
    let out = pump(
        lr,
        uw,
        (route.local, route.remote),
        tamper(2),
        links.clone(),
        forged.clone(),
    );
    let back = pump(
        ur,
        lw,
        (route.remote, route.local),
        tamper(1),
        links.clone(),
        forged.clone(),
    );
    // A clean end of stream half-closes its direction and waits for the other; an error on
    // either drops both sockets.
    let _ = tokio::try_join!(out, back);
    let what = forged.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some((at, what)) = what {
        links.note(format!(
            "the connection that carried the {what} ended {} ms after it: refused",
            at.elapsed().as_millis()
        ));
    }
}

/// What a connection's relay slipped in or damaged on purpose, and when (its end is then
/// reported: the receiver's refusal).
type Forged = Arc<Mutex<Option<(Instant, String)>>>;

/// Follows the witness's side of an exchange: its first message (the handshake's `Welcome`)
/// passes untouched; the byte that ends a chunk after it belongs to the reply.
#[derive(Default)]
struct ReplyWatch {
    passed: u64,
    head: Vec<u8>,
    welcome_end: Option<u64>,
}

impl ReplyWatch {
    /// Damages the last byte of `buf` if it lies in the reply and `want()` says so.
    fn pass(&mut self, buf: &mut [u8], want: impl FnOnce() -> bool) -> bool {
        if self.head.len() < 8 {
            let k = (8 - self.head.len()).min(buf.len());
            self.head.extend_from_slice(&buf[..k]);
            if self.head.len() == 8 {
                let len = u16::from_be_bytes([self.head[6], self.head[7]]);
                self.welcome_end = Some(8 + u64::from(len));
            }
        }
        self.passed += buf.len() as u64;
        let in_reply = self.welcome_end.is_some_and(|end| self.passed > end);
        if in_reply && want() {
            if let Some(b) = buf.last_mut() {
                *b ^= 0x5A;
                return true;
            }
        }
        false
    }
}

/// Forwards one direction: reads chunks as they come, plans when each is due, writes them in
/// order at that time (and not while the link is held); an end of stream is forwarded last.
async fn pump(
    mut r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
    (from, to): (LinkEnd, LinkEnd),
    mut tamper: Option<Tamper>,
    links: FaultLinks,
    forged: Forged,
) -> std::io::Result<()> {
    let mut replies = (from == LinkEnd::Witness).then(ReplyWatch::default);
    let (tx, mut rx) = mpsc::channel::<(Instant, Option<Vec<u8>>)>(QUEUE_CHUNKS);
    let reader_links = links.clone();
    let reader = async move {
        let links = reader_links;
        let mut rng = StdRng::from_entropy();
        loop {
            let mut buf = vec![0; CHUNK];
            let n = r.read(&mut buf).await?;
            let now = Instant::now();
            if n == 0 {
                let due = links.lock().plan(from, to, now, 0, &mut rng);
                let _ = tx.send((due, None)).await;
                return Ok::<(), std::io::Error>(());
            }
            buf.truncate(n);
            if let Some(t) = &mut tamper {
                slip_in_forgery(t, &mut buf, (from, to), &links, &forged);
                match t.pass(&mut buf, || links.lock().take_corruption(from, to)) {
                    Seen::Damaged { epoch } => links.note(format!(
                        "damaged the checkpoint of epoch {epoch} on the wire {from} -> {to}"
                    )),
                    Seen::GaveUp => links.note(format!(
                        "cannot follow the checkpoint stream {from} -> {to} (encrypted?): \
                         corruption not applied there"
                    )),
                    Seen::Nothing => {}
                }
                links
                    .lock()
                    .set_checkpoint_progress(from, to, t.checkpoint_progress());
            }
            if let Some(w) = &mut replies {
                if w.pass(&mut buf, || links.lock().take_reply_damage(from, to)) {
                    let what = format!("witness reply {from} -> {to} damaged in flight");
                    links.note(format!("{what} (a forged reply cannot be sealed)"));
                    *forged.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((Instant::now(), what));
                }
            }
            let due = links.lock().plan(from, to, now, buf.len(), &mut rng);
            if tx.send((due, Some(buf))).await.is_err() {
                return Ok(());
            }
        }
    };
    let writer = async move {
        let mut last: Option<Instant> = None;
        while let Some((due, chunk)) = rx.recv().await {
            // In order: never before the chunk ahead of it.
            let due = last.map_or(due, |l| due.max(l));
            last = Some(due);
            tokio::time::sleep_until(due.into()).await;
            links.wait_released(from, to).await;
            match chunk {
                Some(b) => w.write_all(&b).await?,
                None => {
                    w.shutdown().await?;
                    return Ok(());
                }
            }
        }
        Ok::<(), std::io::Error>(())
    };
    tokio::try_join!(reader, writer).map(|_| ())
}

/// Slips an armed forged message into `buf` at the stream's next frame boundary, if that lies
/// in `buf`: a well-formed frame of the stream's VM followed by a tag the relay cannot compute
/// (it holds no key), so the receiver must refuse it.
fn slip_in_forgery(
    t: &Tamper,
    buf: &mut Vec<u8>,
    (from, to): (LinkEnd, LinkEnd),
    links: &FaultLinks,
    forged: &Forged,
) {
    let (Some(k), Some(vm)) = (t.bytes_to_boundary(), t.vm()) else {
        return;
    };
    let Ok(k) = usize::try_from(k) else { return };
    if k > buf.len() || !links.lock().forgery_armed(from, to) {
        return;
    }
    let Some(msg) = links.lock().take_forgery(from, to) else {
        return;
    };
    let mut frame = encode_peer(VmId(vm), &msg);
    frame.extend_from_slice(&[0; crate::auth::TAG_LEN]);
    buf.splice(k..k, frame);
    let what = format!("forged {msg:?} slipped into {from} -> {to}",);
    links.note(format!("{what} (its tag cannot be right)"));
    *forged.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), what));
}

#[cfg(test)]
mod tests;
