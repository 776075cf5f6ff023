//! The copy-on-write handover: with `FTVM_UFFD_MODE=handoff` the preload library sends a
//! blocking write-protect uffd to the agent and keeps no copy. The agent can then protect pages
//! of the stand-in's RAM, sees each first write as a fault while the writer waits, and lets it go
//! by unprotecting; if the agent drops the uffd, writers are never stuck.

mod dirty_common;

use std::collections::BTreeSet;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dirty_common::{ram_file, ChildOpts, FakeQemu};
use ftvm_real::dirty::{GuestRam, HandedUffd, WpFault, UFFD_MODE_ENV, UFFD_SOCK_ENV};

const PAGES: u64 = 1024;
const BYTES: u64 = PAGES * 4096;
const PS: u64 = 4096;

/// Starts the stand-in in handoff mode and receives its uffd.
fn start(ram: &std::path::Path, dir: &std::path::Path) -> (FakeQemu, HandedUffd) {
    let sock = dir.join("uffd.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    // The stand-in blocks inside mmap64 until the handover is acknowledged.
    let receiver = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        HandedUffd::receive(&stream).unwrap()
    });
    let q = FakeQemu::start(
        ram,
        BYTES,
        ChildOpts {
            env: vec![
                (UFFD_MODE_ENV, "handoff".into()),
                (UFFD_SOCK_ENV, sock.display().to_string()),
            ],
            ..Default::default()
        },
    );
    let uffd = receiver.join().unwrap();
    (q, uffd)
}

fn userfaultfds_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().contains("userfaultfd"))
        .count()
}

fn wait_fault(uffd: &HandedUffd) -> WpFault {
    let t0 = Instant::now();
    loop {
        if let Some(f) = uffd.read_fault().unwrap() {
            return f;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no fault arrived");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn writes_to_protected_pages_wait_for_the_agent() {
    let f = ram_file(BYTES);
    let dir = tempfile::tempdir().unwrap();
    let (mut q, uffd) = start(f.path(), dir.path());
    assert_eq!(uffd.range(), q.base..q.base + BYTES);
    assert_eq!(userfaultfds_of(q.pid()), 0, "the stand-in kept a uffd copy");
    let ram = GuestRam::open(f.path(), BYTES).unwrap();

    // One protected page: the write waits until the agent unprotects it.
    uffd.write_protect(q.base + 3 * PS, PS, true).unwrap();
    q.write(1, &[5]); // unprotected: no fault
    assert!(uffd.read_fault().unwrap().is_none());
    let before = ram.page(3).unwrap().to_vec();
    q.send("write 2", &[3]);
    let fault = wait_fault(&uffd);
    assert_eq!(
        fault,
        WpFault {
            address: q.base + 3 * PS,
            write: true,
            wp: true
        }
    );
    // The writer is still held: the page has not changed (the agent could copy it now).
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(ram.page(3).unwrap(), &before[..]);
    uffd.write_protect(q.base + 3 * PS, PS, false).unwrap();
    q.wait_ok();
    assert_ne!(ram.page(3).unwrap(), &before[..]);

    // All RAM protected: the faults are exactly the pages written (the dirty log of cow mode).
    uffd.write_protect(q.base, BYTES, true).unwrap();
    let uffd = Arc::new(uffd);
    let stop = Arc::new(AtomicBool::new(false));
    let handler = {
        let (uffd, stop, base) = (uffd.clone(), stop.clone(), q.base);
        std::thread::spawn(move || {
            let mut seen = BTreeSet::new();
            while !stop.load(Ordering::Acquire) {
                match uffd.read_fault().unwrap() {
                    Some(f) => {
                        assert!(f.wp && f.write, "{f:?}");
                        seen.insert((f.address - base) / PS);
                        uffd.write_protect(f.address, PS, false).unwrap();
                    }
                    None => std::thread::sleep(Duration::from_micros(200)),
                }
            }
            seen
        })
    };
    let written = [0u64, 1, 2, 700, PAGES - 1];
    q.write(3, &written);
    q.cmd("read", &[10, 11, 12]); // reads do not fault
    q.write(4, &[1, 2]); // already unprotected: no new faults
    stop.store(true, Ordering::Release);
    let seen = handler.join().unwrap();
    assert_eq!(seen, written.iter().copied().collect::<BTreeSet<u64>>());
}

#[test]
fn dropping_the_agent_uffd_never_leaves_the_writer_stuck() {
    let f = ram_file(BYTES);
    let dir = tempfile::tempdir().unwrap();
    let (mut q, uffd) = start(f.path(), dir.path());
    uffd.write_protect(q.base, BYTES, true).unwrap();
    q.send("write 1", &[9]);
    wait_fault(&uffd);
    // The agent dies with a writer waiting: closing the only uffd releases it.
    drop(uffd);
    q.wait_ok();
    q.write(2, &[10, 11]); // and later writes go straight through
    let log = q.stderr();
    assert!(log.contains("blocking userfaultfd handed to"), "{log}");
}

#[test]
fn without_an_agent_listening_the_mapping_stays_untracked_and_usable() {
    let f = ram_file(BYTES);
    let dir = tempfile::tempdir().unwrap();
    let mut q = FakeQemu::start(
        f.path(),
        BYTES,
        ChildOpts {
            env: vec![
                (UFFD_MODE_ENV, "handoff".into()),
                (
                    UFFD_SOCK_ENV,
                    dir.path().join("nobody").display().to_string(),
                ),
            ],
            ..Default::default()
        },
    );
    q.write(1, &[1, 2, 3]);
    assert_eq!(userfaultfds_of(q.pid()), 0);
    let log = q.stderr();
    assert!(log.contains("FAILED to track RAM file"), "{log}");
}
