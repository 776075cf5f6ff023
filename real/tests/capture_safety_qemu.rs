//! The capture-safety check of `capture_safety.rs` with a real QEMU (TCG) running the project's
//! test guest (`real/guest/build.sh`) and its page dirtier, dirty pages found by the preload
//! library + PAGEMAP_SCAN (cow: from the write faults of the uffd QEMU hands over): at every
//! verified checkpoint the backup's committed replica equals the primary's guest RAM as it was when
//! QEMU was stopped. Three combinations: copy × paused-send, auto × staged and auto × cow. Boots one guest at a time (two TCG guests on 2 cores make boots hang).

mod capture_common;
mod qemu_common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use capture_common::{protect_and_verify, Run};
use ftvm_real::agent::capture::CaptureMode;
use ftvm_real::agent::qemu_vm::{QemuLauncher, Tracking};
use ftvm_real::dirty::preload_library_path;
use ftvm_real::qemu::{BootOptions, GuestImage, NetBackend, NetConfig, QemuConfig};
use ftvm_real::transport::TransportKind;
use qemu_common::{guest, ShmFile, BOOT_LOCK};

const RAM: u64 = 256 << 20;
/// Pages per second the guest's dirtier rewrites (TCG reaches a fraction of it: flat out).
const DIRTY_RATE: u64 = 200_000;

fn launcher(guest: &GuestImage, ram: &Path, run_dir: &Path, capture: CaptureMode) -> QemuLauncher {
    let mut base = QemuConfig::new(&guest.kernel, ram, RAM, run_dir.join("qemu"));
    guest.apply(&mut base);
    base.append.push_str(&format!(" ftvm.dirty={DIRTY_RATE}"));
    // A NIC the guest finds at once (without one its init waits 5 s for eth0); nothing is
    // forwarded to it.
    base.net = Some(NetConfig {
        mac: "52:54:00:12:34:58".into(),
        backend: NetBackend::User {
            hostfwd: Vec::new(),
        },
    });
    QemuLauncher {
        base,
        restore_dir: run_dir.join("qemu-restored"),
        tracking: Tracking::Pagemap,
        preload: Some(preload_library_path().unwrap()),
        boot: BootOptions::default(),
        page_size: 4096,
        capture,
        disk: None,
    }
}

async fn replica_matches_paused_qemu(transport: TransportKind, capture: CaptureMode) {
    let guest = guest().await;
    let _boot = BOOT_LOCK.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let tag = format!("{}-{transport}-{capture}", std::process::id());
    let pram = ShmFile(PathBuf::from(format!("/dev/shm/ftvm-capture-qemu-{tag}-p")));
    let bram = ShmFile(PathBuf::from(format!("/dev/shm/ftvm-capture-qemu-{tag}-b")));
    for f in [&pram, &bram] {
        let _ = std::fs::remove_file(&f.0);
    }
    std::fs::create_dir_all(dir.path().join("p/qemu")).unwrap();
    std::fs::create_dir_all(dir.path().join("b/qemu")).unwrap();
    let run = Run {
        transport,
        capture,
        pages: RAM / 4096,
        // A digest of 256 MiB costs ~15 ms of pause: every third epoch keeps epochs short.
        verify_every: 3,
        protected: Duration::from_secs(4),
        protect_timeout: Duration::from_secs(150),
    };
    let out = protect_and_verify(
        dir.path(),
        &run,
        launcher(&guest, &pram.0, &dir.path().join("p"), capture),
        launcher(&guest, &bram.0, &dir.path().join("b"), capture),
    )
    .await;
    assert!(
        out.verified >= 8,
        "{transport}/{capture}: only {} checkpoints verified",
        out.verified
    );
    let dirty = out.median_of("dirty_pages");
    assert!(
        dirty >= 100,
        "{transport}/{capture}: median only {dirty} dirty pages per checkpoint (dirtier off?)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_paused_send_with_qemu() {
    replica_matches_paused_qemu(TransportKind::Copy, CaptureMode::PausedSend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_staged_with_qemu() {
    replica_matches_paused_qemu(TransportKind::Auto, CaptureMode::Staged).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_cow_with_qemu() {
    replica_matches_paused_qemu(TransportKind::Auto, CaptureMode::Cow).await;
}
