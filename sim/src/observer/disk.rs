//! Disk consistency: a replica's disk holds exactly the disk writes of the epochs it
//! committed. The shape of prefix consistency's state-hash check, for the disk alone, plus
//! what only a disk needs: between commits a replica disk must not move (a disk write applied
//! when its checkpoint arrives, before the commit, changes it), and a VM resumed by failover
//! must start from the disk of the epoch it resumes from.
//!
//! Hosts report disk hashes (O(1): the disk keeps a running hash); a real run's journal has
//! none, so nothing here is checked for it.

use std::collections::BTreeMap;

use ftvm_model::{Epoch, Generation, NodeId, Time};

use super::Observer;
use crate::invariant::Invariant;
use crate::vm::replica::Origin;

/// What the disk check remembers.
#[derive(Debug, Default)]
pub(crate) struct DiskWatch {
    /// (primary, generation, epoch) → the primary's disk hash when it captured that epoch.
    captured: BTreeMap<(NodeId, Generation, Epoch), u64>,
    /// Node → the hash its replica disk may have now: that of its last commit, or of the empty
    /// replica it started with, and what that was.
    replica: BTreeMap<NodeId, (u64, String)>,
}

impl Observer {
    /// The primary `node` captured `epoch` of `generation` with its disk hashing to `hash`.
    pub fn captured_disk(&mut self, node: NodeId, generation: Generation, epoch: Epoch, hash: u64) {
        self.disk.captured.insert((node, generation, epoch), hash);
    }

    /// `node`'s replica starts empty (a host start): its disk hashes to `hash`.
    pub fn replica_disk_reset(&mut self, node: NodeId, hash: u64) {
        let what = "its empty start".to_string();
        self.disk.replica.insert(node, (hash, what));
    }

    /// `node`'s replica committed `origin`, after which its disk hashes to `hash`: it must be
    /// the primary's disk as captured at that epoch.
    pub fn committed_disk(&mut self, now: Time, node: NodeId, origin: Origin, hash: u64) {
        let key = (origin.primary, origin.generation, origin.epoch);
        if let Some(&want) = self.disk.captured.get(&key) {
            if want != hash {
                self.fail(
                    Invariant::DiskConsistency,
                    now,
                    Some(node),
                    format!(
                        "replica disk after committing {} {} from {} hashes to {hash:016x}, but \
                         the primary's disk at the end of that epoch was {want:016x}",
                        origin.generation, origin.epoch, origin.primary
                    ),
                );
            }
        }
        // (An epoch never captured is prefix consistency's to report.)
        let what = format!("its commit of {} {}", origin.generation, origin.epoch);
        self.disk.replica.insert(node, (hash, what));
    }

    /// After any event on `node`: its replica disk hashes to `hash`, which must still be what
    /// its last commit (or its empty start) left.
    pub fn replica_disk(&mut self, now: Time, node: NodeId, hash: u64) {
        let Some((want, what)) = self.disk.replica.get(&node) else {
            return;
        };
        if *want != hash {
            let detail = format!(
                "replica disk hashes to {hash:016x} between commits, but {what} left \
                 {want:016x}: disk writes of an epoch not committed reached it"
            );
            // Report once: remember what it is now.
            self.disk.replica.insert(node, (hash, what.clone()));
            self.fail(Invariant::DiskConsistency, now, Some(node), detail);
        }
    }

    /// `node` resumes the VM from its replica's `origin`, with a disk hashing to `hash`: the
    /// primary's disk as captured at that epoch.
    pub fn restored_disk(&mut self, now: Time, node: NodeId, origin: Origin, hash: u64) {
        let key = (origin.primary, origin.generation, origin.epoch);
        let Some(&want) = self.disk.captured.get(&key) else {
            return;
        };
        if want != hash {
            self.fail(
                Invariant::DiskConsistency,
                now,
                Some(node),
                format!(
                    "VM resumed from {} {} with a disk hashing to {hash:016x}, but the primary's \
                     disk at the end of that epoch was {want:016x}",
                    origin.generation, origin.epoch
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use ftvm_model::{Epoch, Generation, NodeId, Time, VmId, WitnessState};

    use super::*;

    const P: NodeId = NodeId(1);
    const B: NodeId = NodeId(2);

    fn observer() -> Observer {
        let on: BTreeSet<Invariant> = Invariant::ALL.into_iter().collect();
        Observer::new(on, WitnessState::initial(VmId(1), P))
    }

    fn origin(epoch: u64) -> Origin {
        Origin {
            primary: P,
            generation: Generation(1),
            epoch: Epoch(epoch),
        }
    }

    #[test]
    fn commits_of_the_captured_disk_and_a_still_replica_pass() {
        let mut o = observer();
        o.replica_disk_reset(B, 10);
        o.replica_disk(Time(1), B, 10);
        o.captured_disk(P, Generation(1), Epoch(1), 11);
        o.captured_disk(P, Generation(1), Epoch(2), 12);
        o.committed_disk(Time(2), B, origin(1), 11);
        o.replica_disk(Time(3), B, 11);
        o.committed_disk(Time(4), B, origin(2), 12);
        o.restored_disk(Time(5), B, origin(2), 12);
        assert_eq!(o.violation(), None);
    }

    #[test]
    fn a_commit_of_another_disk_is_caught() {
        let mut o = observer();
        o.captured_disk(P, Generation(1), Epoch(1), 11);
        o.committed_disk(Time(2), B, origin(1), 99);
        let v = o.violation().expect("caught");
        assert_eq!(v.invariant, Invariant::DiskConsistency);
        assert_eq!(v.node, Some(B));
    }

    #[test]
    fn a_replica_disk_moving_between_commits_is_caught() {
        let mut o = observer();
        o.replica_disk_reset(B, 10);
        o.replica_disk(Time(1), B, 13);
        let v = o.violation().expect("caught");
        assert_eq!(v.invariant, Invariant::DiskConsistency);
        assert!(v.detail.contains("not committed"), "{}", v.detail);
    }

    #[test]
    fn a_resume_from_another_disk_is_caught() {
        let mut o = observer();
        o.captured_disk(P, Generation(1), Epoch(4), 11);
        o.restored_disk(Time(2), B, origin(4), 12);
        assert_eq!(
            o.violation().map(|v| v.invariant),
            Some(Invariant::DiskConsistency)
        );
    }

    #[test]
    fn nothing_is_checked_without_hashes_or_with_the_invariant_off() {
        let mut o = observer();
        // Never captured (a real run records no disk): nothing to compare with.
        o.committed_disk(Time(1), B, origin(1), 5);
        o.restored_disk(Time(1), B, origin(1), 5);
        o.replica_disk(Time(1), NodeId(3), 5);
        assert_eq!(o.violation(), None);
        let on: BTreeSet<Invariant> = [Invariant::PrefixConsistency].into_iter().collect();
        let mut off = Observer::new(on, WitnessState::initial(VmId(1), P));
        off.replica_disk_reset(B, 1);
        off.replica_disk(Time(1), B, 2);
        assert_eq!(off.violation(), None);
    }
}
