//! The state of every relayed link direction, and when a chunk read from one side may be
//! written to the other: the simulator's link model (`sim/src/net/shaper.rs` plus turmoil's
//! latency) applied to a real byte stream.
//!
//! Bandwidth serialises the bytes of one link direction (all its connections share it): a chunk
//! leaves once the bytes before it had time to go out. Latency is drawn per chunk in
//! `min..=max` and added on top; a connection never delivers out of order, so a chunk is due no
//! earlier than the one before it on the same connection. A hold stops delivery on both
//! directions of a link until released. Loss is not here: real TCP recovers real losses, made
//! by nftables ([`crate::host::loss`]).

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use ftvm_model::PeerMsg;
use rand::Rng;

/// One end of a relayed link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinkEnd {
    /// Protocol node `n<k>`.
    Node(u32),
    /// The witness.
    Witness,
}

impl fmt::Display for LinkEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkEnd::Node(k) => write!(f, "n{k}"),
            LinkEnd::Witness => f.write_str("witness"),
        }
    }
}

/// How a link direction behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Lowest latency added to a chunk.
    pub latency_min: Duration,
    /// Highest latency added to a chunk.
    pub latency_max: Duration,
    /// Bytes per millisecond (`None`: unlimited).
    pub bytes_per_ms: Option<u64>,
}

impl Shape {
    /// No latency, no bandwidth limit.
    pub const CLEAR: Shape = Shape {
        latency_min: Duration::ZERO,
        latency_max: Duration::ZERO,
        bytes_per_ms: None,
    };
}

#[derive(Clone, Copy, Debug)]
struct Direction {
    shape: Shape,
    busy_until: Option<Instant>,
    held: bool,
    corrupt_armed: bool,
    /// A checkpoint being read from its sender: bytes read, whole length.
    checkpoint: Option<(u64, u64)>,
    /// A peer message to slip in at the next frame boundary.
    forged: Option<PeerMsg>,
    /// Damage the next witness reply.
    damage_reply: bool,
}

/// Every link direction's shape, holds and armed corruptions. Directions not set yet behave
/// as `defaults`.
#[derive(Debug)]
pub struct Links {
    defaults: Shape,
    dirs: HashMap<(LinkEnd, LinkEnd), Direction>,
    /// The VM id the links' frames carry, once any frame header passed.
    vm: Option<u64>,
}

impl Links {
    /// Links that all start as `defaults`.
    pub fn new(defaults: Shape) -> Links {
        Links {
            defaults,
            dirs: HashMap::new(),
            vm: None,
        }
    }

    fn dir(&mut self, from: LinkEnd, to: LinkEnd) -> &mut Direction {
        let shape = self.defaults;
        self.dirs.entry((from, to)).or_insert(Direction {
            shape,
            busy_until: None,
            held: false,
            corrupt_armed: false,
            checkpoint: None,
            forged: None,
            damage_reply: false,
        })
    }

    /// Sets the latency range of both directions of `a ↔ b`.
    pub fn set_latency(&mut self, a: LinkEnd, b: LinkEnd, min: Duration, max: Duration) {
        for (x, y) in [(a, b), (b, a)] {
            let s = &mut self.dir(x, y).shape;
            s.latency_min = min;
            s.latency_max = max.max(min);
        }
    }

    /// Sets the bandwidth of both directions of `a ↔ b`.
    pub fn set_bandwidth(&mut self, a: LinkEnd, b: LinkEnd, bytes_per_ms: Option<u64>) {
        for (x, y) in [(a, b), (b, a)] {
            self.dir(x, y).shape.bytes_per_ms = bytes_per_ms.filter(|&b| b > 0);
        }
    }

    /// Holds (or releases) both directions of `a ↔ b`.
    pub fn set_hold(&mut self, a: LinkEnd, b: LinkEnd, held: bool) {
        self.dir(a, b).held = held;
        self.dir(b, a).held = held;
    }

    /// Releases every hold.
    pub fn release_all(&mut self) {
        for d in self.dirs.values_mut() {
            d.held = false;
        }
    }

    /// Whether `from → to` is held.
    pub fn held(&self, from: LinkEnd, to: LinkEnd) -> bool {
        self.dirs.get(&(from, to)).is_some_and(|d| d.held)
    }

    /// Damages the next checkpoint sent `from → to`.
    pub fn arm_corruption(&mut self, from: LinkEnd, to: LinkEnd) {
        self.dir(from, to).corrupt_armed = true;
    }

    /// Whether the checkpoint starting on `from → to` must be damaged (consumes the arming).
    pub fn take_corruption(&mut self, from: LinkEnd, to: LinkEnd) -> bool {
        std::mem::take(&mut self.dir(from, to).corrupt_armed)
    }

    /// Notes the VM id a frame header carried.
    pub fn note_vm(&mut self, vm: u64) {
        self.vm = Some(vm);
    }

    /// The VM id frames on these links carry, if any frame header passed yet.
    pub fn vm(&self) -> Option<u64> {
        self.vm
    }

    /// Slips `msg` into `from → to` at its next frame boundary.
    pub fn arm_forgery(&mut self, from: LinkEnd, to: LinkEnd, msg: PeerMsg) {
        self.dir(from, to).forged = Some(msg);
    }

    /// The message to slip in on `from → to` now (consumes it).
    pub fn take_forgery(&mut self, from: LinkEnd, to: LinkEnd) -> Option<PeerMsg> {
        self.dir(from, to).forged.take()
    }

    /// Whether a forgery waits on `from → to`.
    pub fn forgery_armed(&self, from: LinkEnd, to: LinkEnd) -> bool {
        self.dirs
            .get(&(from, to))
            .is_some_and(|d| d.forged.is_some())
    }

    /// Damages the next witness reply `from → to`.
    pub fn arm_reply_damage(&mut self, from: LinkEnd, to: LinkEnd) {
        self.dir(from, to).damage_reply = true;
    }

    /// Whether the reply passing `from → to` must be damaged (consumes it).
    pub fn take_reply_damage(&mut self, from: LinkEnd, to: LinkEnd) -> bool {
        std::mem::take(&mut self.dir(from, to).damage_reply)
    }

    /// Records how far the checkpoint the sender is writing on `from → to` has come.
    pub fn set_checkpoint_progress(
        &mut self,
        from: LinkEnd,
        to: LinkEnd,
        progress: Option<(u64, u64)>,
    ) {
        self.dir(from, to).checkpoint = progress;
    }

    /// How far the checkpoint the sender is writing on `from → to` has come (bytes written,
    /// whole length); `None` between checkpoints.
    pub fn checkpoint_progress(&self, from: LinkEnd, to: LinkEnd) -> Option<(u64, u64)> {
        self.dirs.get(&(from, to)).and_then(|d| d.checkpoint)
    }

    /// When a chunk of `len` bytes read at `now` on `from → to` is due at the other side: after
    /// the bytes before it on the direction had time to go out at its bandwidth, plus a latency
    /// drawn from its range.
    pub fn plan(
        &mut self,
        from: LinkEnd,
        to: LinkEnd,
        now: Instant,
        len: usize,
        rng: &mut impl Rng,
    ) -> Instant {
        let d = self.dir(from, to);
        let start = d.busy_until.map_or(now, |b| b.max(now));
        let tx_us = d
            .shape
            .bytes_per_ms
            .map_or(0, |bw| (len as u64).saturating_mul(1000) / bw.max(1));
        let sent = start + Duration::from_micros(tx_us);
        d.busy_until = Some(sent);
        let (lo, hi) = (d.shape.latency_min, d.shape.latency_max);
        let latency = if hi > lo { rng.gen_range(lo..=hi) } else { lo };
        sent + latency
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const A: LinkEnd = LinkEnd::Node(1);
    const B: LinkEnd = LinkEnd::Node(2);
    const W: LinkEnd = LinkEnd::Witness;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn bandwidth_serialises_a_direction_and_latency_comes_on_top() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut l = Links::new(Shape::CLEAR);
        let t0 = Instant::now();
        l.set_bandwidth(A, B, Some(1000));
        assert_eq!(l.plan(A, B, t0, 1000, &mut rng), t0 + ms(1));
        assert_eq!(l.plan(A, B, t0, 500, &mut rng), t0 + ms(1) + ms(1) / 2);
        // The other direction has its own budget; other links are unaffected.
        assert_eq!(l.plan(B, A, t0, 1000, &mut rng), t0 + ms(1));
        assert_eq!(l.plan(A, W, t0, 1_000_000, &mut rng), t0);
        // An idle direction starts at `now`.
        assert_eq!(l.plan(A, B, t0 + ms(10), 1000, &mut rng), t0 + ms(11));
        l.set_latency(A, B, ms(5), ms(5));
        assert_eq!(l.plan(B, A, t0 + ms(20), 1000, &mut rng), t0 + ms(26));
        l.set_bandwidth(A, B, None);
        assert_eq!(l.plan(A, B, t0 + ms(30), 1 << 30, &mut rng), t0 + ms(35));
        l.set_latency(A, B, ms(2), ms(4));
        for _ in 0..100 {
            let due = l.plan(A, B, t0 + ms(40), 10, &mut rng);
            assert!(due >= t0 + ms(42) && due <= t0 + ms(44), "{due:?}");
        }
    }

    #[test]
    fn defaults_apply_to_directions_never_set() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut l = Links::new(Shape {
            latency_min: ms(3),
            latency_max: ms(3),
            bytes_per_ms: None,
        });
        let t0 = Instant::now();
        assert_eq!(l.plan(W, B, t0, 10, &mut rng), t0 + ms(3));
    }

    #[test]
    fn holds_and_corruption_are_per_link_and_consumed_once() {
        let mut l = Links::new(Shape::CLEAR);
        l.set_hold(A, B, true);
        assert!(l.held(A, B) && l.held(B, A));
        assert!(!l.held(A, W));
        l.release_all();
        assert!(!l.held(A, B));
        l.arm_corruption(A, B);
        assert!(!l.take_corruption(B, A));
        assert!(l.take_corruption(A, B));
        assert!(!l.take_corruption(A, B));
    }
}
