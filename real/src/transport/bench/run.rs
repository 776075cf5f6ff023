//! Running one benchmark case: a receiver thread and a sender thread over one TCP connection,
//! each in its namespace when the path is veth.

use std::io::{IoSlice, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::cpu::{self, CpuTime};
use super::netns::VethPair;
use super::region::{MappedRegion, PAGE};
use super::{secs, BenchCase, BenchOptions, BenchPath, BenchPathReport, BenchSample};
use crate::transport::{self, SendTicket, TransportKind, TransportOptions, TransportStats};

const GIB: f64 = (1u64 << 30) as f64;
/// Largest read the receiver asks for.
const RECV_BUF: usize = 1 << 20;

/// What one case sends with.
#[derive(Debug, Clone, Copy)]
enum Case {
    /// `write` of one contiguous buffer: the path's reference.
    RawTcp,
    Transport(TransportKind),
}

/// Where the two ends run.
struct PathEnv<'a> {
    veth: Option<&'a VethPair>,
}

impl PathEnv<'_> {
    fn receiver_ip(&self) -> IpAddr {
        self.veth.map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |v| {
            IpAddr::V4(v.receiver_addr())
        })
    }
}

/// Page indices in the order they are sent: a random permutation of the region, repeated if a
/// repetition sends more than the region holds.
pub(super) fn page_order(opts: &BenchOptions) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..opts.region_pages).collect();
    perm.shuffle(&mut rand::rngs::StdRng::seed_from_u64(opts.seed));
    (0..opts.bytes_per_rep / PAGE)
        .map(|i| perm[i % perm.len()])
        .collect()
}

/// Measures raw TCP and every transport × batch size on `path`.
pub(super) fn measure_path(
    path: BenchPath,
    opts: &BenchOptions,
    region: &MappedRegion,
    order: &[usize],
) -> BenchPathReport {
    let veth = match path {
        BenchPath::Loopback => None,
        BenchPath::Veth => match VethPair::create() {
            Ok(v) => Some(v),
            Err(why) => {
                return BenchPathReport {
                    path,
                    skipped: Some(why),
                    raw_tcp: None,
                    cases: Vec::new(),
                }
            }
        },
    };
    let env = PathEnv {
        veth: veth.as_ref(),
    };
    let raw_batch = opts
        .batch_bytes
        .iter()
        .copied()
        .max()
        .unwrap_or(PAGE)
        .min(region.as_slice().len());
    let raw_tcp = Some(run_case(&env, Case::RawTcp, raw_batch, opts, region, order));
    let mut cases = Vec::new();
    for &kind in &opts.transports {
        for &batch in &opts.batch_bytes {
            cases.push(run_case(
                &env,
                Case::Transport(kind),
                batch,
                opts,
                region,
                order,
            ));
        }
    }
    BenchPathReport {
        path,
        skipped: None,
        raw_tcp,
        cases,
    }
}

fn run_case(
    env: &PathEnv<'_>,
    case: Case,
    batch: usize,
    opts: &BenchOptions,
    region: &MappedRegion,
    order: &[usize],
) -> BenchCase {
    let name = match case {
        Case::RawTcp => "raw-tcp".to_string(),
        Case::Transport(k) => k.to_string(),
    };
    let reps = opts.repetitions + 1; // the first is a warm-up
    let (addr_tx, addr_rx) = channel();
    let (done_tx, done_rx) = channel();
    let outcome = std::thread::scope(|s| {
        let rx = s.spawn(|| receive(env, reps, opts.bytes_per_rep, addr_tx, done_tx));
        let tx = s.spawn(|| send(env, case, batch, reps, region, order, addr_rx, done_rx));
        let sent = tx
            .join()
            .unwrap_or_else(|_| Err("sender thread panicked".into()));
        let received = rx
            .join()
            .unwrap_or_else(|_| Err("receiver thread panicked".into()));
        // The sender's error explains a receiver's EOF, so it wins.
        sent.and_then(|r| received.map(|()| r))
    });
    let mut out = BenchCase {
        transport: name,
        batch_bytes: batch,
        gib_per_s: 0.0,
        sender_cpu_s_per_gib: 0.0,
        receiver_cpu_s_per_gib: 0.0,
        process_cpu_s_per_gib: 0.0,
        us_per_batch: 0.0,
        stats: None,
        samples: Vec::new(),
        error: None,
    };
    match outcome {
        Err(e) => out.error = Some(e),
        Ok((samples, stats)) => {
            let gib = opts.bytes_per_rep as f64 / GIB;
            let batches = opts.bytes_per_rep.div_ceil(batch) as f64;
            let measured = &samples[1..];
            out.gib_per_s = median(measured.iter().map(|s| gib / s.seconds));
            out.sender_cpu_s_per_gib = median(measured.iter().map(|s| s.sender_cpu_s / gib));
            out.receiver_cpu_s_per_gib = median(measured.iter().map(|s| s.receiver_cpu_s / gib));
            out.process_cpu_s_per_gib = median(measured.iter().map(|s| s.process_cpu_s / gib));
            out.us_per_batch = median(measured.iter().map(|s| s.seconds / batches * 1e6));
            out.stats = stats;
            out.samples = measured.to_vec();
        }
    }
    out
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Accepts one connection and reads `reps` × `bytes`, reporting when each repetition's last
/// byte arrived and the CPU it took.
fn receive(
    env: &PathEnv<'_>,
    reps: usize,
    bytes: usize,
    addr_tx: Sender<Result<SocketAddr, String>>,
    done_tx: Sender<(Instant, CpuTime)>,
) -> Result<(), String> {
    let listener = (|| {
        if let Some(v) = env.veth {
            v.enter_receiver()?;
        }
        let l = TcpListener::bind((env.receiver_ip(), 0)).map_err(|e| format!("bind: {e}"))?;
        let a = l.local_addr().map_err(|e| format!("local_addr: {e}"))?;
        Ok::<_, String>((l, a))
    })();
    let listener = match listener {
        Ok((l, a)) => {
            let _ = addr_tx.send(Ok(a));
            l
        }
        Err(e) => {
            let _ = addr_tx.send(Err(e.clone()));
            return Err(e);
        }
    };
    let (mut s, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    let mut buf = vec![0u8; RECV_BUF];
    let mut prev = cpu::thread();
    for _ in 0..reps {
        let mut left = bytes;
        while left > 0 {
            let n = s
                .read(&mut buf[..left.min(RECV_BUF)])
                .map_err(|e| format!("receive: {e}"))?;
            if n == 0 {
                return Err("receiver: connection closed early".into());
            }
            left -= n;
        }
        let now = Instant::now();
        let c = cpu::thread();
        if done_tx.send((now, c.since(prev))).is_err() {
            return Ok(()); // the sender gave up; it reports why
        }
        prev = c;
    }
    Ok(())
}

type SendOutcome = Result<(Vec<BenchSample>, Option<TransportStats>), String>;

#[allow(clippy::too_many_arguments)]
fn send(
    env: &PathEnv<'_>,
    case: Case,
    batch: usize,
    reps: usize,
    region: &MappedRegion,
    order: &[usize],
    addr_rx: Receiver<Result<SocketAddr, String>>,
    done_rx: Receiver<(Instant, CpuTime)>,
) -> SendOutcome {
    if let Some(v) = env.veth {
        v.enter_sender()?;
    }
    let addr = addr_rx
        .recv()
        .map_err(|_| "receiver thread ended".to_string())??;
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    // The end of a checkpoint must not wait for a delayed ACK.
    stream
        .set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    let bytes = order.len() * PAGE;
    let pages: Vec<IoSlice<'_>> = order
        .iter()
        .map(|&p| IoSlice::new(region.page(p)))
        .collect();
    let mut transport = match case {
        Case::RawTcp => None,
        Case::Transport(k) => {
            let s = stream.try_clone().map_err(|e| format!("dup socket: {e}"))?;
            Some(transport::open(k, s, TransportOptions::default()).map_err(|e| e.to_string())?)
        }
    };
    let mut samples = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        let c0 = cpu::thread();
        let p0 = cpu::process();
        match transport.as_mut() {
            None => {
                let chunk = &region.as_slice()[..batch];
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(batch);
                    stream
                        .write_all(&chunk[..n])
                        .map_err(|e| format!("write: {e}"))?;
                    left -= n;
                }
            }
            Some(t) => {
                let mut last = SendTicket::NONE;
                for b in pages.chunks(batch / PAGE) {
                    // SAFETY: the region is never written during the benchmark and outlives the
                    // transport (dropped at the end of this function, before the region).
                    last = unsafe { t.send(b) }.map_err(|e| e.to_string())?;
                }
                t.wait_released(last).map_err(|e| e.to_string())?;
            }
        }
        let sender_end = Instant::now();
        let sender_cpu = cpu::thread().since(c0);
        let (recv_end, recv_cpu) = done_rx
            .recv()
            .map_err(|_| "receiver ended early".to_string())?;
        let process_cpu = cpu::process().since(p0);
        samples.push(BenchSample {
            seconds: secs(sender_end.max(recv_end) - t0),
            sender_cpu_s: secs(sender_cpu.total()),
            sender_sys_s: secs(sender_cpu.system),
            receiver_cpu_s: secs(recv_cpu.total()),
            process_cpu_s: secs(process_cpu.total()),
        });
    }
    Ok((samples, transport.map(|t| t.stats())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), 2.5);
        assert_eq!(median(std::iter::empty()), 0.0);
    }

    #[test]
    fn page_order_is_a_permutation_repeated() {
        let opts = BenchOptions {
            region_pages: 10,
            bytes_per_rep: 25 * PAGE,
            ..BenchOptions::default()
        };
        let o = page_order(&opts);
        assert_eq!(o.len(), 25);
        let mut first: Vec<usize> = o[..10].to_vec();
        first.sort();
        assert_eq!(first, (0..10).collect::<Vec<_>>());
        assert_eq!(o[..10], o[10..20]);
        assert_ne!(o[..10], (0..10).collect::<Vec<_>>()[..]);
    }
}
