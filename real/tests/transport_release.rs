//! Release semantics: zero-copy buffers are released only once the kernel is done with them
//! (here: once the peer acknowledged the data), in ticket order; `copy` releases on return; a
//! peer that stops reading makes the transport fail instead of hang.

mod transport_common;

use std::time::{Duration, Instant};

use ftvm_real::transport::bench::MappedRegion;
use ftvm_real::transport::{self, SendTicket, TransportError, TransportKind, TransportOptions};
use transport_common::{expected, slices, spawn_reader, tcp_pair};

fn pages(first: usize, n: usize) -> Vec<(usize, usize)> {
    // Every other page: nothing coalesces.
    (0..n).map(|i| ((first + 2 * i) * 4096, 4096)).collect()
}

#[test]
fn zero_copy_releases_only_after_the_peer_took_the_data() {
    let region = MappedRegion::new(2048, 21).unwrap();
    for kind in [
        TransportKind::MsgZeroCopy,
        TransportKind::UringZc,
        TransportKind::Auto,
    ] {
        // A tiny receive window that nobody reads: most of what we send stays queued on our side.
        let (tx, rx) = tcp_pair(Some(4096));
        let opts = TransportOptions {
            zerocopy_min_bytes: 0,
            ..TransportOptions::default()
        };
        let mut t = transport::open(kind, tx, opts).unwrap();
        let (a, b) = (pages(0, 64), pages(512, 32));
        // SAFETY: the region is not written until the transport is dropped.
        let t1 = unsafe { t.send(&slices(&region, &a)) }.unwrap();
        // SAFETY: as above.
        let t2 = unsafe { t.send(&slices(&region, &b)) }.unwrap();
        assert!(t1 < t2);
        let until = Instant::now() + Duration::from_millis(150);
        while Instant::now() < until {
            assert_eq!(
                t.poll_released().unwrap(),
                SendTicket::NONE,
                "{kind}: released before the peer read"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut want = expected(&region, &a);
        want.extend(expected(&region, &b));
        let reader = spawn_reader(rx, want.len(), 1 << 20, Duration::ZERO);
        t.wait_released(t1).unwrap();
        assert!(t.poll_released().unwrap() >= t1);
        t.wait_released(t2).unwrap();
        assert_eq!(t.poll_released().unwrap(), t2);
        let s = t.stats();
        assert_eq!(
            s.zerocopy_completions + s.copied_completions,
            s.zerocopy_calls,
            "{kind}: {s:?}"
        );
        drop(t);
        assert!(reader.join().unwrap() == want, "{kind}: bytes differ");
    }
}

#[test]
fn copy_releases_when_send_returns() {
    let region = MappedRegion::new(256, 22).unwrap();
    let (tx, rx) = tcp_pair(Some(4096));
    let mut t = transport::open(TransportKind::Copy, tx, TransportOptions::default()).unwrap();
    let segs = pages(0, 16);
    // SAFETY: the region is not written until the transport is dropped.
    let ticket = unsafe { t.send(&slices(&region, &segs)) }.unwrap();
    // Nobody has read anything, yet the kernel holds its own copy.
    assert_eq!(t.poll_released().unwrap(), ticket);
    let want = expected(&region, &segs);
    let reader = spawn_reader(rx, want.len(), 1 << 20, Duration::ZERO);
    drop(t);
    assert!(reader.join().unwrap() == want);
}

#[test]
fn waiting_for_a_ticket_never_issued_is_an_error() {
    for kind in TransportKind::ALL {
        let (tx, _rx) = tcp_pair(None);
        let mut t = transport::open(kind, tx, TransportOptions::default()).unwrap();
        t.wait_released(SendTicket::NONE).unwrap();
        let t1 = t
            .send_and_wait(&[std::io::IoSlice::new(b"header")])
            .unwrap();
        assert_eq!(t.last_ticket(), t1);
        // A ticket from another transport with more sends.
        let (tx2, _rx2) = tcp_pair(None);
        let mut other =
            transport::open(TransportKind::Copy, tx2, TransportOptions::default()).unwrap();
        other.send_and_wait(&[std::io::IoSlice::new(b"a")]).unwrap();
        let t2 = other.send_and_wait(&[std::io::IoSlice::new(b"b")]).unwrap();
        match t.wait_released(t2) {
            Err(TransportError::BadTicket { asked, last }) => assert_eq!((asked, last), (t2, t1)),
            other => panic!("{kind}: expected BadTicket, got {other:?}"),
        }
    }
}

#[test]
fn a_peer_that_stops_reading_stalls_the_send_instead_of_hanging() {
    let region = MappedRegion::new(8192, 23).unwrap(); // 32 MiB: more than any socket buffers
    for kind in TransportKind::ALL {
        let (tx, _rx) = tcp_pair(Some(4096));
        let opts = TransportOptions {
            stall_timeout: Duration::from_millis(200),
            ..TransportOptions::default()
        };
        let mut t = transport::open(kind, tx, opts).unwrap();
        let segs: Vec<(usize, usize)> = (0..8192).map(|p| (p * 4096, 4096)).collect();
        let start = Instant::now();
        // SAFETY: the region outlives the transport (whose drop waits at most the stall
        // timeout) and is never written.
        let r = unsafe { t.send(&slices(&region, &segs)) };
        assert!(
            matches!(r, Err(TransportError::Stalled(_))),
            "{kind}: {r:?}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{kind}: took {:?}",
            start.elapsed()
        );
    }
}

#[test]
fn zero_bytes_per_call_is_rejected() {
    let (tx, _rx) = tcp_pair(None);
    let opts = TransportOptions {
        max_bytes_per_call: 0,
        ..TransportOptions::default()
    };
    let err = transport::open(TransportKind::Copy, tx, opts)
        .err()
        .unwrap();
    assert!(matches!(err, TransportError::BadOptions(_)), "{err}");
}
