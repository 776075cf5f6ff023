//! Finds the checkpoint frames in a checkpoint link's byte stream as it passes the relay, and
//! damages one the way the simulator's `corrupt` fault does: the first byte of the first page
//! record's data (of the device state when there are no pages) is XORed with `0x5A`.
//!
//! The stream of a checkpoint link is, per direction: the handshake messages (`FTVA` framing:
//! the dialler sends two, the listener one), then wire frames (`FTVM` header with the body
//! length, body, body checksum), each followed by its GMAC tag. Nothing else is needed to walk
//! it. A stream that does not look like that (encrypted links) is given up on: it passes
//! untouched, and a corruption armed for it stays armed.

use ftvm_model::wire::{HEADER_LEN, META_LEN, RECORD_HEADER_LEN, TRAILER_LEN};

use crate::auth::TAG_LEN;

/// Length of a handshake message's head: magic, version, kind, 2-byte big-endian length.
const HANDSHAKE_HEAD: usize = 8;
/// The wire's frame magic and the checkpoint frame kind (`model/src/wire/header.rs`).
const FRAME_MAGIC: &[u8; 4] = b"FTVM";
const KIND_CHECKPOINT: u8 = 16;
/// Offset of `page_count` (u64 LE) within a checkpoint's meta: after epoch u64, full u8,
/// page_size u32.
const META_PAGE_COUNT: usize = 13;
/// The damage, as in the simulator.
const FLIP: u8 = 0x5A;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum At {
    /// Reading handshake message heads; `left` messages to go.
    Handshake { left: u8 },
    /// Skipping `n` bytes, then back to `then`.
    Skip { n: u64, then: Then },
    /// Reading a frame's header and (for checkpoints) meta.
    Frame,
    /// Not a stream this understands.
    Lost,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Then {
    Handshake { left: u8 },
    Frame,
}

/// What passed the tracker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Nothing of note.
    Nothing,
    /// A checkpoint of this epoch was damaged.
    Damaged {
        /// The checkpoint's epoch.
        epoch: u64,
    },
    /// The stream is not one this tracker understands (it stops looking).
    GaveUp,
}

/// Walks one direction of a checkpoint link.
#[derive(Debug)]
pub struct Tamper {
    at: At,
    /// The head being gathered (handshake head, or frame header + meta).
    head: Vec<u8>,
    /// Bytes of the current frame after `head` still to pass, and where to flip within them.
    pending_flip: Option<u64>,
    /// Inside a checkpoint frame: bytes of it passed so far, and its whole length (tag
    /// included).
    progress: Option<(u64, u64)>,
    /// The VM id of the last frame header seen.
    vm: Option<u64>,
}

impl Tamper {
    /// Bytes until the next frame boundary, once the handshake is over and unless a frame's
    /// header is half read (0 at a boundary). A forged frame may be slipped in there.
    pub fn bytes_to_boundary(&self) -> Option<u64> {
        match self.at {
            At::Frame if self.head.is_empty() => Some(0),
            At::Skip {
                n,
                then: Then::Frame,
            } => Some(n),
            _ => None,
        }
    }

    /// The VM id the stream's frames carry (known after the first frame header).
    pub fn vm(&self) -> Option<u64> {
        self.vm
    }

    /// Inside a checkpoint frame (its header and meta passed): how many of its bytes have
    /// passed, and its whole length. `None` between checkpoints.
    pub fn checkpoint_progress(&self) -> Option<(u64, u64)> {
        self.progress
    }

    /// A tracker for the direction that sends `handshake_messages` handshake messages first
    /// (2 from the dialler, 1 from the listener).
    pub fn new(handshake_messages: u8) -> Tamper {
        Tamper {
            at: if handshake_messages == 0 {
                At::Frame
            } else {
                At::Handshake {
                    left: handshake_messages,
                }
            },
            head: Vec::with_capacity(HEADER_LEN + META_LEN),
            pending_flip: None,
            progress: None,
            vm: None,
        }
    }

    /// Passes `data` (the next bytes of the direction). When a checkpoint frame starts,
    /// `want_damage` is asked whether to damage it (it consumes an armed corruption).
    pub fn pass(&mut self, data: &mut [u8], mut want_damage: impl FnMut() -> bool) -> Seen {
        let mut seen = Seen::Nothing;
        let mut i = 0;
        while i < data.len() {
            match self.at {
                At::Lost => return seen,
                At::Skip { n, then } => {
                    let k = n.min((data.len() - i) as u64);
                    if let Some(off) = self.pending_flip {
                        if off < k {
                            data[i + off as usize] ^= FLIP;
                            self.pending_flip = None;
                        } else {
                            self.pending_flip = Some(off - k);
                        }
                    }
                    i += k as usize;
                    if let Some((passed, _)) = &mut self.progress {
                        *passed += k;
                    }
                    let n = n - k;
                    if n == 0 {
                        self.progress = None;
                    }
                    self.at = if n > 0 {
                        At::Skip { n, then }
                    } else {
                        match then {
                            Then::Handshake { left } => At::Handshake { left },
                            Then::Frame => At::Frame,
                        }
                    };
                }
                At::Handshake { left } => {
                    let k = (HANDSHAKE_HEAD - self.head.len()).min(data.len() - i);
                    self.head.extend_from_slice(&data[i..i + k]);
                    i += k;
                    if self.head.len() < HANDSHAKE_HEAD {
                        continue;
                    }
                    if &self.head[..4] != b"FTVA" {
                        self.at = At::Lost;
                        return Seen::GaveUp;
                    }
                    let len = u16::from_be_bytes([self.head[6], self.head[7]]);
                    self.head.clear();
                    let then = if left > 1 {
                        Then::Handshake { left: left - 1 }
                    } else {
                        Then::Frame
                    };
                    self.at = At::Skip {
                        n: u64::from(len),
                        then,
                    };
                    if len == 0 {
                        self.at = match then {
                            Then::Handshake { left } => At::Handshake { left },
                            Then::Frame => At::Frame,
                        };
                    }
                }
                At::Frame => {
                    let want = if self.head.len() >= HEADER_LEN && self.head[6] == KIND_CHECKPOINT {
                        HEADER_LEN + META_LEN
                    } else {
                        HEADER_LEN
                    };
                    let k = (want - self.head.len()).min(data.len() - i);
                    // The byte to damage lies after the meta, never inside the gathered head.
                    self.head.extend_from_slice(&data[i..i + k]);
                    i += k;
                    if self.head.len() < want {
                        continue;
                    }
                    if &self.head[..4] != FRAME_MAGIC {
                        self.at = At::Lost;
                        return Seen::GaveUp;
                    }
                    if want == HEADER_LEN && self.head[6] == KIND_CHECKPOINT {
                        continue; // gather the meta too
                    }
                    let mut vm = [0u8; 8];
                    vm.copy_from_slice(&self.head[8..16]);
                    self.vm = Some(u64::from_le_bytes(vm));
                    let mut body = [0u8; 8];
                    body.copy_from_slice(&self.head[24..32]);
                    let body_len = u64::from_le_bytes(body);
                    let gathered = (self.head.len() - HEADER_LEN) as u64;
                    let Some(rest) = body_len
                        .checked_sub(gathered)
                        .and_then(|r| r.checked_add((TRAILER_LEN + TAG_LEN) as u64))
                    else {
                        self.at = At::Lost;
                        return Seen::GaveUp;
                    };
                    if self.head[6] == KIND_CHECKPOINT && want_damage() {
                        let meta = &self.head[HEADER_LEN..];
                        let mut pc = [0u8; 8];
                        pc.copy_from_slice(&meta[META_PAGE_COUNT..META_PAGE_COUNT + 8]);
                        let mut ep = [0u8; 8];
                        ep.copy_from_slice(&meta[..8]);
                        let off = if u64::from_le_bytes(pc) > 0 {
                            RECORD_HEADER_LEN as u64
                        } else {
                            0
                        };
                        if off < body_len - gathered {
                            self.pending_flip = Some(off);
                            seen = Seen::Damaged {
                                epoch: u64::from_le_bytes(ep),
                            };
                        }
                    }
                    if self.head[6] == KIND_CHECKPOINT {
                        let head = self.head.len() as u64;
                        self.progress = Some((head, head + rest));
                    }
                    self.head.clear();
                    self.at = At::Skip {
                        n: rest,
                        then: Then::Frame,
                    };
                }
            }
        }
        seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ftvm_model::wire::{encode_checkpoint, encode_peer};
    use ftvm_model::{Epoch, Generation, PeerMsg, VmId};

    fn handshake(len: u16) -> Vec<u8> {
        let mut m = b"FTVA\x01\x01".to_vec();
        m.extend_from_slice(&len.to_be_bytes());
        m.extend(std::iter::repeat_n(0xEE, usize::from(len)));
        m
    }

    fn tagged(frame: Vec<u8>) -> Vec<u8> {
        let mut f = frame;
        f.extend_from_slice(&[0xAA; TAG_LEN]);
        f
    }

    fn checkpoint(epoch: u64, pages: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let refs: Vec<(u64, &[u8])> = pages.iter().map(|(i, p)| (*i, p.as_slice())).collect();
        encode_checkpoint(
            VmId(1),
            Generation(1),
            Epoch(epoch),
            false,
            64,
            &refs,
            b"device-state",
        )
        .unwrap()
    }

    /// A dialler's stream: two handshake messages, a heartbeat, two checkpoints.
    fn stream() -> (Vec<u8>, usize, usize) {
        let mut s = handshake(48);
        s.extend(handshake(0));
        s.extend(tagged(encode_peer(
            VmId(1),
            &PeerMsg::Heartbeat {
                generation: Generation(1),
                epoch: Epoch(3),
            },
        )));
        let first = s.len();
        s.extend(tagged(checkpoint(7, &[(3, vec![1; 64]), (9, vec![2; 64])])));
        let second = s.len();
        s.extend(tagged(checkpoint(8, &[])));
        (s, first, second)
    }

    #[test]
    fn damages_the_first_page_byte_of_the_checkpoint_armed_for_only() {
        let (clean, first, second) = stream();
        // Pass it in awkward pieces; arm before the first checkpoint only.
        for piece in [1, 3, 7, 64, 10_000] {
            let mut data = clean.clone();
            let mut t = Tamper::new(2);
            let mut armed = true;
            let mut seen = Vec::new();
            for c in data.chunks_mut(piece) {
                match t.pass(c, || std::mem::take(&mut armed)) {
                    Seen::Nothing => {}
                    s => seen.push(s),
                }
            }
            assert_eq!(seen, vec![Seen::Damaged { epoch: 7 }], "piece {piece}");
            let diff: Vec<usize> = (0..data.len()).filter(|&i| data[i] != clean[i]).collect();
            let at = first + HEADER_LEN + META_LEN + RECORD_HEADER_LEN;
            assert_eq!(diff, vec![at], "piece {piece}");
            assert_eq!(data[at], clean[at] ^ FLIP);
            assert!(at < second);
        }
    }

    #[test]
    fn knows_where_the_next_frame_starts_and_the_vm() {
        let (clean, first, _) = stream();
        let mut data = clean.clone();
        let mut t = Tamper::new(2);
        assert_eq!(t.bytes_to_boundary(), None, "in the handshake");
        t.pass(&mut data[..first - 5], || false);
        assert_eq!(t.bytes_to_boundary(), Some(5));
        assert_eq!(t.vm(), Some(1));
        t.pass(&mut data[first - 5..first], || false);
        assert_eq!(t.bytes_to_boundary(), Some(0));
        t.pass(&mut data[first..first + 3], || false);
        assert_eq!(t.bytes_to_boundary(), None, "inside a header");
    }

    #[test]
    fn tells_how_far_a_checkpoint_has_passed() {
        let (clean, first, second) = stream();
        let mut data = clean.clone();
        let mut t = Tamper::new(2);
        t.pass(&mut data[..first + 10], || false);
        assert_eq!(t.checkpoint_progress(), None, "inside the header");
        t.pass(&mut data[first + 10..first + 100], || false);
        let len = (second - first) as u64;
        assert_eq!(t.checkpoint_progress(), Some((100, len)));
        t.pass(&mut data[first + 100..second], || false);
        assert_eq!(t.checkpoint_progress(), None, "between checkpoints");
        // Past the header and the meta, which the relay gathers before it counts.
        let past = HEADER_LEN + META_LEN + 5;
        t.pass(&mut data[second..second + past], || false);
        assert_eq!(
            t.checkpoint_progress(),
            Some((past as u64, (clean.len() - second) as u64))
        );
    }

    #[test]
    fn a_checkpoint_without_pages_loses_its_first_device_byte() {
        let (clean, _, second) = stream();
        let mut data = clean.clone();
        let mut t = Tamper::new(2);
        let mut n = 0;
        let seen = t.pass(&mut data, || {
            n += 1;
            n == 2
        });
        assert_eq!(seen, Seen::Damaged { epoch: 8 });
        let at = second + HEADER_LEN + META_LEN;
        let diff: Vec<usize> = (0..data.len()).filter(|&i| data[i] != clean[i]).collect();
        assert_eq!(diff, vec![at]);
    }

    #[test]
    fn a_stream_it_does_not_understand_passes_untouched() {
        let mut data = vec![0x42; 500];
        let mut t = Tamper::new(1);
        assert_eq!(t.pass(&mut data, || true), Seen::GaveUp);
        assert_eq!(data, vec![0x42; 500]);
        assert_eq!(t.pass(&mut data, || true), Seen::Nothing);
    }
}
