//! On loopback the kernel copies zero-copy sends after all (the receive path cannot keep the
//! sender's pages); the transports must see and count that, and `auto` must fall back to `copy`.

mod transport_common;

use std::io::IoSlice;
use std::time::Duration;

use ftvm_real::transport::bench::MappedRegion;
use ftvm_real::transport::{self, SendTicket, Transport, TransportKind, TransportOptions};
use transport_common::{spawn_reader, tcp_pair};

/// Sends `batches` batches of 16 scattered pages (64 KiB) and waits for every release.
fn send_batches(t: &mut dyn Transport, region: &MappedRegion, batches: usize) -> SendTicket {
    let mut last = SendTicket::NONE;
    for b in 0..batches {
        let segs: Vec<IoSlice<'_>> = (0..16)
            .map(|i| IoSlice::new(region.page((b * 37 + i * 2) % region.pages())))
            .collect();
        // SAFETY: the region is not written until the transport is dropped.
        last = unsafe { t.send(&segs) }.unwrap();
    }
    t.wait_released(last).unwrap();
    last
}

#[test]
fn loopback_zero_copy_completions_are_counted_as_copied() {
    let region = MappedRegion::new(1024, 31).unwrap();
    for kind in [TransportKind::MsgZeroCopy, TransportKind::UringZc] {
        let (tx, rx) = tcp_pair(None);
        let reader = spawn_reader(rx, 256 * 16 * 4096, 1 << 20, Duration::ZERO);
        let mut t = transport::open(kind, tx, TransportOptions::default()).unwrap();
        send_batches(t.as_mut(), &region, 256);
        let s = t.stats();
        drop(t);
        reader.join().unwrap();
        assert!(s.zerocopy_calls >= 256, "{kind}: {s:?}");
        assert_eq!(
            s.zerocopy_completions + s.copied_completions,
            s.zerocopy_calls,
            "{kind}: {s:?}"
        );
        // Loopback delivery copies every zero-copy skb's pages (skb_orphan_frags_rx), so every
        // completion must say COPIED.
        assert_eq!(s.copied_completions, s.zerocopy_calls, "{kind}: {s:?}");
        assert!(
            s.notifications >= 1 && s.notifications <= s.zerocopy_calls,
            "{kind}: {s:?}"
        );
        assert!(s.zerocopy_active, "{kind}: only auto falls back");
    }
}

#[test]
fn auto_falls_back_to_copy_on_loopback_and_stays_there() {
    let region = MappedRegion::new(1024, 32).unwrap();
    let (tx, rx) = tcp_pair(None);
    let reader = spawn_reader(rx, 2 * 128 * 16 * 4096, 1 << 20, Duration::ZERO);
    let mut t = transport::open(TransportKind::Auto, tx, TransportOptions::default()).unwrap();
    send_batches(t.as_mut(), &region, 128);
    let first = t.stats();
    assert_eq!(first.fallbacks, 1, "{first:?}");
    assert!(!first.zerocopy_active);
    assert!(
        first.zerocopy_calls >= 4,
        "it tried zero-copy first: {first:?}"
    );
    // The decision waits for the first completions, which come as the peer ACKs; by then some
    // more zero-copy calls may be in flight, but the rest of the round went out plain.
    assert!(
        first.zerocopy_calls < first.calls,
        "it fell back within the round: {first:?}"
    );
    assert_eq!(first.copied_completions, first.zerocopy_calls, "{first:?}");
    send_batches(t.as_mut(), &region, 128);
    let second = t.stats();
    drop(t);
    reader.join().unwrap();
    assert_eq!(
        second.zerocopy_calls, first.zerocopy_calls,
        "no zero-copy after falling back"
    );
    assert_eq!(second.fallbacks, 1);
    // One plain call per batch, plus one more for each call the kernel took only part of.
    assert_eq!(
        second.calls - first.calls,
        128 + second.partial_sends - first.partial_sends,
        "{second:?}"
    );
}
