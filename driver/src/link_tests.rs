use ftvm_model::wire::{
    encode_checkpoint, encode_checkpoint_with_disk, encode_peer, Expect, StreamDecoder,
    DISK_BLOCK_SIZE,
};
use ftvm_model::{Generation, VmId};

use super::*;

const VM: VmId = VmId(4);
const PS: u32 = 4096;

fn limits() -> StagingLimits {
    StagingLimits {
        page_size: PS,
        ram_pages: 64,
        max_device_bytes: 1 << 20,
        disk_blocks: 32,
    }
}

/// A checkpoint of two pages and two disk blocks (`fill` and `fill + 1` bytes).
fn disk_checkpoint(generation: u64, epoch: u64, fill: u8) -> Vec<u8> {
    let page = vec![3u8; PS as usize];
    let a = vec![fill; DISK_BLOCK_SIZE as usize];
    let b = vec![fill.wrapping_add(1); DISK_BLOCK_SIZE as usize];
    encode_checkpoint_with_disk(
        VM,
        Generation(generation),
        Epoch(epoch),
        false,
        PS,
        &[(5, &page[..]), (9, &page[..])],
        &[(31, &a[..]), (0, &b[..])],
        b"device",
    )
    .unwrap()
}

fn reader() -> LinkReader<StreamDecoder> {
    LinkReader::new(StreamDecoder::new(Expect::vm(VM)), limits())
}

fn heartbeat(generation: u64) -> Vec<u8> {
    encode_peer(
        VM,
        &PeerMsg::Heartbeat {
            generation: Generation(generation),
            epoch: Epoch(1),
        },
    )
}

fn sync_start(generation: u64) -> Vec<u8> {
    encode_peer(
        VM,
        &PeerMsg::SyncStart {
            generation: Generation(generation),
            epoch: Epoch(1),
            base: None,
            lineage: 0,
            continues: false,
        },
    )
}

fn checkpoint(generation: u64, epoch: u64) -> Vec<u8> {
    let page = vec![3u8; PS as usize];
    let pages = [(5, &page[..]), (9, &page[..])];
    encode_checkpoint(
        VM,
        Generation(generation),
        Epoch(epoch),
        true,
        PS,
        &pages,
        b"device",
    )
    .unwrap()
}

/// What a reader delivers, summarised for comparison.
fn kinds(events: &[LinkEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            LinkEvent::Message(m) => format!("msg {m:?}"),
            LinkEvent::CheckpointStarted(e) => format!("start {e}"),
            LinkEvent::CheckpointReceived(s) => {
                format!("whole {} {:?} {}", s.epoch, s.indices, s.device.len())
            }
            LinkEvent::CheckpointDamaged { epoch, .. } => format!("damaged {epoch}"),
        })
        .collect()
}

fn stream() -> Vec<u8> {
    [
        heartbeat(1),
        checkpoint(1, 1),
        sync_start(2),
        checkpoint(2, 2),
    ]
    .concat()
}

#[test]
fn messages_and_checkpoints_come_out_whole_however_the_bytes_are_split() {
    let bytes = stream();
    let mut whole = Vec::new();
    reader().feed(&bytes, &mut whole).unwrap();
    assert_eq!(
        kinds(&whole),
        vec![
            "msg Heartbeat { generation: Generation(1), epoch: Epoch(1) }".to_string(),
            "start e1".into(),
            "whole 1 [5, 9] 6".into(),
            "msg SyncStart { generation: Generation(2), epoch: Epoch(1), base: None, lineage: 0, continues: false }"
                .into(),
            "start e2".into(),
            "whole 2 [5, 9] 6".into(),
        ]
    );
    for chunk in [1, 7, 100, 4097] {
        let mut r = reader();
        let mut split = Vec::new();
        for piece in bytes.chunks(chunk) {
            r.feed(piece, &mut split).unwrap();
        }
        assert_eq!(kinds(&split), kinds(&whole), "in pieces of {chunk}");
        r.end_of_stream().unwrap();
    }
}

#[test]
fn a_sync_start_raises_the_floor_and_older_frames_end_the_link() {
    let mut r = reader();
    let mut out = Vec::new();
    r.feed(&sync_start(3), &mut out).unwrap();
    assert_eq!(r.floor(), Generation(3));
    assert!(matches!(
        r.feed(&heartbeat(2), &mut out),
        Err(LinkError::Frame(_))
    ));
    // Nothing more is read after the error.
    r.feed(&heartbeat(3), &mut out).unwrap();
    assert_eq!(out.len(), 1);
}

#[test]
fn a_damaged_or_cut_checkpoint_is_reported_with_what_arrived() {
    let mut bytes = checkpoint(1, 7);
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    let mut r = reader();
    let mut out = Vec::new();
    assert!(r.feed(&bytes, &mut out).is_err(), "the checksum fails");
    assert_eq!(kinds(&out), vec!["start e7".to_string()]);
    match r.close() {
        Some(LinkEvent::CheckpointDamaged { epoch, partial }) => {
            assert_eq!(epoch, Epoch(7));
            assert_eq!(partial.map(|p| p.indices), Some(vec![5, 9]));
        }
        other => panic!("expected a damaged checkpoint, got {other:?}"),
    }
    assert!(r.close().is_none(), "reported once");
    // Cut short: the stream ends inside the checkpoint.
    let bytes = checkpoint(1, 8);
    let mut r = reader();
    r.feed(&bytes[..bytes.len() / 2], &mut out).unwrap();
    assert!(matches!(r.end_of_stream(), Err(LinkError::Truncated(_))));
    assert!(matches!(
        r.close(),
        Some(LinkEvent::CheckpointDamaged {
            epoch: Epoch(8),
            ..
        })
    ));
}

#[test]
fn witness_frames_end_a_checkpoint_link() {
    let req = ftvm_model::wire::encode_witness_request(VM, &ftvm_model::WitnessRequest::Query);
    let mut out = Vec::new();
    assert!(matches!(
        reader().feed(&req, &mut out),
        Err(LinkError::WitnessFrame)
    ));
}

/// A decoder that first buffers what it is given and then decodes from its buffer consuming no
/// input, as the real agent's decrypting one does.
struct Buffered {
    inner: StreamDecoder,
    buf: Vec<u8>,
    pos: usize,
}

impl ItemDecoder for Buffered {
    type Error = WireError;

    fn decode<'a>(&'a mut self, input: &'a [u8]) -> Result<(usize, Option<Item<'a>>), WireError> {
        if self.pos < self.buf.len() {
            let (used, item) = self.inner.decode(&self.buf[self.pos..])?;
            self.pos += used;
            return Ok((0, item));
        }
        let n = input.len().min(13);
        self.buf.clear();
        self.buf.extend_from_slice(&input[..n]);
        self.pos = 0;
        Ok((n, None))
    }

    fn pending(&self) -> bool {
        self.pos < self.buf.len()
    }

    fn set_min_generation(&mut self, generation: Generation) {
        self.inner.set_min_generation(generation)
    }

    fn finish(&self) -> Result<(), WireError> {
        self.inner.finish()
    }
}

#[test]
fn a_buffering_decoder_loses_no_byte() {
    let bytes = stream();
    let mut expected = Vec::new();
    reader().feed(&bytes, &mut expected).unwrap();
    for chunk in [1, 5, 64, 5000] {
        let dec = Buffered {
            inner: StreamDecoder::new(Expect::vm(VM)),
            buf: Vec::new(),
            pos: 0,
        };
        let mut r = LinkReader::new(dec, limits());
        let mut out = Vec::new();
        for piece in bytes.chunks(chunk) {
            r.feed(piece, &mut out).unwrap();
        }
        assert_eq!(kinds(&out), kinds(&expected), "in pieces of {chunk}");
    }
}

#[test]
fn disk_blocks_come_out_whole_however_the_bytes_are_split() {
    let bytes = [
        disk_checkpoint(1, 1, 10),
        heartbeat(1),
        disk_checkpoint(1, 2, 20),
    ]
    .concat();
    for chunk in [1, 7, 100, 4097, bytes.len()] {
        let mut r = reader();
        let mut out = Vec::new();
        for piece in bytes.chunks(chunk) {
            r.feed(piece, &mut out).unwrap();
        }
        r.end_of_stream().unwrap();
        let whole: Vec<&StagedCheckpoint> = out
            .iter()
            .filter_map(|e| match e {
                LinkEvent::CheckpointReceived(s) => Some(s),
                _ => None,
            })
            .collect();
        assert_eq!(whole.len(), 2, "in pieces of {chunk}");
        for (s, fill) in whole.iter().zip([10u8, 20]) {
            assert_eq!(s.indices, vec![5, 9]);
            assert_eq!(s.disk_indices, vec![31, 0]);
            let blocks: Vec<(u64, u8)> = s.disk_blocks().map(|(i, d)| (i, d[0])).collect();
            assert_eq!(blocks, vec![(31, fill), (0, fill + 1)]);
            assert!(s
                .disk_blocks()
                .all(|(_, d)| d.len() == DISK_BLOCK_SIZE as usize));
        }
    }
}

#[test]
fn a_damaged_disk_part_is_reported_with_what_arrived_and_never_received() {
    let mut bytes = disk_checkpoint(1, 7, 1);
    // A byte inside the second disk block: the pages and the first block arrived.
    let at = bytes.len() - 4 - b"device".len() - 10;
    bytes[at] ^= 0x40;
    let mut r = reader();
    let mut out = Vec::new();
    assert!(r.feed(&bytes, &mut out).is_err(), "the checksum fails");
    assert_eq!(kinds(&out), vec!["start e7".to_string()]);
    match r.close() {
        Some(LinkEvent::CheckpointDamaged { epoch, partial }) => {
            assert_eq!(epoch, Epoch(7));
            let partial = partial.unwrap();
            assert_eq!(partial.indices, vec![5, 9]);
            assert_eq!(partial.disk_indices, vec![31, 0]);
        }
        other => panic!("expected a damaged checkpoint, got {other:?}"),
    }
    // Cut inside the disk part.
    let bytes = disk_checkpoint(1, 8, 1);
    let mut r = reader();
    r.feed(&bytes[..bytes.len() - 4 - 6 - 100], &mut out)
        .unwrap();
    assert!(matches!(r.end_of_stream(), Err(LinkError::Truncated(_))));
    match r.close() {
        Some(LinkEvent::CheckpointDamaged { epoch, partial }) => {
            assert_eq!(epoch, Epoch(8));
            assert_eq!(
                partial.unwrap().disk_indices,
                vec![31],
                "the whole block only"
            );
        }
        other => panic!("expected a damaged checkpoint, got {other:?}"),
    }
}

#[test]
fn disk_blocks_to_a_vm_without_a_disk_end_the_link() {
    let no_disk = StagingLimits {
        disk_blocks: 0,
        ..limits()
    };
    let mut r = LinkReader::new(StreamDecoder::new(Expect::vm(VM)), no_disk);
    let mut out = Vec::new();
    let e = r.feed(&disk_checkpoint(1, 4, 1), &mut out).unwrap_err();
    assert!(
        matches!(
            e,
            LinkError::Staging(StagingError::NoDisk { epoch: 4, count: 2 })
        ),
        "{e}"
    );
    assert!(out.is_empty(), "the checkpoint never started");
    assert!(matches!(
        r.close(),
        Some(LinkEvent::CheckpointDamaged {
            epoch: Epoch(4),
            partial: None
        })
    ));
}
