//! Messages between the primary and its backup/joiner on the checkpoint link.
//! (Checkpoint data itself travels as a separate frame kind, see [`crate::wire`].)

use std::fmt;

use crate::ids::{Epoch, Generation, NodeId, VmId};

/// A control message on the checkpoint link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum PeerMsg {
    /// Joiner → primary: "make me your backup". `known` is the newest generation the joiner has
    /// heard of (from the witness), `Generation::UNKNOWN` for a fresh backup. A primary that sees
    /// a newer generation than its own closes the link and asks the witness whether it was
    /// deposed; the claim alone never stops it.
    Join {
        /// The VM the joiner wants to protect.
        vm: VmId,
        /// The joiner.
        node: NodeId,
        /// Joiner's replica size in pages.
        ram_pages: u64,
        /// Joiner's page size in bytes.
        page_size: u32,
        /// Joiner's replica disk size in blocks of [`crate::wire::DISK_BLOCK_SIZE`] bytes (0: the
        /// VM has no protected disk).
        disk_blocks: u64,
        /// Newest generation the joiner knows of.
        known: Generation,
        /// The committed replica the joiner could resume from (`None`: nothing usable). A
        /// primary whose history it is a prefix of answers with a catch-up instead of a full
        /// sync (see [`ReplicaAt`]).
        replica: Option<ReplicaAt>,
    },
    /// Primary → joiner: join refused.
    Reject {
        /// Sender's generation.
        generation: Generation,
        /// Why.
        reason: RejectReason,
    },
    /// Primary → joiner: join accepted; the sync checkpoint of `epoch` follows. Its commit
    /// gives the joiner a replica of `epoch`, and `epoch` is the replica's registration token.
    SyncStart {
        /// Primary's generation, which the joiner adopts.
        generation: Generation,
        /// Epoch of the sync checkpoint that follows.
        epoch: Epoch,
        /// `None`: the checkpoint is full (all of RAM and disk). `Some(c)`: a catch-up holding
        /// what changed after epoch `c`, to be applied on top of the joiner's replica of `c`
        /// (the epoch its `Join` offered).
        base: Option<Epoch>,
        /// The primary's lineage ([`ReplicaAt::lineage`]), which the joiner's token records.
        lineage: u64,
        /// The stream of a registered backup that rejoined within `Config::rejoin_grace` goes
        /// on: its registration and token stay as they are (the catch-up's commit does not start
        /// a new replica). `false`: a new sync, whose epoch becomes the replica's token.
        continues: bool,
    },
    /// Backup → primary: checkpoint `epoch` is durably committed in the replica.
    Ack {
        /// Generation the backup follows.
        generation: Generation,
        /// Committed epoch.
        epoch: Epoch,
    },
    /// Either way: "I am alive". From the primary `epoch` is the last captured epoch, from the
    /// backup the last committed one.
    Heartbeat {
        /// Sender's generation.
        generation: Generation,
        /// See above.
        epoch: Epoch,
    },
}

impl PeerMsg {
    /// The generation the frame header carries for this message.
    pub fn generation(&self) -> Generation {
        match *self {
            PeerMsg::Join { known, .. } => known,
            PeerMsg::Reject { generation, .. }
            | PeerMsg::SyncStart { generation, .. }
            | PeerMsg::Ack { generation, .. }
            | PeerMsg::Heartbeat { generation, .. } => generation,
        }
    }
}

/// A replica a joiner offers to resume from: the last epoch it committed of a stream, and
/// whose stream that was.
///
/// A primary names its history by its generation and `lineage`, a number its process drew at
/// start ([`crate::Config::incarnation`]). Only the primary that made a replica can vouch that
/// the replica is a prefix of its history (it sent every checkpoint the replica holds), so a
/// primary accepts the offer only for its own generation and lineage, and for an epoch it has
/// captured. A replica of an earlier run, of another primary or of another generation gets a
/// full sync.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct ReplicaAt {
    /// Generation of the stream the replica followed.
    pub generation: Generation,
    /// The lineage of that stream's primary.
    pub lineage: u64,
    /// The sync the replica descends from (its registration token).
    pub since: Epoch,
    /// The last epoch committed to the replica.
    pub epoch: Epoch,
}

/// Why a primary refused a join.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum RejectReason {
    /// The joiner asked for another VM. Permanent.
    WrongVm,
    /// Replica RAM size differs from the VM's. Permanent.
    RamSizeMismatch,
    /// Page size differs. Permanent.
    PageSizeMismatch,
    /// Replica disk size differs from the VM's. Permanent.
    DiskSizeMismatch,
    /// The primary already has a backup (at most one). Retry later.
    HaveBackup,
    /// The primary is busy (settling a lost backup with the witness, or mid-capture). Retry.
    Busy,
    /// The addressee is not (or no longer) a primary. Ask the witness again.
    NotPrimary,
}

impl RejectReason {
    /// True when retrying cannot help (a configuration mismatch).
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            RejectReason::WrongVm
                | RejectReason::RamSizeMismatch
                | RejectReason::PageSizeMismatch
                | RejectReason::DiskSizeMismatch
        )
    }

    /// Wire code.
    pub(crate) fn code(self) -> u8 {
        match self {
            RejectReason::WrongVm => 1,
            RejectReason::RamSizeMismatch => 2,
            RejectReason::PageSizeMismatch => 3,
            RejectReason::HaveBackup => 4,
            RejectReason::Busy => 5,
            RejectReason::NotPrimary => 6,
            RejectReason::DiskSizeMismatch => 7,
        }
    }

    /// Inverse of [`RejectReason::code`].
    pub(crate) fn from_code(code: u8) -> Option<RejectReason> {
        Some(match code {
            1 => RejectReason::WrongVm,
            2 => RejectReason::RamSizeMismatch,
            3 => RejectReason::PageSizeMismatch,
            4 => RejectReason::HaveBackup,
            5 => RejectReason::Busy,
            6 => RejectReason::NotPrimary,
            7 => RejectReason::DiskSizeMismatch,
            _ => return None,
        })
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RejectReason::WrongVm => "wrong VM",
            RejectReason::RamSizeMismatch => "RAM size mismatch",
            RejectReason::PageSizeMismatch => "page size mismatch",
            RejectReason::DiskSizeMismatch => "disk size mismatch",
            RejectReason::HaveBackup => "primary already has a backup",
            RejectReason::Busy => "primary busy",
            RejectReason::NotPrimary => "not the primary",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reject_codes_round_trip_and_classify() {
        for r in [
            RejectReason::WrongVm,
            RejectReason::RamSizeMismatch,
            RejectReason::PageSizeMismatch,
            RejectReason::HaveBackup,
            RejectReason::Busy,
            RejectReason::NotPrimary,
            RejectReason::DiskSizeMismatch,
        ] {
            assert_eq!(RejectReason::from_code(r.code()), Some(r));
            assert_eq!(r.is_permanent(), r.code() <= 3 || r.code() == 7);
        }
        assert_eq!(
            RejectReason::DiskSizeMismatch.to_string(),
            "disk size mismatch"
        );
        assert_eq!(RejectReason::from_code(0), None);
        assert_eq!(RejectReason::from_code(8), None);
    }

    #[test]
    fn generation_of_each_message() {
        let j = PeerMsg::Join {
            vm: VmId(1),
            node: NodeId(2),
            ram_pages: 3,
            page_size: 4096,
            disk_blocks: 0,
            known: Generation(5),
            replica: None,
        };
        assert_eq!(j.generation(), Generation(5));
        let h = PeerMsg::Heartbeat {
            generation: Generation(7),
            epoch: Epoch(1),
        };
        assert_eq!(h.generation(), Generation(7));
    }
}
