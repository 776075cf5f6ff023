//! Static parameters of one protected VM's protocol instance, and how a node starts.

use std::time::Duration;

use crate::epoch_policy::EpochPolicy;
use crate::ids::{NodeId, VmId};
#[cfg(feature = "mutants")]
use crate::mutants::Mutant;

/// Protocol parameters. Every node of one VM (and the witness) must agree on `vm`, `ram_pages`,
/// `page_size`, `disk_blocks` and `witness`; the timers may differ per host.
///
/// Build it with [`Config::new`] and then adjust fields: the struct has a cfg-gated field
/// (`mutant`) so struct literals would not compile in both feature configurations.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Config {
    /// The protected VM.
    pub vm: VmId,
    /// Guest RAM size in pages; a joiner with a different size is rejected.
    pub ram_pages: u64,
    /// Guest page size in bytes (4096 on x86).
    pub page_size: u32,
    /// Protected disk size in blocks of [`crate::wire::DISK_BLOCK_SIZE`] bytes; 0 (the default,
    /// so configurations written before disks still parse): the VM has no protected disk. A
    /// joiner with a different size is rejected.
    #[serde(default)]
    pub disk_blocks: u64,
    /// How long the VM runs between two captures when the link keeps up (default 25 ms); under
    /// [`EpochPolicy::Output`] the longest epoch.
    pub epoch_interval: Duration,
    /// When an epoch ends: every `epoch_interval` (default) or early when output waits.
    #[serde(default)]
    pub epoch_policy: EpochPolicy,
    /// How often each side tells the other it is alive (default 10 ms).
    pub heartbeat_interval: Duration,
    /// Silence after which the peer counts as lost (default 150 ms).
    pub failure_timeout: Duration,
    /// Resend period for an unanswered witness request (default 50 ms).
    pub witness_retry: Duration,
    /// Pause before a joiner retries after a refused or failed join (default 100 ms).
    pub join_retry: Duration,
    /// How long a primary keeps its registered backup registered, output held, after the
    /// backup's link closed (it broke the stream on a damaged checkpoint, or its process
    /// restarted): a rejoin within it continues the registration with a catch-up, so a primary
    /// that dies meanwhile still has a backup to take over. A backup that falls silent is
    /// dropped at once, as before. `None` (the default) means the failure timeout, whatever it
    /// is set to later; read it with [`Config::rejoin_grace`].
    #[serde(default)]
    pub rejoin_grace: Option<Duration>,
    /// Checkpoints the primary may have captured but not yet seen acked; beyond this it stops
    /// capturing (the VM keeps running with output held) until an ack arrives (default 2).
    pub max_unacked: u64,
    /// After being fenced, become a joiner again after this delay (`None`: stay fenced).
    /// Default: `Some(failure_timeout)`, so a deposed host re-protects the new primary.
    pub rejoin_after_fence: Option<Duration>,
    /// The witness (fencing party) every node asks.
    pub witness: NodeId,
    /// A number this node's process drew at random when it started (per host; 0 where nothing
    /// depends on it). A primary names its history with it (its *lineage*), so that a replica
    /// left over from another run, whose epoch numbers may repeat ours, is never taken for a
    /// prefix of this one and caught up (see [`crate::ReplicaAt`]).
    #[serde(default)]
    pub incarnation: u64,
    /// Test-only protocol bug to exhibit (see [`Mutant`]). Only with the `mutants` feature.
    #[cfg(feature = "mutants")]
    #[serde(default)]
    pub mutant: Option<Mutant>,
}

/// How a [`crate::Node`] starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Start {
    /// Fresh VM on this host, generation 1; output is held until the first backup is protecting.
    Primary,
    /// Fresh, empty replica that joins this primary.
    Backup {
        /// The primary to join.
        primary: NodeId,
    },
    /// The host restarted (or was fenced): ask the witness who the primary is, then join it.
    Rejoin,
    /// A backup restarted with its replica kept (verified by the driver): ask the witness who
    /// the primary is, then join it offering `replica`, so the primary that made it sends only
    /// what changed since. While the witness still registers the replica's token it can also
    /// take over from it, like a backup that was cut off for a while.
    Resume {
        /// The committed replica on this host.
        replica: crate::ReplicaAt,
    },
}

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A zero duration would make a timer fire in a loop.
    #[error("{0} must be greater than zero")]
    ZeroDuration(&'static str),
    /// The failure timeout must cover several heartbeats or the peer is lost at the first delay.
    #[error(
        "failure_timeout ({failure:?}) must be at least twice heartbeat_interval ({heartbeat:?})"
    )]
    TimeoutTooShort {
        /// Configured failure timeout.
        failure: Duration,
        /// Configured heartbeat interval.
        heartbeat: Duration,
    },
    /// Page size must be a non-zero power of two.
    #[error("page_size {0} is not a power of two")]
    BadPageSize(u32),
    /// At least one checkpoint must be allowed in flight.
    #[error("max_unacked must be at least 1")]
    NoCheckpointInFlight,
    /// The disk's bytes must be addressable: `disk_blocks × DISK_BLOCK_SIZE` fits in a u64.
    #[error("disk_blocks {0} is too large (the disk's size in bytes overflows)")]
    DiskTooLarge(u64),
    /// The idle bound of output-driven epochs is a percentage of time.
    #[error("the output epoch policy's max idle share must be 1 to 100 percent, not {0}")]
    IdleShare(u8),
}

impl Config {
    /// Defaults from the design: epoch 25 ms, heartbeat 10 ms, failure timeout 150 ms,
    /// witness retry 50 ms, join retry 100 ms, 2 unacked checkpoints, 4 KiB pages.
    pub fn new(vm: VmId, ram_pages: u64, witness: NodeId) -> Config {
        let failure_timeout = Duration::from_millis(150);
        Config {
            vm,
            ram_pages,
            page_size: 4096,
            disk_blocks: 0,
            epoch_interval: Duration::from_millis(25),
            epoch_policy: EpochPolicy::Fixed,
            heartbeat_interval: Duration::from_millis(10),
            failure_timeout,
            witness_retry: Duration::from_millis(50),
            join_retry: Duration::from_millis(100),
            rejoin_grace: None,
            max_unacked: 2,
            rejoin_after_fence: Some(failure_timeout),
            witness,
            incarnation: 0,
            #[cfg(feature = "mutants")]
            mutant: None,
        }
    }

    /// How long a primary keeps a backup whose link closed registered (see the field).
    pub fn rejoin_grace(&self) -> Duration {
        self.rejoin_grace.unwrap_or(self.failure_timeout)
    }

    /// Checks the parameters. [`crate::Node::new`] does not call this (it clamps instead, so a
    /// bad value can never make it panic); front ends should call it and report the error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, d) in [
            ("epoch_interval", self.epoch_interval),
            ("heartbeat_interval", self.heartbeat_interval),
            ("failure_timeout", self.failure_timeout),
            ("witness_retry", self.witness_retry),
            ("join_retry", self.join_retry),
            ("rejoin_grace", self.rejoin_grace()),
        ] {
            if d.is_zero() {
                return Err(ConfigError::ZeroDuration(name));
            }
        }
        if self.failure_timeout < self.heartbeat_interval * 2 {
            return Err(ConfigError::TimeoutTooShort {
                failure: self.failure_timeout,
                heartbeat: self.heartbeat_interval,
            });
        }
        if !self.page_size.is_power_of_two() {
            return Err(ConfigError::BadPageSize(self.page_size));
        }
        if self.max_unacked == 0 {
            return Err(ConfigError::NoCheckpointInFlight);
        }
        if self
            .disk_blocks
            .checked_mul(u64::from(crate::wire::DISK_BLOCK_SIZE))
            .is_none()
        {
            return Err(ConfigError::DiskTooLarge(self.disk_blocks));
        }
        if let EpochPolicy::Output(p) = self.epoch_policy {
            if !(1..=100).contains(&p.max_idle_pct) {
                return Err(ConfigError::IdleShare(p.max_idle_pct));
            }
        }
        Ok(())
    }

    /// A copy with every value clamped into the working range (what the node runs with).
    pub(crate) fn sanitized(&self) -> Config {
        let min = Duration::from_micros(1);
        let mut c = self.clone();
        c.epoch_interval = c.epoch_interval.max(min);
        c.heartbeat_interval = c.heartbeat_interval.max(min);
        c.failure_timeout = c.failure_timeout.max(min);
        c.witness_retry = c.witness_retry.max(min);
        c.join_retry = c.join_retry.max(min);
        c.rejoin_grace = c.rejoin_grace.map(|g| g.max(min));
        c.max_unacked = c.max_unacked.max(1);
        if let EpochPolicy::Output(p) = &mut c.epoch_policy {
            p.max_idle_pct = p.max_idle_pct.clamp(1, 100);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = Config::new(VmId(1), 1024, NodeId(9));
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.epoch_interval, Duration::from_millis(25));
        assert_eq!(c.failure_timeout, Duration::from_millis(150));
    }

    #[test]
    fn rejects_bad_values() {
        let mut c = Config::new(VmId(1), 1024, NodeId(9));
        c.heartbeat_interval = Duration::ZERO;
        assert_eq!(
            c.validate(),
            Err(ConfigError::ZeroDuration("heartbeat_interval"))
        );
        let mut c = Config::new(VmId(1), 1024, NodeId(9));
        c.failure_timeout = Duration::from_millis(15);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::TimeoutTooShort { .. })
        ));
        let mut c = Config::new(VmId(1), 1024, NodeId(9));
        c.page_size = 3000;
        assert_eq!(c.validate(), Err(ConfigError::BadPageSize(3000)));
        let mut c = Config::new(VmId(1), 1024, NodeId(9));
        c.max_unacked = 0;
        assert_eq!(c.validate(), Err(ConfigError::NoCheckpointInFlight));
        let mut d = Config::new(VmId(1), 1024, NodeId(9));
        d.disk_blocks = u64::MAX / 2;
        assert_eq!(d.validate(), Err(ConfigError::DiskTooLarge(u64::MAX / 2)));
        d.disk_blocks = 1 << 20;
        assert_eq!(d.validate(), Ok(()));
        let s = c.sanitized();
        assert_eq!(s.max_unacked, 1);
        let mut c = Config::new(VmId(1), 1024, NodeId(9));
        c.epoch_policy = EpochPolicy::Output(crate::OutputDriven {
            min_gap: Duration::ZERO,
            max_idle_pct: 0,
        });
        assert_eq!(c.validate(), Err(ConfigError::IdleShare(0)));
    }
}
