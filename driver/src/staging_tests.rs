use ftvm_model::wire::{encode_checkpoint_with_disk, CheckpointMeta, Expect, Item, StreamDecoder};
use ftvm_model::{Epoch, Generation, VmId};

use super::*;

const PS: u32 = 4096;
const RAM_PAGES: u64 = 100;
const DISK_BLOCKS: u64 = 130;
const BS: usize = DISK_BLOCK_SIZE as usize;

fn limits() -> StagingLimits {
    StagingLimits {
        page_size: PS,
        ram_pages: RAM_PAGES,
        max_device_bytes: 1000,
        disk_blocks: DISK_BLOCKS,
    }
}

fn no_disk() -> StagingLimits {
    StagingLimits {
        disk_blocks: 0,
        ..limits()
    }
}

fn meta(epoch: u64, page_size: u32, page_count: u64, device_len: u64) -> CheckpointMeta {
    CheckpointMeta {
        epoch: Epoch(epoch),
        full: false,
        page_size,
        page_count,
        device_len,
        disk_blocks: 0,
    }
}

fn disk_meta(epoch: u64, page_count: u64, disk_blocks: u64) -> CheckpointMeta {
    CheckpointMeta {
        disk_blocks,
        ..meta(epoch, PS, page_count, 0)
    }
}

fn begin(m: CheckpointMeta) -> Item<'static> {
    Item::CheckpointBegin {
        generation: Generation(1),
        meta: m,
    }
}

/// Runs a real frame through the wire decoder and the assembler; returns what the assembler
/// reported last, or its error.
fn assemble(
    asm: &mut CheckpointAssembler,
    epoch: u64,
    pages: &[(u64, &[u8])],
    device: &[u8],
) -> Result<Option<StagedCheckpoint>, StagingError> {
    assemble_disk(asm, epoch, pages, &[], device)
}

/// [`assemble`] with disk blocks.
fn assemble_disk(
    asm: &mut CheckpointAssembler,
    epoch: u64,
    pages: &[(u64, &[u8])],
    disk: &[(u64, &[u8])],
    device: &[u8],
) -> Result<Option<StagedCheckpoint>, StagingError> {
    let bytes = encode_checkpoint_with_disk(
        VmId(1),
        Generation(1),
        Epoch(epoch),
        false,
        PS,
        pages,
        disk,
        device,
    )
    .unwrap();
    let mut dec = StreamDecoder::new(Expect::vm(VmId(1)));
    let mut input = &bytes[..];
    let mut done = None;
    // Small reads, so pages also arrive through the decoder's gathering buffer.
    while !input.is_empty() {
        let chunk = &input[..input.len().min(1000)];
        let mut pos = 0;
        while pos < chunk.len() {
            let (used, item) = dec.decode(&chunk[pos..]).unwrap();
            pos += used;
            if let Some(item) = item {
                if let Staged::Complete(_, s) = asm.feed(item)? {
                    done = Some(s);
                }
            }
        }
        input = &input[chunk.len()..];
    }
    Ok(done)
}

#[test]
fn a_well_formed_checkpoint_comes_out_whole_pages_in_any_order() {
    let mut asm = CheckpointAssembler::new(limits());
    let (a, b) = (vec![1u8; PS as usize], vec![2u8; PS as usize]);
    // The wire encoder does not order pages: a descending pair is fine.
    let s = assemble(&mut asm, 5, &[(9, &a), (3, &b)], b"dev")
        .unwrap()
        .unwrap();
    assert_eq!(s.epoch, 5);
    assert_eq!(s.generation, 1);
    assert_eq!(s.indices, vec![9, 3]);
    assert_eq!(&s.data[..PS as usize], &a[..]);
    assert_eq!(&s.data[PS as usize..], &b[..]);
    assert_eq!(s.device, b"dev");
    assert_eq!(
        asm.abort().map(|a| a.epoch),
        None,
        "nothing is open after a whole checkpoint"
    );
    // The same pages again in the next checkpoint are no duplicates.
    let s = assemble(&mut asm, 6, &[(3, &b), (9, &a)], b"")
        .unwrap()
        .unwrap();
    assert_eq!(s.indices, vec![3, 9]);
}

#[test]
fn begin_refuses_a_foreign_page_size_too_many_pages_or_too_much_device_state() {
    let mut asm = CheckpointAssembler::new(limits());
    let e = asm.feed(begin(meta(1, 8192, 1, 0))).unwrap_err();
    assert_eq!(
        e,
        StagingError::PageSize {
            epoch: 1,
            got: 8192,
            want: PS
        }
    );
    assert_eq!(asm.abort().map(|a| a.epoch), Some(Epoch(1)));
    let e = asm.feed(begin(meta(2, PS, RAM_PAGES + 1, 0))).unwrap_err();
    assert!(
        matches!(e, StagingError::PageCount { count: 101, .. }),
        "{e}"
    );
    assert_eq!(asm.abort().map(|a| a.epoch), Some(Epoch(2)));
    let e = asm.feed(begin(meta(3, PS, 1, 1001))).unwrap_err();
    assert!(
        matches!(
            e,
            StagingError::DeviceLen {
                len: 1001,
                cap: 1000,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(asm.abort().map(|a| a.epoch), Some(Epoch(3)));
    // At the limits exactly, a checkpoint starts.
    let ok = asm.feed(begin(meta(4, PS, RAM_PAGES, 1000))).unwrap();
    assert!(matches!(ok, Staged::Started(Epoch(4))));
}

#[test]
fn a_claim_reserves_only_a_small_fixed_amount_and_growth_stays_within_the_claim() {
    let big = StagingLimits {
        page_size: PS,
        ram_pages: 1 << 30,
        max_device_bytes: 1 << 30,
        disk_blocks: 1 << 30,
    };
    let mut asm = CheckpointAssembler::new(big);
    let claim = CheckpointMeta {
        disk_blocks: 1 << 30,
        ..meta(1, PS, 1 << 30, 1 << 30)
    };
    asm.feed(begin(claim)).unwrap();
    let (_, s) = asm.cur.as_ref().unwrap();
    assert!(s.data.capacity() <= INITIAL_PAGES * PS as usize);
    assert!(s.indices.capacity() <= INITIAL_PAGES);
    assert!(s.disk_data.capacity() <= INITIAL_DISK_BLOCKS * BS);
    assert!(s.disk_indices.capacity() <= INITIAL_DISK_BLOCKS);
    assert!(s.device.capacity() <= INITIAL_DEVICE_BYTES);
    // A small claim grows exactly to the claim, not to the next power of two.
    let mut asm = CheckpointAssembler::new(limits());
    asm.feed(begin(meta(2, PS, 70, 0))).unwrap();
    let page = vec![0u8; PS as usize];
    for i in 0..70 {
        asm.feed(Item::Page {
            index: i,
            data: &page,
        })
        .unwrap();
    }
    let (_, s) = asm.cur.as_ref().unwrap();
    assert_eq!(s.data.capacity(), 70 * PS as usize);
    assert_eq!(s.indices.capacity(), 70);
}

#[test]
fn a_page_outside_guest_ram_is_refused_and_the_checkpoint_reported_dropped() {
    let mut asm = CheckpointAssembler::new(limits());
    let p = vec![0u8; PS as usize];
    let e = assemble(&mut asm, 7, &[(0, &p), (RAM_PAGES, &p)], b"").unwrap_err();
    assert_eq!(
        e,
        StagingError::PageIndex {
            epoch: 7,
            index: RAM_PAGES,
            ram_pages: RAM_PAGES
        }
    );
    assert_eq!(asm.abort().map(|a| a.epoch), Some(Epoch(7)));
    assert_eq!(asm.abort().map(|a| a.epoch), None, "reported once");
}

#[test]
fn a_page_sent_twice_is_refused_and_the_bitmap_is_clean_afterwards() {
    let mut asm = CheckpointAssembler::new(limits());
    let p = vec![0u8; PS as usize];
    let e = assemble(&mut asm, 8, &[(4, &p), (63, &p), (64, &p), (4, &p)], b"").unwrap_err();
    assert_eq!(e, StagingError::DuplicatePage { epoch: 8, index: 4 });
    assert_eq!(asm.abort().map(|a| a.epoch), Some(Epoch(8)));
    assert!(
        asm.seen.iter().all(|&w| w == 0),
        "marks of the dropped checkpoint"
    );
    // A later checkpoint with those pages is fine.
    let s = assemble(&mut asm, 9, &[(4, &p), (63, &p), (64, &p)], b"")
        .unwrap()
        .unwrap();
    assert_eq!(s.indices, vec![4, 63, 64]);
    assert!(
        asm.seen.iter().all(|&w| w == 0),
        "marks of the completed checkpoint"
    );
}

#[test]
fn a_checkpoint_cut_short_is_reported_by_abort() {
    let mut asm = CheckpointAssembler::new(limits());
    let p = vec![0u8; PS as usize];
    asm.feed(begin(meta(3, PS, 2, 0))).unwrap();
    asm.feed(Item::Page { index: 1, data: &p }).unwrap();
    let aborted = asm.abort().expect("a checkpoint was open");
    assert_eq!(aborted.epoch, Epoch(3));
    let partial = aborted.partial.expect("what arrived is handed back");
    assert_eq!(partial.indices, vec![1], "the one page that arrived");
    assert!(asm.cur.is_none());
    assert!(asm.seen.iter().all(|&w| w == 0));
}

#[test]
fn items_out_of_place_are_errors_not_panics() {
    let mut asm = CheckpointAssembler::new(limits());
    let p = vec![0u8; PS as usize];
    assert!(matches!(
        asm.feed(Item::Page { index: 0, data: &p }),
        Err(StagingError::OutOfPlace(_))
    ));
    assert!(matches!(
        asm.feed(Item::CheckpointEnd { epoch: Epoch(1) }),
        Err(StagingError::OutOfPlace(_))
    ));
    asm.feed(begin(meta(1, PS, 1, 4))).unwrap();
    // A short page, device state past its length, an end before all pages.
    assert!(asm
        .feed(Item::Page {
            index: 0,
            data: &p[..10]
        })
        .is_err());
    assert!(asm
        .feed(Item::Device {
            offset: 0,
            data: b"12345"
        })
        .is_err());
    assert!(asm.feed(Item::CheckpointEnd { epoch: Epoch(1) }).is_err());
    assert_eq!(asm.abort().map(|a| a.epoch), Some(Epoch(1)));
}

/// Mutated frames, fed through the decoder and the assembler: no panic, and whatever comes out
/// whole fits the VM (indices in range and unique, sizes as claimed, buffers within bounds).
#[test]
fn mutated_frames_never_panic_and_what_passes_fits_the_vm() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let page = vec![9u8; PS as usize];
    let mut whole = 0;
    for _ in 0..3000 {
        let n = rng.gen_range(0..4u64);
        let pages: Vec<(u64, &[u8])> = (0..n)
            .map(|_| (rng.gen_range(0..2 * RAM_PAGES), &page[..]))
            .collect();
        let blocks = vec![4u8; BS];
        let b = rng.gen_range(0..3u64);
        let disk: Vec<(u64, &[u8])> = (0..b)
            .map(|_| (rng.gen_range(0..2 * DISK_BLOCKS), &blocks[..]))
            .collect();
        let mut bytes = encode_checkpoint_with_disk(
            VmId(1),
            Generation(1),
            Epoch(1),
            false,
            PS,
            &pages,
            &disk,
            &[1u8; 700][..rng.gen_range(0..700)],
        )
        .unwrap();
        // Flip a few bytes, mostly in the header, meta and record headers.
        for _ in 0..rng.gen_range(0..3) {
            let at = if rng.gen_bool(0.7) {
                rng.gen_range(0..bytes.len().min(80))
            } else {
                rng.gen_range(0..bytes.len())
            };
            bytes[at] ^= rng.gen_range(1..=255u8);
        }
        let mut dec = StreamDecoder::new(Expect::vm(VmId(1)));
        let mut asm = CheckpointAssembler::new(limits());
        let mut pos = 0;
        while pos < bytes.len() {
            let Ok((used, item)) = dec.decode(&bytes[pos..]) else {
                break;
            };
            pos += used;
            let Some(item) = item else { continue };
            match asm.feed(item) {
                Ok(Staged::Complete(_, s)) => {
                    whole += 1;
                    let mut seen = std::collections::BTreeSet::new();
                    assert!(s.indices.iter().all(|&i| i < RAM_PAGES && seen.insert(i)));
                    assert_eq!(s.data.len(), s.indices.len() * PS as usize);
                    let mut seen = std::collections::BTreeSet::new();
                    assert!(s
                        .disk_indices
                        .iter()
                        .all(|&i| i < DISK_BLOCKS && seen.insert(i)));
                    assert_eq!(s.disk_data.len(), s.disk_indices.len() * BS);
                    assert!(s.device.len() as u64 <= limits().max_device_bytes);
                }
                Ok(_) => {
                    let (_, s) = asm.cur.as_ref().unwrap();
                    assert!(s.data.capacity() as u64 <= RAM_PAGES * u64::from(PS));
                    assert!(s.disk_data.capacity() as u64 <= DISK_BLOCKS * BS as u64);
                    assert!(s.device.capacity() <= 1000);
                }
                Err(_) => break,
            }
        }
    }
    // The unmutated and out-of-range cases both occur; some pass whole.
    assert!(whole > 100, "only {whole} whole checkpoints");
}

#[test]
fn disk_blocks_are_staged_after_the_pages_and_come_out_whole() {
    let mut asm = CheckpointAssembler::new(limits());
    let p = vec![1u8; PS as usize];
    let (a, b) = (vec![7u8; BS], vec![8u8; BS]);
    let s = assemble_disk(&mut asm, 5, &[(2, &p)], &[(129, &a), (0, &b)], b"dev")
        .unwrap()
        .unwrap();
    assert_eq!(s.indices, vec![2]);
    assert_eq!(s.disk_indices, vec![129, 0]);
    assert_eq!(s.disk_data.len(), 2 * BS);
    let blocks: Vec<(u64, &[u8])> = s.disk_blocks().collect();
    assert_eq!(blocks, vec![(129, &a[..]), (0, &b[..])]);
    assert_eq!(s.device, b"dev");
    assert!(asm.disk_seen.iter().all(|&w| w == 0), "marks cleared");
    // The same blocks again in the next checkpoint are no duplicates.
    let s = assemble_disk(&mut asm, 6, &[], &[(0, &a), (129, &b)], b"")
        .unwrap()
        .unwrap();
    assert_eq!(s.disk_indices, vec![0, 129]);
}

#[test]
fn a_disk_block_outside_the_disk_is_refused() {
    let mut asm = CheckpointAssembler::new(limits());
    let b = vec![0u8; BS];
    let e = assemble_disk(&mut asm, 7, &[], &[(1, &b), (DISK_BLOCKS, &b)], b"").unwrap_err();
    assert_eq!(
        e,
        StagingError::DiskBlockIndex {
            epoch: 7,
            index: DISK_BLOCKS,
            disk_blocks: DISK_BLOCKS
        }
    );
    let aborted = asm.abort().unwrap();
    assert_eq!(aborted.epoch, Epoch(7));
    assert_eq!(aborted.partial.unwrap().disk_indices, vec![1]);
    assert!(asm.disk_seen.iter().all(|&w| w == 0));
}

#[test]
fn a_disk_block_sent_twice_is_refused_and_the_bitmap_is_clean_afterwards() {
    let mut asm = CheckpointAssembler::new(limits());
    let b = vec![0u8; BS];
    let blocks = [(4, &b[..]), (64, &b[..]), (4, &b[..])];
    let e = assemble_disk(&mut asm, 8, &[], &blocks, b"").unwrap_err();
    assert_eq!(e, StagingError::DuplicateDiskBlock { epoch: 8, index: 4 });
    assert_eq!(asm.abort().map(|a| a.epoch), Some(Epoch(8)));
    assert!(asm.disk_seen.iter().all(|&w| w == 0));
    let s = assemble_disk(&mut asm, 9, &[], &blocks[..2], b"")
        .unwrap()
        .unwrap();
    assert_eq!(s.disk_indices, vec![4, 64]);
}

#[test]
fn begin_refuses_more_disk_blocks_than_the_disk_has() {
    let mut asm = CheckpointAssembler::new(limits());
    let e = asm
        .feed(begin(disk_meta(1, 0, DISK_BLOCKS + 1)))
        .unwrap_err();
    assert_eq!(
        e,
        StagingError::DiskBlockCount {
            epoch: 1,
            count: DISK_BLOCKS + 1,
            disk_blocks: DISK_BLOCKS
        }
    );
    assert_eq!(asm.abort().map(|a| a.epoch), Some(Epoch(1)));
    assert!(
        asm.disk_seen.is_empty(),
        "nothing allocated for a refused claim"
    );
    // Exactly the disk's size is fine (a full checkpoint of the whole disk).
    let ok = asm.feed(begin(disk_meta(2, 0, DISK_BLOCKS))).unwrap();
    assert!(matches!(ok, Staged::Started(Epoch(2))));
    assert_eq!(
        asm.disk_seen.len(),
        usize::try_from(DISK_BLOCKS.div_ceil(64)).unwrap()
    );
}

#[test]
fn disk_blocks_for_a_vm_without_a_disk_are_refused() {
    let mut asm = CheckpointAssembler::new(no_disk());
    let e = asm.feed(begin(disk_meta(3, 1, 1))).unwrap_err();
    assert_eq!(e, StagingError::NoDisk { epoch: 3, count: 1 });
    assert_eq!(asm.abort().map(|a| a.epoch), Some(Epoch(3)));
    assert!(asm.disk_seen.is_empty());
    // The same VM takes checkpoints without disk blocks as before.
    let p = vec![0u8; PS as usize];
    let s = assemble(&mut asm, 4, &[(0, &p)], b"").unwrap().unwrap();
    assert!(s.disk_indices.is_empty() && s.disk_data.is_empty());
    // A disk block that sneaks past `begin` (no decoder yields one) is still refused.
    asm.feed(begin(meta(5, PS, 0, 0))).unwrap();
    let b = vec![0u8; BS];
    assert!(matches!(
        asm.feed(Item::DiskBlock { index: 0, data: &b }),
        Err(StagingError::OutOfPlace(_))
    ));
}

#[test]
fn disk_items_out_of_place_are_errors_not_panics() {
    let mut asm = CheckpointAssembler::new(limits());
    let b = vec![0u8; BS];
    let p = vec![0u8; PS as usize];
    assert!(matches!(
        asm.feed(Item::DiskBlock { index: 0, data: &b }),
        Err(StagingError::OutOfPlace(_))
    ));
    // A block before the last page.
    asm.feed(begin(disk_meta(1, 1, 1))).unwrap();
    assert!(matches!(
        asm.feed(Item::DiskBlock { index: 0, data: &b }),
        Err(StagingError::OutOfPlace(_))
    ));
    asm.abort();
    // A short block, then too many blocks, then an end short of its blocks.
    asm.feed(begin(disk_meta(2, 1, 1))).unwrap();
    asm.feed(Item::Page { index: 0, data: &p }).unwrap();
    assert!(asm
        .feed(Item::DiskBlock {
            index: 0,
            data: &b[..100]
        })
        .is_err());
    asm.abort();
    asm.feed(begin(disk_meta(3, 0, 1))).unwrap();
    asm.feed(Item::DiskBlock { index: 0, data: &b }).unwrap();
    assert!(asm.feed(Item::DiskBlock { index: 1, data: &b }).is_err());
    asm.abort();
    asm.feed(begin(disk_meta(4, 0, 2))).unwrap();
    asm.feed(Item::DiskBlock { index: 0, data: &b }).unwrap();
    assert!(asm.feed(Item::CheckpointEnd { epoch: Epoch(4) }).is_err());
    let aborted = asm.abort().unwrap();
    assert_eq!(aborted.partial.unwrap().disk_indices, vec![0]);
    assert!(asm.disk_seen.iter().all(|&w| w == 0));
}

#[test]
fn a_damaged_disk_block_is_never_staged_whole() {
    // The CRC covers the disk section: a flipped bit in a block stops the checkpoint at the
    // decoder, so the assembler never reports it complete.
    let b = vec![5u8; BS];
    let mut bytes = encode_checkpoint_with_disk(
        VmId(1),
        Generation(1),
        Epoch(3),
        false,
        PS,
        &[],
        &[(9, &b)],
        b"",
    )
    .unwrap();
    let at = bytes.len() - 4 - BS / 2;
    bytes[at] ^= 1;
    let mut dec = StreamDecoder::new(Expect::vm(VmId(1)));
    let mut asm = CheckpointAssembler::new(limits());
    let mut pos = 0;
    let mut complete = false;
    let mut error = None;
    while pos < bytes.len() {
        match dec.decode(&bytes[pos..]) {
            Ok((used, item)) => {
                pos += used;
                if let Some(item) = item {
                    complete |= matches!(asm.feed(item), Ok(Staged::Complete(..)));
                }
            }
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    assert!(!complete);
    assert!(error.is_some());
    assert_eq!(asm.abort().map(|a| a.epoch), Some(Epoch(3)));
}
