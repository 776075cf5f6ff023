//! QEMU dropped to another user with `-runas` (here `nobody`): the kernel clears its parent-death
//! signal at that change of credentials, and the ftvm preload library arms it again, so a QEMU
//! still dies with the agent thread that started it. Needs root and qemu-system-x86_64.

mod qemu_common;

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ftvm_real::dirty::preload_library_path;
use ftvm_real::qemu::{boot, BootOptions, QemuConfig};
use qemu_common::{guest, ShmFile};

/// The real uid of process `pid`.
fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn qemu_run_as_nobody_boots_and_still_dies_with_the_thread_that_started_it() {
    let rt = Arc::new(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
    );
    let guest = rt.block_on(guest());
    let dir = tempfile::tempdir().unwrap();
    let ram = ShmFile(PathBuf::from(format!(
        "/dev/shm/ftvm-runas-test-{}",
        std::process::id()
    )));
    let mut c = QemuConfig::new(&guest.kernel, &ram.0, 128 << 20, dir.path());
    guest.apply(&mut c);
    c.run_as = Some("nobody".into());
    let without_preload = c.clone();
    c.env.push((
        "LD_PRELOAD".into(),
        preload_library_path().unwrap().display().to_string(),
    ));
    c.env
        .push(("FTVM_RAM_FILE".into(), ram.0.display().to_string()));

    // Without the library nothing would tie QEMU to us after the drop: refused.
    let refused = rt.block_on(ftvm_real::qemu::Qemu::spawn(without_preload));
    assert!(
        matches!(refused, Err(ftvm_real::qemu::QemuError::InvalidConfig(_))),
        "{refused:?}"
    );

    // The "agent": a thread that boots QEMU and then ends, as a killed agent's would.
    let agent_rt = rt.clone();
    let booted = std::thread::spawn(move || {
        let booted = agent_rt
            .block_on(boot(&c, &BootOptions::default()))
            .expect("boot as nobody");
        assert_eq!(uid_of(booted.qemu.pid()), 65534, "QEMU runs as nobody");
        booted
    })
    .join()
    .unwrap();
    let mut exit = booted.qemu.exit_watch();
    let status = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), exit.ended()).await })
        .expect("QEMU outlived the thread that started it");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
}
