//! An in-memory VM for agent tests: RAM is a byte vector, a "guest" task rewrites random pages
//! while the VM runs, and every write marks its page dirty. It stands in for QEMU so the agent's
//! protocol plumbing (links, witness, replica, failover) can be tested in seconds.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};

use super::vm::{CaptureStats, RestorePoint, Vm, VmError, VmLauncher};
use crate::replica::StagedCheckpoint;

#[derive(Debug)]
struct State {
    ram: Vec<u8>,
    dirty: BTreeSet<u64>,
    running: bool,
    /// Test knob: the guest stops writing (the VM keeps running).
    frozen: bool,
    dead: bool,
    /// Writes done by the guest (page 0 holds this counter, so progress is visible in RAM).
    writes: u64,
}

/// Shared view of an in-memory VM's RAM (for tests to compare against the replica).
#[derive(Clone, Debug)]
pub struct MemRam(Arc<Mutex<State>>);

impl MemRam {
    /// A copy of guest RAM.
    pub fn snapshot(&self) -> Vec<u8> {
        self.0.lock().map(|s| s.ram.clone()).unwrap_or_default()
    }

    /// Stops (or restarts) the guest's writes, so RAM holds still for a comparison.
    pub fn set_frozen(&self, frozen: bool) {
        if let Ok(mut s) = self.0.lock() {
            s.frozen = frozen;
        }
    }

    /// Guest writes so far.
    pub fn writes(&self) -> u64 {
        self.0.lock().map(|s| s.writes).unwrap_or(0)
    }
}

/// An in-memory VM.
pub struct MemVm {
    state: Arc<Mutex<State>>,
    page_size: usize,
    guest: tokio::task::JoinHandle<()>,
}

impl MemVm {
    /// A VM with `ram` as its memory; its guest writes `pages_per_ms` random pages per ms.
    pub fn start(ram: Vec<u8>, page_size: usize, pages_per_ms: u32, seed: u64) -> MemVm {
        let pages = (ram.len() / page_size) as u64;
        let writes = ram
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0);
        let state = Arc::new(Mutex::new(State {
            ram,
            dirty: (0..pages).collect(),
            running: true,
            frozen: false,
            dead: false,
            writes,
        }));
        let s = state.clone();
        let guest = tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            loop {
                tokio::time::sleep(Duration::from_millis(1)).await;
                let Ok(mut st) = s.lock() else { return };
                if !st.running || st.frozen {
                    continue;
                }
                for _ in 0..pages_per_ms {
                    let page = rng.gen_range(1..pages.max(2)) as usize;
                    let byte = rng.gen::<u8>();
                    let off = page * page_size;
                    if let Some(p) = st.ram.get_mut(off..off + page_size) {
                        p.fill(byte);
                        st.dirty.insert(page as u64);
                    }
                    st.writes += 1;
                    let w = st.writes.to_le_bytes();
                    st.ram[..8].copy_from_slice(&w);
                    st.dirty.insert(0);
                }
            }
        });
        MemVm {
            state,
            page_size,
            guest,
        }
    }

    /// Shared view of this VM's RAM.
    pub fn ram(&self) -> MemRam {
        MemRam(self.state.clone())
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> Result<T, VmError> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| VmError::Died("state poisoned".into()))?;
        if st.dead {
            return Err(VmError::Died("killed".into()));
        }
        Ok(f(&mut st))
    }
}

impl Drop for MemVm {
    fn drop(&mut self) {
        self.guest.abort();
    }
}

impl Vm for MemVm {
    async fn pause(&mut self) -> Result<(), VmError> {
        self.with(|s| s.running = false)
    }

    async fn resume(&mut self) -> Result<(), VmError> {
        self.with(|s| s.running = true)
    }

    async fn capture(
        &mut self,
        full: bool,
        out: &mut StagedCheckpoint,
    ) -> Result<CaptureStats, VmError> {
        let ps = self.page_size;
        self.with(|s| {
            let pages: Vec<u64> = if full {
                (0..(s.ram.len() / ps) as u64).collect()
            } else {
                s.dirty.iter().copied().collect()
            };
            s.dirty.clear();
            out.indices.clear();
            out.data.clear();
            for p in &pages {
                let off = *p as usize * ps;
                out.data.extend_from_slice(&s.ram[off..off + ps]);
            }
            out.indices = pages;
            out.device = s.writes.to_le_bytes().to_vec();
            CaptureStats {
                pages: out.indices.len() as u64,
                ..CaptureStats::default()
            }
        })
    }

    fn ram_digest(&mut self) -> Result<u64, VmError> {
        self.with(|s| xxhash_rust::xxh3::xxh3_64(&s.ram))
    }

    async fn kill(&mut self) {
        if let Ok(mut s) = self.state.lock() {
            s.dead = true;
            s.running = false;
        }
        self.guest.abort();
    }

    async fn died(&mut self) -> VmError {
        std::future::pending().await
    }
}

/// Launches [`MemVm`]s: a zeroed one at boot, one loaded from the replica file at failover.
pub struct MemLauncher {
    /// RAM size in bytes.
    pub ram_bytes: usize,
    /// Page size.
    pub page_size: usize,
    /// Guest write rate.
    pub pages_per_ms: u32,
    /// RNG seed of the guest.
    pub seed: u64,
    /// Every VM launched, for tests to inspect.
    pub launched: Arc<Mutex<Vec<MemRam>>>,
}

impl VmLauncher for MemLauncher {
    type Vm = MemVm;

    async fn boot(&mut self) -> Result<MemVm, VmError> {
        let vm = MemVm::start(
            vec![0; self.ram_bytes],
            self.page_size,
            self.pages_per_ms,
            self.seed,
        );
        if let Ok(mut l) = self.launched.lock() {
            l.push(vm.ram());
        }
        Ok(vm)
    }

    async fn restore(&mut self, from: RestorePoint) -> Result<MemVm, VmError> {
        let ram =
            std::fs::read(&from.ram_file).map_err(|e| VmError::failed("read replica RAM", e))?;
        if ram.len() != self.ram_bytes {
            return Err(VmError::failed(
                "restore",
                format!(
                    "replica has {} bytes, expected {}",
                    ram.len(),
                    self.ram_bytes
                ),
            ));
        }
        let vm = MemVm::start(ram, self.page_size, self.pages_per_ms, self.seed ^ 0x5a5a);
        if let Ok(mut l) = self.launched.lock() {
            l.push(vm.ram());
        }
        Ok(vm)
    }
}
