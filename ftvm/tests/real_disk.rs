//! A protected VM with a disk, for real: the small guest's disk writer stamps every 4 KiB block
//! it writes with (block, round), the agents replicate its writes per epoch, and the backup's
//! replica disk must equal the primary's block for block at every verified checkpoint, before
//! and after a failover, and after a re-protection that synced the whole disk anew.

mod common;

use std::path::Path;
use std::process::Command;

/// Real deployments share the namespace names and the machine's two cores: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

const BLOCK: usize = 4096;
const DISK_MB: u64 = 32;

fn demo(name: &str, subnet: u8, extra: &[&str]) -> (serde_json::Value, std::path::PathBuf) {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let disk_mb = DISK_MB.to_string();
    let mut args = vec![
        "--disk-mb",
        &disk_mb,
        "--disk-write",
        "400",
        "--verify-every",
        "5",
    ];
    args.extend(extra);
    let (s, work) = common::passing_demo(name, &format!("ftk{subnet}"), subnet, &args);
    assert_eq!(s["client"]["lost"], 0, "{name}: {s}");
    assert_eq!(s["client"]["connections"], 1, "{name}: {s}");
    (s, work)
}

/// The disk writer's stamp in a block: (block, round), or None for a block it never wrote.
fn stamp(block: &[u8]) -> Option<(u64, u64)> {
    if &block[..8] != b"FTVMDSK1" {
        return None;
    }
    let word = |i: usize| u64::from_le_bytes(block[i..i + 8].try_into().unwrap());
    Some((word(8), word(16)))
}

/// Checks an image the disk writer wrote: every stamped block carries its own index and one
/// round throughout (no torn or misplaced write), and the rounds form what a writer going
/// through the blocks in order leaves — round R up to some block, R-1 after it. Returns the
/// number of stamped blocks.
fn check_writer_image(path: &Path) -> usize {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(bytes.len() as u64, DISK_MB << 20, "{}", path.display());
    let mut rounds = Vec::new();
    for (k, block) in bytes.chunks(BLOCK).enumerate() {
        let Some((index, round)) = stamp(block) else {
            rounds.push(0);
            continue;
        };
        assert_eq!(index, k as u64, "block {k} holds block {index}'s data");
        for rec in block.chunks(32) {
            assert_eq!(stamp(rec), Some((index, round)), "block {k} is torn");
        }
        rounds.push(round);
    }
    let drops = rounds.windows(2).filter(|w| w[0] != w[1]).count();
    let first = rounds[0];
    assert!(first > 0, "the writer never wrote block 0");
    assert!(
        rounds.iter().all(|&r| r == first || r + 1 == first) && drops <= 1,
        "rounds are not a clean prefix: {drops} changes"
    );
    rounds.iter().filter(|&&r| r > 0).count()
}

/// The image is a raw disk of the VM's size to `qemu-img` (what a user inspects).
fn qemu_img_sees_raw(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .expect("running qemu-img");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["format"], "raw", "{info}");
    assert_eq!(info["virtual-size"], DISK_MB << 20, "{info}");
}

/// The disk writer's writes so far, from its last progress line in a serial log. (A failed
/// write may end a log: an agent serves its VM's disk and dies a moment before its QEMU does,
/// when it is killed or at the end of the demo; nobody outside sees that VM again.)
fn writer_progress(serial: &Path) -> u64 {
    let log = String::from_utf8_lossy(&std::fs::read(serial).unwrap()).into_owned();
    log.lines()
        .filter_map(|l| l.split(" writes ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .next_back()
        .unwrap_or(0)
}

#[test]
fn replica_disk_equals_the_primary_at_every_verified_checkpoint_and_fails_over() {
    let (s, work) = demo(
        "disk-failover",
        60,
        &[
            "--kill",
            "primary",
            "--before-kill",
            "5",
            "--after-kill",
            "4",
        ],
    );
    let ram = s["verified_checkpoints"].as_u64().unwrap();
    let disk = s["verified_disk_checkpoints"].as_u64().unwrap();
    assert!(disk >= 10, "only {disk} disk digests compared: {s}");
    assert_eq!(
        disk, ram,
        "every verified checkpoint compares the disk too: {s}"
    );
    assert_eq!(s["survivor"]["generation"], 2, "{s}");
    // The guest wrote before the failover and went on writing after it, on the replica disk.
    let before = writer_progress(&work.join("primary/qemu/serial.log"));
    let after = writer_progress(&work.join("backup/qemu-restored/serial.log"));
    assert!(
        before > 100,
        "the guest wrote only {before} blocks before the kill"
    );
    assert!(
        after > before,
        "no guest writes after the failover ({before} → {after})"
    );
    let survivor_disk = work.join("disks/n2.raw");
    qemu_img_sees_raw(&survivor_disk);
    let stamped = check_writer_image(&survivor_disk);
    assert!(stamped as u64 >= after.min((DISK_MB << 20) / BLOCK as u64) / 2);
}

#[test]
fn a_restarted_backup_gets_the_whole_disk_again_and_stays_equal() {
    let (s, work) = demo(
        "disk-reprotect",
        61,
        &[
            "--kill",
            "backup",
            "--before-kill",
            "3",
            "--after-kill",
            "5",
        ],
    );
    assert!(s["reprotect_ms"].as_f64().is_some(), "{s}");
    assert_eq!(s["survivor"]["phase"], "protected", "{s}");
    // Checkpoints verified after the re-protection: the restarted backup's replica disk was
    // filled by a full sync (it started as the old, stale image) and then kept equal.
    let lines = |dir: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(work.join(dir).join("replica/verify.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let (p, b) = (lines("primary"), lines("backup"));
    let restarted = b
        .windows(2)
        .position(|w| w[1]["epoch"].as_u64() < w[0]["epoch"].as_u64().map(|e| e + 1))
        .map_or(0, |i| i + 1);
    let mut after = 0;
    for line in &b[restarted..] {
        let key = (&line["generation"], &line["epoch"]);
        if let Some(pl) = p.iter().find(|pl| (&pl["generation"], &pl["epoch"]) == key) {
            assert_eq!(pl["disk_digest"], line["disk_digest"], "epoch {}", key.1);
            assert!(line["disk_digest"].is_u64(), "{line}");
            after += 1;
        }
    }
    assert!(
        after >= 3,
        "only {after} disk digests compared after the re-protection"
    );
    check_writer_image(&work.join("disks/n2.raw"));
}
