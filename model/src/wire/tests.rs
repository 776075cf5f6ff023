//! Round trips, every decode error, byte-by-byte streaming, and fuzzing of the decoders.

use proptest::prelude::*;

use super::*;
use crate::ids::{Epoch, Generation, NodeId, VmId};
use crate::msg::{PeerMsg, RejectReason};
use crate::witness_msg::{Registration, WitnessReply, WitnessRequest, WitnessState};

const VM: VmId = VmId(0xfeed);

fn expect(g: u64) -> Expect {
    Expect {
        vm: VM,
        min_generation: Generation(g),
    }
}

fn all_peer_msgs() -> Vec<PeerMsg> {
    let g = Generation(3);
    vec![
        PeerMsg::Join {
            vm: VM,
            node: NodeId(4),
            ram_pages: 1 << 20,
            page_size: 4096,
            disk_blocks: 1 << 24,
            known: g,
            replica: None,
        },
        PeerMsg::Join {
            vm: VM,
            node: NodeId(5),
            ram_pages: 9,
            page_size: 4096,
            disk_blocks: 0,
            known: Generation::UNKNOWN,
            replica: None,
        },
        PeerMsg::Reject {
            generation: g,
            reason: RejectReason::RamSizeMismatch,
        },
        PeerMsg::Reject {
            generation: g,
            reason: RejectReason::HaveBackup,
        },
        PeerMsg::Reject {
            generation: g,
            reason: RejectReason::DiskSizeMismatch,
        },
        PeerMsg::SyncStart {
            generation: g,
            epoch: Epoch(17),
            base: None,
            lineage: 0,
            continues: false,
        },
        PeerMsg::Ack {
            generation: g,
            epoch: Epoch(18),
        },
        PeerMsg::Heartbeat {
            generation: g,
            epoch: Epoch(u64::MAX),
        },
    ]
}

fn all_requests() -> Vec<WitnessRequest> {
    let r = Registration {
        node: NodeId(2),
        since: Epoch(40),
    };
    vec![
        WitnessRequest::Query,
        WitnessRequest::RegisterBackup {
            generation: Generation(2),
            primary: NodeId(1),
            backup: r,
        },
        WitnessRequest::DropBackup {
            generation: Generation(2),
            primary: NodeId(1),
            backup: r,
        },
        WitnessRequest::Takeover {
            generation: Generation(2),
            backup: r,
        },
    ]
}

fn a_reply() -> WitnessReply {
    WitnessReply {
        request: WitnessRequest::Takeover {
            generation: Generation(2),
            backup: Registration {
                node: NodeId(2),
                since: Epoch(40),
            },
        },
        granted: true,
        state: WitnessState {
            vm: VM,
            generation: Generation(3),
            primary: NodeId(2),
            backup: None,
            floor: Epoch(0),
            promoted: Some(Registration {
                node: NodeId(2),
                since: Epoch(40),
            }),
        },
    }
}

fn page(fill: u8, size: usize) -> Vec<u8> {
    // Bytes counting up from `fill`, wrapping: the low byte of the offset is what is wanted.
    (0..size)
        .map(|i| fill.wrapping_add(i.to_le_bytes()[0]))
        .collect()
}

const BLOCK: usize = DISK_BLOCK_SIZE as usize;

/// Two pages of 64 bytes, two disk blocks, device state.
fn a_checkpoint() -> (Vec<u8>, Checkpoint) {
    let p1 = page(1, 64);
    let p2 = page(9, 64);
    let d1 = page(33, BLOCK);
    let d2 = page(77, BLOCK);
    let device = b"device-state-bytes".to_vec();
    let bytes = encode_checkpoint_with_disk(
        VM,
        Generation(3),
        Epoch(12),
        false,
        64,
        &[(5, &p1), (900, &p2)],
        &[(3, &d1), (1 << 40, &d2)],
        &device,
    )
    .unwrap();
    let cp = Checkpoint {
        generation: Generation(3),
        meta: CheckpointMeta {
            epoch: Epoch(12),
            full: false,
            page_size: 64,
            page_count: 2,
            device_len: device.len() as u64,
            disk_blocks: 2,
        },
        pages: vec![(5, p1), (900, p2)],
        disk: vec![(3, d1), (1 << 40, d2)],
        device,
    };
    (bytes, cp)
}

/// Offset of the first disk block's contents in [`a_checkpoint`]'s frame.
fn first_block_at() -> usize {
    HEADER_LEN + META_LEN + 2 * (RECORD_HEADER_LEN + 64) + RECORD_HEADER_LEN
}

/// Rewrite the header crc after editing header bytes.
fn reseal_header(frame: &mut [u8]) {
    let crc = crc32fast::hash(&frame[..32]);
    frame[32..36].copy_from_slice(&crc.to_le_bytes());
}

/// Rewrite the body crc after editing body bytes of a small frame.
fn reseal_body(frame: &mut [u8]) {
    let end = frame.len() - TRAILER_LEN;
    let crc = crc32fast::hash(&frame[HEADER_LEN..end]);
    frame[end..].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn peer_messages_round_trip() {
    for msg in all_peer_msgs() {
        let bytes = encode_peer(VM, &msg);
        let (frame, used) = decode(&bytes, &expect(0)).unwrap();
        assert_eq!(frame, Frame::Peer(msg));
        assert_eq!(used, bytes.len());
    }
}

#[test]
fn witness_traffic_round_trips() {
    for req in all_requests() {
        let bytes = encode_witness_request(VM, &req);
        assert_eq!(
            decode(&bytes, &expect(0)).unwrap().0,
            Frame::WitnessRequest(req)
        );
    }
    let reply = a_reply();
    let bytes = encode_witness_reply(&reply);
    assert_eq!(
        decode(&bytes, &expect(9)).unwrap().0,
        Frame::WitnessReply(reply)
    );
}

#[test]
fn checkpoint_round_trips() {
    let (bytes, cp) = a_checkpoint();
    assert_eq!(bytes.len() as u64, cp.meta.frame_len().unwrap());
    let (frame, used) = decode(&bytes, &expect(3)).unwrap();
    assert_eq!(frame, Frame::Checkpoint(cp));
    assert_eq!(used, bytes.len());
}

#[test]
fn empty_checkpoint_round_trips() {
    let bytes = encode_checkpoint(VM, Generation(1), Epoch(1), true, 4096, &[], &[]).unwrap();
    let Frame::Checkpoint(cp) = decode(&bytes, &expect(1)).unwrap().0 else {
        panic!()
    };
    assert!(cp.pages.is_empty() && cp.disk.is_empty() && cp.device.is_empty());
    assert!(cp.meta.full);
    assert_eq!(cp.meta.disk_blocks, 0);
}

#[test]
fn disk_blocks_sit_between_pages_and_device_state() {
    let (bytes, cp) = a_checkpoint();
    assert_eq!(
        bytes.len(),
        HEADER_LEN
            + META_LEN
            + 2 * (RECORD_HEADER_LEN + 64)
            + 2 * (RECORD_HEADER_LEN + BLOCK)
            + cp.device.len()
            + TRAILER_LEN
    );
    let at = first_block_at();
    assert_eq!(bytes[at - RECORD_HEADER_LEN..at], 3u64.to_le_bytes());
    assert_eq!(bytes[at..at + BLOCK], cp.disk[0].1[..]);
    let device_at = bytes.len() - TRAILER_LEN - cp.device.len();
    assert_eq!(bytes[device_at..device_at + cp.device.len()], cp.device[..]);
    // The meta's last field is the disk block count.
    let count_at = HEADER_LEN + META_LEN - 8;
    assert_eq!(bytes[count_at..count_at + 8], 2u64.to_le_bytes());
}

#[test]
fn disk_only_checkpoint_round_trips() {
    let block = page(5, BLOCK);
    let bytes = encode_checkpoint_with_disk(
        VM,
        Generation(1),
        Epoch(4),
        false,
        4096,
        &[],
        &[(0, &block)],
        &[],
    )
    .unwrap();
    let Frame::Checkpoint(cp) = decode(&bytes, &expect(1)).unwrap().0 else {
        panic!()
    };
    assert!(cp.pages.is_empty() && cp.device.is_empty());
    assert_eq!(cp.disk, vec![(0, block)]);
}

#[test]
fn corrupt_disk_part_is_refused_like_a_corrupt_page() {
    let (cp, _) = a_checkpoint();
    for i in [
        first_block_at() - RECORD_HEADER_LEN, // the block index
        first_block_at(),
        first_block_at() + BLOCK - 1,
        first_block_at() + BLOCK + RECORD_HEADER_LEN + 100, // second block
    ] {
        let mut bad = cp.clone();
        bad[i] ^= 0x10;
        assert_eq!(
            decode(&bad, &expect(0)),
            Err(WireError::Corrupted { part: Part::Body }),
            "byte {i}"
        );
        // The stream decoder hands out the damaged block but never the checkpoint's end.
        let items = stream_items(&bad, 100);
        assert_eq!(items, Err(WireError::Corrupted { part: Part::Body }));
    }
}

#[test]
fn a_frame_cut_in_its_disk_part_is_truncated() {
    let (cp, _) = a_checkpoint();
    for cut in [
        first_block_at() - RECORD_HEADER_LEN,
        first_block_at() - 1,
        first_block_at(),
        first_block_at() + BLOCK / 2,
        first_block_at() + BLOCK,
        first_block_at() + BLOCK + RECORD_HEADER_LEN + BLOCK - 1,
    ] {
        assert_eq!(
            decode(&cp[..cut], &expect(0)),
            Err(WireError::Truncated {
                needed: (cp.len() - cut) as u64
            }),
            "cut at {cut}"
        );
    }
}

#[test]
fn zero_copy_encoder_pieces_make_the_same_frame() {
    let (whole, cp) = a_checkpoint();
    let (mut enc, prefix) = CheckpointEncoder::new(VM, cp.generation, cp.meta).unwrap();
    let mut pieces = prefix.to_vec();
    for (index, data) in &cp.pages {
        pieces.extend_from_slice(&enc.page(*index, data).unwrap());
        pieces.extend_from_slice(data);
    }
    for (index, data) in &cp.disk {
        pieces.extend_from_slice(&enc.disk_block(*index, data).unwrap());
        pieces.extend_from_slice(data);
    }
    // Device state may be fed in chunks.
    let (a, b) = cp.device.split_at(5);
    enc.device(a).unwrap();
    enc.device(b).unwrap();
    pieces.extend_from_slice(&cp.device);
    pieces.extend_from_slice(&enc.finish().unwrap());
    assert_eq!(pieces, whole);
}

#[test]
fn encoder_refuses_misuse() {
    let meta = CheckpointMeta {
        epoch: Epoch(1),
        full: false,
        page_size: 64,
        page_count: 1,
        device_len: 2,
        disk_blocks: 0,
    };
    let (mut enc, _) = CheckpointEncoder::new(VM, Generation(1), meta).unwrap();
    assert!(matches!(
        enc.page(0, &[0; 63]),
        Err(WireError::EncoderMisuse(_))
    ));
    assert!(
        matches!(enc.device(b"xx"), Err(WireError::EncoderMisuse(_))),
        "device before pages"
    );
    enc.page(0, &[0; 64]).unwrap();
    assert!(
        matches!(enc.page(1, &[0; 64]), Err(WireError::EncoderMisuse(_))),
        "too many pages"
    );
    assert!(
        matches!(enc.device(b"xxx"), Err(WireError::EncoderMisuse(_))),
        "too much device"
    );
    enc.device(b"x").unwrap();
    assert!(
        matches!(enc.clone().finish(), Err(WireError::EncoderMisuse(_))),
        "device short"
    );
    enc.device(b"y").unwrap();
    assert!(enc.finish().is_ok());
    let bad = CheckpointMeta {
        page_size: 1000,
        ..meta
    };
    assert!(CheckpointEncoder::new(VM, Generation(1), bad).is_err());
    let huge = CheckpointMeta {
        disk_blocks: u64::MAX / 8,
        ..meta
    };
    assert_eq!(huge.body_len(), None, "disk size overflow");
    assert!(CheckpointEncoder::new(VM, Generation(1), huge).is_err());
}

#[test]
fn encoder_refuses_disk_misuse() {
    let meta = CheckpointMeta {
        epoch: Epoch(1),
        full: false,
        page_size: 64,
        page_count: 1,
        device_len: 2,
        disk_blocks: 2,
    };
    let block = [0u8; BLOCK];
    fn misuse<T>(r: Result<T, WireError>) -> bool {
        matches!(r, Err(WireError::EncoderMisuse(_)))
    }
    let (mut enc, _) = CheckpointEncoder::new(VM, Generation(1), meta).unwrap();
    assert!(misuse(enc.disk_block(0, &block)), "disk block before pages");
    enc.page(0, &[0; 64]).unwrap();
    assert!(
        misuse(enc.disk_block(0, &block[..BLOCK - 1])),
        "short block"
    );
    assert!(misuse(enc.disk_block(0, &[0; 64])), "a page-sized block");
    enc.disk_block(7, &block).unwrap();
    assert!(misuse(enc.device(b"x")), "device before the last block");
    assert!(misuse(enc.clone().finish()), "a block short");
    enc.disk_block(8, &block).unwrap();
    assert!(misuse(enc.disk_block(9, &block)), "too many blocks");
    enc.device(b"xy").unwrap();
    assert!(
        misuse(enc.clone().disk_block(9, &block)),
        "block after device"
    );
    assert!(enc.finish().is_ok());
    // A frame without a disk refuses any block.
    let no_disk = CheckpointMeta {
        disk_blocks: 0,
        device_len: 0,
        page_count: 0,
        ..meta
    };
    let (mut enc, _) = CheckpointEncoder::new(VM, Generation(1), no_disk).unwrap();
    assert!(misuse(enc.disk_block(0, &block)));
    assert!(enc.finish().is_ok());
}

#[test]
fn every_proper_prefix_is_truncated() {
    let (cp, _) = a_checkpoint();
    for frame in [
        encode_peer(VM, &all_peer_msgs()[0]),
        encode_witness_reply(&a_reply()),
        cp,
    ] {
        for len in 0..frame.len() {
            match decode(&frame[..len], &expect(0)) {
                Err(WireError::Truncated { needed }) => {
                    assert!(needed >= 1);
                    assert!(
                        needed <= (frame.len() - len) as u64,
                        "needed {needed} at {len}"
                    );
                }
                other => panic!("prefix of {len} bytes: {other:?}"),
            }
        }
    }
}

#[test]
fn truncated_stream_reports_exact_missing_bytes() {
    let (cp, _) = a_checkpoint();
    for len in 1..cp.len() {
        let mut dec = StreamDecoder::new(expect(0));
        let mut input = &cp[..len];
        while !input.is_empty() {
            let (used, _) = dec.decode(input).unwrap();
            input = &input[used..];
        }
        let missing = (cp.len() - len) as u64;
        match dec.finish() {
            // Once the header is in, the decoder knows the exact frame length.
            Err(WireError::Truncated { needed }) if len >= HEADER_LEN => {
                assert_eq!(needed, missing)
            }
            Err(WireError::Truncated { needed }) => {
                assert_eq!(
                    needed,
                    (HEADER_LEN - len) as u64,
                    "at least the rest of the header"
                )
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn any_flipped_bit_is_refused() {
    let (cp, _) = a_checkpoint();
    let frames = [
        encode_peer(
            VM,
            &PeerMsg::Ack {
                generation: Generation(3),
                epoch: Epoch(9),
            },
        ),
        encode_witness_request(VM, &all_requests()[1]),
        cp,
    ];
    for frame in frames {
        for i in 0..frame.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = frame.clone();
                bad[i] ^= bit;
                assert!(
                    decode(&bad, &expect(0)).is_err(),
                    "byte {i} bit {bit:#x} accepted"
                );
            }
        }
    }
}

#[test]
fn body_and_trailer_damage_is_corruption() {
    let frame = encode_peer(
        VM,
        &PeerMsg::Ack {
            generation: Generation(3),
            epoch: Epoch(9),
        },
    );
    let mut bad = frame.clone();
    bad[HEADER_LEN] ^= 0xff;
    assert_eq!(
        decode(&bad, &expect(0)),
        Err(WireError::Corrupted { part: Part::Body })
    );
    let mut bad = frame.clone();
    *bad.last_mut().unwrap() ^= 1;
    assert_eq!(
        decode(&bad, &expect(0)),
        Err(WireError::Corrupted { part: Part::Body })
    );
    let mut bad = frame;
    bad[20] ^= 1; // generation byte, header crc not updated
    assert_eq!(
        decode(&bad, &expect(0)),
        Err(WireError::Corrupted { part: Part::Header })
    );
    let (mut cp, _) = a_checkpoint();
    let i = HEADER_LEN + META_LEN + RECORD_HEADER_LEN + 3; // inside the first page
    cp[i] ^= 4;
    assert_eq!(
        decode(&cp, &expect(0)),
        Err(WireError::Corrupted { part: Part::Body })
    );
}

#[test]
fn wrong_magic_and_version() {
    let frame = encode_peer(VM, &all_peer_msgs()[4]);
    let mut bad = frame.clone();
    bad[0] = b'X';
    assert_eq!(decode(&bad, &expect(0)), Err(WireError::BadMagic));
    let mut v2 = frame.clone();
    v2[4..6].copy_from_slice(&(VERSION + 1).to_le_bytes());
    reseal_header(&mut v2);
    assert_eq!(
        decode(&v2, &expect(0)),
        Err(WireError::WrongVersion {
            found: VERSION + 1,
            supported: VERSION
        })
    );
    // A peer of the layout before disk blocks (version 1) is named as such, not misparsed.
    let mut v1 = frame;
    v1[4..6].copy_from_slice(&1u16.to_le_bytes());
    reseal_header(&mut v1);
    assert_eq!(
        decode(&v1, &expect(0)),
        Err(WireError::WrongVersion {
            found: 1,
            supported: VERSION
        })
    );
    // The version is checked before the checksum, so a future layout is named as such.
    v2[20] ^= 1;
    assert!(matches!(
        decode(&v2, &expect(0)),
        Err(WireError::WrongVersion { .. })
    ));
}

#[test]
fn wrong_vm_is_refused() {
    let other = VmId(1);
    let frame = encode_peer(
        other,
        &PeerMsg::Heartbeat {
            generation: Generation(1),
            epoch: Epoch(1),
        },
    );
    assert_eq!(
        decode(&frame, &expect(0)),
        Err(WireError::WrongVm {
            expected: VM,
            found: other
        })
    );
    let join = PeerMsg::Join {
        vm: other,
        node: NodeId(3),
        ram_pages: 1,
        page_size: 4096,
        disk_blocks: 0,
        known: Generation(0),
        replica: None,
    };
    let frame = encode_peer(VM, &join);
    assert!(matches!(
        decode(&frame, &expect(0)),
        Err(WireError::WrongVm { .. })
    ));
    let cp = encode_checkpoint(other, Generation(1), Epoch(1), true, 64, &[], b"").unwrap();
    assert!(matches!(
        decode(&cp, &expect(0)),
        Err(WireError::WrongVm { .. })
    ));
}

#[test]
fn stale_generation_is_refused_except_join_and_witness_frames() {
    let old = Generation(2);
    let ack = encode_peer(
        VM,
        &PeerMsg::Ack {
            generation: old,
            epoch: Epoch(1),
        },
    );
    assert_eq!(
        decode(&ack, &expect(3)),
        Err(WireError::StaleGeneration {
            current: Generation(3),
            found: old
        })
    );
    assert!(decode(&ack, &expect(2)).is_ok());
    let cp = encode_checkpoint(VM, old, Epoch(1), true, 64, &[], b"").unwrap();
    assert!(matches!(
        decode(&cp, &expect(3)),
        Err(WireError::StaleGeneration { .. })
    ));
    let join = all_peer_msgs()[1];
    assert!(decode(&encode_peer(VM, &join), &expect(3)).is_ok());
    let query = encode_witness_request(VM, &WitnessRequest::Query);
    assert!(decode(&query, &expect(3)).is_ok());
}

#[test]
fn malformed_frames_are_named() {
    // Unknown kind with a valid header checksum.
    let mut f = encode_peer(VM, &all_peer_msgs()[5]);
    f[6] = 99;
    reseal_header(&mut f);
    assert_eq!(
        decode(&f, &expect(0)),
        Err(WireError::Malformed("unknown frame kind"))
    );
    // Non-zero flags.
    let mut f = encode_peer(VM, &all_peer_msgs()[5]);
    f[7] = 1;
    reseal_header(&mut f);
    assert!(matches!(
        decode(&f, &expect(0)),
        Err(WireError::Malformed(_))
    ));
    // Body length that does not fit the kind (and would be huge).
    let mut f = encode_peer(VM, &all_peer_msgs()[5]);
    f[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    reseal_header(&mut f);
    assert!(matches!(
        decode(&f, &expect(0)),
        Err(WireError::Malformed(_))
    ));
    // Unknown reject reason with valid checksums.
    let reject = PeerMsg::Reject {
        generation: Generation(1),
        reason: RejectReason::Busy,
    };
    let mut f = encode_peer(VM, &reject);
    f[HEADER_LEN] = 200;
    reseal_body(&mut f);
    assert_eq!(
        decode(&f, &expect(0)),
        Err(WireError::Malformed("unknown reject reason"))
    );
    // Witness query with garbage in unused fields.
    let mut f = encode_witness_request(VM, &WitnessRequest::Query);
    f[HEADER_LEN + 3] = 1;
    reseal_body(&mut f);
    assert!(matches!(
        decode(&f, &expect(0)),
        Err(WireError::Malformed(_))
    ));
    // Checkpoint whose meta disagrees with the header's body length.
    let (mut cp, _) = a_checkpoint();
    let count_at = HEADER_LEN + 13;
    cp[count_at..count_at + 8].copy_from_slice(&3u64.to_le_bytes());
    assert_eq!(
        decode(&cp, &expect(0)),
        Err(WireError::Malformed(
            "checkpoint length disagrees with its meta"
        ))
    );
    // The same for a disk block count that disagrees with the body length.
    let (mut cp, _) = a_checkpoint();
    let count_at = HEADER_LEN + META_LEN - 8;
    cp[count_at..count_at + 8].copy_from_slice(&3u64.to_le_bytes());
    assert_eq!(
        decode(&cp, &expect(0)),
        Err(WireError::Malformed(
            "checkpoint length disagrees with its meta"
        ))
    );
    // A disk block count so large the body length overflows.
    let (mut cp, _) = a_checkpoint();
    cp[count_at..count_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(
        decode(&cp, &expect(0)),
        Err(WireError::Malformed(
            "bad checkpoint page size or size overflow"
        ))
    );
}

/// Feed `bytes` in chunks of `chunk` and collect owned items.
fn stream_items(bytes: &[u8], chunk: usize) -> Result<Vec<String>, WireError> {
    let mut dec = StreamDecoder::new(expect(0));
    let mut out = Vec::new();
    let mut page_bytes: Vec<u8> = Vec::new();
    for piece in bytes.chunks(chunk.max(1)) {
        let mut input = piece;
        while !input.is_empty() {
            let (used, item) = dec.decode(input)?;
            match item {
                Some(Item::Page { index, data }) => {
                    page_bytes.extend_from_slice(data);
                    out.push(format!("page {index} {}", data.len()));
                }
                Some(Item::DiskBlock { index, data }) => {
                    page_bytes.extend_from_slice(data);
                    out.push(format!("disk {index} {}", data.len()));
                }
                Some(Item::Device { offset, data }) => {
                    page_bytes.extend_from_slice(data);
                    out.push(format!("device {offset}+{}", data.len()));
                }
                Some(other) => out.push(format!("{other:?}")),
                None => assert!(used > 0, "no progress"),
            }
            input = &input[used..];
        }
    }
    dec.finish()?;
    out.push(format!("content {:08x}", crc32fast::hash(&page_bytes)));
    Ok(out)
}

/// Merge consecutive device chunks so chunking does not change the comparison.
fn merge_device(items: Vec<String>) -> Vec<String> {
    items
        .into_iter()
        .filter(|s| !s.starts_with("device"))
        .collect()
}

#[test]
fn streaming_at_every_chunk_size_gives_the_same_items() {
    let (cp, _) = a_checkpoint();
    let mut bytes = Vec::new();
    for msg in all_peer_msgs() {
        bytes.extend_from_slice(&encode_peer(VM, &msg));
    }
    bytes.extend_from_slice(&cp);
    bytes.extend_from_slice(&encode_witness_reply(&a_reply()));
    bytes.extend_from_slice(&cp);
    let reference = stream_items(&bytes, bytes.len()).unwrap();
    assert_eq!(
        reference.iter().filter(|s| s.starts_with("page")).count(),
        4
    );
    assert_eq!(
        reference.iter().filter(|s| s.starts_with("disk")).count(),
        4
    );
    assert!(reference.iter().any(|s| s.contains("CheckpointEnd")));
    for chunk in 1..=97 {
        let got = stream_items(&bytes, chunk).unwrap();
        assert_eq!(
            merge_device(got),
            merge_device(reference.clone()),
            "chunk size {chunk}"
        );
    }
}

#[test]
fn whole_pages_in_the_input_are_lent_not_copied() {
    let (cp, _) = a_checkpoint();
    let mut dec = StreamDecoder::new(expect(0));
    let mut input = &cp[..];
    while !input.is_empty() {
        let base = input.as_ptr() as usize;
        let len = input.len();
        let (used, item) = dec.decode(input).unwrap();
        if let Some(Item::Page { data, .. } | Item::DiskBlock { data, .. }) = item {
            let p = data.as_ptr() as usize;
            assert!(
                p >= base && p + data.len() <= base + len,
                "record was copied"
            );
        }
        input = &input[used..];
    }
    assert!(dec.at_frame_boundary());
}

#[test]
fn decoder_is_poisoned_after_an_error() {
    let mut f = encode_peer(VM, &all_peer_msgs()[5]);
    f[0] = 0;
    let mut dec = StreamDecoder::new(expect(0));
    assert_eq!(dec.decode(&f).map(|(n, _)| n), Err(WireError::BadMagic));
    let good = encode_peer(VM, &all_peer_msgs()[5]);
    assert_eq!(dec.decode(&good).map(|(n, _)| n), Err(WireError::BadMagic));
    assert_eq!(dec.finish(), Err(WireError::BadMagic));
}

#[test]
fn min_generation_can_be_raised() {
    let ack = encode_peer(
        VM,
        &PeerMsg::Ack {
            generation: Generation(2),
            epoch: Epoch(1),
        },
    );
    let mut dec = StreamDecoder::new(expect(0));
    let (used, none) = dec.decode(&ack).unwrap();
    assert_eq!(
        (used, none),
        (HEADER_LEN, None),
        "the header alone yields nothing"
    );
    assert!(matches!(
        dec.decode(&ack[used..]),
        Ok((_, Some(Item::Peer(_))))
    ));
    dec.set_min_generation(Generation(3));
    assert!(matches!(
        dec.decode(&ack),
        Err(WireError::StaleGeneration { .. })
    ));
}

fn arb_gen() -> impl Strategy<Value = Generation> {
    any::<u64>().prop_map(Generation)
}

fn arb_reason() -> impl Strategy<Value = RejectReason> {
    (1u8..=7).prop_map(|c| RejectReason::from_code(c).unwrap())
}

fn arb_peer_msg() -> impl Strategy<Value = PeerMsg> {
    prop_oneof![
        (
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            arb_gen(),
            proptest::option::of((arb_gen(), any::<u64>(), any::<u64>(), any::<u64>())),
        )
            .prop_map(|(n, r, p, d, known, replica)| PeerMsg::Join {
                vm: VM,
                node: NodeId(n),
                ram_pages: r,
                page_size: p,
                disk_blocks: d,
                known,
                replica: replica.map(|(generation, lineage, since, epoch)| {
                    crate::msg::ReplicaAt {
                        generation,
                        lineage,
                        since: Epoch(since),
                        epoch: Epoch(epoch),
                    }
                }),
            }),
        (arb_gen(), arb_reason())
            .prop_map(|(generation, reason)| PeerMsg::Reject { generation, reason }),
        (
            arb_gen(),
            any::<u64>(),
            proptest::option::of(any::<u64>()),
            any::<u64>(),
            any::<bool>()
        )
            .prop_map(
                |(generation, e, base, lineage, continues)| PeerMsg::SyncStart {
                    generation,
                    epoch: Epoch(e),
                    base: base.map(Epoch),
                    lineage,
                    continues,
                }
            ),
        (arb_gen(), any::<u64>()).prop_map(|(generation, e)| PeerMsg::Ack {
            generation,
            epoch: Epoch(e)
        }),
        (arb_gen(), any::<u64>()).prop_map(|(generation, e)| PeerMsg::Heartbeat {
            generation,
            epoch: Epoch(e)
        }),
    ]
}

fn arb_reg() -> impl Strategy<Value = Registration> {
    (1u32.., any::<u64>()).prop_map(|(n, s)| Registration {
        node: NodeId(n),
        since: Epoch(s),
    })
}

fn arb_request() -> impl Strategy<Value = WitnessRequest> {
    prop_oneof![
        Just(WitnessRequest::Query),
        (arb_gen(), any::<u32>(), arb_reg()).prop_map(|(generation, p, backup)| {
            WitnessRequest::RegisterBackup {
                generation,
                primary: NodeId(p),
                backup,
            }
        }),
        (arb_gen(), any::<u32>(), arb_reg()).prop_map(|(generation, p, backup)| {
            WitnessRequest::DropBackup {
                generation,
                primary: NodeId(p),
                backup,
            }
        }),
        (arb_gen(), arb_reg())
            .prop_map(|(generation, backup)| WitnessRequest::Takeover { generation, backup }),
    ]
}

fn arb_reply() -> impl Strategy<Value = WitnessReply> {
    (
        arb_request(),
        any::<bool>(),
        arb_gen(),
        any::<u32>(),
        proptest::option::of(arb_reg()),
        any::<u64>(),
        proptest::option::of(arb_reg()),
    )
        .prop_map(
            |(request, granted, generation, p, backup, floor, promoted)| WitnessReply {
                request,
                granted,
                state: WitnessState {
                    vm: VM,
                    generation,
                    primary: NodeId(p),
                    backup,
                    floor: Epoch(floor),
                    promoted,
                },
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn prop_peer_msg_round_trip(msg in arb_peer_msg()) {
        let bytes = encode_peer(VM, &msg);
        prop_assert_eq!(decode(&bytes, &expect(0)).unwrap(), (Frame::Peer(msg), bytes.len()));
    }

    #[test]
    fn prop_witness_round_trip(req in arb_request(), reply in arb_reply()) {
        let bytes = encode_witness_request(VM, &req);
        prop_assert_eq!(decode(&bytes, &expect(0)).unwrap().0, Frame::WitnessRequest(req));
        let bytes = encode_witness_reply(&reply);
        prop_assert_eq!(decode(&bytes, &expect(0)).unwrap().0, Frame::WitnessReply(reply));
    }

    #[test]
    fn prop_checkpoint_round_trip_any_chunking(
        pages in proptest::collection::vec((any::<u64>(), any::<u8>()), 0..6),
        blocks in proptest::collection::vec((any::<u64>(), any::<u8>()), 0..3),
        device in proptest::collection::vec(any::<u8>(), 0..100),
        epoch in any::<u64>(),
        full in any::<bool>(),
        chunk in 1usize..200,
    ) {
        let data: Vec<(u64, Vec<u8>)> = pages.iter().map(|&(i, f)| (i, page(f, 32))).collect();
        let refs: Vec<(u64, &[u8])> = data.iter().map(|(i, p)| (*i, p.as_slice())).collect();
        let disk: Vec<(u64, Vec<u8>)> =
            blocks.iter().map(|&(i, f)| (i, page(f, BLOCK))).collect();
        let disk_refs: Vec<(u64, &[u8])> = disk.iter().map(|(i, b)| (*i, b.as_slice())).collect();
        let bytes = encode_checkpoint_with_disk(
            VM, Generation(1), Epoch(epoch), full, 32, &refs, &disk_refs, &device,
        )
        .unwrap();
        let Frame::Checkpoint(cp) = decode(&bytes, &expect(1)).unwrap().0 else {
            return Err(TestCaseError::fail("not a checkpoint"));
        };
        prop_assert_eq!(&cp.pages, &data);
        prop_assert_eq!(&cp.disk, &disk);
        prop_assert_eq!(cp.meta.disk_blocks, disk.len() as u64);
        prop_assert_eq!(&cp.device, &device);
        prop_assert_eq!(cp.meta.epoch, Epoch(epoch));
        prop_assert_eq!(cp.meta.full, full);
        let items = stream_items(&bytes, chunk).unwrap();
        prop_assert_eq!(items.iter().filter(|s| s.starts_with("page")).count(), data.len());
        prop_assert_eq!(items.iter().filter(|s| s.starts_with("disk")).count(), disk.len());
    }

    #[test]
    fn prop_decode_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode(&bytes, &expect(0));
        let _ = stream_items(&bytes, 7);
    }

    #[test]
    fn prop_decode_never_panics_on_damaged_frames(
        which in 0usize..4,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
        chunk in 1usize..64,
    ) {
        let (cp, _) = a_checkpoint();
        let mut bytes = match which {
            0 => encode_peer(VM, &all_peer_msgs()[0]),
            1 => encode_witness_reply(&a_reply()),
            2 => encode_witness_request(VM, &all_requests()[2]),
            _ => cp,
        };
        let original = bytes.clone();
        for (at, v) in edits {
            let i = at % bytes.len();
            bytes[i] = v;
        }
        bytes.truncate(cut % (bytes.len() + 1));
        let whole = decode(&bytes, &expect(0));
        let streamed = stream_items(&bytes, chunk);
        // Whatever survives the damage must be exactly what was sent, never something else.
        if bytes == original {
            prop_assert!(whole.is_ok());
        } else if let Ok((frame, used)) = whole {
            prop_assert_eq!(&bytes[..used], &original[..used]);
            prop_assert_eq!(Ok((frame, used)), decode(&original, &expect(0)));
        }
        let _ = streamed;
    }
}
