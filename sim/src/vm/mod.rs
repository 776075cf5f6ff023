//! The simulated VM: guest RAM, a disk, a seeded workload that dirties pages (and disk blocks)
//! every tick, and the counter service whose state lives in RAM. Its "device state" (vCPU
//! registers, so to speak) is the workload's RNG state and two counters; it travels in every
//! checkpoint. Disk writes travel in the checkpoint of the epoch that made them, like pages.
//!
//! Time only matters through [`SimVm::advance_to`]: the workload's ticks since the last call
//! are played then, in order. Nothing can observe the VM between two calls (captures and
//! requests call it first), so this is the same as ticking eagerly, and much cheaper.

pub(crate) mod disk;
pub(crate) mod ram;
pub(crate) mod replica;
pub mod service;

use std::time::Duration;

use ftvm_driver::WriteHistory;
use ftvm_model::{Epoch, Scope, Time};

use crate::rng::SimRng;
use crate::scenario::VmSpec;
use disk::Disk;
use ram::{state_hash, Ram};
use service::{Reply, Request};

/// Device state length: workload RNG state, ticks run, requests served (u64 LE each).
pub(crate) const DEVICE_LEN: usize = 24;

/// Pages, disk blocks and device state of one capture.
#[derive(Clone, Debug, Default)]
pub(crate) struct Captured {
    pub pages: Vec<(u64, Vec<u8>)>,
    /// Disk blocks written since the last capture (the whole disk for a full one).
    pub disk: Vec<(u64, Vec<u8>)>,
    pub device: Vec<u8>,
}

#[derive(Clone, Debug)]
pub(crate) struct SimVm {
    spec: VmSpec,
    ram: Ram,
    dirty: Vec<bool>,
    dirty_list: Vec<u64>,
    disk: Disk,
    disk_dirty: Vec<bool>,
    disk_dirty_list: Vec<u64>,
    /// Last capturing epoch of each page and disk block (for catch-up captures).
    history: WriteHistory,
    disk_history: WriteHistory,
    rng: SimRng,
    ticks: u64,
    served: u64,
    running: bool,
    next_tick: Time,
}

impl SimVm {
    /// A freshly booted VM (zeroed RAM and disk), not running yet.
    pub fn fresh(spec: &VmSpec, workload_seed: u64) -> SimVm {
        let ram = Ram::new(spec.pages, spec.page_size);
        let disk = Disk::new(spec.disk_blocks);
        SimVm::with(spec, ram, disk, SimRng::derive(workload_seed, 0), 0, 0)
    }

    /// A VM restored from a replica's RAM, disk and device state, not running yet. A short or
    /// damaged device state is padded with zeros (only a buggy commit can produce one, and
    /// the prefix check has reported it by then).
    pub fn restore(spec: &VmSpec, ram: Ram, disk: Disk, device: &[u8]) -> SimVm {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            for (k, b) in w.iter_mut().enumerate() {
                *b = device.get(i * 8 + k).copied().unwrap_or(0);
            }
            u64::from_le_bytes(w)
        };
        SimVm::with(
            spec,
            ram,
            disk,
            SimRng::from_state(word(0)),
            word(1),
            word(2),
        )
    }

    fn with(spec: &VmSpec, ram: Ram, disk: Disk, rng: SimRng, ticks: u64, served: u64) -> SimVm {
        let n = usize::try_from(spec.pages).unwrap_or(0);
        let blocks = usize::try_from(disk.blocks()).unwrap_or(0);
        SimVm {
            spec: spec.clone(),
            ram,
            dirty: vec![false; n],
            dirty_list: Vec::new(),
            disk,
            disk_dirty: vec![false; blocks],
            disk_dirty_list: Vec::new(),
            history: WriteHistory::new(spec.pages),
            disk_history: WriteHistory::new(blocks as u64),
            rng,
            ticks,
            served,
            running: false,
            next_tick: Time::ZERO,
        }
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Start (or continue) running at `now`; ticks missed while stopped are not replayed.
    pub fn resume(&mut self, now: Time) {
        self.running = true;
        if self.next_tick <= now {
            self.next_tick = now + self.spec.tick;
        }
    }

    /// Stop at `now` (ticks up to `now` have run).
    pub fn pause(&mut self, now: Time) {
        self.advance_to(now);
        self.running = false;
    }

    /// Play the workload's ticks up to `now`.
    pub fn advance_to(&mut self, now: Time) {
        if !self.running || self.spec.tick == Duration::ZERO {
            return;
        }
        while self.next_tick <= now {
            self.tick();
            self.next_tick = self.next_tick + self.spec.tick;
        }
    }

    fn tick(&mut self) {
        let workload_pages = self.spec.pages - self.spec.counters;
        let words = (self.spec.page_size / 8) as u64;
        for _ in 0..self.spec.writes_per_tick {
            let page = self.spec.counters + self.rng.below(workload_pages);
            let offset = (self.rng.below(words) * 8) as usize;
            let value = self.rng.next_u64();
            self.write(page, offset, value);
        }
        // Disk writes draw from the workload's RNG only when there are any, so a VM without
        // disk writes runs exactly as before disks existed.
        let blocks = self.disk.blocks();
        let block_words = u64::from(ftvm_model::wire::DISK_BLOCK_SIZE / 8);
        for i in 0..self.spec.disk_writes_per_tick {
            if blocks == 0 {
                break;
            }
            let block = self.rng.below(blocks);
            let offset = (self.rng.below(block_words) * 8) as usize;
            // Distinct for every write of this VM's history: tick number and write number.
            let value = (self.ticks << 16 | u64::from(i)) + 1;
            self.write_disk(block, offset, value);
        }
        self.ticks += 1;
    }

    fn write_disk(&mut self, block: u64, offset: usize, value: u64) {
        if self.disk.write_u64(block, offset, value) && !self.disk_dirty[block as usize] {
            self.disk_dirty[block as usize] = true;
            self.disk_dirty_list.push(block);
        }
    }

    fn write(&mut self, page: u64, offset: usize, value: u64) {
        if self.ram.write_u64(page, offset, value) && !self.dirty[page as usize] {
            self.dirty[page as usize] = true;
            self.dirty_list.push(page);
        }
    }

    /// Handle one request at `now`: increment its counter, answer with the new value.
    pub fn serve(&mut self, now: Time, req: &Request) -> Reply {
        self.advance_to(now);
        let page = u64::from(req.key) % self.spec.counters;
        let value = self.ram.read_u64(page, 0).wrapping_add(1);
        self.write(page, 0, value);
        self.served += 1;
        Reply {
            client: req.client,
            req: req.req,
            key: req.key,
            value,
        }
    }

    /// Device state bytes.
    pub fn device(&self) -> Vec<u8> {
        let mut d = Vec::with_capacity(DEVICE_LEN);
        d.extend_from_slice(&self.rng.state().to_le_bytes());
        d.extend_from_slice(&self.ticks.to_le_bytes());
        d.extend_from_slice(&self.served.to_le_bytes());
        d
    }

    /// The pages and disk blocks `scope` names for checkpoint `epoch` (the shared
    /// [`WriteHistory`] picks them) and device state; clears the dirty sets. Pages and blocks
    /// go out in index order.
    pub fn capture(&mut self, epoch: Epoch, scope: Scope) -> Captured {
        let dirty_blocks = std::mem::take(&mut self.disk_dirty_list);
        for &b in &dirty_blocks {
            self.disk_dirty[b as usize] = false;
        }
        let blocks = self.disk_history.capture(epoch, scope, dirty_blocks);
        let disk = blocks
            .into_iter()
            .map(|b| (b, self.disk.block(b).to_vec()))
            .collect();
        let dirty = std::mem::take(&mut self.dirty_list);
        for &p in &dirty {
            self.dirty[p as usize] = false;
        }
        let list = self.history.capture(epoch, scope, dirty);
        let pages = list
            .into_iter()
            .map(|p| (p, self.ram.page(p).to_vec()))
            .collect();
        Captured {
            pages,
            disk,
            device: self.device(),
        }
    }

    /// Hash of the disk (what a replica's disk committed at this epoch must hash to).
    pub fn disk_hash(&self) -> u64 {
        self.disk.hash()
    }

    /// Hash of RAM + device state (what a replica of this epoch must hash to).
    pub fn state_hash(&self) -> u64 {
        state_hash(&self.ram, &self.device())
    }

    /// Counter values (index = counter page).
    pub fn counters(&self) -> Vec<u64> {
        counters_of(&self.ram, self.spec.counters)
    }
}

/// Counter values held by `ram`.
pub(crate) fn counters_of(ram: &Ram, counters: u64) -> Vec<u64> {
    (0..counters).map(|p| ram.read_u64(p, 0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            pages: 32,
            page_size: 64,
            counters: 4,
            writes_per_tick: 3,
            tick: Duration::from_millis(1),
            capture_pause: Duration::ZERO,
            pre_copy: Duration::ZERO,
            disk_blocks: 8,
            disk_writes_per_tick: 2,
        }
    }

    #[test]
    fn workload_runs_only_while_running_and_is_seeded() {
        let mut a = SimVm::fresh(&spec(), 1);
        let mut b = SimVm::fresh(&spec(), 1);
        let h0 = a.state_hash();
        a.advance_to(Time(10_000));
        assert_eq!(a.state_hash(), h0, "a stopped VM must not change");
        a.resume(Time(0));
        b.resume(Time(0));
        a.advance_to(Time(10_000));
        b.advance_to(Time(5_000));
        b.advance_to(Time(10_000));
        assert_eq!(a.state_hash(), b.state_hash(), "lazy ticking is order-free");
        assert_ne!(a.state_hash(), h0);
        let mut c = SimVm::fresh(&spec(), 2);
        c.resume(Time(0));
        c.advance_to(Time(10_000));
        assert_ne!(a.state_hash(), c.state_hash());
    }

    #[test]
    fn capture_then_restore_reproduces_the_state() {
        let mut vm = SimVm::fresh(&spec(), 3);
        vm.resume(Time(0));
        vm.advance_to(Time(4_000));
        let full = vm.capture(Epoch(1), Scope::Full);
        assert_eq!(full.pages.len(), 32);
        let r = vm.serve(
            Time(4_500),
            &Request {
                client: 0,
                req: 1,
                key: 2,
            },
        );
        assert_eq!(r.value, 1);
        vm.pause(Time(7_000));
        let inc = vm.capture(Epoch(2), Scope::Epoch);
        assert!(inc.pages.iter().any(|(p, _)| *p == 2));
        assert!(inc.pages.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(full.disk.len(), 8, "a full capture holds the whole disk");
        assert!(!inc.disk.is_empty() && inc.disk.len() <= 8);
        assert!(inc.disk.windows(2).all(|w| w[0].0 < w[1].0));
        // Replay both captures onto an empty RAM and disk.
        let mut ram = Ram::new(32, 64);
        for (p, d) in full.pages.iter().chain(inc.pages.iter()) {
            assert!(ram.set_page(*p, d));
        }
        let mut disk = Disk::new(8);
        for (b, d) in full.disk.iter().chain(inc.disk.iter()) {
            assert!(disk.set_block(*b, d));
        }
        assert_eq!(disk.hash(), vm.disk_hash());
        let restored = SimVm::restore(&spec(), ram, disk, &inc.device);
        assert_eq!(restored.state_hash(), vm.state_hash());
        assert_eq!(restored.disk_hash(), vm.disk_hash());
        assert_eq!(restored.counters(), vec![0, 0, 1, 0]);
        let empty = vm.capture(Epoch(3), Scope::Epoch);
        assert!(empty.pages.is_empty(), "dirty set was cleared");
        assert!(empty.disk.is_empty(), "dirty disk set was cleared");
        // A catch-up from 1 holds what 2 wrote: replayed onto the full capture it gives the
        // state now, as the incremental did.
        let catch_up = vm.capture(Epoch(4), Scope::Since(Epoch(1)));
        assert_eq!(catch_up.pages, inc.pages);
        assert_eq!(catch_up.disk, inc.disk);
        assert!(vm
            .capture(Epoch(5), Scope::Since(Epoch(2)))
            .pages
            .is_empty());
    }

    #[test]
    fn every_disk_write_is_distinct_and_a_vm_without_disk_writes_is_unchanged() {
        let mut s = spec();
        s.disk_blocks = 1;
        s.disk_writes_per_tick = 1;
        let mut vm = SimVm::fresh(&s, 4);
        vm.resume(Time(0));
        let mut seen = std::collections::BTreeSet::new();
        for t in 1..=64u64 {
            vm.advance_to(Time(t * 1000));
            let words: Vec<u64> = vm
                .disk
                .block(0)
                .chunks(8)
                .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
                .collect();
            // The newest write is the largest value on the disk, and never seen before.
            let newest = *words.iter().max().unwrap();
            assert!(seen.insert(newest), "write value {newest} repeated");
        }
        // Disk writes do not disturb the RAM workload when there are none.
        let mut without = spec();
        without.disk_writes_per_tick = 0;
        let mut other = without.clone();
        other.disk_blocks = 0;
        let mut a = SimVm::fresh(&without, 5);
        let mut b = SimVm::fresh(&other, 5);
        for vm in [&mut a, &mut b] {
            vm.resume(Time(0));
            vm.advance_to(Time(20_000));
        }
        assert_eq!(a.state_hash(), b.state_hash());
        assert_eq!(a.disk_hash(), Disk::new(8).hash(), "nothing written");
    }
}
