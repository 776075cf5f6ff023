//! The agent's checkpoint listener: accepts inbound links under three limits.
//!
//! - **A cap on concurrent inbound connections** ([`ConnLimits::max_inbound`]): beyond it a new
//!   connection is closed at once (one log line per burst of refusals).
//! - **A handshake deadline** ([`ConnLimits::handshake_deadline`]): an accepted connection must
//!   show it is a peer — today, its first valid frame — before the deadline, or it is closed,
//!   so a connection that sends a few bytes and stalls cannot hold a slot. The link's reader
//!   reports it through [`Admission::established`]; that call is the hook an authentication
//!   handshake takes over.
//! - **Back-off on accept errors** ([`AcceptBackoff`]): a failing `accept` (say, out of file
//!   descriptors) is retried after a growing pause instead of in a busy loop.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_model::VmId;
use tokio::sync::mpsc::UnboundedSender;

use super::event::{ConnId, Event};
use super::link;
use super::staging::StagingLimits;
use crate::transport::TransportKind;

/// Default cap on concurrent inbound links: an agent has a handful of peers, each with one live
/// link and perhaps one being replaced.
pub const DEFAULT_MAX_INBOUND: usize = 16;

/// Default time an accepted connection has to send its first valid frame.
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
    /// Time from accept to the connection being established (its first valid frame).
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
    /// The VM.
    pub vm: VmId,
    /// What arriving checkpoints are checked against.
    pub staging: StagingLimits,
    /// How checkpoints leave.
    pub kind: TransportKind,
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

/// An accepted connection waiting for its first valid frame.
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
                eprintln!(
                    "ftvm: accept on the checkpoint port failed ({e}); retrying in {pause:?}"
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
        let Ok(socket) = stream.try_clone() else {
            live.fetch_sub(1, Ordering::AcqRel);
            continue;
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
        let announce = |link| {
            let _ = tx.send(Event::Accepted { conn, link });
        };
        let started = link::spawn(
            stream,
            conn,
            l.vm,
            l.staging,
            l.kind,
            Some(admission),
            l.events.clone(),
            announce,
        );
        match started {
            Ok(()) => {
                let _ = deadlines.send(Pending {
                    deadline: Instant::now() + l.limits.handshake_deadline,
                    peer,
                    watch,
                });
            }
            Err(e) => eprintln!("ftvm: accepting a checkpoint link from {peer}: {e}"),
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
                eprintln!(
                    "ftvm: inbound connection from {} sent no valid frame in time; closed",
                    p.peer
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
            eprintln!(
                "ftvm: refused {} inbound connection(s) (last from {peer}): {cap} already open",
                self.unlogged
            );
            self.logged_at = Some(Instant::now());
            self.unlogged = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_ceiling_and_resets_on_success() {
        let mut b = AcceptBackoff::default();
        let waits: Vec<Duration> = (0..10).map(|_| b.failed()).collect();
        assert_eq!(waits[0], BACKOFF_FIRST);
        assert_eq!(waits[1], BACKOFF_FIRST * 2);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*waits.last().unwrap(), BACKOFF_MAX);
        b.succeeded();
        assert_eq!(b.failed(), BACKOFF_FIRST);
    }

    #[test]
    fn an_admission_frees_its_slot_when_dropped() {
        let (a, b) = (
            TcpListener::bind("127.0.0.1:0").unwrap(),
            TcpListener::bind("127.0.0.1:0").unwrap(),
        );
        let live = Arc::new(AtomicUsize::new(2));
        let admit = |addr| Admission {
            live: live.clone(),
            watch: Arc::new(Watch {
                established: AtomicBool::new(false),
                socket: Mutex::new(Some(TcpStream::connect(addr).unwrap())),
            }),
        };
        let (x, y) = (
            admit(a.local_addr().unwrap()),
            admit(b.local_addr().unwrap()),
        );
        // Established: the watchdog's handle is gone (nothing left to close at the deadline).
        x.established();
        assert!(x.watch.established.load(Ordering::Acquire));
        assert!(x.watch.take_socket().is_none());
        // Closed before its deadline: the handle goes too, and the slot is freed.
        let watch = y.watch.clone();
        drop(y);
        assert!(watch.take_socket().is_none());
        assert_eq!(live.load(Ordering::Acquire), 1);
        drop(x);
        assert_eq!(live.load(Ordering::Acquire), 0);
    }

    mod live {
        use std::io::{Read, Write};

        use ftvm_model::{Generation, NodeId, PeerMsg};
        use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

        use super::*;

        static NEXT: AtomicUsize = AtomicUsize::new(1);

        fn next_conn() -> ConnId {
            ConnId(5_000_000 + NEXT.fetch_add(1, Ordering::Relaxed) as u64)
        }

        /// Keeps every event (dropping an `Accepted` link would close it) and counts messages.
        fn drain(rx: &mut UnboundedReceiver<Event>, kept: &mut Vec<Event>) -> usize {
            while let Ok(ev) = rx.try_recv() {
                kept.push(ev);
            }
            kept.iter()
                .filter(|e| matches!(e, Event::Message { .. }))
                .count()
        }

        fn closures(rx: &mut UnboundedReceiver<Event>, kept: &mut Vec<Event>) -> usize {
            drain(rx, kept);
            kept.iter()
                .filter(|e| matches!(e, Event::LinkClosed { .. }))
                .count()
        }

        /// True when the peer closed `s` within `within` (EOF or reset), false when it is still
        /// open (the read timed out).
        fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
            s.set_read_timeout(Some(within)).unwrap();
            let mut b = [0u8; 64];
            loop {
                match s.read(&mut b) {
                    Ok(0) => return true,
                    Ok(_) => continue,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        return false
                    }
                    Err(_) => return true,
                }
            }
        }

        /// Idle connections fill the cap, the next one is refused; the idle ones are closed at
        /// the handshake deadline, and then a real peer gets in and stays.
        #[test]
        fn the_cap_refuses_extra_connections_and_idle_ones_are_closed_at_the_deadline() {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let (tx, mut rx) = unbounded_channel();
            let deadline = Duration::from_millis(400);
            spawn(Listener {
                listener,
                vm: VmId(7),
                staging: StagingLimits {
                    page_size: 4096,
                    ram_pages: 16,
                    max_device_bytes: 1 << 20,
                },
                kind: TransportKind::Copy,
                limits: ConnLimits {
                    max_inbound: 2,
                    handshake_deadline: deadline,
                },
                events: tx,
                new_conn: next_conn,
            })
            .unwrap();
            let mut kept = Vec::new();
            let t0 = Instant::now();
            let mut idle: Vec<TcpStream> =
                (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
            // Fewer bytes than a frame header: not a frame.
            idle[0].write_all(&[0x46; 10]).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            let mut extra = TcpStream::connect(addr).unwrap();
            assert!(
                closed_within(&mut extra, Duration::from_millis(300)),
                "a third connection above the cap of 2 was kept"
            );
            assert!(
                t0.elapsed() < deadline,
                "too slow to tell the cap from the deadline"
            );
            for s in &mut idle {
                assert!(
                    closed_within(s, deadline * 4),
                    "an idle connection outlived its deadline"
                );
            }
            // The readers report the closures, then free the slots (a moment later).
            let t1 = Instant::now();
            while closures(&mut rx, &mut kept) < 2 {
                assert!(
                    t1.elapsed() < Duration::from_secs(5),
                    "closures not reported"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(Duration::from_millis(50));
            // The slots are free again: a peer that speaks at once gets in and stays.
            let mut peer = TcpStream::connect(addr).unwrap();
            let join = PeerMsg::Join {
                vm: VmId(7),
                node: NodeId(2),
                ram_pages: 16,
                page_size: 4096,
                known: Generation(0),
            };
            peer.write_all(&ftvm_model::wire::encode_peer(VmId(7), &join))
                .unwrap();
            let closed = closed_within(&mut peer, deadline * 2);
            drain(&mut rx, &mut kept);
            let why: Vec<&String> = kept
                .iter()
                .filter_map(|e| match e {
                    Event::LinkClosed { why, .. } => Some(why),
                    _ => None,
                })
                .collect();
            assert!(!closed, "an established peer was closed: {why:?}");
            assert_eq!(drain(&mut rx, &mut kept), 1, "the peer's join arrived");
        }
    }
}
