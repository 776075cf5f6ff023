//! ENOBUFS: when the socket's option memory (`net.core.optmem_max`, per network namespace)
//! cannot hold another MSG_ZEROCOPY notification, the send fails with ENOBUFS; the transport
//! must reap completions and retry (or, with nothing to reap, send that call plainly) and still
//! deliver every byte. Runs in a fresh namespace with a tiny optmem_max (needs root and `ip`).

mod transport_common;

use std::fs::File;
use std::process::Command;
use std::time::Duration;

use ftvm_real::transport::bench::MappedRegion;
use ftvm_real::transport::{self, SendTicket, TransportKind, TransportOptions, TransportStats};
use nix::sched::{setns, CloneFlags};
use transport_common::{expected, scattered, slices, spawn_reader, tcp_pair};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace with loopback up and the given optmem_max; deleted on drop.
struct Netns(String);

impl Netns {
    fn new(optmem: u32) -> Netns {
        let name = format!("ftvmenobufs{}o{optmem}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.0, "sysctl", "-qw"])
            .arg(format!("net.core.optmem_max={optmem}"))
            .output()
            .expect("run sysctl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ns
    }

    /// Moves the calling thread into the namespace.
    fn enter(&self) {
        let f = File::open(format!("/run/netns/{}", self.0)).unwrap();
        setns(&f, CloneFlags::CLONE_NEWNET).unwrap();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Sends 6000 scattered segments in small zero-copy calls inside a namespace with the given
/// optmem_max; returns the stats after everything was released and checked on arrival.
fn send_with_optmem(optmem: u32) -> TransportStats {
    let ns = Netns::new(optmem);
    let region = MappedRegion::new(4096, 41).unwrap();
    // A thread of its own: setns changes only the calling thread, which then ends.
    std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter();
            let segs = scattered(&region, 6000, 7);
            let want = expected(&region, &segs);
            let (tx, rx) = tcp_pair(Some(256 << 10));
            let reader = spawn_reader(rx, want.len(), 64 << 10, Duration::from_micros(200));
            let opts = TransportOptions {
                zerocopy_min_bytes: 0,
                max_bytes_per_call: 32 << 10,
                ..TransportOptions::default()
            };
            let mut t = transport::open(TransportKind::MsgZeroCopy, tx, opts).unwrap();
            let mut last = SendTicket::NONE;
            for chunk in segs.chunks(50) {
                // SAFETY: the region is not written until the transport is dropped.
                last = unsafe { t.send(&slices(&region, chunk)) }.unwrap();
            }
            t.wait_released(last).unwrap();
            let st = t.stats();
            drop(t);
            assert!(
                reader.join().unwrap() == want,
                "optmem {optmem}: bytes differ"
            );
            assert_eq!(st.bytes, want.len() as u64);
            st
        })
        .join()
        .unwrap()
    })
}

#[test]
fn enobufs_is_retried_after_reaping_and_every_byte_arrives() {
    // Room for a couple of notifications only.
    let st = send_with_optmem(2048);
    assert!(st.enobufs_retries > 0, "no ENOBUFS happened: {st:?}");
    assert_eq!(st.fallbacks, 0, "{st:?}");
    assert!(st.zerocopy_calls > 0);
    assert_eq!(
        st.zerocopy_completions + st.copied_completions,
        st.zerocopy_calls,
        "{st:?}"
    );
}

#[test]
fn enobufs_with_nothing_to_reap_sends_plainly() {
    // Not even one notification fits: every call falls back to a plain send.
    let st = send_with_optmem(256);
    assert!(st.fallbacks > 0, "{st:?}");
    assert_eq!(st.fallbacks, st.enobufs_retries, "{st:?}");
    assert_eq!(st.zerocopy_calls, 0, "{st:?}");
}
