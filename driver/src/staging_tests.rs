use ftvm_model::wire::{encode_checkpoint, CheckpointMeta, Expect, Item, StreamDecoder};
use ftvm_model::{Epoch, Generation, VmId};

use super::*;

const PS: u32 = 4096;
const RAM_PAGES: u64 = 100;

fn limits() -> StagingLimits {
    StagingLimits {
        page_size: PS,
        ram_pages: RAM_PAGES,
        max_device_bytes: 1000,
    }
}

fn meta(epoch: u64, page_size: u32, page_count: u64, device_len: u64) -> CheckpointMeta {
    CheckpointMeta {
        epoch: Epoch(epoch),
        full: false,
        page_size,
        page_count,
        device_len,
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
    let bytes = encode_checkpoint(
        VmId(1),
        Generation(1),
        Epoch(epoch),
        false,
        PS,
        pages,
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
    };
    let mut asm = CheckpointAssembler::new(big);
    asm.feed(begin(meta(1, PS, 1 << 30, 1 << 30))).unwrap();
    let (_, s) = asm.cur.as_ref().unwrap();
    assert!(s.data.capacity() <= INITIAL_PAGES * PS as usize);
    assert!(s.indices.capacity() <= INITIAL_PAGES);
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
        let mut bytes = encode_checkpoint(
            VmId(1),
            Generation(1),
            Epoch(1),
            false,
            PS,
            &pages,
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
                    assert!(s.device.len() as u64 <= limits().max_device_bytes);
                }
                Ok(_) => {
                    let (_, s) = asm.cur.as_ref().unwrap();
                    assert!(s.data.capacity() as u64 <= RAM_PAGES * u64::from(PS));
                    assert!(s.device.capacity() <= 1000);
                }
                Err(_) => break,
            }
        }
    }
    // The unmutated and out-of-range cases both occur; some pass whole.
    assert!(whole > 100, "only {whole} whole checkpoints");
}
