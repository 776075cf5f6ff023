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

    use ftvm_model::{Generation, PeerMsg, VmId};
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    use super::*;
    use crate::agent::staging::StagingLimits;
    use crate::auth::handshake::{self, Purpose};
    use crate::auth::{FrameSealer, Identity, Protection};
    use crate::transport::TransportKind;

    static NEXT: AtomicUsize = AtomicUsize::new(1);

    /// A listener's link setup (node 1) and the identity of a peer (node 2) it trusts.
    fn setup(deadline: Duration) -> (LinkSetup, Identity) {
        let (_, mut ids) = Identity::generate_set(&[NodeId(1), NodeId(2)]).unwrap();
        let me = ids.remove(&NodeId(1)).unwrap();
        let peer = ids.remove(&NodeId(2)).unwrap();
        let setup = LinkSetup {
            vm: VmId(7),
            staging: StagingLimits {
                page_size: 4096,
                ram_pages: 16,
                max_device_bytes: 1 << 20,
                disk_blocks: 0,
            },
            kind: TransportKind::Copy,
            identity: Arc::new(me),
            handshake_deadline: deadline,
            protection: Protection::Mac,
            spool: None,
            progress: Default::default(),
            socket_buffer: None,
        };
        (setup, peer)
    }

    fn next_conn() -> ConnId {
        ConnId(5_000_000 + NEXT.fetch_add(1, Ordering::Relaxed) as u64)
    }

    /// Keeps every event (dropping an `Accepted` link would close it) and counts messages.
    fn drain(rx: &mut UnboundedReceiver<Event>, kept: &mut Vec<Event>) -> usize {
        while let Ok(ev) = rx.try_recv() {
            kept.push(ev);
        }
        kept.iter()
            .filter(|e| {
                matches!(
                    e,
                    Event::Link {
                        event: ftvm_driver::LinkEvent::Message(_),
                        ..
                    }
                )
            })
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
        let (setup, dialler) = setup(deadline);
        let key = setup.identity.me.public;
        spawn(Listener {
            listener,
            setup,
            node: NodeId(1),
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
        let mut idle: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
        // Fewer bytes than a handshake message's header: the listener waits for more.
        idle[0].write_all(b"FTV").unwrap();
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
        // The failed handshakes end and free their slots (a moment later); they never reached
        // the agent: no link was announced or closed.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(closures(&mut rx, &mut kept), 0);
        // The slots are free again: a peer that authenticates at once gets in and stays.
        let mut peer = TcpStream::connect(addr).unwrap();
        let link = Purpose::Link(Protection::Mac);
        let acc = handshake::dial(&mut peer, &dialler, &key, link, VmId(7)).unwrap();
        let join = PeerMsg::Join {
            vm: VmId(7),
            node: NodeId(2),
            ram_pages: 16,
            page_size: 4096,
            known: Generation(0),
            replica: None,
            disk_blocks: 0,
        };
        let frame = ftvm_model::wire::encode_peer(VmId(7), &join);
        peer.write_all(&frame).unwrap();
        peer.write_all(&FrameSealer::new(acc.send_key).seal(&frame))
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
