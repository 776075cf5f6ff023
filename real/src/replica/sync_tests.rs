//! Full syncs streamed into the sync files (see `super::sync`): committed by the journal's
//! rename, applied by renaming the files into place, replayed idempotently after a crash at
//! any step, thrown away when cut short, and never touched by an out-of-range index.

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};

use super::sync::sync_path;
use super::*;

const PS: usize = 4096;
const RAM_PAGES: u64 = 8;
const DISK_BLOCKS: u64 = 32;
const BS: usize = DISK_BLOCK_SIZE as usize;

fn open(dir: &Path) -> Replica {
    Replica::open_with_disk(
        &dir.join("r"),
        &dir.join("ram"),
        RAM_PAGES * PS as u64,
        PS,
        Durability::Atomic,
        Some(&DiskSpec {
            path: dir.join("disk.raw"),
            blocks: DISK_BLOCKS,
        }),
    )
    .unwrap()
}

fn checkpoint(
    epoch: u64,
    full: bool,
    pages: &[(u64, u8)],
    blocks: &[(u64, u8)],
) -> StagedCheckpoint {
    StagedCheckpoint {
        generation: 1,
        epoch,
        full,
        indices: pages.iter().map(|p| p.0).collect(),
        data: pages.iter().flat_map(|p| vec![p.1; PS]).collect(),
        disk_indices: blocks.iter().map(|b| b.0).collect(),
        disk_data: blocks.iter().flat_map(|b| vec![b.1; BS]).collect(),
        device: vec![epoch.to_le_bytes()[0]; 10],
        spooled: 0,
    }
}

/// `s` as a link reader sees it arrive: the pages, then the first block, then whole; sealed.
fn receive(w: &mut StageWriter, s: &StagedCheckpoint) -> StagedCheckpoint {
    let mut growing = s.clone();
    growing.disk_indices.truncate(1);
    growing.disk_data.truncate(growing.disk_indices.len() * BS);
    w.follow(Some(&growing));
    let mut whole = s.clone();
    w.follow(Some(&whole));
    w.seal(&mut whole);
    whole
}

fn read(path: &Path, at: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    b
}

fn page(d: &Path, index: u64) -> Vec<u8> {
    read(&d.join("ram"), index * PS as u64, PS)
}

fn block(d: &Path, index: u64) -> Vec<u8> {
    read(&d.join("disk.raw"), index * BS as u64, BS)
}

fn sync_files_exist(d: &Path) -> (bool, bool) {
    (
        sync_path(&d.join("ram")).exists(),
        sync_path(&d.join("disk.raw")).exists(),
    )
}

/// The replica holds epoch 1 (an ordinary checkpoint): page 1 and block 7 hold data.
fn with_epoch_1(d: &Path) -> Replica {
    let mut r = open(d);
    r.commit_in_stream(&checkpoint(1, false, &[(1, 7)], &[(7, 7)]))
        .unwrap();
    r
}

/// The full sync of these tests: pages 0 and 2–3, blocks 0–2 and 30.
fn full_sync() -> StagedCheckpoint {
    checkpoint(
        2,
        true,
        &[(0, 5), (2, 6), (3, 6)],
        &[(0, 1), (1, 2), (2, 3), (30, 4)],
    )
}

fn assert_full_sync_applied(d: &Path) {
    assert_eq!(page(d, 0), vec![5; PS]);
    assert_eq!(
        page(d, 1),
        vec![0; PS],
        "the old page is gone: a new RAM file"
    );
    assert_eq!(page(d, 3), vec![6; PS]);
    assert_eq!(block(d, 1), vec![2; BS]);
    assert_eq!(
        block(d, 7),
        vec![0; BS],
        "the old block is gone: a new image"
    );
    assert_eq!(block(d, 30), vec![4; BS]);
    assert_eq!(sync_files_exist(d), (false, false));
    assert!(!d.join("r/journal").exists());
}

#[test]
fn a_full_sync_streams_into_sync_files_and_commits_by_renaming_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut r = with_epoch_1(d);
    let old_inode = fs::metadata(d.join("ram")).unwrap().ino();
    let mut w = r.spool().writer();
    let s = receive(&mut w, &full_sync());
    assert_ne!(s.spooled, 0, "sealed");
    assert_eq!(sync_files_exist(d), (true, true));
    // The journal holds the header and device state only, not the pages and blocks.
    let stage: Vec<_> = fs::read_dir(d.join("r"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with(STAGE_PREFIX))
        .collect();
    assert_eq!(stage.len(), 1);
    let head = read(&stage[0].path(), 0, HEADER_LEN);
    let (h, _) = JournalHeader::parse(&head).unwrap();
    assert!(h.synced && h.full);
    assert_eq!((h.pages, h.data_len, h.disk_blocks), (0, 0, 0));
    assert_eq!(h.device_len, s.device.len() as u64);
    // (A reused spare may be longer: bytes past the device state are ignored.)
    assert!(stage[0].metadata().unwrap().len() < (PS + 2 * BS + HEADER_LEN + 100) as u64);
    assert_eq!(
        page(d, 1),
        vec![7; PS],
        "nothing in place before the commit"
    );
    r.commit_point_in_stream(&s).unwrap();
    assert_eq!(page(d, 1), vec![7; PS], "committed, not applied yet");
    r.apply_committed(&s).unwrap();
    assert_full_sync_applied(d);
    assert_ne!(fs::metadata(d.join("ram")).unwrap().ino(), old_inode);
    assert_eq!(
        fs::metadata(d.join("ram")).unwrap().mode() & 0o777,
        0o600,
        "the new RAM file is private too"
    );
    // The replica's own handles follow the renamed files: an ordinary checkpoint after it
    // lands in the new ones, and digests read through them match a fresh open's.
    assert_eq!(r.device_state().unwrap(), s.device);
    r.commit_in_stream(&checkpoint(3, false, &[(1, 9)], &[(7, 9)]))
        .unwrap();
    assert_eq!(page(d, 1), vec![9; PS]);
    assert_eq!(block(d, 7), vec![9; BS]);
    let digests = (r.ram_digest().unwrap(), r.disk_digest().unwrap());
    drop(r);
    let mut fresh = open(d);
    assert_eq!(fresh.committed().map(|c| c.epoch), Some(3));
    assert_eq!(
        (fresh.ram_digest().unwrap(), fresh.disk_digest().unwrap()),
        digests
    );
}

#[test]
fn a_crash_between_the_commit_point_and_the_apply_is_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    {
        let mut r = with_epoch_1(d);
        let mut w = r.spool().writer();
        let s = receive(&mut w, &full_sync());
        r.commit_point_in_stream(&s).unwrap();
        // The process dies here: the writer and the replica go without applying.
        std::mem::forget(w);
        std::mem::forget(r);
    }
    let mut r = open(d);
    assert_eq!(r.committed().map(|c| c.epoch), Some(2));
    assert_eq!(r.device_state().unwrap(), full_sync().device);
    assert_full_sync_applied(d);
}

#[test]
fn a_crash_after_the_renames_is_replayed_idempotently() {
    for renamed in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        {
            let mut r = with_epoch_1(d);
            let mut w = r.spool().writer();
            let s = receive(&mut w, &full_sync());
            r.commit_point_in_stream(&s).unwrap();
            std::mem::forget(w);
            std::mem::forget(r);
        }
        // The apply renamed one or both files, then the process died before `committed`.
        fs::rename(sync_path(&d.join("ram")), d.join("ram")).unwrap();
        if renamed == 2 {
            fs::rename(sync_path(&d.join("disk.raw")), d.join("disk.raw")).unwrap();
        }
        let mut r = open(d);
        assert_eq!(r.committed().map(|c| c.epoch), Some(2), "renamed {renamed}");
        assert_eq!(r.device_state().unwrap(), full_sync().device);
        assert_full_sync_applied(d);
        // And once more: the applied journal is gone, nothing changes.
        drop(r);
        let r = open(d);
        assert_eq!(r.committed().map(|c| c.epoch), Some(2));
        assert_full_sync_applied(d);
    }
}

#[test]
fn an_abandoned_sync_leaves_the_committed_replica_and_no_sync_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut r = with_epoch_1(d);
    // The link is cut halfway: the reader stops following the checkpoint.
    let mut w = r.spool().writer();
    let mut half = full_sync();
    half.disk_indices.truncate(2);
    half.disk_data.truncate(2 * BS);
    w.follow(Some(&half));
    w.follow(Some(&half));
    assert_eq!(sync_files_exist(d), (true, true));
    w.follow(None);
    assert_eq!(sync_files_exist(d), (false, false));
    // Sealed but never committed, then the process dies: the next open throws it away.
    let s = receive(&mut w, &full_sync());
    assert_ne!(s.spooled, 0);
    std::mem::forget(w);
    drop(r);
    r = open(d);
    assert_eq!(sync_files_exist(d), (false, false));
    assert_eq!(r.committed().map(|c| c.epoch), Some(1));
    assert_eq!(page(d, 1), vec![7; PS]);
    assert_eq!(block(d, 7), vec![7; BS]);
}

#[test]
fn an_out_of_range_index_never_touches_any_file() {
    for (pages, blocks) in [
        (vec![(0, 5), (RAM_PAGES, 6)], vec![(0, 1)]),
        (vec![(0, 5)], vec![(0, 1), (DISK_BLOCKS, 2)]),
        (vec![(0, 5)], vec![(0, 1), (u64::MAX, 2)]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut r = with_epoch_1(d);
        let ram_len = fs::metadata(d.join("ram")).unwrap().len();
        let mut w = r.spool().writer();
        let s = receive(&mut w, &checkpoint(2, true, &pages, &blocks));
        assert_eq!(s.spooled, 0, "not sealed");
        assert_eq!(sync_files_exist(d), (false, false));
        assert!(
            r.commit_point_in_stream(&s).is_err(),
            "refused at the commit"
        );
        assert_eq!(r.committed().map(|c| c.epoch), Some(1));
        assert_eq!(fs::metadata(d.join("ram")).unwrap().len(), ram_len);
        assert_eq!(page(d, 1), vec![7; PS]);
        assert_eq!(block(d, 7), vec![7; BS]);
    }
}

#[test]
fn a_second_full_sync_while_the_sync_files_are_taken_is_spooled() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut r = with_epoch_1(d);
    let mut w1 = r.spool().writer();
    let mut w2 = r.spool().writer();
    let first = receive(&mut w1, &full_sync());
    let mut later = full_sync();
    later.epoch = 3;
    later.data = vec![8; later.data.len()];
    let second = receive(&mut w2, &later);
    assert_ne!(second.spooled, 0, "spooled as before");
    r.commit_in_stream(&first).unwrap();
    r.commit_in_stream(&second).unwrap();
    assert_eq!(page(d, 0), vec![8; PS]);
    assert_eq!(page(d, 1), vec![0; PS]);
    assert_eq!(
        block(d, 7),
        vec![0; BS],
        "a spooled full checkpoint zeroes the disk"
    );
    assert_eq!(block(d, 30), vec![4; BS]);
}

#[test]
fn the_synced_disk_image_is_a_sparse_raw_image_with_holes_of_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut r = with_epoch_1(d);
    let mut w = r.spool().writer();
    let s = receive(&mut w, &full_sync());
    r.commit_in_stream(&s).unwrap();
    let meta = fs::metadata(d.join("disk.raw")).unwrap();
    assert_eq!(meta.len(), DISK_BLOCKS * BS as u64);
    assert!(
        meta.blocks() * 512 < meta.len(),
        "blocks not sent are holes"
    );
    for b in 3..30 {
        assert_eq!(block(d, b), vec![0; BS], "block {b}");
    }
    // A plain raw image `qemu-img` reads, where it is installed.
    let Ok(out) = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(d.join("disk.raw"))
        .output()
    else {
        return;
    };
    let info = String::from_utf8_lossy(&out.stdout);
    assert!(info.contains("\"format\": \"raw\""), "{info}");
    assert!(
        info.contains(&format!("\"virtual-size\": {}", DISK_BLOCKS * BS as u64)),
        "{info}"
    );
}

/// The replica holds epoch 1 with pages 1 and 5 and block 7 holding data.
fn with_pages_1_and_5(d: &Path) -> Replica {
    let mut r = open(d);
    r.commit_in_stream(&checkpoint(1, false, &[(1, 7), (5, 7)], &[(7, 7)]))
        .unwrap();
    r
}

/// A full checkpoint lists only the primary's non-zero pages: page 5, not listed, must read
/// zero after it, whichever way it was committed.
#[test]
fn a_page_a_full_checkpoint_leaves_out_is_zero_afterwards_streamed_spooled_or_written_whole() {
    // Leaves out page 5 (and page 1, which it lists as zeroes: written since a pre-copy).
    let full = || checkpoint(2, true, &[(0, 5), (1, 0), (3, 6)], &[(0, 1)]);
    let check = |d: &Path, how: &str| {
        assert_eq!(page(d, 0), vec![5; PS], "{how}");
        assert_eq!(page(d, 1), vec![0; PS], "{how}: listed as zeroes");
        assert_eq!(page(d, 3), vec![6; PS], "{how}");
        assert_eq!(page(d, 5), vec![0; PS], "{how}: not listed, was 7");
        assert_eq!(block(d, 7), vec![0; BS], "{how}");
        assert_eq!(block(d, 0), vec![1; BS], "{how}");
    };
    // Streamed into the sync files.
    let dir = tempfile::tempdir().unwrap();
    let mut r = with_pages_1_and_5(dir.path());
    let mut w = r.spool().writer();
    let s = receive(&mut w, &full());
    r.commit_in_stream(&s).unwrap();
    check(dir.path(), "streamed");
    // Spooled: another full checkpoint holds the sync files.
    let dir = tempfile::tempdir().unwrap();
    let mut r = with_pages_1_and_5(dir.path());
    let mut holder = r.spool().writer();
    let mut other = full();
    other.epoch = 9;
    let mut growing = other.clone();
    growing.disk_indices.clear();
    growing.disk_data.clear();
    holder.follow(Some(&growing));
    let mut w = r.spool().writer();
    let s = receive(&mut w, &full());
    assert_ne!(s.spooled, 0);
    r.commit_in_stream(&s).unwrap();
    check(dir.path(), "spooled");
    drop(holder);
    // Written whole at the commit (no journal sealed ahead).
    let dir = tempfile::tempdir().unwrap();
    let mut r = with_pages_1_and_5(dir.path());
    r.commit_in_stream(&full()).unwrap();
    check(dir.path(), "whole");
    // Committed whole, then the process dies before the apply: the replay zeroes too.
    let dir = tempfile::tempdir().unwrap();
    {
        let mut r = with_pages_1_and_5(dir.path());
        r.commit_point_in_stream(&full()).unwrap();
        std::mem::forget(r);
    }
    let r = open(dir.path());
    assert_eq!(r.committed().map(|c| c.epoch), Some(2));
    check(dir.path(), "replayed");
}

/// An ordinary (or catch-up) checkpoint leaves the pages it does not list alone.
#[test]
fn a_page_an_ordinary_checkpoint_leaves_out_keeps_its_contents() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut r = with_pages_1_and_5(d);
    r.commit_in_stream(&checkpoint(2, false, &[(0, 5)], &[]))
        .unwrap();
    assert_eq!(page(d, 5), vec![7; PS]);
    assert_eq!(page(d, 1), vec![7; PS]);
    assert_eq!(block(d, 7), vec![7; BS]);
}

/// A full checkpoint with a page or block index out of range is refused on every path, and
/// the replica is left as it was (nothing zeroed).
#[test]
fn a_full_checkpoint_out_of_range_is_refused_before_anything_is_zeroed() {
    for (pages, blocks) in [
        (vec![(0, 5), (RAM_PAGES, 6)], vec![]),
        (vec![(0, 5), (u64::MAX, 6)], vec![]),
        (vec![(0, 5)], vec![(DISK_BLOCKS, 2)]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut r = with_pages_1_and_5(d);
        let bad = checkpoint(2, true, &pages, &blocks);
        assert!(r.commit_in_stream(&bad).is_err(), "{pages:?} {blocks:?}");
        let mut short = checkpoint(2, true, &[(0, 5)], &[]);
        short.data.truncate(PS - 1);
        assert!(
            r.commit_in_stream(&short).is_err(),
            "data shorter than its pages"
        );
        assert_eq!(r.committed().map(|c| c.epoch), Some(1));
        assert_eq!(page(d, 5), vec![7; PS]);
        assert_eq!(block(d, 7), vec![7; BS]);
    }
}

/// After a full checkpoint the RAM file's holes (the zero pages not sent) are allocated
/// behind the commit, without changing a byte.
#[test]
fn the_ram_file_is_allocated_whole_after_a_full_sync() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut r = with_pages_1_and_5(d);
    let mut w = r.spool().writer();
    let s = receive(&mut w, &full_sync());
    r.commit_in_stream(&s).unwrap();
    let whole = RAM_PAGES * PS as u64;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fs::metadata(d.join("ram")).unwrap().blocks() * 512 < whole {
        assert!(
            std::time::Instant::now() < deadline,
            "the RAM file was never allocated"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_full_sync_applied(d);
    assert_eq!(page(d, 5), vec![0; PS]);
}
