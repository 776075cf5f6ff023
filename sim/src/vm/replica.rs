//! The backup's replica (RAM, disk and device state of its last committed epoch) and the
//! checkpoints staged beside it until the model says commit. An epoch's disk writes reach the
//! replica disk only at its commit, together with its pages: a takeover resumes from a disk
//! holding exactly the writes of the epochs committed.

use ftvm_driver::StagedCheckpoint;
use ftvm_model::{Epoch, Generation, NodeId, ReplicaAt};

use super::disk::Disk;
use super::ram::{state_hash, Ram};
use crate::scenario::VmSpec;

/// Where a replica's contents come from: the primary, its generation, and the epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Origin {
    pub primary: NodeId,
    pub generation: Generation,
    pub epoch: Epoch,
}

#[derive(Clone, Debug)]
pub(crate) struct Replica {
    pub ram: Ram,
    pub disk: Disk,
    pub device: Vec<u8>,
    /// Last committed checkpoint.
    pub committed: Option<Origin>,
    /// Epoch of the sync (full or catch-up) the replica descends from.
    pub since: Option<Epoch>,
    /// What the model said the replica is at its last commit (what a restart offers).
    pub at: Option<ReplicaAt>,
}

impl Replica {
    /// An empty replica (zeroed pages and disk, no device state).
    pub fn empty(spec: &VmSpec) -> Replica {
        Replica {
            ram: Ram::new(spec.pages, spec.page_size),
            disk: Disk::new(spec.disk_blocks),
            device: Vec::new(),
            committed: None,
            since: None,
            at: None,
        }
    }

    /// Apply a staged checkpoint sent by `from` in one step (the simulated commit is atomic),
    /// which makes the replica what the model's `Commit` says (`at`). Staging kept page
    /// records inside the RAM; a short device state overwrites only its prefix (which is
    /// exactly the damage a partial commit does).
    pub fn apply(&mut self, cp: &StagedCheckpoint, from: NodeId, page_size: usize, at: ReplicaAt) {
        for (index, data) in cp.pages(page_size) {
            self.ram.set_page(index, data);
        }
        self.write_disk(cp);
        if self.device.len() < cp.device.len() {
            self.device.resize(cp.device.len(), 0);
        }
        self.device[..cp.device.len()].copy_from_slice(&cp.device);
        self.committed = Some(Origin {
            primary: from,
            generation: Generation(cp.generation),
            epoch: Epoch(cp.epoch),
        });
        self.since = Some(at.since);
        self.at = Some(at);
    }

    /// Writes the checkpoint's disk blocks to the replica disk (staging kept them inside it).
    /// Only [`Replica::apply`] may call this, at the commit; the planted
    /// `DiskWritesBeforeCommit` bug calls it as a checkpoint arrives.
    pub fn write_disk(&mut self, cp: &StagedCheckpoint) {
        for (index, data) in cp.disk_blocks() {
            self.disk.set_block(index, data);
        }
    }

    /// Hash of RAM + device state, comparable with [`super::SimVm::state_hash`].
    pub fn state_hash(&self) -> u64 {
        state_hash(&self.ram, &self.device)
    }
}
