//! A client of the guest's counter service (real/guest): one persistent HTTP/1.1 connection
//! sending `GET /incr`, checking that the counter never goes back — a reply that shows a value
//! at or below one already seen means the VM lost state a client was told about.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How often [`Connection::open`] starts another connection attempt while none has connected.
pub const CONNECT_RETRY: Duration = Duration::from_millis(200);

/// Errors of one request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection failed or closed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The reply was not what the service sends.
    #[error("bad reply: {0}")]
    BadReply(String),
    /// No reply within the timeout.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
}

/// What a client run saw.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ClientReport {
    /// Replies received.
    pub replies: u64,
    /// Requests that failed (timeout, reset) and were retried on a new connection.
    pub errors: u64,
    /// Connections opened (1 when the TCP connection survived failover).
    pub connections: u64,
    /// Replies whose counter was not above every counter seen before: state went back.
    pub lost: u64,
    /// Highest counter seen.
    pub max_seen: u64,
    /// Longest time between two consecutive replies, in microseconds (the pause a client saw).
    pub longest_gap_us: u64,
    /// Median and 99th percentile response time, in microseconds.
    pub p50_us: u64,
    /// 99th percentile response time, in microseconds.
    pub p99_us: u64,
    /// Mean response time, in microseconds.
    pub mean_us: u64,
    /// The longest waits between consecutive replies ([`PAUSE_REPORTED`] or more), each with
    /// when it ended (wall clock), so a run can tell which of its phases a pause fell in. At
    /// most [`PAUSES_KEPT`], the longest.
    pub pauses: Vec<Pause>,
}

/// A wait between two consecutive replies long enough to report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pause {
    /// When the reply that ended it arrived, in milliseconds since the Unix epoch.
    pub end_unix_ms: u64,
    /// How long it was, in microseconds.
    pub us: u64,
}

/// Waits shorter than this are not listed in [`ClientReport::pauses`].
pub const PAUSE_REPORTED: Duration = Duration::from_millis(20);
/// How many of the longest pauses a report keeps.
pub const PAUSES_KEPT: usize = 64;

impl ClientReport {
    /// Notes a wait of `us` that ended now, keeping only the [`PAUSES_KEPT`] longest.
    fn note_pause(&mut self, us: u64) {
        if us < PAUSE_REPORTED.as_micros() as u64 {
            return;
        }
        let end_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.pauses.push(Pause { end_unix_ms, us });
        self.keep_longest_pauses();
    }

    fn keep_longest_pauses(&mut self) {
        if self.pauses.len() > PAUSES_KEPT {
            self.pauses
                .sort_unstable_by_key(|p| std::cmp::Reverse(p.us));
            self.pauses.truncate(PAUSES_KEPT);
        }
    }

    /// The longest pause that overlaps the wall-clock window `[from_ms, to_ms]` (Unix ms).
    pub fn longest_pause_within(pauses: &[Pause], from_ms: u64, to_ms: u64) -> Option<Pause> {
        pauses
            .iter()
            .copied()
            .filter(|p| p.end_unix_ms >= from_ms && p.end_unix_ms - p.us / 1000 <= to_ms)
            .max_by_key(|p| p.us)
    }
}

/// One open connection to the service.
pub struct Connection {
    reader: BufReader<TcpStream>,
}

impl Connection {
    /// Connects to the service within `timeout`, starting a fresh attempt every
    /// [`CONNECT_RETRY`] while the earlier ones are still pending; the first to connect wins.
    ///
    /// One `connect` alone would retransmit its SYN after 1 s, 3 s, 7 s: across a failover or
    /// a full sync the VM may answer only for a few hundred milliseconds before its next
    /// outage, and a backed-off SYN can miss that window whole. Earlier attempts stay pending
    /// because a SYN-ACK can be held by the output gate for a whole epoch and its pause.
    pub async fn open(addr: SocketAddr, timeout: Duration) -> Result<Self, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut attempts = tokio::task::JoinSet::new();
        let mut retry = tokio::time::interval(CONNECT_RETRY);
        let mut last_error = None;
        let stream = loop {
            tokio::select! {
                _ = retry.tick() => {
                    attempts.spawn(TcpStream::connect(addr));
                }
                Some(done) = attempts.join_next() => match done {
                    Ok(Ok(stream)) => break stream,
                    Ok(Err(e)) => last_error = Some(e),
                    // An attempt's task cannot panic; a cancelled one is simply not counted.
                    Err(_) => {}
                },
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(match last_error {
                        Some(e) => ClientError::Io(e),
                        None => ClientError::Timeout(timeout),
                    });
                }
            }
        };
        // Dropping the set aborts the attempts still pending, closing their sockets.
        drop(attempts);
        stream.set_nodelay(true)?;
        Ok(Connection {
            reader: BufReader::new(stream),
        })
    }

    /// Sends `GET path` and returns the reply body.
    pub async fn get(&mut self, path: &str, timeout: Duration) -> Result<String, ClientError> {
        tokio::time::timeout(timeout, self.get_inner(path))
            .await
            .map_err(|_| ClientError::Timeout(timeout))?
    }

    async fn get_inner(&mut self, path: &str) -> Result<String, ClientError> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: vm\r\nConnection: keep-alive\r\n\r\n");
        self.reader.get_mut().write_all(req.as_bytes()).await?;
        let mut status = String::new();
        if self.reader.read_line(&mut status).await? == 0 {
            return Err(ClientError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        if !status.starts_with("HTTP/1.") || !status.contains(" 200") {
            return Err(ClientError::BadReply(status.trim().to_string()));
        }
        let mut length = None;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).await? == 0 {
                return Err(ClientError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse::<usize>().ok();
                }
            }
        }
        let length = length.ok_or_else(|| ClientError::BadReply("no Content-Length".into()))?;
        if length > 1 << 20 {
            return Err(ClientError::BadReply(format!("body of {length} bytes")));
        }
        let mut body = vec![0u8; length];
        self.reader.read_exact(&mut body).await?;
        String::from_utf8(body).map_err(|_| ClientError::BadReply("body is not UTF-8".into()))
    }
}

/// Drives `GET /incr` until `deadline` passes, reconnecting after errors.
pub async fn run_counter_client(
    addr: SocketAddr,
    request_timeout: Duration,
    deadline: Instant,
    on_reply: impl FnMut(u64),
) -> ClientReport {
    let (mut report, mut latencies) = drive(addr, request_timeout, deadline, on_reply).await;
    report.summarise(&mut latencies);
    report
}

/// `clients` clients, each on its own connection, drive `GET /incr` at once until `deadline`;
/// one report for all of them (a client's replies must rise among themselves: the counter is
/// shared, so replies to different clients may arrive in any order).
pub async fn run_counter_clients(
    addr: SocketAddr,
    clients: usize,
    request_timeout: Duration,
    deadline: Instant,
    on_reply: std::sync::Arc<dyn Fn(u64) + Send + Sync>,
) -> ClientReport {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..clients.max(1) {
        let f = on_reply.clone();
        set.spawn(drive(addr, request_timeout, deadline, move |v| f(v)));
    }
    let mut all = ClientReport::default();
    let mut latencies = Vec::new();
    while let Some(done) = set.join_next().await {
        match done {
            Ok((r, l)) => {
                all.replies += r.replies;
                all.errors += r.errors;
                all.connections += r.connections;
                all.lost += r.lost;
                all.max_seen = all.max_seen.max(r.max_seen);
                all.longest_gap_us = all.longest_gap_us.max(r.longest_gap_us);
                all.pauses.extend(r.pauses);
                all.keep_longest_pauses();
                latencies.extend(l);
            }
            // A client task that died is a client that saw an error.
            Err(_) => all.errors += 1,
        }
    }
    all.summarise(&mut latencies);
    all
}

/// One client's loop: its report (without the latency figures) and its response times (µs).
async fn drive(
    addr: SocketAddr,
    request_timeout: Duration,
    deadline: Instant,
    mut on_reply: impl FnMut(u64),
) -> (ClientReport, Vec<u64>) {
    let mut report = ClientReport::default();
    let mut conn: Option<Connection> = None;
    let mut last_reply = Instant::now();
    let mut latencies: Vec<u64> = Vec::new();
    while Instant::now() < deadline {
        if conn.is_none() {
            match Connection::open(addr, request_timeout).await {
                Ok(c) => {
                    report.connections += 1;
                    conn = Some(c);
                }
                Err(_) => {
                    report.errors += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let sent = Instant::now();
        match c.get("/incr", request_timeout).await {
            Ok(body) => {
                let now = Instant::now();
                latencies.push(now.duration_since(sent).as_micros() as u64);
                let gap = now.duration_since(last_reply).as_micros() as u64;
                if report.replies > 0 {
                    report.longest_gap_us = report.longest_gap_us.max(gap);
                    report.note_pause(gap);
                }
                last_reply = now;
                report.replies += 1;
                match body.trim().parse::<u64>() {
                    Ok(v) => {
                        if v <= report.max_seen {
                            report.lost += 1;
                        }
                        report.max_seen = report.max_seen.max(v);
                        on_reply(v);
                    }
                    Err(_) => report.errors += 1,
                }
            }
            Err(_) => {
                report.errors += 1;
                conn = None;
            }
        }
    }
    (report, latencies)
}

impl ClientReport {
    /// Fills in the response-time figures from `latencies` (µs).
    fn summarise(&mut self, latencies: &mut [u64]) {
        if latencies.is_empty() {
            return;
        }
        latencies.sort_unstable();
        self.p50_us = latencies[latencies.len() / 2];
        self.p99_us = latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)];
        self.mean_us = latencies.iter().sum::<u64>() / latencies.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_keep_the_longest_and_are_found_by_window() {
        let mut r = ClientReport::default();
        r.note_pause(5_000); // too short to list
        assert!(r.pauses.is_empty());
        for i in 0..(PAUSES_KEPT as u64 + 10) {
            r.note_pause(20_000 + i);
        }
        assert_eq!(r.pauses.len(), PAUSES_KEPT);
        assert!(
            r.pauses.iter().all(|p| p.us >= 20_010),
            "the shortest went first"
        );
        let ps = [
            Pause {
                end_unix_ms: 1_000,
                us: 300_000,
            }, // 700..1000
            Pause {
                end_unix_ms: 5_000,
                us: 80_000,
            }, // 4920..5000
            Pause {
                end_unix_ms: 9_000,
                us: 50_000,
            }, // 8950..9000
        ];
        let within = |a, b| ClientReport::longest_pause_within(&ps, a, b).map(|p| p.us);
        assert_eq!(within(2_000, 10_000), Some(80_000));
        assert_eq!(
            within(900, 1_000),
            Some(300_000),
            "overlapping the window's start"
        );
        assert_eq!(
            within(4_000, 4_900),
            None,
            "ends before the next pause starts"
        );
        assert_eq!(within(8_990, 9_500), Some(50_000));
    }

    /// A service that starts listening only after the first attempts were refused is reached
    /// within one `open`: later attempts keep coming while the deadline has not passed.
    #[tokio::test]
    async fn open_keeps_trying_until_the_service_listens() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(3 * CONNECT_RETRY.as_millis() as u64)).await;
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            listener.accept().await.map(|_| ())
        });
        let started = Instant::now();
        let opened = Connection::open(addr, Duration::from_secs(5)).await;
        assert!(opened.is_ok(), "{:?}", opened.err());
        assert!(started.elapsed() >= 2 * CONNECT_RETRY);
        late.await.unwrap().unwrap();
    }

    /// Nothing ever listens: `open` gives up at its deadline with the last refusal.
    #[tokio::test]
    async fn open_gives_up_at_its_deadline() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let started = Instant::now();
        let err = Connection::open(addr, Duration::from_millis(700))
            .await
            .err()
            .expect("nothing listens");
        assert!(matches!(err, ClientError::Io(_)), "{err}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(700) && took < Duration::from_secs(3),
            "{took:?}"
        );
    }
}
