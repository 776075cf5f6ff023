use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener as StdListener, TcpStream as StdStream};
use std::time::{Duration, Instant};

use ftvm_model::wire::{encode_checkpoint, HEADER_LEN, META_LEN, RECORD_HEADER_LEN};
use ftvm_model::{Epoch, Generation, VmId};

use super::*;

const A: LinkEnd = LinkEnd::Node(1);
const B: LinkEnd = LinkEnd::Node(2);

/// A peer that hands every accepted connection to `serve` on its own thread.
fn peer(serve: fn(StdStream)) -> SocketAddr {
    let l = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || serve(s));
        }
    });
    addr
}

fn echo(mut s: StdStream) {
    let mut buf = [0; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 || s.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

fn relay_to(upstream: SocketAddr, links: &FaultLinks, checkpoint_link: bool) -> (Relay, StdStream) {
    let relay = Relay::start(
        None,
        vec![Route {
            listen: "127.0.0.1:0".parse().unwrap(),
            upstream,
            local: A,
            remote: B,
            checkpoint_link,
        }],
        links.clone(),
    )
    .unwrap();
    let s = StdStream::connect(relay.addrs()[0]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (relay, s)
}

fn round_trip(s: &mut StdStream, data: &[u8]) -> Duration {
    let t0 = Instant::now();
    s.write_all(data).unwrap();
    let mut back = vec![0; data.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, data);
    t0.elapsed()
}

#[test]
fn bytes_pass_unchanged_both_ways_and_an_end_of_stream_follows_them() {
    let links = FaultLinks::new(Shape::CLEAR);
    let (_relay, mut s) = relay_to(peer(echo), &links, false);
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut reader = s.try_clone().unwrap();
    let expect = data.clone();
    let got = std::thread::spawn(move || {
        let mut all = Vec::new();
        reader.read_to_end(&mut all).unwrap();
        all
    });
    s.write_all(&data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(got.join().unwrap(), expect);
}

#[test]
fn latency_delays_each_direction() {
    let links = FaultLinks::new(Shape::CLEAR);
    let (_relay, mut s) = relay_to(peer(echo), &links, false);
    assert!(round_trip(&mut s, b"warm") < Duration::from_millis(60));
    links.set_latency(B, A, Duration::from_millis(40), Duration::from_millis(60));
    let rtt = round_trip(&mut s, b"slow");
    assert!(rtt >= Duration::from_millis(80), "{rtt:?}");
    assert!(rtt < Duration::from_millis(1000), "{rtt:?}");
}

#[test]
fn bandwidth_spreads_bytes_over_time() {
    let links = FaultLinks::new(Shape::CLEAR);
    let (_relay, mut s) = relay_to(peer(echo), &links, false);
    // 100 kB at 500 B/ms: at least 200 ms each way (the echo overlaps the two directions).
    links.set_bandwidth(A, B, Some(500));
    let rtt = round_trip(&mut s, &vec![7; 100_000]);
    assert!(rtt >= Duration::from_millis(200), "{rtt:?}");
    links.set_bandwidth(A, B, None);
    let rtt = round_trip(&mut s, &vec![7; 100_000]);
    assert!(rtt < Duration::from_millis(150), "{rtt:?}");
}

#[test]
fn a_hold_keeps_bytes_until_it_is_released() {
    let links = FaultLinks::new(Shape::CLEAR);
    let (_relay, mut s) = relay_to(peer(echo), &links, false);
    round_trip(&mut s, b"up");
    links.set_hold(A, B, true);
    s.write_all(b"held").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0; 4];
    assert!(s.read(&mut buf).is_err(), "a held link delivered");
    links.release_all();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"held");
}

fn sink(mut s: StdStream) {
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let _ = s.write_all(&all);
    let _ = s.shutdown(Shutdown::Write);
}

#[test]
fn corruption_damages_one_page_byte_of_the_next_checkpoint_only() {
    let links = FaultLinks::new(Shape::CLEAR);
    let (_relay, mut s) = relay_to(peer(sink), &links, true);
    let mut stream = Vec::new();
    for len in [32u16, 16] {
        stream.extend_from_slice(b"FTVA\x01\x01");
        stream.extend_from_slice(&len.to_be_bytes());
        stream.extend(std::iter::repeat_n(0, usize::from(len)));
    }
    let first = stream.len();
    for epoch in [4, 5] {
        let page = [9u8; 64];
        let f = encode_checkpoint(
            VmId(1),
            Generation(1),
            Epoch(epoch),
            false,
            64,
            &[(1, &page[..])],
            b"dev",
        )
        .unwrap();
        stream.extend(f);
        stream.extend([0; crate::auth::TAG_LEN]);
    }
    links.arm_corruption(A, B);
    s.write_all(&stream).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    assert_eq!(back.len(), stream.len());
    let diff: Vec<usize> = (0..back.len()).filter(|&i| back[i] != stream[i]).collect();
    assert_eq!(
        diff,
        vec![first + HEADER_LEN + META_LEN + RECORD_HEADER_LEN]
    );
    // (The sink echoes a dialler's stream back, which the way back does not follow: it
    // says so in a note of its own.)
    let damaged: Vec<String> = links
        .take_notes()
        .into_iter()
        .filter(|n| n.starts_with("damaged"))
        .collect();
    assert_eq!(
        damaged,
        vec!["damaged the checkpoint of epoch 4 on the wire n1 -> n2".to_string()]
    );
}

#[test]
fn a_peer_that_is_down_ends_the_dialled_connection() {
    let l = StdListener::bind("127.0.0.1:0").unwrap();
    let dead = l.local_addr().unwrap();
    drop(l);
    let links = FaultLinks::new(Shape::CLEAR);
    let (_relay, mut s) = relay_to(dead, &links, false);
    let mut buf = [0; 1];
    assert_eq!(s.read(&mut buf).unwrap(), 0);
}

#[test]
fn a_checkpoint_half_written_by_its_sender_shows_as_in_progress() {
    let links = FaultLinks::new(Shape::CLEAR);
    let (_relay, mut s) = relay_to(peer(sink), &links, true);
    let mut stream = Vec::new();
    for len in [8u16, 8] {
        stream.extend_from_slice(b"FTVA\x01\x01");
        stream.extend_from_slice(&len.to_be_bytes());
        stream.extend(std::iter::repeat_n(0, usize::from(len)));
    }
    let start = stream.len();
    let pages: Vec<(u64, Vec<u8>)> = (0..20).map(|i| (i, vec![1u8; 64])).collect();
    let refs: Vec<(u64, &[u8])> = pages.iter().map(|(i, p)| (*i, p.as_slice())).collect();
    stream.extend(
        encode_checkpoint(VmId(1), Generation(1), Epoch(2), false, 64, &refs, b"d").unwrap(),
    );
    stream.extend([0; crate::auth::TAG_LEN]);
    let total = (stream.len() - start) as u64;
    let half = start + (stream.len() - start) * 6 / 10;
    let progress = || links.checkpoint_progress(A, B);
    let wait_until = |what: &str, ok: &dyn Fn() -> bool| {
        let t0 = Instant::now();
        while !ok() {
            assert!(t0.elapsed() < Duration::from_secs(5), "never {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    s.write_all(&stream[..half]).unwrap();
    let passed = (half - start) as u64;
    wait_until("in progress", &|| progress() == Some((passed, total)));
    s.write_all(&stream[half..]).unwrap();
    wait_until("done", &|| progress().is_none());
    assert_eq!(links.checkpoint_progress(B, A), None);
}

#[test]
fn a_forged_frame_goes_in_at_a_frame_boundary_with_a_tag_no_key_made() {
    use ftvm_model::wire::encode_peer;
    use ftvm_model::PeerMsg;
    let links = FaultLinks::new(Shape::CLEAR);
    let (_relay, mut s) = relay_to(peer(sink), &links, true);
    let mut first = Vec::new();
    for len in [8u16, 8] {
        first.extend_from_slice(b"FTVA\x01\x01");
        first.extend_from_slice(&len.to_be_bytes());
        first.extend(std::iter::repeat_n(0, usize::from(len)));
    }
    let heartbeat = |e| {
        let mut f = encode_peer(
            VmId(9),
            &PeerMsg::Heartbeat {
                generation: Generation(1),
                epoch: Epoch(e),
            },
        );
        f.extend([0xAA; crate::auth::TAG_LEN]);
        f
    };
    first.extend(heartbeat(1));
    s.write_all(&first).unwrap();
    // Let the relay pass the first frame before arming, so the next write starts at a boundary.
    let t0 = Instant::now();
    while links.checkpoint_progress(A, B).is_some() || t0.elapsed() < Duration::from_millis(100) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let forged = PeerMsg::Heartbeat {
        generation: Generation(u64::MAX),
        epoch: Epoch(1),
    };
    links.arm_forgery(A, B, forged);
    let second = heartbeat(2);
    s.write_all(&second).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    let mut expect = first.clone();
    expect.extend(encode_peer(VmId(9), &forged));
    expect.extend([0; crate::auth::TAG_LEN]);
    expect.extend(second);
    assert_eq!(back, expect);
    // The connection's end is noted once both directions are done, which may come just after
    // the reader saw the end of stream.
    let mut notes = links.take_notes();
    let t0 = Instant::now();
    while !notes.iter().any(|n| n.contains("ended")) && t0.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(5));
        notes.extend(links.take_notes());
    }
    assert!(notes[0].starts_with("forged Heartbeat"), "{notes:?}");
    assert!(
        notes
            .iter()
            .any(|n| n.contains("ended") && n.ends_with("refused")),
        "{notes:?}"
    );
}

#[test]
fn a_witness_reply_is_damaged_after_the_handshake_only() {
    let mut w = ReplyWatch::default();
    let mut welcome = b"FTVA\x01\x02\x00\x04abcd".to_vec();
    assert!(!w.pass(&mut welcome, || true));
    assert_eq!(welcome, b"FTVA\x01\x02\x00\x04abcd");
    let mut reply = b"FTVA\x01\x03\x00\x02xy".to_vec();
    let mut asked = 0;
    assert!(w.pass(&mut reply, || {
        asked += 1;
        true
    }));
    assert_eq!(asked, 1);
    assert_eq!(reply, b"FTVA\x01\x03\x00\x02x\x23");
}

/// A stand-in witness: reads a 12-byte `Hello`, answers a 12-byte `Welcome`, reads a 10-byte
/// request, answers a 10-byte reply and ends the connection.
fn fake_witness(mut s: StdStream) {
    let mut hello = [0; 12];
    if s.read_exact(&mut hello).is_err() {
        return;
    }
    let _ = s.write_all(b"FTVA\x01\x02\x00\x04abcd");
    let mut req = [0; 10];
    if s.read_exact(&mut req).is_err() {
        return;
    }
    let _ = s.write_all(b"FTVA\x01\x03\x00\x02xy");
    let _ = s.shutdown(Shutdown::Write);
}

fn witness_relay(links: &FaultLinks) -> (Relay, StdStream) {
    let relay = Relay::start(
        None,
        vec![Route {
            listen: "127.0.0.1:0".parse().unwrap(),
            upstream: peer(fake_witness),
            local: A,
            remote: LinkEnd::Witness,
            checkpoint_link: false,
        }],
        links.clone(),
    )
    .unwrap();
    let s = StdStream::connect(relay.addrs()[0]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (relay, s)
}

fn disorder(duplicate: f64, reorder: f64, reply_loss: f64) -> ExchangeDisorder {
    ExchangeDisorder {
        duplicate,
        reorder,
        reply_loss,
        max_delay: Duration::from_millis(300),
        agent_timeout: Duration::from_millis(200),
    }
}

#[test]
fn a_duplicated_witness_request_is_held_past_the_agents_timeout_after_the_hello_only() {
    let links = FaultLinks::new(Shape::CLEAR);
    links.set_witness_disorder(Some(disorder(1.0, 0.0, 0.0)), 7);
    let (_relay, mut s) = witness_relay(&links);
    let t0 = Instant::now();
    s.write_all(b"FTVA\x01\x01\x00\x04hhhh").unwrap();
    let mut welcome = [0; 12];
    s.read_exact(&mut welcome).unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(200),
        "the handshake is not delayed"
    );
    let t1 = Instant::now();
    s.write_all(b"FTVA\x01\x03\x00\x02rq").unwrap();
    let mut reply = [0; 10];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"FTVA\x01\x03\x00\x02xy");
    assert!(
        t1.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t1.elapsed()
    );
    let summary = links.witness_disorder_summary().unwrap();
    assert!(
        summary.contains("1 of 1 exchanges delivered late (1 past"),
        "{summary}"
    );
}

#[test]
fn a_lost_witness_reply_is_dropped_after_the_welcome_and_the_connection_stays_open() {
    let links = FaultLinks::new(Shape::CLEAR);
    links.set_witness_disorder(Some(disorder(0.0, 0.0, 1.0)), 7);
    let (_relay, mut s) = witness_relay(&links);
    s.write_all(b"FTVA\x01\x01\x00\x04hhhh").unwrap();
    let mut welcome = [0; 12];
    s.read_exact(&mut welcome).unwrap();
    assert_eq!(&welcome, b"FTVA\x01\x02\x00\x04abcd");
    s.write_all(b"FTVA\x01\x03\x00\x02rq").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0; 10];
    let err = s
        .read(&mut buf)
        .expect_err("neither reply nor end of stream");
    assert!(matches!(
        err.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ));
    let summary = links.witness_disorder_summary().unwrap();
    assert!(summary.contains("1 replies dropped"), "{summary}");
}

/// A joiner's connection carries its handshake and one frame before it is refused: with the VM
/// id learnt from another connection's frames, the forgery goes in ahead of that first frame.
#[test]
fn a_forgery_goes_in_before_a_connections_first_frame_once_the_vm_is_known() {
    use ftvm_model::wire::encode_peer;
    use ftvm_model::PeerMsg;
    let links = FaultLinks::new(Shape::CLEAR);
    let forged = PeerMsg::Heartbeat {
        generation: Generation(u64::MAX),
        epoch: Epoch(1),
    };
    let handshake = || {
        let mut h = Vec::new();
        for len in [8u16, 8] {
            h.extend_from_slice(b"FTVA\x01\x01");
            h.extend_from_slice(&len.to_be_bytes());
            h.extend(std::iter::repeat_n(0, usize::from(len)));
        }
        h
    };
    let mut join = encode_peer(
        VmId(9),
        &PeerMsg::Heartbeat {
            generation: Generation(1),
            epoch: Epoch(3),
        },
    );
    join.extend([0xAA; crate::auth::TAG_LEN]);
    // Without a VM id seen anywhere, the relay cannot forge a frame of this stream.
    let run = |armed: bool| {
        let (_relay, mut s) = relay_to(peer(sink), &links, true);
        s.write_all(&handshake()).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        if armed {
            links.arm_forgery(A, B, forged);
        }
        s.write_all(&join).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        back
    };
    let first = run(true);
    let mut plain = handshake();
    plain.extend(&join);
    assert_eq!(first, plain, "forged with no VM id known");
    // The first connection's frame taught the relay the VM id; the still-armed forgery goes in
    // ahead of the next connection's only frame.
    let second = run(false);
    let mut expect = handshake();
    expect.extend(encode_peer(VmId(9), &forged));
    expect.extend([0; crate::auth::TAG_LEN]);
    expect.extend(&join);
    assert_eq!(second, expect);
}
