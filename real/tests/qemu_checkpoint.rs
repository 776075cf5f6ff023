//! The QEMU control layer against a real QEMU (TCG) and the project's test guest
//! (`real/guest/build.sh`): boot, device-state capture while paused, restore of that checkpoint
//! into a second QEMU on a copy of the RAM file, and the ways QEMU can fail under us.
//!
//! Needs root-free but real resources: qemu-system-x86_64 and /dev/shm. Tests that boot a guest
//! run one at a time (two TCG guests on a 2-core host make boots hang more often).

mod qemu_common;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ftvm_real::client::Connection;
use ftvm_real::qemu::{
    boot, BootOptions, GuestImage, NetBackend, NetConfig, Qemu, QemuConfig, QemuError,
};
use qemu_common::{guest, ShmFile, BOOT_LOCK};

const RAM: u64 = 256 << 20;
const REQ_TIMEOUT: Duration = Duration::from_secs(10);

impl ShmFile {
    fn new(tag: &str) -> Self {
        let p = PathBuf::from(format!(
            "/dev/shm/ftvm-qemu-test-{}-{tag}",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&p);
        ShmFile(p)
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn config(guest: &GuestImage, ram: &Path, run: &Path, port: u16) -> QemuConfig {
    let mut c = QemuConfig::new(&guest.kernel, ram, RAM, run);
    guest.apply(&mut c);
    c.net = Some(NetConfig {
        mac: "52:54:00:12:34:56".into(),
        backend: NetBackend::User {
            hostfwd: vec![format!("tcp:127.0.0.1:{port}-:80")],
        },
    });
    c
}

async fn get_number(conn: &mut Connection, path: &str) -> u64 {
    let body = conn.get(path, REQ_TIMEOUT).await.unwrap();
    body.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{path} replied {body:?}"))
}

#[tokio::test]
async fn checkpoint_restores_into_a_second_qemu_on_the_ram_copy() {
    let _one_at_a_time = BOOT_LOCK.lock().await;
    let guest = guest().await;
    let dir = tempfile::tempdir().unwrap();
    let (run1, run2) = (dir.path().join("primary"), dir.path().join("restored"));
    std::fs::create_dir_all(&run1).unwrap();
    std::fs::create_dir_all(&run2).unwrap();
    let ram = ShmFile::new("ram");
    let replica = ShmFile::new("replica");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let cfg = config(&guest, &ram.0, &run1, port);

    let booted = boot(&cfg, &BootOptions::default()).await.unwrap();
    eprintln!(
        "booted in {:?} after {} tries {:?}",
        booted.boot_time, booted.tries, booted.retry_reasons
    );
    let mut qemu = booted.qemu;
    // Guest RAM and the logs are created by us 0600 (under -sandbox), not by QEMU (0644).
    for f in [&ram.0, &cfg.serial_log, &cfg.stderr_log] {
        use std::os::unix::fs::MetadataExt;
        let mode = std::fs::metadata(f).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    assert!(cfg.sandbox);
    let mut conn = Connection::open(addr, REQ_TIMEOUT).await.unwrap();
    let mut last = 0;
    for _ in 0..3 {
        let v = get_number(&mut conn, "/incr").await;
        assert!(v > last, "counter went from {last} to {v}");
        last = v;
    }

    // Several checkpoint cycles with the guest serving in between; the last one is kept.
    let mut blob = Vec::new();
    for cycle in 0..5 {
        qemu.stop().await.unwrap();
        assert!(!qemu.query_status().await.unwrap().running);
        blob = qemu.capture_device_state().await.unwrap();
        // Devices only: with x-ignore-shared the 256 MiB of RAM must not be in the stream.
        assert!(
            (1_000..4 << 20).contains(&blob.len()),
            "cycle {cycle}: blob of {} bytes",
            blob.len()
        );
        assert_eq!(qemu.query_status().await.unwrap().status, "postmigrate");
        if cycle == 4 {
            // The replica at this checkpoint: RAM copied while the VM is still paused.
            std::fs::copy(&ram.0, &replica.0).unwrap();
        }
        qemu.cont().await.unwrap();
        assert!(qemu.query_status().await.unwrap().running);
        if cycle < 4 {
            let v = get_number(&mut conn, "/incr").await;
            assert_eq!(v, last + 1, "counter after cycle {cycle}");
            last = v;
        }
    }
    let at_checkpoint = last;
    // Work after the checkpoint: lost by design when we restore the older checkpoint.
    for _ in 0..3 {
        last = get_number(&mut conn, "/incr").await;
    }
    assert_eq!(last, at_checkpoint + 3);
    drop(conn);
    qemu.kill().await.unwrap();

    // Failover: same machine, RAM = the replica, device state = the blob; this QEMU drops to
    // `nobody` once set up (the device state then arrives through a descriptor passed over QMP,
    // which needs no privilege).
    let mut incoming = cfg.incoming(&replica.0, &run2);
    incoming.run_as = Some("nobody".into());
    incoming.env.push((
        "LD_PRELOAD".into(),
        ftvm_real::dirty::preload_library_path()
            .unwrap()
            .display()
            .to_string(),
    ));
    incoming
        .env
        .push(("FTVM_RAM_FILE".into(), replica.0.display().to_string()));
    let mut restored = Qemu::spawn_incoming(incoming).await.unwrap();
    assert_eq!(
        restored.query_status().await.unwrap().status,
        "inmigrate",
        "a -incoming defer QEMU waits for its state"
    );
    restored.restore_device_state(&blob).await.unwrap();
    assert!(restored.query_status().await.unwrap().running);
    let status = std::fs::read_to_string(format!("/proc/{}/status", restored.pid())).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(uid.split_whitespace().nth(1), Some("65534"), "{uid}");
    let mut conn = Connection::open(addr, REQ_TIMEOUT).await.unwrap();
    assert_eq!(
        get_number(&mut conn, "/get").await,
        at_checkpoint,
        "restored guest must resume exactly at the checkpoint"
    );
    assert_eq!(get_number(&mut conn, "/incr").await, at_checkpoint + 1);
    // And it keeps being checkpointable.
    restored.stop().await.unwrap();
    let again = restored.capture_device_state().await.unwrap();
    assert!(again.len() > 1_000);
    restored.cont().await.unwrap();
    assert_eq!(get_number(&mut conn, "/incr").await, at_checkpoint + 2);
    restored.kill().await.unwrap();
}

#[tokio::test]
async fn qemu_killed_behind_our_back_is_reported_as_died() {
    let guest = guest().await;
    let dir = tempfile::tempdir().unwrap();
    let ram = ShmFile::new("died");
    let mut c = config(&guest, &ram.0, dir.path(), free_port());
    // No need to boot: a QEMU waiting for incoming state answers QMP and never runs the guest.
    c.incoming_defer = true;
    let mut qemu = Qemu::spawn(c).await.unwrap();
    assert!(qemu.check_alive().is_ok());
    // SAFETY: plain kill(2) of the child we just started and have not reaped (its reaper task
    // holds it until it exits, so the pid cannot have been reused).
    let rc = unsafe { libc::kill(qemu.pid() as i32, libc::SIGKILL) };
    assert_eq!(rc, 0);
    let e = qemu.stop().await.unwrap_err();
    match &e {
        QemuError::Died { status, .. } => assert!(status.contains('9'), "{e}"),
        other => panic!("expected Died, got {other:?}"),
    }
    assert!(matches!(qemu.check_alive(), Err(QemuError::Died { .. })));
}

#[tokio::test]
async fn garbage_device_state_fails_the_restore_with_qemus_reason() {
    let guest = guest().await;
    let dir = tempfile::tempdir().unwrap();
    let ram = ShmFile::new("garbage");
    let c = config(&guest, &ram.0, dir.path(), free_port());
    let mut qemu = Qemu::spawn_incoming(c).await.unwrap();
    let e = qemu
        .restore_device_state(b"this is not a migration stream")
        .await
        .unwrap_err();
    match &e {
        // QEMU 7.2 exits when an incoming migration fails to load.
        QemuError::Died { stderr_tail, .. } => {
            assert!(stderr_tail.contains("migration"), "{e}")
        }
        QemuError::MigrationFailed(_) => {}
        other => panic!("expected a failed restore, got {other:?}"),
    }
}

#[tokio::test]
async fn qmp_errors_and_bad_configs_are_typed() {
    let guest = guest().await;
    let dir = tempfile::tempdir().unwrap();
    let ram = ShmFile::new("errors");
    let mut c = config(&guest, &ram.0, dir.path(), free_port());
    c.incoming_defer = true;

    let mut missing = c.clone();
    missing.binary = "/nonexistent/qemu-system-x86_64".into();
    assert!(matches!(
        Qemu::spawn(missing).await,
        Err(QemuError::BinaryNotFound(_))
    ));

    // QEMU refuses to start: its own reason comes back.
    let mut bad = c.clone();
    bad.extra_args = vec!["-no-such-option".into()];
    match Qemu::spawn(bad).await {
        Err(QemuError::Died { stderr_tail, .. }) => {
            assert!(stderr_tail.contains("no-such-option"), "{stderr_tail}")
        }
        other => panic!("expected Died, got {other:?}"),
    }

    let mut qemu = Qemu::spawn(c).await.unwrap();
    match qemu.qmp().execute("no-such-command", None).await {
        Err(QemuError::Qmp { class, .. }) => assert_eq!(class, "CommandNotFound"),
        other => panic!("expected a QMP error, got {other:?}"),
    }
    // The connection stays usable after an error.
    assert_eq!(qemu.query_status().await.unwrap().status, "inmigrate");
    let status = qemu.kill().await.unwrap();
    assert!(!status.success());
}

#[tokio::test]
async fn hung_boot_is_retried_and_reported() {
    let _one_at_a_time = BOOT_LOCK.lock().await;
    let guest = guest().await;
    let dir = tempfile::tempdir().unwrap();
    let ram = ShmFile::new("hung");
    let c = config(&guest, &ram.0, dir.path(), free_port());
    let opts = BootOptions {
        ready_marker: "A-MARKER-THE-GUEST-NEVER-PRINTS".into(),
        timeout: Duration::from_millis(1500),
        max_tries: 2,
    };
    match boot(&c, &opts).await {
        Err(QemuError::BootFailed { tries, last_reason }) => {
            assert_eq!(tries, 2);
            assert!(last_reason.contains("A-MARKER"), "{last_reason}");
        }
        other => panic!("expected BootFailed, got {other:?}"),
    }
}

#[tokio::test]
async fn stream_netdev_connects_to_the_agent_socket() {
    let guest = guest().await;
    let dir = tempfile::tempdir().unwrap();
    let ram = ShmFile::new("stream");
    let sock = dir.path().join("agent-net.sock");
    // QEMU 7.2's stream netdev connects once at startup: the agent listens first.
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let mut c = config(&guest, &ram.0, dir.path(), 0);
    c.net = Some(NetConfig {
        mac: "52:54:00:12:34:57".into(),
        backend: NetBackend::Stream {
            socket: sock.clone(),
        },
    });
    c.incoming_defer = true;
    let mut qemu = Qemu::spawn(c.clone()).await.unwrap();
    let accepted = tokio::time::timeout(Duration::from_secs(10), listener.accept()).await;
    assert!(
        matches!(accepted, Ok(Ok(_))),
        "QEMU did not connect its netdev"
    );
    let info = qemu.netdev_info().await.unwrap();
    assert!(info.contains("type=stream"), "{info}");
    assert!(!info.contains("error"), "{info}");
    qemu.kill().await.unwrap();

    // Nobody listening: QEMU 7.2 would run on without a network; spawn refuses that.
    drop(listener);
    std::fs::remove_file(&sock).unwrap();
    match Qemu::spawn(c).await {
        Err(QemuError::NetdevNotConnected(p)) => assert_eq!(p, sock),
        other => panic!("expected NetdevNotConnected, got {other:?}"),
    }
}
