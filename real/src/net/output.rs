//! The output gate: frames the VM sends are held, tagged with the epoch that produced them, until
//! the backup committed the epoch (docs/ARCHITECTURE.md, Output commit). Open when degraded: frames
//! pass straight through.
//!
//! The bytes it holds are bounded by an [`OutputCap`]: the netdev reader charges each frame it
//! reads, the gate refunds it when the frame leaves (or a fence drops it), and at the cap the
//! reader stops reading the VM (see `backpressure`): no frame is ever dropped for space.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::backpressure::OutputCap;

/// One Ethernet frame the VM emitted, with the epoch it belongs to and when it arrived.
#[derive(Debug)]
struct HeldFrame {
    epoch: u64,
    since: Instant,
    frame: Vec<u8>,
}

/// Statistics of frames held behind the gate, reset by [`OutputGate::take_stats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct GateStats {
    /// Frames released after being held.
    pub released: u64,
    /// Frames passed through an open gate without holding.
    pub passed: u64,
    /// Frames dropped by a fence.
    pub dropped: u64,
    /// Longest time a released frame was held, in microseconds.
    pub longest_hold_us: u64,
}

/// Holds the VM's outgoing frames until their epoch is committed.
#[derive(Debug)]
pub struct OutputGate {
    open: bool,
    fenced: bool,
    /// Epoch that frames arriving now belong to.
    current_epoch: u64,
    held: VecDeque<HeldFrame>,
    stats: GateStats,
    /// Refunded as frames leave.
    cap: Option<Arc<OutputCap>>,
}

impl Default for OutputGate {
    fn default() -> Self {
        Self::new()
    }
}

impl OutputGate {
    /// A closed gate: nothing leaves until released.
    pub fn new() -> Self {
        Self {
            open: false,
            fenced: false,
            current_epoch: 0,
            held: VecDeque::new(),
            stats: GateStats::default(),
            cap: None,
        }
    }

    /// A closed gate that refunds `cap` for every frame that leaves it.
    pub fn with_cap(cap: Arc<OutputCap>) -> Self {
        Self {
            cap: Some(cap),
            ..Self::new()
        }
    }

    fn refund(&self, bytes: usize, now: Instant) {
        if let Some(c) = &self.cap {
            c.refund(bytes as u64, now);
        }
    }

    /// Frames arriving from now on belong to `epoch` (the VM was resumed into it).
    pub fn begin_epoch(&mut self, epoch: u64) {
        self.current_epoch = epoch;
    }

    /// The epoch that new frames are tagged with.
    pub fn current_epoch(&self) -> u64 {
        self.current_epoch
    }

    /// A frame from the VM. Returns it back when it may leave at once (open gate).
    pub fn push(&mut self, frame: Vec<u8>, now: Instant) -> Option<Vec<u8>> {
        if self.fenced {
            self.stats.dropped += 1;
            self.refund(frame.len(), now);
            return None;
        }
        if self.open {
            self.stats.passed += 1;
            self.refund(frame.len(), now);
            return Some(frame);
        }
        self.held.push_back(HeldFrame {
            epoch: self.current_epoch,
            since: now,
            frame,
        });
        None
    }

    /// Releases every held frame of an epoch ≤ `through`, in emission order.
    pub fn release_through(&mut self, through: u64, now: Instant) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        // Frames are queued in emission order and epochs only grow, so the releasable ones
        // are a prefix of the queue.
        while self.held.front().is_some_and(|f| f.epoch <= through) {
            if let Some(f) = self.held.pop_front() {
                self.note_release(f.since, now);
                out.push(f.frame);
            }
        }
        self.refund(out.iter().map(Vec::len).sum(), now);
        out
    }

    /// Opens (degraded: everything held leaves now, new frames pass) or closes the gate.
    pub fn set_open(&mut self, open: bool, now: Instant) -> Vec<Vec<u8>> {
        if self.fenced {
            return Vec::new();
        }
        self.open = open;
        if !open {
            return Vec::new();
        }
        let frames: Vec<HeldFrame> = self.held.drain(..).collect();
        let out: Vec<Vec<u8>> = frames
            .into_iter()
            .map(|f| {
                self.note_release(f.since, now);
                f.frame
            })
            .collect();
        self.refund(out.iter().map(Vec::len).sum(), now);
        out
    }

    /// Fence: drop everything held and never let anything out again.
    pub fn fence(&mut self) {
        self.fenced = true;
        self.open = false;
        self.stats.dropped += self.held.len() as u64;
        let bytes = self.held.drain(..).map(|f| f.frame.len()).sum();
        self.refund(bytes, Instant::now());
    }

    /// Number of frames currently held.
    pub fn held_frames(&self) -> usize {
        self.held.len()
    }

    /// How long the oldest held frame has waited.
    pub fn oldest_hold(&self, now: Instant) -> Duration {
        self.held
            .front()
            .map(|f| now.saturating_duration_since(f.since))
            .unwrap_or_default()
    }

    /// Returns the statistics gathered since the last call and resets them.
    pub fn take_stats(&mut self) -> GateStats {
        std::mem::take(&mut self.stats)
    }

    fn note_release(&mut self, since: Instant, now: Instant) {
        self.stats.released += 1;
        let held = now.saturating_duration_since(since).as_micros() as u64;
        self.stats.longest_hold_us = self.stats.longest_hold_us.max(held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_until_epoch_released() {
        let t0 = Instant::now();
        let mut g = OutputGate::new();
        g.begin_epoch(1);
        assert!(g.push(vec![1], t0).is_none());
        g.begin_epoch(2);
        assert!(g.push(vec![2], t0).is_none());
        assert!(g.release_through(0, t0).is_empty());
        assert_eq!(g.release_through(1, t0), vec![vec![1]]);
        assert_eq!(g.held_frames(), 1);
        assert_eq!(g.release_through(5, t0), vec![vec![2]]);
        assert_eq!(g.take_stats().released, 2);
    }

    #[test]
    fn open_gate_flushes_and_passes() {
        let t0 = Instant::now();
        let mut g = OutputGate::new();
        g.begin_epoch(3);
        g.push(vec![9], t0);
        assert_eq!(g.set_open(true, t0), vec![vec![9]]);
        assert_eq!(g.push(vec![7], t0), Some(vec![7]));
        assert!(g.set_open(false, t0).is_empty());
        assert!(g.push(vec![8], t0).is_none());
        assert_eq!(g.held_frames(), 1);
    }

    #[test]
    fn fence_drops_everything_forever() {
        let t0 = Instant::now();
        let mut g = OutputGate::new();
        g.push(vec![1], t0);
        g.fence();
        assert_eq!(g.held_frames(), 0);
        assert!(g.push(vec![2], t0).is_none());
        assert!(g.set_open(true, t0).is_empty());
        assert!(g.push(vec![3], t0).is_none());
        assert!(g.release_through(u64::MAX, t0).is_empty());
        assert_eq!(g.take_stats().dropped, 3);
    }

    /// A reader charging frames as QEMU's netdev reader does: reads until the cap pauses it.
    fn read_until_paused(cap: &OutputCap, g: &mut OutputGate, next: &mut u8, t: Instant) {
        while !cap.paused() {
            let frame = vec![*next; 10];
            *next += 1;
            cap.charge(10, t);
            assert!(g.push(frame, t).is_none());
        }
    }

    #[test]
    fn the_cap_pauses_reading_until_low_water_and_no_frame_is_lost_or_reordered() {
        let t0 = Instant::now();
        let cap = Arc::new(OutputCap::new(100));
        let mut g = OutputGate::with_cap(cap.clone());
        let mut next = 0u8;
        let mut out = Vec::new();
        // Epoch 1: reading stops at the cap, 10 frames of 10 bytes.
        g.begin_epoch(1);
        read_until_paused(&cap, &mut g, &mut next, t0);
        assert_eq!(g.held_frames(), 10);
        assert_eq!(cap.stats(t0).held_bytes, 100);
        // Epoch 2 gets nothing while paused; a partial release above low water keeps it so.
        g.begin_epoch(2);
        assert!(g.release_through(0, t0).is_empty());
        assert!(cap.paused());
        // Releasing epoch 1 frees everything: reading resumes and epoch 2 fills up.
        out.extend(g.release_through(1, t0));
        assert!(!cap.paused());
        read_until_paused(&cap, &mut g, &mut next, t0);
        g.begin_epoch(3);
        out.extend(g.release_through(2, t0));
        // Degraded: everything left goes out, new frames pass.
        out.extend(g.set_open(true, t0));
        assert_eq!(cap.stats(t0).held_bytes, 0);
        assert_eq!(cap.stats(t0).cap_hits, 2);
        let firsts: Vec<u8> = out.iter().map(|f| f[0]).collect();
        assert_eq!(
            firsts,
            (0..next).collect::<Vec<u8>>(),
            "all frames, in order"
        );
        assert_eq!(g.take_stats().dropped, 0);
    }

    #[test]
    fn a_fence_refunds_what_it_drops() {
        let t0 = Instant::now();
        let cap = Arc::new(OutputCap::new(20));
        let mut g = OutputGate::with_cap(cap.clone());
        let mut next = 0;
        read_until_paused(&cap, &mut g, &mut next, t0);
        g.fence();
        assert!(!cap.paused());
        assert_eq!(cap.stats(t0).held_bytes, 0);
        cap.charge(5, t0);
        assert!(g.push(vec![1; 5], t0).is_none());
        assert_eq!(cap.stats(t0).held_bytes, 0);
    }
}
