//! Proof of safety of every transport × capture mode (issue 4 item 3): with a guest rewriting
//! pages as fast as it can, the backup's committed replica equals the primary's RAM as it was
//! when the VM was paused, at every checkpoint.
//!
//! Primary and backup agents run over loopback with in-memory VMs whose RAM is a shared mapping
//! (so paused-send really sends from guest RAM). Both record an xxh3 digest of all RAM at every
//! epoch: the primary while paused at the capture, the backup right after committing. Any page
//! sent after it changed shows up as a digest mismatch, or as a frame the backup rejects by its
//! checksum and so never commits — both fail the test.

mod capture_common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use capture_common::{protect_and_verify, Run};
use ftvm_real::agent::capture::CaptureMode;
use ftvm_real::agent::cow::CowOptions;
use ftvm_real::agent::mem_vm::{MemLauncher, MemRam};
use ftvm_real::transport::TransportKind;

/// 8 MiB of guest RAM.
const PAGES: u64 = 2048;

/// The combinations share two cores with everything else: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn launcher(seed: u64, launched: &Arc<Mutex<Vec<MemRam>>>) -> MemLauncher {
    MemLauncher {
        ram_bytes: PAGES as usize * ftvm_real::dirty::page_size(),
        page_size: ftvm_real::dirty::page_size(),
        pages_per_ms: u32::MAX,
        seed,
        // Early write-protect passes at any size, so they run in every epoch under test.
        cow: CowOptions {
            min_pass_pages: 1,
            ..CowOptions::default()
        },
        launched: launched.clone(),
        failing_restores: 0,
    }
}

async fn replica_matches_paused_ram(transport: TransportKind, capture: CaptureMode) {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let run = Run {
        transport,
        capture,
        pages: PAGES,
        verify_every: 1,
        protected: Duration::from_millis(1200),
        protect_timeout: Duration::from_secs(20),
    };
    let launched = Arc::new(Mutex::new(Vec::new()));
    let out = protect_and_verify(
        dir.path(),
        &run,
        launcher(3, &launched),
        launcher(4, &launched),
    )
    .await;
    let writes = launched.lock().unwrap()[0].writes();
    assert!(
        out.verified >= 10,
        "{transport}/{capture}: only {} checkpoints verified",
        out.verified
    );
    assert!(
        // Under cow a write to a page in flight waits for the send, which the frame tag made
        // longer: 7,600-13,000 writes in this run on a loaded machine.
        writes >= 5_000,
        "{transport}/{capture}: the guest wrote only {writes} pages"
    );
    let dirty = out.median_of("dirty_pages");
    assert!(
        dirty >= 32,
        "{transport}/{capture}: median only {dirty} dirty pages per checkpoint"
    );
    if capture == CaptureMode::Cow {
        // The early write-protect passes ran (while the guest wrote), so their correctness is
        // part of what the replica comparison proved.
        let early = out.median_of("early_protected");
        assert!(
            early > 0,
            "{transport}/{capture}: no page was write-protected early"
        );
    }
}

macro_rules! combination {
    ($name:ident, $transport:expr, $capture:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            replica_matches_paused_ram($transport, $capture).await;
        }
    };
}

combination!(
    copy_paused_send,
    TransportKind::Copy,
    CaptureMode::PausedSend
);
combination!(copy_staged, TransportKind::Copy, CaptureMode::Staged);
combination!(
    msg_zerocopy_paused_send,
    TransportKind::MsgZeroCopy,
    CaptureMode::PausedSend
);
combination!(
    msg_zerocopy_staged,
    TransportKind::MsgZeroCopy,
    CaptureMode::Staged
);
combination!(
    uring_zc_paused_send,
    TransportKind::UringZc,
    CaptureMode::PausedSend
);
combination!(uring_zc_staged, TransportKind::UringZc, CaptureMode::Staged);
combination!(
    auto_paused_send,
    TransportKind::Auto,
    CaptureMode::PausedSend
);
combination!(auto_staged, TransportKind::Auto, CaptureMode::Staged);
combination!(copy_cow, TransportKind::Copy, CaptureMode::Cow);
combination!(
    msg_zerocopy_cow,
    TransportKind::MsgZeroCopy,
    CaptureMode::Cow
);
combination!(uring_zc_cow, TransportKind::UringZc, CaptureMode::Cow);
combination!(auto_cow, TransportKind::Auto, CaptureMode::Cow);
