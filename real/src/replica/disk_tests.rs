//! The replica disk: blocks land with their checkpoint's commit, a full checkpoint leaves
//! exactly its blocks, a crash between commit point and apply is replayed, bad input never
//! touches the image.

use std::fs;
use std::os::unix::fs::FileExt;

use super::*;

const PS: usize = 4096;
const RAM_PAGES: u64 = 8;
const DISK_BLOCKS: u64 = 32;
const BS: usize = DISK_BLOCK_SIZE as usize;

fn open(dir: &Path) -> Result<Replica, ReplicaError> {
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
}

fn checkpoint(epoch: u64, full: bool, blocks: &[(u64, u8)]) -> StagedCheckpoint {
    StagedCheckpoint {
        generation: 1,
        epoch,
        full,
        indices: vec![0],
        data: vec![epoch.to_le_bytes()[0]; PS],
        disk_indices: blocks.iter().map(|b| b.0).collect(),
        disk_data: blocks.iter().flat_map(|b| vec![b.1; BS]).collect(),
        device: b"dev".to_vec(),
        spooled: 0,
    }
}

fn block(dir: &Path, index: u64) -> Vec<u8> {
    let f = fs::File::open(dir.join("disk.raw")).unwrap();
    let mut b = vec![0u8; BS];
    f.read_exact_at(&mut b, index * BS as u64).unwrap();
    b
}

#[test]
fn blocks_land_with_their_commit_and_a_full_checkpoint_leaves_only_its_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut r = open(d).unwrap();
    assert_eq!(
        fs::metadata(d.join("disk.raw")).unwrap().len(),
        DISK_BLOCKS * BS as u64
    );
    r.commit_in_stream(&checkpoint(1, true, &[(0, 1), (31, 2)]))
        .unwrap();
    r.commit_in_stream(&checkpoint(2, false, &[(5, 3)]))
        .unwrap();
    assert_eq!(block(d, 0), vec![1; BS]);
    assert_eq!(block(d, 31), vec![2; BS]);
    assert_eq!(block(d, 5), vec![3; BS]);
    // A new sync: blocks it does not carry are zeroes on the primary.
    r.commit_in_stream(&checkpoint(3, true, &[(7, 4)])).unwrap();
    assert_eq!(block(d, 7), vec![4; BS]);
    for i in [0, 5, 31] {
        assert_eq!(
            block(d, i),
            vec![0; BS],
            "block {i} left over from before the sync"
        );
    }
}

#[test]
fn a_crash_after_the_commit_point_replays_the_disk_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    {
        let mut r = open(d).unwrap();
        r.commit_in_stream(&checkpoint(1, true, &[(1, 1)])).unwrap();
        // Committed, not applied: the process dies here.
        r.commit_point_in_stream(&checkpoint(2, false, &[(2, 9), (1, 8)]))
            .unwrap();
        assert_eq!(block(d, 2), vec![0; BS], "applied before the apply step");
    }
    let r = open(d).unwrap();
    assert_eq!(r.committed().map(|c| c.epoch), Some(2));
    assert_eq!(block(d, 1), vec![8; BS]);
    assert_eq!(block(d, 2), vec![9; BS]);
}

#[test]
fn bad_disk_input_never_touches_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut r = open(d).unwrap();
    r.commit_in_stream(&checkpoint(1, true, &[(3, 1)])).unwrap();
    let before = fs::read(d.join("disk.raw")).unwrap();
    let out_of_range = checkpoint(2, false, &[(4, 5), (DISK_BLOCKS, 5)]);
    assert!(matches!(
        r.commit_in_stream(&out_of_range),
        Err(ReplicaError::BadDiskBlock {
            index: DISK_BLOCKS,
            ..
        })
    ));
    let mut short = checkpoint(2, false, &[(4, 5)]);
    short.disk_data.truncate(BS - 1);
    assert!(matches!(
        r.commit_in_stream(&short),
        Err(ReplicaError::BadDiskBlock { .. })
    ));
    assert_eq!(fs::read(d.join("disk.raw")).unwrap(), before);
    assert_eq!(r.committed().map(|c| c.epoch), Some(1));
}

#[test]
fn a_disk_of_another_size_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let f = secure_fs::create_new(&d.join("disk.raw"), PRIVATE_FILE_MODE).unwrap();
    f.set_len(3 * BS as u64).unwrap();
    f.write_all_at(b"precious", 0).unwrap();
    let e = open(d).err().expect("refused");
    assert!(
        e.to_string()
            .contains("is 12288 bytes, the VM's disk is 131072"),
        "{e}"
    );
    assert_eq!(&fs::read(d.join("disk.raw")).unwrap()[..8], b"precious");
}

#[test]
fn a_replica_without_a_disk_refuses_disk_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut r = Replica::open(&d.join("r"), &d.join("ram"), RAM_PAGES * PS as u64, PS).unwrap();
    assert!(matches!(
        r.commit_in_stream(&checkpoint(1, true, &[(0, 1)])),
        Err(ReplicaError::NoDisk)
    ));
}

#[test]
fn disk_blocks_spooled_as_they_arrive_commit_and_replay() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let full = checkpoint(1, true, &[(0, 1), (9, 2), (20, 3)]);
    {
        let mut r = open(d).unwrap();
        let mut w = r.spool().writer();
        // The checkpoint as the link reader sees it grow: pages, then one block, then all.
        let mut growing = full.clone();
        growing.disk_indices.truncate(1);
        growing.disk_data.truncate(BS);
        w.follow(Some(&growing));
        let mut whole = full.clone();
        w.follow(Some(&whole));
        w.seal(&mut whole);
        assert_ne!(whole.spooled, 0, "sealed");
        // Committed from the spooled journal, then the process dies before the apply.
        r.commit_point_in_stream(&whole).unwrap();
    }
    let r = open(d).unwrap();
    assert_eq!(r.committed().map(|c| c.epoch), Some(1));
    assert_eq!(block(d, 0), vec![1; BS]);
    assert_eq!(block(d, 9), vec![2; BS]);
    assert_eq!(block(d, 20), vec![3; BS]);
}

#[test]
fn runs_of_blocks_land_each_at_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut r = open(d).unwrap();
    r.commit_in_stream(&checkpoint(
        1,
        true,
        &[(3, 1), (4, 2), (5, 3), (9, 4), (10, 5)],
    ))
    .unwrap();
    for (b, v) in [(3, 1), (4, 2), (5, 3), (9, 4), (10, 5), (6, 0), (8, 0)] {
        assert_eq!(block(d, b), vec![v; BS], "block {b}");
    }
}
