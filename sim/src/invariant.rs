//! The properties the checkers enforce, and what a broken one looks like.

use std::fmt;

use ftvm_model::{NodeId, Time};
use serde::Serialize;

/// One checked property (docs/ARCHITECTURE.md, Safety argument). Names are the ones scenario
/// files use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Invariant {
    /// No frame of epoch N leaves a host unless the backup that could take over has committed
    /// N, or no backup can take over (the witness records none for that generation).
    OutputCommit,
    /// Every replica commit leaves the replica equal to the primary's VM (pages and device
    /// state) at the end of the committed epoch; primaries capture epochs in strictly
    /// increasing order.
    PrefixConsistency,
    /// A replica's disk holds exactly the disk writes of the epochs it committed: after every
    /// commit of epoch N it equals the primary's disk as captured at N, between commits it
    /// does not change (no write of an uncommitted epoch reaches it), and a VM resumed by
    /// failover starts from the disk of the epoch it resumes from.
    DiskConsistency,
    /// A VM resumed by failover holds every counter value any released reply carried, and no
    /// counter value is ever handed out to two different requests (diverging histories).
    NoLostCommitments,
    /// One VM releases output per generation; only the witness's primary of a generation
    /// releases in it; once a backup took over from epoch E of generation g, no VM releases
    /// output of g tagged after E.
    SingleActive,
    /// The witness never registers a backup that gave that replica up (in the same start of
    /// its software). When the active primary dies or is cut off from its backup, that backup
    /// is registered and can reach the witness, and the primary is dead or can reach the witness cleanly too,
    /// a VM serves again within failure timeout + restore time + slack.
    Liveness,
    /// The model asked the driver for something impossible (e.g. commit an epoch that was
    /// never staged) or the driver broke the contract. Always checked.
    Driver,
}

impl Invariant {
    /// Every invariant a scenario can switch on (`Driver` is always on).
    pub const ALL: [Invariant; 6] = [
        Invariant::OutputCommit,
        Invariant::PrefixConsistency,
        Invariant::DiskConsistency,
        Invariant::NoLostCommitments,
        Invariant::SingleActive,
        Invariant::Liveness,
    ];

    /// Scenario-file name.
    pub fn name(self) -> &'static str {
        match self {
            Invariant::OutputCommit => "output_commit",
            Invariant::PrefixConsistency => "prefix_consistency",
            Invariant::DiskConsistency => "disk_consistency",
            Invariant::NoLostCommitments => "no_lost_commitments",
            Invariant::SingleActive => "single_active",
            Invariant::Liveness => "liveness",
            Invariant::Driver => "driver",
        }
    }

    /// Inverse of [`Invariant::name`] (only the switchable ones).
    pub fn from_name(name: &str) -> Option<Invariant> {
        Invariant::ALL.into_iter().find(|i| i.name() == name)
    }
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A broken invariant: which, when, where, and the evidence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// The property.
    pub invariant: Invariant,
    /// Simulated time of detection.
    #[serde(serialize_with = "ser_time")]
    pub at: Time,
    /// Host where it was detected, if any.
    #[serde(serialize_with = "ser_node")]
    pub node: Option<NodeId>,
    /// Human-readable evidence.
    pub detail: String,
}

fn ser_time<S: serde::Serializer>(t: &Time, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(t.as_micros())
}

fn ser_node<S: serde::Serializer>(n: &Option<NodeId>, s: S) -> Result<S::Ok, S::Error> {
    match n {
        Some(n) => s.serialize_some(&n.0),
        None => s.serialize_none(),
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} violated at {}", self.invariant, self.at)?;
        if let Some(n) = self.node {
            write!(f, " on {n}")?;
        }
        write!(f, ": {}", self.detail)
    }
}
