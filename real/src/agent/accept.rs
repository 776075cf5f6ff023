//! The agent's checkpoint listener: accepts inbound links under three limits.
//!
//! - **A cap on concurrent inbound connections** ([`ConnLimits::max_inbound`]): beyond it a new
//!   connection is closed at once (one log line per burst of refusals).
//! - **A handshake deadline** ([`ConnLimits::handshake_deadline`]): an accepted connection must
//!   finish the authentication handshake before the deadline, or it is closed, so a connection
//!   that sends a few bytes and stalls cannot hold a slot. The link reports success through
//!   [`Admission::established`].
//! - **Back-off on accept errors** ([`AcceptBackoff`]): a failing `accept` (say, out of file
//!   descriptors) is retried after a growing pause instead of in a busy loop.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_model::NodeId;
use tokio::sync::mpsc::UnboundedSender;

use super::event::{ConnId, Event};
use super::link::{self, LinkSetup, Side};

/// Default cap on concurrent inbound links: an agent has a handful of peers, each with one live
/// link and perhaps one being replaced.
pub const DEFAULT_MAX_INBOUND: usize = 16;

/// Default time an accepted connection has to authenticate.
pub const DEFAULT_HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);

/// First pause after a failed `accept`.
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
/// Longest pause after failed `accept`s.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Refusals of one burst are logged at most this often.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);

/// Limits on the connections a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Concurrent inbound connections at most.
    pub max_inbound: usize,
    /// Time from accept to the connection being established (authenticated).
    pub handshake_deadline: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_inbound: DEFAULT_MAX_INBOUND,
            handshake_deadline: DEFAULT_HANDSHAKE_DEADLINE,
        }
    }
}

/// What a link's reader holds for an accepted connection: its slot under the cap (freed when
/// dropped, that is when the reader ends) and the state the handshake deadline checks.
#[derive(Debug)]
pub struct Admission {
    live: Arc<AtomicUsize>,
    watch: Arc<Watch>,
}

/// An accepted connection as the handshake watchdog sees it. The watchdog's handle on the
/// socket goes away as soon as the connection is established or closed, so connections that
/// come and go quickly do not pile up descriptors until their deadlines.
#[derive(Debug)]
struct Watch {
    established: AtomicBool,
    socket: Mutex<Option<TcpStream>>,
}

impl Watch {
    fn take_socket(&self) -> Option<TcpStream> {
        self.socket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

impl Admission {
    /// The connection proved to be a peer: the handshake deadline no longer applies.
    pub fn established(&self) {
        if !self.watch.established.swap(true, Ordering::AcqRel) {
            drop(self.watch.take_socket());
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        drop(self.watch.take_socket());
        self.live.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The pause before retrying a failed `accept`: doubles from 10 ms up to 1 s, back to nothing
/// after a success.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AcceptBackoff {
    next: Option<Duration>,
}

impl AcceptBackoff {
    /// An `accept` failed: how long to wait before the next one.
    pub fn failed(&mut self) -> Duration {
        let d = self.next.unwrap_or(BACKOFF_FIRST);
        self.next = Some((d * 2).min(BACKOFF_MAX));
        d
    }

    /// An `accept` succeeded.
    pub fn succeeded(&mut self) {
        self.next = None;
    }
}

/// What the accept thread needs to start a link.
pub struct Listener {
    /// The bound socket.
    pub listener: TcpListener,
    /// What every link shares (VM, staging limits, transport, keys).
    pub setup: LinkSetup,
    /// This node (for log lines).
    pub node: NodeId,
    /// Connection limits.
    pub limits: ConnLimits,
    /// The agent's event channel.
    pub events: UnboundedSender<Event>,
    /// Allocates connection ids.
    pub new_conn: fn() -> ConnId,
}

/// Starts the accept thread and its handshake watchdog.
pub fn spawn(l: Listener) -> std::io::Result<()> {
    let (watch_tx, watch_rx) = mpsc::channel::<Pending>();
    std::thread::Builder::new()
        .name("accept-deadline".into())
        .spawn(move || watchdog(watch_rx))?;
    std::thread::Builder::new()
        .name("accept".into())
        .spawn(move || accept_loop(l, watch_tx))?;
    Ok(())
}

/// An accepted connection waiting to authenticate.
struct Pending {
    deadline: Instant,
    peer: SocketAddr,
    watch: Arc<Watch>,
}

fn accept_loop(l: Listener, deadlines: mpsc::Sender<Pending>) {
    let live = Arc::new(AtomicUsize::new(0));
    let mut backoff = AcceptBackoff::default();
    let mut refused = Refusals::default();
    loop {
        let (stream, peer) = match l.listener.accept() {
            Ok(s) => {
                backoff.succeeded();
                s
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let pause = backoff.failed();
                tracing::warn!(
                    node = l.node.0,
                    error = %e,
                    retry_in = ?pause,
                    "accept on the checkpoint port failed; retrying"
                );
                std::thread::sleep(pause);
                continue;
            }
        };
        // Take a slot first: the count only goes down when a reader ends.
        if live.fetch_add(1, Ordering::AcqRel) >= l.limits.max_inbound {
            live.fetch_sub(1, Ordering::AcqRel);
            drop(stream);
            refused.note(peer, l.limits.max_inbound);
            continue;
        }
        let socket = match stream.try_clone() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(
                    node = l.node.0,
                    %peer,
                    error = %e,
                    "inbound connection dropped: cloning its socket failed"
                );
                live.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
        };
        let watch = Arc::new(Watch {
            established: AtomicBool::new(false),
            socket: Mutex::new(Some(socket)),
        });
        let admission = Admission {
            live: live.clone(),
            watch: watch.clone(),
        };
        let conn = (l.new_conn)();
        let tx = l.events.clone();
        let announce = move |link, peer| {
            let _ = tx.send(Event::Accepted { conn, peer, link });
        };
        let node = l.node;
        let refused = move |why: String| {
            tracing::warn!(node = node.0, %peer, %why, "refused a connection");
        };
        let started = link::spawn(
            stream,
            conn,
            Side::Listen,
            l.setup.clone(),
            Some(admission),
            l.events.clone(),
            announce,
            refused,
        );
        match started {
            Ok(()) => {
                let _ = deadlines.send(Pending {
                    deadline: Instant::now() + l.limits.handshake_deadline,
                    peer,
                    watch,
                });
            }
            Err(e) => {
                tracing::warn!(
                    node = l.node.0,
                    %peer,
                    error = %e,
                    "accepting a checkpoint link failed"
                )
            }
        }
    }
}

/// Closes connections that missed their handshake deadline. Every connection gets the same
/// deadline, so they expire in the order they were accepted.
fn watchdog(rx: mpsc::Receiver<Pending>) {
    let mut waiting: VecDeque<Pending> = VecDeque::new();
    loop {
        let next = waiting.front().map(|p| p.deadline);
        let got = match next {
            Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        match got {
            Ok(p) => waiting.push_back(p),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) if waiting.is_empty() => return,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(next.map_or(Duration::ZERO, |d| {
                    d.saturating_duration_since(Instant::now())
                }));
            }
        }
        let now = Instant::now();
        while waiting.front().is_some_and(|p| p.deadline <= now) {
            let Some(p) = waiting.pop_front() else { break };
            // Still there: neither established nor closed.
            if let Some(socket) = p.watch.take_socket() {
                tracing::warn!(
                    peer = %p.peer,
                    "inbound connection did not authenticate in time; closed"
                );
                // The reader sees the end of the stream, reports the link closed and frees
                // the slot.
                let _ = socket.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// Logs refusals at the cap: the first of a burst at once, then a count at most once a second.
#[derive(Default)]
struct Refusals {
    logged_at: Option<Instant>,
    unlogged: u64,
}

impl Refusals {
    fn note(&mut self, peer: SocketAddr, cap: usize) {
        self.unlogged += 1;
        let due = self
            .logged_at
            .is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY);
        if due {
            tracing::warn!(
                refused = self.unlogged,
                last_peer = %peer,
                open = cap,
                "inbound connections refused: the cap is reached"
            );
            self.logged_at = Some(Instant::now());
            self.unlogged = 0;
        }
    }
}

#[cfg(test)]
#[path = "accept_tests.rs"]
mod tests;
