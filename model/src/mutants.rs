//! Deliberate protocol bugs, compiled in only with the `mutants` cargo feature.
//!
//! The simulator's invariant checkers must catch each of them; a checker that cannot is not
//! checking anything. Production builds do not even contain the enum, so no configuration file
//! can switch one on by accident.

#[cfg(feature = "mutants")]
pub use enabled::Mutant;

#[cfg(feature = "mutants")]
mod enabled {
    /// One protocol bug, selected at run time through `Config::mutant`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
    pub enum Mutant {
        /// Primary releases epoch N's output as soon as N is captured, before the backup acked
        /// it (breaks *output commit*).
        ReleaseBeforeAck,
        /// Backup commits a checkpoint whose receive was not ok (truncated or corrupt), and so
        /// applies a partial checkpoint (breaks *prefix consistency*).
        CommitPartial,
        /// Backup fails over on silence alone without the witness's grant (breaks *single
        /// active VM* under a partition).
        FailoverWithoutWitness,
        /// Takeover keeps the old generation number: the new primary runs in the generation of
        /// the old one (breaks *single active VM per generation*).
        ReuseGeneration,
        /// Backup acks epoch N at `CheckpointStarted { N }`, before N is received, verified and
        /// committed (breaks *output commit* / *no lost commitments*).
        AckBeforeCommit,
        /// The witness grants a `DropBackup` without raising `floor`: a late duplicate of the
        /// dropped `RegisterBackup` registers the backup again behind the primary's open gate
        /// (breaks *output commit*).
        DropKeepsFloor,
        /// The witness denies a `Takeover` without raising `floor`: the primary's still
        /// travelling `RegisterBackup` then names a backup that threw its replica away (breaks
        /// *liveness*: the registered backup can never take over).
        DenialKeepsFloor,
        /// An executor bug, not the model's: the simulator's backup writes a checkpoint's disk
        /// blocks to its replica disk as the checkpoint arrives (whole, cut short or damaged),
        /// not at its commit, so the replica disk holds writes of an epoch it never committed
        /// (breaks *disk consistency*). The model behaves as always; the simulated replica
        /// (`ftvm-sim`, `host/node`) reads this value.
        DiskWritesBeforeCommit,
        /// The primary answers a joiner's offered replica of epoch `C` with a catch-up of what
        /// changed after `C + 1` (it resumes from an epoch newer than the joiner committed),
        /// so the writes of epoch `C + 1` never reach the replica (breaks *prefix
        /// consistency*).
        CatchUpSkipsEpoch,
    }

    impl Mutant {
        /// Every mutant, for test loops.
        pub const ALL: [Mutant; 9] = [
            Mutant::ReleaseBeforeAck,
            Mutant::CommitPartial,
            Mutant::FailoverWithoutWitness,
            Mutant::ReuseGeneration,
            Mutant::AckBeforeCommit,
            Mutant::DropKeepsFloor,
            Mutant::DenialKeepsFloor,
            Mutant::DiskWritesBeforeCommit,
            Mutant::CatchUpSkipsEpoch,
        ];
    }
}

/// `mutant!(cfg, Name)`: is mutant `Name` switched on? Always `false` without the feature, so
/// the buggy branch is dead code the optimiser removes.
#[cfg(feature = "mutants")]
macro_rules! mutant {
    ($cfg:expr, $m:ident) => {
        $cfg.mutant == Some($crate::mutants::Mutant::$m)
    };
}

#[cfg(not(feature = "mutants"))]
macro_rules! mutant {
    ($cfg:expr, $m:ident) => {
        false
    };
}

pub(crate) use mutant;
