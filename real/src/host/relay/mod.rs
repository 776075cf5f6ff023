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

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
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
/// How long a connection whose witness reply was dropped stays open after the witness closed
/// it (the agent gives the exchange up before that).
const REPLY_LOSS_LINGER: Duration = Duration::from_secs(6);
/// The latest a late witness exchange's request is delivered after its connection opened: the
/// witness gives a connection 2 s to authenticate and send its request, and a request later
/// than that would be lost, not late.
const LATEST_REQUEST: Duration = Duration::from_millis(1800);

/// Disorder of witness exchanges, as real links can have it. Every exchange is its own TCP
/// connection with a Noise handshake, so the relay cannot replay a request (the replayed
/// handshake would be refused); it can deliver an exchange's request late (later exchanges
/// overtake it) and drop the witness's reply after the witness acted on the request (the
/// agent times out and resends). A duplicate is made of both: the request is held past the
/// agent's timeout, the agent resends over a new connection, and the late request is delivered
/// too, so the witness sees the request twice.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ExchangeDisorder {
    /// Probability that an exchange's request is held past the agent's timeout (the witness
    /// then sees it and its resend).
    pub duplicate: f64,
    /// Probability that an exchange's request is delivered `1..=max_delay` late.
    pub reorder: f64,
    /// Probability that the witness's reply is dropped.
    pub reply_loss: f64,
    /// The bound of a late delivery.
    pub max_delay: Duration,
    /// How long an agent waits for a witness reply before it gives the exchange up.
    pub agent_timeout: Duration,
}

/// What the relay does to one witness exchange.
#[derive(Clone, Copy, Debug, Default)]
struct ExchangeFate {
    /// Added to the delivery of the request (everything after the dialler's first message).
    delay: Duration,
    /// Drop the witness's reply (everything after its handshake message), and keep the
    /// connection open until the agent gives up.
    drop_reply: bool,
}

/// What the witness disorder did so far.
#[derive(Clone, Copy, Debug, Default)]
struct DisorderCounts {
    exchanges: u64,
    late: u64,
    past_timeout: u64,
    replies_dropped: u64,
}

/// The witness disorder of a deployment's relays.
struct Disorder {
    cfg: ExchangeDisorder,
    rng: StdRng,
    counts: DisorderCounts,
}

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
    /// Witness exchange disorder, when switched on.
    disorder: Arc<Mutex<Option<Disorder>>>,
    /// Chunks that found their link held, per direction.
    held_chunks: Arc<Mutex<BTreeMap<(LinkEnd, LinkEnd), u64>>>,
}

impl FaultLinks {
    /// Links that all start as `defaults`.
    pub fn new(defaults: Shape) -> FaultLinks {
        FaultLinks {
            links: Arc::new(Mutex::new(Links::new(defaults))),
            released: Arc::new(watch::channel(()).0),
            notes: Arc::default(),
            disorder: Arc::default(),
            held_chunks: Arc::default(),
        }
    }

    /// Switches witness exchange disorder on (`seed` seeds its choices), or off (`None`).
    pub fn set_witness_disorder(&self, cfg: Option<ExchangeDisorder>, seed: u64) {
        let mut d = self.disorder.lock().unwrap_or_else(|e| e.into_inner());
        let counts = d.as_ref().map(|d| d.counts).unwrap_or_default();
        *d = cfg.map(|cfg| Disorder {
            cfg,
            rng: StdRng::seed_from_u64(seed),
            counts,
        });
    }

    /// What the witness disorder did to the exchanges so far, if it was ever switched on.
    pub fn witness_disorder_summary(&self) -> Option<String> {
        let d = self.disorder.lock().unwrap_or_else(|e| e.into_inner());
        let c = d.as_ref()?.counts;
        Some(format!(
            "witness disorder: {} of {} exchanges delivered late ({} past the agent's timeout: \
             it resent, and the witness saw the request twice), {} replies dropped after the \
             witness answered",
            c.late, c.exchanges, c.past_timeout, c.replies_dropped
        ))
    }

    /// Chooses the fate of a new witness exchange.
    fn exchange_fate(&self) -> ExchangeFate {
        let mut guard = self.disorder.lock().unwrap_or_else(|e| e.into_inner());
        let Some(d) = guard.as_mut() else {
            return ExchangeFate::default();
        };
        let cfg = d.cfg;
        let max_ms = (cfg.max_delay.as_millis() as u64).max(1);
        let r: f64 = d.rng.gen();
        let delay = if r < cfg.duplicate {
            // Past the agent's timeout, within the witness's deadline.
            let lo = (cfg.agent_timeout + Duration::from_millis(50)).min(LATEST_REQUEST);
            let hi = cfg.max_delay.max(lo).min(LATEST_REQUEST);
            let span = (hi - lo).as_millis() as u64;
            lo + Duration::from_millis(d.rng.gen_range(0..=span))
        } else if r < cfg.duplicate + cfg.reorder {
            Duration::from_millis(d.rng.gen_range(1..=max_ms)).min(LATEST_REQUEST)
        } else {
            Duration::ZERO
        };
        let drop_reply = cfg.reply_loss > 0.0 && d.rng.gen_bool(cfg.reply_loss.min(1.0));
        d.counts.exchanges += 1;
        if !delay.is_zero() {
            d.counts.late += 1;
        }
        if delay > cfg.agent_timeout {
            d.counts.past_timeout += 1;
        }
        if drop_reply {
            d.counts.replies_dropped += 1;
        }
        ExchangeFate { delay, drop_reply }
    }

    /// How many chunks `from → to` found the link held (and waited for its release).
    pub fn held_chunks(&self, from: LinkEnd, to: LinkEnd) -> u64 {
        let h = self.held_chunks.lock().unwrap_or_else(|e| e.into_inner());
        h.get(&(from, to)).copied().unwrap_or(0)
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
        if self.lock().held(from, to) {
            *self
                .held_chunks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry((from, to))
                .or_default() += 1;
        }
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
    let fate = if route.remote == LinkEnd::Witness {
        links.exchange_fate()
    } else {
        ExchangeFate::default()
    };
    let out = pump(
        lr,
        uw,
        (route.local, route.remote),
        tamper(2),
        links.clone(),
        forged.clone(),
        fate,
    );
    let back = pump(
        ur,
        lw,
        (route.remote, route.local),
        tamper(1),
        links.clone(),
        forged.clone(),
        fate,
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

/// Follows one side of a witness exchange past its first handshake message (the dialler's
/// `Hello`, the witness's `Welcome`): what comes after it is the request, or the reply.
#[derive(Default)]
struct ReplyWatch {
    passed: u64,
    head: Vec<u8>,
    welcome_end: Option<u64>,
}

impl ReplyWatch {
    /// Follows `buf`; returns where in it the bytes after the first message start, if any do.
    fn after_first(&mut self, buf: &[u8]) -> Option<usize> {
        if self.head.len() < 8 {
            let k = (8 - self.head.len()).min(buf.len());
            self.head.extend_from_slice(&buf[..k]);
            if self.head.len() == 8 {
                let len = u16::from_be_bytes([self.head[6], self.head[7]]);
                self.welcome_end = Some(8 + u64::from(len));
            }
        }
        let before = self.passed;
        self.passed += buf.len() as u64;
        let end = self.welcome_end?;
        (self.passed > end).then(|| end.saturating_sub(before) as usize)
    }

    /// Damages the last byte of `buf` if it lies in the reply and `want()` says so.
    fn pass(&mut self, buf: &mut [u8], want: impl FnOnce() -> bool) -> bool {
        let in_reply = self.after_first(buf).is_some();
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
    fate: ExchangeFate,
) -> std::io::Result<()> {
    let mut replies = (from == LinkEnd::Witness).then(ReplyWatch::default);
    // The request of a late witness exchange: everything after the dialler's `Hello`.
    let mut request = (to == LinkEnd::Witness && !fate.delay.is_zero()).then(ReplyWatch::default);
    let drop_reply = from == LinkEnd::Witness && fate.drop_reply;
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
                let mut l = links.lock();
                l.set_checkpoint_progress(from, to, t.checkpoint_progress());
                if let Some(vm) = t.vm() {
                    l.note_vm(vm);
                }
            }
            let mut late = Duration::ZERO;
            if let Some(w) = &mut request {
                if w.after_first(&buf).is_some() {
                    late = fate.delay;
                }
            }
            if let (true, Some(w)) = (drop_reply, &mut replies) {
                // The reply is lost on its way back; the witness acted on the request.
                if let Some(k) = w.after_first(&buf) {
                    buf.truncate(k);
                    if buf.is_empty() {
                        continue;
                    }
                }
            } else if let Some(w) = &mut replies {
                if w.pass(&mut buf, || links.lock().take_reply_damage(from, to)) {
                    let what = format!("witness reply {from} -> {to} damaged in flight");
                    links.note(format!("{what} (a forged reply cannot be sealed)"));
                    *forged.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((Instant::now(), what));
                }
            }
            let due = links.lock().plan(from, to, now, buf.len(), &mut rng) + late;
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
                    if drop_reply {
                        // The agent hears neither reply nor end: it times out and resends.
                        tokio::time::sleep(REPLY_LOSS_LINGER).await;
                    }
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
    // A joiner's connection carries one frame (its Join) before it is refused: the VM id may
    // come from a frame header seen on another link, so the forgery can go in before that one.
    let vm = t.vm().or_else(|| links.lock().vm());
    let (Some(k), Some(vm)) = (t.bytes_to_boundary(), vm) else {
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
