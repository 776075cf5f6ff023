//! The real agent's side of output commit. Which frames the VM sent may leave, and when, is
//! decided by the one output gate, the model's `OutputGate`, which the driver core holds
//! (docs/ARCHITECTURE.md, Output commit): frames are held, tagged with the epoch that produced
//! them, until the backup has committed that epoch, and pass straight through when degraded.
//! This module only accounts for the frames the gate holds and lets go.
//!
//! The bytes held are bounded by an [`OutputCap`]: the netdev reader charges each frame it
//! reads, [`OutputAccount`] refunds it when the frame leaves (or a fence drops it), and at the
//! cap the reader stops reading the VM (see `backpressure`): no frame is ever dropped for space.

use std::sync::Arc;
use std::time::Instant;

use super::backpressure::OutputCap;

/// One Ethernet frame the VM emitted, with when it reached the gate.
#[derive(Debug)]
pub struct HeldFrame {
    /// When the agent read it from the VM.
    pub since: Instant,
    /// The frame.
    pub frame: Vec<u8>,
}

impl HeldFrame {
    /// A frame read now.
    pub fn new(frame: Vec<u8>, since: Instant) -> HeldFrame {
        HeldFrame { since, frame }
    }
}

/// Statistics of frames through the gate, reset by [`OutputAccount::take_stats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct GateStats {
    /// Frames released after being held.
    pub released: u64,
    /// Frames that left at once (open gate, or their epoch was already released).
    pub passed: u64,
    /// Frames dropped by a fence.
    pub dropped: u64,
    /// Longest time a released frame was held, in microseconds.
    pub longest_hold_us: u64,
}

/// Counts frames out of the gate and refunds the byte cap for each.
#[derive(Debug)]
pub struct OutputAccount {
    stats: GateStats,
    cap: Arc<OutputCap>,
}

impl OutputAccount {
    /// Refunds `cap` for every frame that leaves the gate or is dropped.
    pub fn new(cap: Arc<OutputCap>) -> OutputAccount {
        OutputAccount {
            stats: GateStats::default(),
            cap,
        }
    }

    /// Frames the gate released after holding them: their bytes, in order.
    pub fn released(&mut self, frames: Vec<HeldFrame>, now: Instant) -> Vec<Vec<u8>> {
        let mut bytes = 0;
        let out = frames
            .into_iter()
            .map(|f| {
                self.stats.released += 1;
                let held = now.saturating_duration_since(f.since).as_micros();
                let held = u64::try_from(held).unwrap_or(u64::MAX);
                self.stats.longest_hold_us = self.stats.longest_hold_us.max(held);
                bytes += f.frame.len() as u64;
                f.frame
            })
            .collect();
        self.cap.refund(bytes, now);
        out
    }

    /// A frame the gate let through at once.
    pub fn passed(&mut self, frame: HeldFrame, now: Instant) -> Vec<u8> {
        self.stats.passed += 1;
        self.cap.refund(frame.frame.len() as u64, now);
        frame.frame
    }

    /// Frames a fence dropped (or that reached a fenced gate).
    pub fn dropped(&mut self, frames: impl IntoIterator<Item = HeldFrame>, now: Instant) {
        for f in frames {
            self.stats.dropped += 1;
            self.cap.refund(f.frame.len() as u64, now);
        }
    }

    /// Returns the statistics gathered since the last call and resets them.
    pub fn take_stats(&mut self) -> GateStats {
        std::mem::take(&mut self.stats)
    }
}

#[cfg(test)]
#[path = "output_tests.rs"]
mod tests;
