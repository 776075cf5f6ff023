//! Every transport delivers exactly the bytes it was given: many scattered segments of a large
//! mapped region, more than IOV_MAX per send, and sends the kernel only partly takes.

mod transport_common;

use std::time::Duration;

use ftvm_real::transport::bench::MappedRegion;
use ftvm_real::transport::{self, SendTicket, TransportKind, TransportOptions};
use transport_common::{expected, scattered, slices, spawn_reader, tcp_pair};

/// Segments per send: the second one is over 2 × IOV_MAX (1024).
const SEND_SIZES: [usize; 3] = [700, 2600, 1500];

#[test]
fn every_transport_delivers_scattered_segments_exactly() {
    let region = MappedRegion::new(8192, 11).unwrap(); // 32 MiB
    for kind in TransportKind::ALL {
        let segs = scattered(&region, SEND_SIZES.iter().sum(), kind as u64);
        let want = expected(&region, &segs);
        let (tx, rx) = tcp_pair(None);
        let reader = spawn_reader(rx, want.len(), 1 << 20, Duration::ZERO);
        let mut t = transport::open(kind, tx, TransportOptions::default()).unwrap();
        assert_eq!(t.kind(), kind);
        let mut rest = &segs[..];
        let mut last = SendTicket::NONE;
        for n in SEND_SIZES {
            let (now, later) = rest.split_at(n);
            rest = later;
            // SAFETY: the region is not written until the transport is dropped.
            let ticket = unsafe { t.send(&slices(&region, now)) }.unwrap();
            assert_eq!(
                ticket.value(),
                last.value() + 1,
                "{kind}: tickets count sends"
            );
            last = ticket;
        }
        t.wait_released(last).unwrap();
        assert_eq!(t.poll_released().unwrap(), last);
        let s = t.stats();
        drop(t); // closes the socket: the reader checks nothing follows
        assert!(reader.join().unwrap() == want, "{kind}: bytes differ");
        assert_eq!(s.bytes, want.len() as u64, "{kind}");
        assert_eq!(s.sends, 3, "{kind}");
        // Batched: at least one call per IOV_MAX iovecs, and nowhere near one per segment.
        assert!(s.calls >= 4, "{kind}: {} calls", s.calls);
        assert!(
            s.calls * 50 < segs.len() as u64,
            "{kind}: {} calls for {} segments",
            s.calls,
            segs.len()
        );
        assert_eq!(
            s.zerocopy_completions + s.copied_completions,
            s.zerocopy_calls,
            "{kind}: every zero-copy call completed once: {s:?}"
        );
        if kind == TransportKind::Copy {
            assert_eq!(s.zerocopy_calls, 0);
        } else {
            assert!(s.zerocopy_calls > 0, "{kind}: {s:?}");
        }
    }
}

#[test]
fn partial_sends_are_resumed_where_they_stopped() {
    let region = MappedRegion::new(4096, 12).unwrap(); // 16 MiB
    for kind in TransportKind::ALL {
        // 6 MiB of whole pages in one send; a small receive window and a slow reader keep the
        // socket buffer full, so sendmsg takes only part of each call.
        let segs: Vec<(usize, usize)> = scattered(&region, 4000, 100 + kind as u64)
            .into_iter()
            .map(|(o, _)| (o / 4096 * 4096, 4096))
            .take(1536)
            .collect();
        let want = expected(&region, &segs);
        let (tx, rx) = tcp_pair(Some(64 << 10));
        let reader = spawn_reader(rx, want.len(), 64 << 10, Duration::from_micros(500));
        let opts = TransportOptions {
            zerocopy_min_bytes: 0,
            ..TransportOptions::default()
        };
        let mut t = transport::open(kind, tx, opts).unwrap();
        // SAFETY: the region is not written until the transport is dropped.
        let ticket = unsafe { t.send(&slices(&region, &segs)) }.unwrap();
        t.wait_released(ticket).unwrap();
        let s = t.stats();
        drop(t);
        assert!(reader.join().unwrap() == want, "{kind}: bytes differ");
        assert_eq!(s.bytes, want.len() as u64);
        // io_uring retries inside the kernel (MSG_WAITALL), so only sendmsg shows partial calls.
        if kind != TransportKind::UringZc {
            assert!(
                s.partial_sends > 0,
                "{kind}: no partial send happened: {s:?}"
            );
        }
    }
}
