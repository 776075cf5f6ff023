//! Running one benchmark case: a receiver thread and a sender thread over one TCP connection,
//! each in its namespace when the path is veth.

use std::io::{IoSlice, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

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
/// How long the receiver waits for its sender to connect.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// CPUs to pin the sender and the receiver to.
    cpus: Option<(usize, usize)>,
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

/// Measures raw TCP and every transport × batch size on `path`. Every case keeps one connection
/// (as the agent would) and the repetitions are interleaved round by round, so a slow moment on
/// the machine hits every case alike instead of one.
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
        cpus: if opts.pin_threads { two_cpus() } else { None },
    };
    let raw_batch = opts
        .batch_bytes
        .iter()
        .copied()
        .max()
        .unwrap_or(PAGE)
        .min(region.as_slice().len());
    let mut specs = vec![(Case::RawTcp, raw_batch)];
    for &kind in &opts.transports {
        for &batch in &opts.batch_bytes {
            specs.push((Case::Transport(kind), batch));
        }
    }
    let mut cases = std::thread::scope(|s| {
        let mut sessions: Vec<Session<'_, '_>> = specs
            .iter()
            .map(|&(case, batch)| Session::start(s, &env, case, batch, opts, region, order))
            .collect();
        // Round 0 warms every connection up and is not kept. Each round visits the batch sizes
        // in a fresh (seeded) order and, within a batch size, the transports in a fresh order:
        // no case always follows the same neighbour, and the cases compared with each other
        // (same batch) run back to back, so a slow spell of a shared machine hits a pair alike.
        // A case's samples stay in round order, so cases can be compared round by round.
        let order = round_order(&specs, opts.repetitions, opts.seed);
        for (round, sequence) in order.iter().enumerate() {
            for &i in sequence {
                sessions[i].run_once(round > 0);
            }
        }
        sessions
            .into_iter()
            .map(|sess| sess.finish(opts))
            .collect::<Vec<_>>()
    });
    let raw_tcp = Some(cases.remove(0));
    BenchPathReport {
        path,
        skipped: None,
        raw_tcp,
        cases,
    }
}

/// For each round (warm-up included), the order in which the cases of `specs` run: batch sizes
/// shuffled, and the cases of one batch size shuffled among themselves, kept together.
fn round_order(specs: &[(Case, usize)], repetitions: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut batches: Vec<usize> = specs.iter().map(|s| s.1).collect();
    batches.sort_unstable();
    batches.dedup();
    (0..=repetitions)
        .map(|round| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(
                seed ^ (round as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            );
            batches.shuffle(&mut rng);
            batches
                .iter()
                .flat_map(|&b| {
                    let mut same: Vec<usize> =
                        (0..specs.len()).filter(|&i| specs[i].1 == b).collect();
                    same.shuffle(&mut rng);
                    same
                })
                .collect()
        })
        .collect()
}

/// The first two CPUs this process may run on: sender and receiver get one each, so the
/// scheduler does not move them around mid-measurement.
fn two_cpus() -> Option<(usize, usize)> {
    let set = sched_getaffinity(Pid::from_raw(0)).ok()?;
    let mut allowed = (0..CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false));
    Some((allowed.next()?, allowed.next()?))
}

fn pin(cpu: Option<usize>) -> Result<(), String> {
    let Some(cpu) = cpu else { return Ok(()) };
    let mut set = CpuSet::new();
    set.set(cpu).map_err(|e| format!("cpu {cpu}: {e}"))?;
    // pid 0: the calling thread only.
    sched_setaffinity(Pid::from_raw(0), &set).map_err(|e| format!("pin to cpu {cpu}: {e}"))
}

type SenderResult = Result<Option<TransportStats>, String>;

/// One case: a connected sender thread and receiver thread, driven one repetition at a time.
struct Session<'scope, 'env> {
    case: Case,
    batch: usize,
    go: Option<Sender<()>>,
    results: Receiver<Result<BenchSample, String>>,
    sender: ScopedJoinHandle<'scope, SenderResult>,
    receiver: ScopedJoinHandle<'scope, Result<(), String>>,
    samples: Vec<BenchSample>,
    error: Option<String>,
    _env: std::marker::PhantomData<&'env ()>,
}

impl<'scope, 'env> Session<'scope, 'env> {
    fn start(
        s: &'scope Scope<'scope, 'env>,
        env: &'env PathEnv<'env>,
        case: Case,
        batch: usize,
        opts: &'env BenchOptions,
        region: &'env MappedRegion,
        order: &'env [usize],
    ) -> Self {
        let (addr_tx, addr_rx) = channel();
        let (done_tx, done_rx) = channel();
        let (go_tx, go_rx) = channel();
        let (res_tx, res_rx) = channel();
        let bytes = opts.bytes_per_rep;
        let receiver = s.spawn(move || receive(env, bytes, addr_tx, done_tx));
        let sender = s.spawn(move || {
            let ends = SenderEnds {
                addr_rx,
                done_rx,
                go_rx,
                res_tx,
            };
            send(env, case, batch, region, order, ends)
        });
        Session {
            case,
            batch,
            go: Some(go_tx),
            results: res_rx,
            sender,
            receiver,
            samples: Vec::new(),
            error: None,
            _env: std::marker::PhantomData,
        }
    }

    /// Runs one repetition; keeps its sample if `keep`.
    fn run_once(&mut self, keep: bool) {
        if self.error.is_some() {
            return;
        }
        let Some(go) = &self.go else { return };
        let outcome = go
            .send(())
            .map_err(|_| "sender thread ended".to_string())
            .and_then(|()| {
                self.results
                    .recv()
                    .map_err(|_| "sender thread ended".to_string())?
            });
        match outcome {
            Ok(sample) if keep => self.samples.push(sample),
            Ok(_) => {}
            Err(e) => self.error = Some(e),
        }
    }

    fn finish(mut self, opts: &BenchOptions) -> BenchCase {
        drop(self.go.take()); // the sender closes its connection, the receiver sees EOF
        let sent = self
            .sender
            .join()
            .unwrap_or_else(|_| Err("sender thread panicked".into()));
        let received = self
            .receiver
            .join()
            .unwrap_or_else(|_| Err("receiver thread panicked".into()));
        let transport = match self.case {
            Case::RawTcp => "raw-tcp".to_string(),
            Case::Transport(k) => k.to_string(),
        };
        let mut out = BenchCase::empty(transport, self.batch);
        // A thread's own error explains the "thread ended" the driver saw; the sender's error
        // explains a receiver's early EOF.
        match (sent, received, self.error) {
            (Err(e), _, _) | (Ok(_), Err(e), _) | (Ok(_), Ok(()), Some(e)) => out.error = Some(e),
            (Ok(stats), Ok(()), None) => {
                let gib = opts.bytes_per_rep as f64 / GIB;
                let batches = opts.bytes_per_rep.div_ceil(self.batch) as f64;
                let m = &self.samples;
                out.gib_per_s = median(m.iter().map(|s| gib / s.seconds));
                out.best_gib_per_s = m.iter().map(|s| gib / s.seconds).fold(0.0, f64::max);
                out.sender_cpu_s_per_gib = median(m.iter().map(|s| s.sender_cpu_s / gib));
                out.receiver_cpu_s_per_gib = median(m.iter().map(|s| s.receiver_cpu_s / gib));
                out.process_cpu_s_per_gib = median(m.iter().map(|s| s.process_cpu_s / gib));
                out.us_per_batch = median(m.iter().map(|s| s.seconds / batches * 1e6));
                out.stats = stats;
                out.samples = self.samples;
            }
        }
        out
    }
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

/// Accepts one connection and reads `bytes` per repetition until the sender closes, reporting
/// when each repetition's last byte arrived and the CPU it took.
fn receive(
    env: &PathEnv<'_>,
    bytes: usize,
    addr_tx: Sender<Result<SocketAddr, String>>,
    done_tx: Sender<(Instant, CpuTime)>,
) -> Result<(), String> {
    let listener = (|| {
        if let Some(v) = env.veth {
            v.enter_receiver()?;
        }
        pin(env.cpus.map(|c| c.1))?;
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
    let mut s = accept_within(&listener, ACCEPT_TIMEOUT)?;
    drop(listener);
    let mut buf = vec![0u8; RECV_BUF];
    let mut prev = cpu::thread();
    loop {
        let mut left = bytes;
        while left > 0 {
            let n = s
                .read(&mut buf[..left.min(RECV_BUF)])
                .map_err(|e| format!("receive: {e}"))?;
            if n == 0 && left == bytes {
                return Ok(()); // closed between repetitions: done
            }
            if n == 0 {
                return Err("receiver: connection closed mid-repetition".into());
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
}

/// Accepts one connection, giving up after `timeout` (a sender that failed to set up never
/// connects, and the receiver must not wait for it forever).
fn accept_within(l: &TcpListener, timeout: Duration) -> Result<TcpStream, String> {
    l.set_nonblocking(true)
        .map_err(|e| format!("listener O_NONBLOCK: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)
                    .map_err(|e| format!("socket blocking mode: {e}"))?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(format!("no connection within {timeout:?}"));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
}

/// The sender thread's channels.
struct SenderEnds {
    addr_rx: Receiver<Result<SocketAddr, String>>,
    done_rx: Receiver<(Instant, CpuTime)>,
    go_rx: Receiver<()>,
    res_tx: Sender<Result<BenchSample, String>>,
}

/// Connects, then runs one repetition per message on `go_rx` until it closes.
fn send(
    env: &PathEnv<'_>,
    case: Case,
    batch: usize,
    region: &MappedRegion,
    order: &[usize],
    ends: SenderEnds,
) -> SenderResult {
    if let Some(v) = env.veth {
        v.enter_sender()?;
    }
    pin(env.cpus.map(|c| c.0))?;
    let addr = ends
        .addr_rx
        .recv()
        .map_err(|_| "receiver thread ended".to_string())??;
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    // The end of a checkpoint must not wait for a delayed ACK.
    stream
        .set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
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
    for () in ends.go_rx.iter() {
        let sample = (|| {
            let t0 = Instant::now();
            let c0 = cpu::thread();
            let p0 = cpu::process();
            match transport.as_mut() {
                None => {
                    let chunk = &region.as_slice()[..batch];
                    let mut left = pages.len() * PAGE;
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
                        // SAFETY: the region is never written during the benchmark and
                        // outlives the transport (dropped when this thread ends, inside the
                        // scope that borrows the region).
                        last = unsafe { t.send(b) }.map_err(|e| e.to_string())?;
                    }
                    t.wait_released(last).map_err(|e| e.to_string())?;
                }
            }
            let sender_end = Instant::now();
            let sender_cpu = cpu::thread().since(c0);
            let (recv_end, recv_cpu) = ends
                .done_rx
                .recv()
                .map_err(|_| "receiver ended early".to_string())?;
            let process_cpu = cpu::process().since(p0);
            Ok(BenchSample {
                seconds: secs(sender_end.max(recv_end) - t0),
                sender_cpu_s: secs(sender_cpu.total()),
                sender_sys_s: secs(sender_cpu.system),
                receiver_cpu_s: secs(recv_cpu.total()),
                process_cpu_s: secs(process_cpu.total()),
            })
        })();
        let failed = sample.as_ref().err().cloned();
        let _ = ends.res_tx.send(sample);
        if let Some(e) = failed {
            return Err(e);
        }
    }
    Ok(transport.map(|t| t.stats()))
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

#[cfg(test)]
mod order_tests {
    use super::*;
    use crate::transport::TransportKind;

    #[test]
    fn every_case_runs_once_per_round_with_its_batch_neighbours() {
        let specs: Vec<(Case, usize)> = [64, 256]
            .into_iter()
            .flat_map(|b| {
                [TransportKind::Copy, TransportKind::Auto]
                    .into_iter()
                    .map(move |k| (Case::Transport(k), b << 10))
            })
            .chain([(Case::RawTcp, 256 << 10)])
            .collect();
        let order = round_order(&specs, 6, 42);
        assert_eq!(order.len(), 7);
        let mut firsts = std::collections::BTreeSet::new();
        for seq in &order {
            let mut sorted = seq.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..specs.len()).collect::<Vec<_>>());
            // Cases of one batch size are contiguous.
            let batches: Vec<usize> = seq.iter().map(|&i| specs[i].1).collect();
            let changes = batches.windows(2).filter(|w| w[0] != w[1]).count();
            assert_eq!(changes, 1, "{batches:?}");
            firsts.insert(seq[0]);
        }
        // The order changes from round to round.
        assert!(firsts.len() > 1);
    }
}
