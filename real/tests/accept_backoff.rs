//! A listener whose `accept` keeps failing (here: out of file descriptors, with connections
//! waiting in the backlog) retries after a growing pause instead of spinning. The failing
//! listener runs in a child process (this test binary again), so the descriptor limit it needs
//! does not starve the other tests.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use ftvm_model::{NodeId, VmId};
use ftvm_real::agent::accept::{self, ConnLimits, Listener};
use ftvm_real::agent::event::ConnId;
use ftvm_real::agent::link::LinkSetup;
use ftvm_real::agent::staging::StagingLimits;
use ftvm_real::auth::{Identity, Protection};
use ftvm_real::transport::TransportKind;

const CHILD: &str = "FTVM_ACCEPT_BACKOFF_CHILD";
const TEST: &str = "accept_errors_back_off_instead_of_spinning";
/// How long the child's listener runs.
const RUN: Duration = Duration::from_millis(1500);
const FAILED: &str = "accept on the checkpoint port failed";

#[test]
fn accept_errors_back_off_instead_of_spinning() {
    if std::env::var_os(CHILD).is_some() {
        return child();
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let addr: SocketAddr = loop {
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the child printed no address"
        );
        // libtest may print "test NAME ... " on the same line first.
        if let Some(at) = line.find("LISTENING ") {
            break line[at + "LISTENING ".len()..].trim().parse().unwrap();
        }
    };
    // More connections than the child has descriptors for: they wait in its backlog.
    let _conns: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(child.wait().unwrap().success(), "child failed:\n{err}");
    let failures = err.lines().filter(|l| l.contains(FAILED)).count();
    eprintln!("{failures} failed accepts in {RUN:?}");
    // 10 ms doubling to 1 s: at most 8 retries fit in 1.5 s; a busy loop makes thousands.
    assert!(
        failures >= 2,
        "accept never failed; the limit did not bite:\n{err}"
    );
    assert!(
        failures <= 10,
        "{failures} failed accepts in {RUN:?}: not backing off"
    );
}

fn next_conn() -> ConnId {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    ConnId(NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Runs the listener with room for one accepted link's descriptors and no more.
fn child() {
    // The listener reports failed accepts as log events: print them where the parent reads.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let highest = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap();
    // One link takes four descriptors (the stream, the deadline watch's clone, the reader's and
    // the link handle's clones).
    let limit = libc::rlimit {
        rlim_cur: highest + 1 + 4,
        rlim_max: highest + 1 + 4,
    };
    // SAFETY: setrlimit reads the struct we pass and changes only this (child) process.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert_eq!(rc, 0, "setrlimit: {}", std::io::Error::last_os_error());
    // Fill every free descriptor number below the limit, then give back the four one link
    // takes (new descriptors take the lowest free numbers, so the limit alone is not enough).
    let mut filler = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        filler.push(f);
    }
    filler.truncate(filler.len().saturating_sub(4));
    let (_, mut ids) = Identity::generate_set(&[NodeId(1)]).unwrap();
    let setup = LinkSetup {
        vm: VmId(7),
        staging: StagingLimits {
            page_size: 4096,
            ram_pages: 16,
            max_device_bytes: 1 << 20,
            disk_blocks: 0,
        },
        kind: TransportKind::Copy,
        identity: std::sync::Arc::new(ids.remove(&NodeId(1)).unwrap()),
        handshake_deadline: Duration::from_secs(60),
        protection: Protection::Mac,
        spool: None,
        progress: Default::default(),
        socket_buffer: None,
    };
    accept::spawn(Listener {
        listener,
        setup,
        node: NodeId(1),
        limits: ConnLimits {
            max_inbound: 100,
            handshake_deadline: Duration::from_secs(60),
        },
        events: tx,
        new_conn: next_conn,
    })
    .unwrap();
    println!("LISTENING {addr}");
    std::thread::sleep(RUN);
    drop(filler);
}
