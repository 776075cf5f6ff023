//! Logical time as seen by the model: microseconds since an origin the driver picks.
//!
//! The model never reads a clock. turmoil's simulated clock and tokio's clock both map onto
//! this one newtype, which is why it is a plain integer rather than `std::time::Instant`.

use std::fmt;
use std::ops::{Add, Sub};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Microseconds since a driver-chosen origin.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Time(pub u64);

impl Time {
    /// The driver's origin.
    pub const ZERO: Time = Time(0);

    /// `micros` microseconds after the origin.
    pub const fn from_micros(micros: u64) -> Time {
        Time(micros)
    }

    /// `d` after the origin (saturating at `u64::MAX` microseconds).
    pub fn from_duration(d: Duration) -> Time {
        Time::ZERO + d
    }

    /// Microseconds since the origin.
    pub const fn as_micros(self) -> u64 {
        self.0
    }

    /// Time elapsed since `earlier`, zero if `earlier` is in the future.
    pub fn saturating_since(self, earlier: Time) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

fn micros_of(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Add<Duration> for Time {
    type Output = Time;
    /// Saturating: a far-future deadline is as good as "never" and must not wrap.
    fn add(self, rhs: Duration) -> Time {
        Time(self.0.saturating_add(micros_of(rhs)))
    }
}

impl Sub<Time> for Time {
    type Output = Duration;
    /// Saturating, like [`Time::saturating_since`].
    fn sub(self, rhs: Time) -> Duration {
        self.saturating_since(rhs)
    }
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:06}s", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_and_sub_saturate() {
        let t = Time::from_micros(10);
        assert_eq!(t + Duration::from_millis(1), Time(1_010));
        assert_eq!(Time(u64::MAX - 1) + Duration::from_secs(5), Time(u64::MAX));
        assert_eq!(Time(5) - Time(7), Duration::ZERO);
        assert_eq!(Time(7) - Time(5), Duration::from_micros(2));
    }

    #[test]
    fn displays_seconds() {
        assert_eq!(Time(1_500_000).to_string(), "1.500000s");
    }
}
