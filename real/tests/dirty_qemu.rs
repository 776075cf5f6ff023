//! Dirty tracking of a real QEMU (TCG) running the project's test guest with the preload
//! library: over several run/pause rounds, every page whose content changed between two pauses
//! must be in the scan taken at the second pause (0 missed writes), checked against a full
//! shadow copy of guest RAM read from the file (read(2), which does not allocate holes).

mod qemu_common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use ftvm_real::client::Connection;
use ftvm_real::dirty::{preload_library_path, DirtyTracker, PagemapScanner};
use ftvm_real::qemu::{boot, BootOptions, GuestImage, NetBackend, NetConfig, QemuConfig};
use qemu_common::ShmFile;

const RAM: u64 = 256 << 20;
const PAGE: usize = 4096;
const ROUNDS: usize = 12;

async fn guest() -> GuestImage {
    if let Ok(d) = std::env::var("DEVONLY_GUEST_DIR") {
        return GuestImage::from_dir(d).unwrap();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build.sh");
    GuestImage::build(&script)
        .await
        .expect("building the test guest with real/guest/build.sh")
}

#[tokio::test]
async fn every_guest_write_between_pauses_is_in_the_next_scan() {
    let guest = guest().await;
    let run = tempfile::tempdir().unwrap();
    let ram = ShmFile(PathBuf::from(format!(
        "/dev/shm/ftvm-dirty-qemu-{}",
        std::process::id()
    )));
    let _ = std::fs::remove_file(&ram.0);
    let mut cfg = QemuConfig::new(&guest.kernel, &ram.0, RAM, run.path());
    guest.apply(&mut cfg);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    cfg.net = Some(NetConfig {
        mac: "52:54:00:12:34:57".into(),
        backend: NetBackend::User {
            hostfwd: vec![format!("tcp:127.0.0.1:{port}-:80")],
        },
    });
    let lib = preload_library_path().unwrap();
    cfg.env
        .push(("LD_PRELOAD".into(), lib.display().to_string()));
    cfg.env
        .push(("FTVM_RAM_FILE".into(), ram.0.display().to_string()));

    let booted = boot(&cfg, &BootOptions::default()).await.unwrap();
    eprintln!(
        "booted in {:?} after {} tries {:?}",
        booted.boot_time, booted.tries, booted.retry_reasons
    );
    let mut qemu = booted.qemu;
    let log = std::fs::read_to_string(&cfg.stderr_log).unwrap_or_default();
    assert!(
        log.contains("ftvm-preload: tracking RAM file"),
        "QEMU's stderr has no tracking line: {log}"
    );

    // The guest's dirtying knob, so rounds see thousands of writes, not just kernel noise.
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut conn = Connection::open(addr, Duration::from_secs(10))
        .await
        .unwrap();
    let rate = conn
        .get("/dirty?pages=20000&mode=scatter", Duration::from_secs(10))
        .await
        .unwrap();
    eprintln!("guest dirtying rate: {}", rate.trim());

    qemu.stop().await.unwrap();
    let mut scanner = PagemapScanner::open(qemu.pid(), &ram.0).unwrap();
    let pages = RAM / PAGE as u64;
    // Nothing was write-protected yet: the first scan is all RAM (the full copy).
    assert_eq!(scanner.scan().unwrap().count(), pages);
    let mut shadow = std::fs::read(&ram.0).unwrap();

    let (mut changed_total, mut unchanged_reported) = (0u64, 0u64);
    let mut missed = Vec::new();
    for round in 0..ROUNDS {
        qemu.cont().await.unwrap();
        tokio::time::sleep(Duration::from_millis(30 + 40 * (round as u64 % 4))).await;
        qemu.stop().await.unwrap();
        let dirty = scanner.scan().unwrap();
        let now = std::fs::read(&ram.0).unwrap();
        let mut changed = 0u64;
        for (p, (a, b)) in shadow.chunks(PAGE).zip(now.chunks(PAGE)).enumerate() {
            if a != b {
                changed += 1;
                if !dirty.contains(p as u64) {
                    missed.push((round, p));
                }
            }
        }
        eprintln!(
            "round {round}: {changed} pages changed, {} reported ({} regions, {} ioctls)",
            dirty.count(),
            scanner.last_stats().regions,
            scanner.last_stats().ioctls
        );
        changed_total += changed;
        unchanged_reported += dirty
            .iter()
            .filter(|&p| {
                let r = p as usize * PAGE..(p as usize + 1) * PAGE;
                shadow[r.clone()] == now[r]
            })
            .count() as u64;
        shadow = now;
    }
    qemu.kill().await.unwrap();
    eprintln!("{changed_total} page changes; {unchanged_reported} reported pages were unchanged");
    assert!(missed.is_empty(), "missed writes (round, page): {missed:?}");
    // The guest really wrote (else the check above proves nothing).
    assert!(
        changed_total >= ROUNDS as u64 * 200,
        "only {changed_total} changes"
    );
}
