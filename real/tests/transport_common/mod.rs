//! Shared helpers of the transport tests: loopback TCP pairs, a reader thread, scattered
//! segments of a mapped region.

#![allow(dead_code)] // each test file uses a different subset

use std::io::{IoSlice, Read};
use std::net::{TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

use ftvm_real::transport::bench::MappedRegion;
use nix::sys::socket::{setsockopt, sockopt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A connected loopback pair `(sender, receiver)`. `rcvbuf` is set on the listener before the
/// connection exists, so the receive window starts (and stays) that small.
pub fn tcp_pair(rcvbuf: Option<usize>) -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    if let Some(n) = rcvbuf {
        setsockopt(&l, sockopt::RcvBuf, &n).unwrap();
    }
    let tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (rx, _) = l.accept().unwrap();
    tx.set_nodelay(true).unwrap();
    (tx, rx)
}

/// Reads exactly `total` bytes on a thread (sleeping `pause` after every read of up to `chunk`
/// bytes, to make the sender's buffer fill up), then checks the stream ends there.
pub fn spawn_reader(
    mut s: TcpStream,
    total: usize,
    chunk: usize,
    pause: Duration,
) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut out = vec![0u8; total];
        let mut got = 0;
        while got < total {
            let end = (got + chunk).min(total);
            let n = s.read(&mut out[got..end]).unwrap();
            assert!(n > 0, "stream ended after {got} of {total} bytes");
            got += n;
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
        let mut extra = [0u8; 1];
        assert_eq!(s.read(&mut extra).unwrap(), 0, "more bytes than sent");
        out
    })
}

/// `count` segments `(offset, len)` of `region`: whole pages, sub-page pieces of odd lengths,
/// and runs of adjacent pages (which the transports may coalesce), in random order.
pub fn scattered(region: &MappedRegion, count: usize, seed: u64) -> Vec<(usize, usize)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let page = 4096;
    let pages = region.pages();
    let mut segs = Vec::with_capacity(count);
    while segs.len() < count {
        let p = rng.gen_range(0..pages);
        match rng.gen_range(0..4) {
            0 => segs.push((p * page, page)),
            1 => {
                let off = rng.gen_range(0..page);
                let len = rng.gen_range(1..=page - off);
                segs.push((p * page + off, len));
            }
            2 => {
                // A run of adjacent whole pages, as separate segments.
                for q in p..(p + rng.gen_range(2..6)).min(pages) {
                    segs.push((q * page, page));
                }
            }
            _ => {
                // Two pieces of one page that touch: coalescable.
                let cut = rng.gen_range(1..page);
                segs.push((p * page, cut));
                segs.push((p * page + cut, page - cut));
            }
        }
    }
    segs.truncate(count);
    segs
}

/// The segments as IoSlices of `region`.
pub fn slices<'a>(region: &'a MappedRegion, segs: &[(usize, usize)]) -> Vec<IoSlice<'a>> {
    let all = region.as_slice();
    segs.iter()
        .map(|&(o, l)| IoSlice::new(&all[o..o + l]))
        .collect()
}

/// The bytes the segments should arrive as.
pub fn expected(region: &MappedRegion, segs: &[(usize, usize)]) -> Vec<u8> {
    let all = region.as_slice();
    let mut out = Vec::new();
    for &(o, l) in segs {
        out.extend_from_slice(&all[o..o + l]);
    }
    out
}
