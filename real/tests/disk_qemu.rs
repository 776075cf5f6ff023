//! The agent as the guest's disk, against a real QEMU (TCG) and the project's test guest: QEMU's
//! NBD client talks to `ftvm_real::disk::DiskServer`, the guest's `ftvm-diskwriter` writes a
//! stamped pattern to /dev/vda, and at every pause the dirty blocks alone bring a second image
//! (the "replica") to exactly the primary's contents.
//!
//! Needs qemu-system-x86_64 and /dev/shm; the guest comes from `real/guest/build.sh`.

mod qemu_common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ftvm_real::disk::{DiskImage, DiskServer, DiskServerConfig, BLOCK_SIZE};
use ftvm_real::qemu::{boot, BootOptions, DiskConfig, GuestImage, QemuConfig, QemuError};
use qemu_common::{guest, ShmFile, BOOT_LOCK};

const RAM: u64 = 256 << 20;
const DISK: u64 = 64 << 20;
/// The writer cycles over the first 16 MiB, so blocks are rewritten by later rounds between
/// checkpoints.
const WRITTEN_BLOCKS: u64 = 4096;
const BS: usize = BLOCK_SIZE as usize;

fn ram_file(tag: &str) -> ShmFile {
    let p = PathBuf::from(format!(
        "/dev/shm/ftvm-disk-test-{}-{tag}",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&p);
    ShmFile(p)
}

fn config(guest: &GuestImage, ram: &Path, run: &Path, socket: &Path) -> QemuConfig {
    let mut c = QemuConfig::new(&guest.kernel, ram, RAM, run);
    guest.apply(&mut c);
    c.append.push_str(&format!(
        " ftvm.diskwrite=max ftvm.diskblocks={WRITTEN_BLOCKS}"
    ));
    c.disk = Some(DiskConfig {
        socket: socket.to_path_buf(),
        export: "vda".into(),
    });
    c
}

/// What a block of the guest's pattern says: `None` for a never-written (zero) block, else the
/// round that wrote it. Panics on anything else: a torn, misplaced or foreign block.
fn stamp(index: u64, block: &[u8]) -> Option<u64> {
    if block.iter().all(|&b| b == 0) {
        return None;
    }
    let rec = &block[..32];
    assert_eq!(&rec[..8], b"FTVMDSK1", "block {index}: no stamp");
    let word = |i: usize| u64::from_le_bytes(rec[i..i + 8].try_into().unwrap());
    let (k, r, check) = (word(8), word(16), word(24));
    assert_eq!(k, index, "block {index} holds block {k}'s data");
    assert_eq!(
        check,
        k.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ r,
        "block {index}"
    );
    assert!(
        block.chunks_exact(32).all(|c| c == rec),
        "block {index}: torn (records differ)"
    );
    Some(r)
}

fn assert_images_equal(primary: &Path, replica: &Path, when: &str) {
    let (a, b) = (
        std::fs::read(primary).unwrap(),
        std::fs::read(replica).unwrap(),
    );
    assert_eq!(a.len(), b.len());
    if let Some(i) = a
        .chunks_exact(BS)
        .zip(b.chunks_exact(BS))
        .position(|(x, y)| x != y)
    {
        panic!("{when}: replica differs from the primary at block {i}");
    }
}

#[tokio::test]
async fn replica_from_dirty_blocks_equals_primary_and_restores_into_a_second_qemu() {
    let _one_at_a_time = BOOT_LOCK.lock().await;
    let guest = guest().await;
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let ram = ram_file("ram");
    let socket = dir.path().join("disk.sock");
    let primary_path = dir.path().join("primary.img");
    let replica_path = dir.path().join("replica.img");
    // The backup starts from the same (empty) disk, like a fresh pair.
    let server = DiskServer::start(
        DiskImage::create(&primary_path, DISK).unwrap(),
        &socket,
        DiskServerConfig::new("vda"),
    )
    .unwrap();
    let replica = DiskImage::create(&replica_path, DISK).unwrap();

    let cfg = config(&guest, &ram.0, &run, &socket);
    let booted = boot(&cfg, &BootOptions::default()).await.unwrap();
    eprintln!(
        "booted in {:?} after {} tries",
        booted.boot_time, booted.tries
    );
    let mut qemu = booted.qemu;
    let mut serial = qemu.serial();
    serial
        .wait_for("ftvm-diskwriter: writing", Duration::from_secs(30))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.stats().writes < 500 {
        assert!(
            Instant::now() < deadline,
            "guest wrote {:?}",
            server.stats()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut buf = Vec::new();
    let mut block = [0u8; BS];
    let mut rounds_seen = 0;
    let mut copied = 0usize;
    for checkpoint in 0..8 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        qemu.stop().await.unwrap();
        let dirty = server.take_dirty();
        assert!(!dirty.is_empty(), "checkpoint {checkpoint}: nothing dirty");
        assert!(dirty.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
        assert!(
            dirty.iter().all(|&i| i < WRITTEN_BLOCKS),
            "only the written area"
        );
        buf.clear();
        server.read_blocks(&dirty, &mut buf).unwrap();
        for (&index, data) in dirty.iter().zip(buf.chunks_exact(BS)) {
            let r = stamp(index, data).expect("a dirty block was written");
            rounds_seen = rounds_seen.max(r);
            block.copy_from_slice(data);
            replica.write_block(index, &block).unwrap();
        }
        copied += dirty.len();
        // While paused, the dirty blocks alone made the replica equal to the primary.
        assert_images_equal(
            &primary_path,
            &replica_path,
            &format!("checkpoint {checkpoint}"),
        );
        eprintln!(
            "checkpoint {checkpoint}: {} dirty blocks, highest round {rounds_seen}",
            dirty.len()
        );
        qemu.cont().await.unwrap();
    }

    tokio::time::sleep(Duration::from_millis(400)).await;
    qemu.stop().await.unwrap();
    let dirty = server.take_dirty();
    buf.clear();
    server.read_blocks(&dirty, &mut buf).unwrap();
    for (&index, data) in dirty.iter().zip(buf.chunks_exact(BS)) {
        block.copy_from_slice(data);
        replica.write_block(index, &block).unwrap();
    }
    assert_images_equal(&primary_path, &replica_path, "final");
    // The writer goes through blocks in order with one write in flight, and the pause drained
    // it: the image is round R up to some block and round R-1 (or never written) after it.
    let rounds: Vec<Option<u64>> = (0..WRITTEN_BLOCKS)
        .map(|i| {
            replica.read_block(i, &mut block).unwrap();
            stamp(i, &block)
        })
        .collect();
    let top = rounds[0].expect("block 0 written");
    let boundary = rounds
        .iter()
        .position(|&r| r != Some(top))
        .unwrap_or(rounds.len());
    let below = if top == 1 { None } else { Some(top - 1) };
    assert!(
        rounds[boundary..].iter().all(|&r| r == below),
        "rounds not a clean prefix: top {top} to block {boundary}"
    );
    for i in WRITTEN_BLOCKS..DISK / BLOCK_SIZE {
        replica.read_block(i, &mut block).unwrap();
        assert_eq!(stamp(i, &block), None, "block {i} beyond the written area");
    }
    let stats = server.stats();
    eprintln!(
        "{} blocks copied over 9 checkpoints; top round {top} to block {boundary}; {stats:?}",
        copied + dirty.len()
    );
    assert!(stats.writes > 500 && stats.failed_connections == 0 && stats.refused == 0);
    assert_eq!(stats.connections, 1);

    // Failover: the checkpoint (device state, RAM copy, replica disk) restored into a second
    // QEMU whose disk is the replica, served by a second server; the guest writes on where it
    // was, into the replica.
    let blob = qemu.capture_device_state().await.unwrap();
    let ram_copy = ram_file("ram-copy");
    std::fs::copy(&ram.0, &ram_copy.0).unwrap();
    qemu.kill().await.unwrap();
    server.stop();
    drop(replica);
    let backup = DiskServer::start(
        DiskImage::open(&replica_path).unwrap(),
        dir.path().join("backup-disk.sock"),
        DiskServerConfig::new("vda"),
    )
    .unwrap();
    let run2 = dir.path().join("restored");
    std::fs::create_dir_all(&run2).unwrap();
    let mut incoming = cfg.incoming(&ram_copy.0, &run2);
    incoming.disk.as_mut().unwrap().socket = backup.socket().to_path_buf();
    let mut restored = ftvm_real::qemu::Qemu::spawn_incoming(incoming)
        .await
        .unwrap();
    restored.restore_device_state(&blob).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while backup.stats().writes < 200 {
        assert!(
            Instant::now() < deadline,
            "restored guest wrote {:?}",
            backup.stats()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    restored.stop().await.unwrap();
    // The restored guest wrote on from the block after the checkpoint's last one.
    let mut after = backup.take_dirty();
    let mut want: Vec<u64> = (0..after.len() as u64)
        .map(|j| (boundary as u64 + j) % WRITTEN_BLOCKS)
        .collect();
    after.sort_unstable();
    want.sort_unstable();
    assert_eq!(after, want, "writer resumed in place");
    let image = DiskImage::open(&replica_path).unwrap();
    for i in 0..WRITTEN_BLOCKS {
        image.read_block(i, &mut block).unwrap();
        stamp(i, &block);
    }
    eprintln!("restored guest wrote {:?}", backup.stats());
    restored.kill().await.unwrap();
    backup.stop();
}

#[tokio::test]
async fn qemu_fails_to_start_when_no_disk_server_listens() {
    let _one_at_a_time = BOOT_LOCK.lock().await;
    let guest = guest().await;
    let dir = tempfile::tempdir().unwrap();
    let ram = ram_file("nodisk");
    let cfg = config(&guest, &ram.0, dir.path(), &dir.path().join("nobody.sock"));
    let e = ftvm_real::qemu::Qemu::spawn(cfg).await.unwrap_err();
    match &e {
        QemuError::Died { stderr_tail, .. } => {
            assert!(stderr_tail.contains("nobody.sock"), "{stderr_tail}")
        }
        other => panic!("expected QEMU to die, got {other:?}"),
    }
}

#[tokio::test]
async fn guest_io_fails_fast_and_qemu_stays_responsive_when_the_server_goes() {
    let _one_at_a_time = BOOT_LOCK.lock().await;
    let guest = guest().await;
    let dir = tempfile::tempdir().unwrap();
    let ram = ram_file("gone");
    let socket = dir.path().join("disk.sock");
    let server = DiskServer::start(
        DiskImage::create(dir.path().join("primary.img"), DISK).unwrap(),
        &socket,
        DiskServerConfig::new("vda"),
    )
    .unwrap();
    let cfg = config(&guest, &ram.0, dir.path(), &socket);
    let mut qemu = boot(&cfg, &BootOptions::default()).await.unwrap().qemu;
    let mut serial = qemu.serial();
    serial
        .wait_for("ftvm-diskwriter: writing", Duration::from_secs(30))
        .await
        .unwrap();
    server.stop();
    // reconnect-delay=0: the guest's next write fails at once instead of QEMU waiting for a
    // server that is not coming back.
    serial
        .wait_for("ftvm-diskwriter: write of block", Duration::from_secs(20))
        .await
        .unwrap();
    let t = Instant::now();
    qemu.stop().await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        t.elapsed()
    );
    eprintln!(
        "{}",
        serial
            .read_all()
            .unwrap()
            .lines()
            .filter(|l| l.contains("vda") || l.contains("diskwriter: write of"))
            .take(4)
            .collect::<Vec<_>>()
            .join("\n")
    );
    qemu.kill().await.unwrap();
}
