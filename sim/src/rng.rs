//! The simulator's only source of randomness: SplitMix64 streams derived from the run's seed.
//!
//! Each consumer (workload of a VM, a client, the fault jitter, the link shaper) gets its own
//! stream, so adding a draw in one place does not shift every other random choice of the run.

/// A deterministic 64-bit pseudo-random stream (SplitMix64).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimRng(u64);

impl SimRng {
    /// The stream `stream` of run seed `seed`.
    pub fn derive(seed: u64, stream: u64) -> SimRng {
        let mut r = SimRng(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        r.next_u64();
        r
    }

    /// Resume from a saved [`SimRng::state`].
    pub fn from_state(state: u64) -> SimRng {
        SimRng(state)
    }

    /// The whole state (the simulated VM keeps it in its device state).
    pub fn state(&self) -> u64 {
        self.0
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// True with probability `p` (clamped to 0..=1).
    pub fn chance(&mut self, p: f64) -> bool {
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        unit < p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4).map(|_| SimRng::derive(7, 1).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let mut x = SimRng::derive(7, 1);
        let mut y = SimRng::derive(7, 2);
        assert_ne!(x.next_u64(), y.next_u64());
        let mut r = SimRng::derive(1, 0);
        for _ in 0..1000 {
            assert!(r.below(10) < 10);
        }
        assert_eq!(r.below(0), 0);
        assert!(!r.chance(0.0));
        assert!(r.chance(1.0));
        let saved = r.state();
        let n = r.next_u64();
        assert_eq!(SimRng::from_state(saved).next_u64(), n);
    }
}
