//! An in-memory VM for agent tests. Its RAM is a memfd mapped twice, like QEMU's guest RAM file:
//! writable for its "guest" (a thread that rewrites random pages while the VM runs, marking each
//! page dirty) and read-only as the [`GuestRam`] the agent sends pages from in paused-send mode.
//! It stands in for QEMU so the agent's protocol plumbing (links, witness, replica, failover,
//! capture modes) can be tested in seconds.
//!
//! In [`CaptureMode::Cow`] the guest's writable mapping is registered with a blocking
//! write-protect userfaultfd ([`CowEngine`], from the first cow capture on): its guest thread then
//! faults on protected pages like a vCPU would, and the dirty log comes from those faults. Each
//! capture cross-checks that log against the pages the guest itself recorded writing.
//!
//! Pausing is exact: the guest writes only while holding the state lock and seeing `running`, so
//! once [`Vm::pause`] returned no guest write happens until [`Vm::resume`].

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_driver::WriteHistory;
use ftvm_model::{Epoch, Scope};
use rand::{Rng, SeedableRng};

use super::capture::CaptureMode;
use super::cow::{CowCheckpoint, CowEngine, CowOptions};
use super::vm::{first_capture_scope, CaptureStats, RestorePoint, Vm, VmError, VmLauncher};
use super::zero_pages;
use crate::dirty::{GuestRam, GuestRamMut, HandedUffd};
use crate::replica::StagedCheckpoint;

/// Guest writes per turn of the state lock: short enough that a pause never waits long.
const WRITES_PER_LOCK: u32 = 16;

#[derive(Debug)]
struct State {
    /// The guest's writable view of RAM.
    ram: GuestRamMut,
    dirty: BTreeSet<u64>,
    running: bool,
    /// Test knob: the guest stops writing (the VM keeps running).
    frozen: bool,
    dead: bool,
    /// Writes done by the guest (page 0 holds this counter, so progress is visible in RAM).
    writes: u64,
    /// Benchmark knob: after each resume the guest writes exactly this many distinct pages
    /// (besides page 0), then idles until the next resume. `None`: it writes at its rate.
    burst: Option<u64>,
    /// Writes left in the current burst.
    burst_left: u64,
    /// Position of the next burst write in a walk over pages 1.. that visits each page once.
    cursor: u64,
    /// Step of that walk: 1 (runs of neighbouring pages) or coprime to the page count (scattered).
    stride: u64,
    /// Benchmark knob: spread each burst evenly over this long after the resume, instead of
    /// writing it as fast as possible.
    burst_pace: Option<Duration>,
    /// When the current burst started (the last resume).
    burst_started: Instant,
}

impl State {
    /// Whether the guest has writes to do.
    fn busy(&self) -> bool {
        self.running && !self.frozen && !self.dead && (self.burst.is_none() || self.burst_left > 0)
    }

    /// A full capture leaves out the pages that are all zero, as the QEMU VM's does (the VM
    /// is paused here, so checking them now is exact).
    fn drop_zero_pages(&self, pages: &mut Vec<u64>) {
        pages.retain(|&p| self.ram.page(p).is_some_and(|b| !zero_pages::is_zero(b)));
    }

    /// VM paused: makes `out` the checkpoint of `pages` (their contents too when `mode` copies
    /// them; the device state is the write counter) and starts a new dirty record.
    fn fill(&mut self, pages: Vec<u64>, mode: CaptureMode, out: &mut StagedCheckpoint) {
        self.dirty.clear();
        out.data.clear();
        if mode.copies_pages() {
            out.data.reserve(pages.len() * self.ram.page_size());
            for &p in &pages {
                out.data
                    .extend_from_slice(self.ram.page(p).unwrap_or_default());
            }
        }
        out.indices = pages;
        out.device = self.writes.to_le_bytes().to_vec();
    }

    /// Burst writes the pace allows now (all that are left when the burst is not paced).
    fn burst_due(&self) -> u64 {
        let (Some(burst), Some(pace)) = (self.burst, self.burst_pace) else {
            return self.burst_left;
        };
        let share = (self.burst_started.elapsed().as_secs_f64() / pace.as_secs_f64()).min(1.0);
        let written = burst - self.burst_left;
        ((burst as f64 * share).ceil() as u64).saturating_sub(written)
    }
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Hint for the guest thread: `running && !frozen && !dead`. It is re-checked under the lock;
    /// it only keeps an idle guest from taking the lock (and a pause from queueing behind it).
    active: AtomicBool,
    /// Read-only view of the same RAM, for the agent's sender.
    ram: Arc<GuestRam>,
}

impl Shared {
    /// Runs `f` on the state. The guest is told to stand back first: a thread that re-takes a
    /// lock right after releasing it would otherwise starve a pause on a busy machine.
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> Result<T, VmError> {
        self.active.store(false, Ordering::Release);
        let mut s = self.state.lock().map_err(|_| VmError::Poisoned)?;
        let r = f(&mut s);
        self.active.store(s.busy(), Ordering::Release);
        Ok(r)
    }
}

/// Shared view of an in-memory VM's RAM (for tests to compare against the replica).
#[derive(Clone, Debug)]
pub struct MemRam(Arc<Shared>);

impl MemRam {
    /// A copy of guest RAM.
    pub fn snapshot(&self) -> Vec<u8> {
        self.0
            .with(|s| s.ram.as_slice().to_vec())
            .unwrap_or_default()
    }

    /// Stops (or restarts) the guest's writes, so RAM holds still for a comparison.
    pub fn set_frozen(&self, frozen: bool) {
        let _ = self.0.with(|s| s.frozen = frozen);
    }

    /// Guest writes so far.
    pub fn writes(&self) -> u64 {
        self.0.with(|s| s.writes).unwrap_or(0)
    }

    /// Benchmark knob: spread the writes of each resume evenly over `over` (as the pages of a
    /// steadily running workload), or write them as fast as possible (`None`).
    pub fn set_burst_pace(&self, over: Option<Duration>) {
        let _ = self.0.with(|s| s.burst_pace = over);
    }

    /// Benchmark knob: from the next resume on, the guest writes exactly `pages` distinct pages
    /// besides page 0 after each resume (as fast as its rate allows), then idles until the next
    /// resume; `None` restores writing at its rate. The pages are `scattered` over RAM (no two
    /// neighbours) or else one run of neighbouring pages.
    pub fn set_writes_per_resume(&self, pages: Option<u64>, scattered: bool) {
        let _ = self.0.with(|s| {
            s.burst = pages;
            s.burst_left = 0;
            let others = s.ram.pages().saturating_sub(1).max(1);
            s.stride = 1;
            if scattered {
                s.stride = (others * 5 / 8).max(1);
                while gcd(s.stride, others) != 1 {
                    s.stride += 1;
                }
            }
        });
    }
}

/// An in-memory VM.
pub struct MemVm {
    shared: Arc<Shared>,
    /// Copy-on-write fault handling, from the first cow capture on.
    cow: Option<CowEngine>,
    /// Options the first cow capture starts that engine with.
    cow_options: CowOptions,
    /// The checkpoint of the last cow capture, until the agent takes it.
    cow_checkpoint: Option<CowCheckpoint>,
    /// The last capture that wrote each page, since this VM started (catch-up captures).
    history: WriteHistory,
}

fn map_failed(source: crate::dirty::DirtyError) -> VmError {
    VmError::Dirty {
        what: "map RAM",
        source,
    }
}

fn cow_err(what: &'static str) -> impl FnOnce(super::cow::CowError) -> VmError {
    move |source| VmError::Cow { what, source }
}

/// A memfd of `contents.len()` bytes holding `contents`, mapped writable and read-only.
fn memfd_ram(contents: &[u8]) -> Result<(GuestRamMut, GuestRam), VmError> {
    let failed = |source| VmError::Io {
        what: "create in-memory RAM",
        source,
    };
    // memfd_create: anonymous shared memory, like QEMU's RAM file in /dev/shm.
    // SAFETY: a valid NUL-terminated name and flags; no memory is passed to the kernel.
    let fd = unsafe { libc::memfd_create(c"ftvm-mem-vm".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(failed(std::io::Error::last_os_error()));
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.set_len(contents.len() as u64).map_err(failed)?;
    if contents.iter().any(|&b| b != 0) {
        file.write_all(contents).map_err(failed)?;
    }
    // Both mappings share the one memfd (a named path would be refused: /proc/self/fd/N is a
    // symbolic link, and RAM files are never opened through one).
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let bytes = contents.len() as u64;
    let twin = file.try_clone().map_err(failed)?;
    let rw = GuestRamMut::from_file(twin, &path, bytes).map_err(map_failed)?;
    let ro = GuestRam::from_file(file, &path, bytes).map_err(map_failed)?;
    Ok((rw, ro))
}

impl MemVm {
    /// A running VM with `ram` as its memory (a whole number of host pages); its guest rewrites
    /// `pages_per_ms` random pages per millisecond (`u32::MAX`: as fast as it can).
    pub fn start(
        ram: Vec<u8>,
        page_size: usize,
        pages_per_ms: u32,
        seed: u64,
    ) -> Result<MemVm, VmError> {
        if page_size != crate::dirty::page_size() {
            return Err(VmError::failed(
                "start in-memory VM",
                format!(
                    "page size {page_size} is not the host's {}",
                    crate::dirty::page_size()
                ),
            ));
        }
        let writes = ram
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0);
        let (rw, ro) = memfd_ram(&ram)?;
        let pages = ro.pages();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                ram: rw,
                dirty: (0..pages).collect(),
                running: true,
                frozen: false,
                dead: false,
                writes,
                burst: None,
                burst_left: 0,
                cursor: 0,
                stride: 1,
                burst_pace: None,
                burst_started: Instant::now(),
            }),
            active: AtomicBool::new(true),
            ram: Arc::new(ro),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("mem-vm-guest".into())
            .spawn(move || guest(&s, pages, pages_per_ms, seed))
            .map_err(|source| VmError::Io {
                what: "start the guest thread",
                source,
            })?;
        Ok(MemVm {
            shared,
            cow: None,
            cow_options: CowOptions::default(),
            cow_checkpoint: None,
            history: WriteHistory::new(pages),
        })
    }

    /// The options of the copy-on-write engine that the first cow capture starts.
    pub fn set_cow_options(&mut self, options: CowOptions) {
        self.cow_options = options;
    }

    /// Shared view of this VM's RAM.
    pub fn ram(&self) -> MemRam {
        MemRam(self.shared.clone())
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> Result<T, VmError> {
        self.shared.with(|s| {
            if s.dead {
                Err(VmError::Killed)
            } else {
                Ok(f(s))
            }
        })?
    }

    fn stop_guest(&self) {
        let _ = self.shared.with(|s| {
            s.dead = true;
            s.running = false;
        });
    }
}

impl MemVm {
    /// A capture with the dirty log of the copy-on-write engine (started here on first use:
    /// that capture takes every page, since earlier writes were not logged).
    fn capture_cow(
        &mut self,
        epoch: Epoch,
        scope: Scope,
        mode: CaptureMode,
        out: &mut StagedCheckpoint,
    ) -> Result<CaptureStats, VmError> {
        let (shared, cow, slot) = (self.shared.clone(), &mut self.cow, &mut self.cow_checkpoint);
        let history = &mut self.history;
        let options = self.cow_options;
        shared.with(|s| {
            if s.dead {
                return Err(VmError::Killed);
            }
            if s.running {
                return Err(VmError::failed("capture", "the VM is running"));
            }
            let fresh = cow.is_none();
            if fresh {
                // The guest holds the state lock while it writes, so none is mid-write now.
                let uffd = HandedUffd::register_local(s.ram.base_addr(), s.ram.bytes()).map_err(
                    |source| VmError::Dirty {
                        what: "cow capture",
                        source,
                    },
                )?;
                *cow = Some(
                    CowEngine::start_with(uffd, shared.ram.clone(), options)
                        .map_err(cow_err("cow capture"))?,
                );
            }
            let engine = cow
                .as_ref()
                .ok_or_else(|| VmError::failed("cow capture", "no engine"))?;
            let skip_zero = scope == Scope::Full;
            let scope = first_capture_scope(scope, fresh);
            let all = scope == Scope::Full;
            // The fault log, kept to check it against the guest's own record below.
            let mut logged = Vec::new();
            let state = &*s;
            let select = |log: Vec<u64>| {
                logged.clone_from(&log);
                let mut pages = history.capture(epoch, scope, log);
                if skip_zero {
                    state.drop_zero_pages(&mut pages);
                }
                pages
            };
            let (pages, st) = if mode == CaptureMode::Cow {
                let (cp, st) = engine
                    .begin_with(all, select)
                    .map_err(cow_err("cow capture"))?;
                let pages = cp.indices().to_vec();
                *slot = Some(cp);
                (pages, st)
            } else {
                engine.rearm_with(all, select).map_err(cow_err("capture"))?
            };
            // Every page the guest wrote must have faulted (before the engine started, none
            // could).
            if !fresh {
                if let Some(p) = first_unlogged(s.dirty.iter().copied(), &logged) {
                    *slot = None;
                    return Err(VmError::failed(
                        "cow capture",
                        format!("the fault log missed page {p} that the guest wrote"),
                    ));
                }
            }
            s.fill(pages, mode, out);
            Ok(CaptureStats {
                pages: out.indices.len() as u64,
                scan_us: st.us,
                early_protected: st.early_pages,
                protected: st.protected,
                ..CaptureStats::default()
            })
        })?
    }
}

/// The guest: rewrites random pages (each filled with one random byte) and bumps the write
/// counter in page 0, at most `pages_per_ms` per millisecond, while the VM runs.
fn guest(shared: &Shared, pages: u64, pages_per_ms: u32, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Bursts walk pages 1.. with a stride coprime to their count: each page once per lap.
    let others = pages.saturating_sub(1).max(1);
    let tick = Duration::from_millis(1);
    let (mut tick_start, mut done) = (Instant::now(), 0u32);
    loop {
        if !shared.active.load(Ordering::Acquire) {
            let Ok(s) = shared.state.lock() else { return };
            if s.dead {
                return;
            }
            drop(s);
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        if tick_start.elapsed() >= tick {
            (tick_start, done) = (Instant::now(), 0);
        }
        if done >= pages_per_ms {
            std::thread::sleep(tick.saturating_sub(tick_start.elapsed()));
            continue;
        }
        let Ok(mut s) = shared.state.lock() else {
            return;
        };
        if s.dead {
            return;
        }
        if !s.running || s.frozen {
            continue;
        }
        let mut n = WRITES_PER_LOCK.min(pages_per_ms - done);
        if s.burst.is_some() {
            if s.burst_left == 0 {
                shared.active.store(false, Ordering::Release);
                continue;
            }
            let due = s.burst_due();
            if due == 0 {
                drop(s);
                std::thread::sleep(Duration::from_micros(100));
                continue;
            }
            n = n.min(due.try_into().unwrap_or(u32::MAX));
        }
        let mut wrote = 0;
        for _ in 0..n {
            // Someone waits for the lock (a pause): stop the turn after the current write. A
            // write may be slow (cow: it faults, and may wait for a page in flight), so a full
            // turn could hold a pause for many of them.
            if wrote > 0 && !shared.active.load(Ordering::Acquire) {
                break;
            }
            wrote += 1;
            let page = if s.burst.is_some() {
                s.cursor = (s.cursor + s.stride) % others;
                1 + s.cursor
            } else {
                rng.gen_range(1..pages.max(2))
            };
            let byte = rng.gen::<u8>();
            if let Some(p) = s.ram.page_mut(page) {
                p.fill(byte);
                s.dirty.insert(page);
            }
            s.writes += 1;
            let w = s.writes.to_le_bytes();
            if let Some(p0) = s.ram.page_mut(0) {
                p0[..8].copy_from_slice(&w);
                s.dirty.insert(0);
            }
        }
        if s.burst.is_some() {
            s.burst_left -= u64::from(wrote);
        }
        done += wrote;
    }
}

/// The first of `written` (ascending) missing from `logged` (ascending). One merge walk: the
/// check runs while the VM is paused, and a binary search per page lengthened that pause.
fn first_unlogged(mut written: impl Iterator<Item = u64>, logged: &[u64]) -> Option<u64> {
    let mut logged = logged.iter().copied().peekable();
    written.find(|&p| {
        while logged.next_if(|&l| l < p).is_some() {}
        logged.next_if_eq(&p).is_none()
    })
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Drop for MemVm {
    fn drop(&mut self) {
        self.stop_guest();
    }
}

impl Vm for MemVm {
    async fn prepare_pause(&mut self) -> Result<(), VmError> {
        if let Some(engine) = &self.cow {
            engine.protect_before_pause();
        }
        Ok(())
    }

    async fn pause(&mut self) -> Result<(), VmError> {
        self.with(|s| s.running = false)
    }

    async fn resume(&mut self) -> Result<(), VmError> {
        self.with(|s| {
            s.running = true;
            s.burst_left = s.burst.unwrap_or(0);
            s.burst_started = Instant::now();
        })
    }

    async fn capture(
        &mut self,
        epoch: Epoch,
        scope: Scope,
        mode: CaptureMode,
        out: &mut StagedCheckpoint,
    ) -> Result<CaptureStats, VmError> {
        if mode == CaptureMode::Cow || self.cow.is_some() {
            return self.capture_cow(epoch, scope, mode, out);
        }
        let history = &mut self.history;
        self.shared.with(|s| {
            if s.dead {
                return Err(VmError::Killed);
            }
            if s.running {
                return Err(VmError::failed("capture", "the VM is running"));
            }
            // The first capture needs no special case: the dirty record starts with every page.
            let dirty = s.dirty.iter().copied().collect();
            let mut pages = history.capture(epoch, scope, dirty);
            if scope == Scope::Full {
                s.drop_zero_pages(&mut pages);
            }
            s.fill(pages, mode, out);
            Ok(CaptureStats {
                pages: out.indices.len() as u64,
                ..CaptureStats::default()
            })
        })?
    }

    fn take_cow(&mut self) -> Option<CowCheckpoint> {
        self.cow_checkpoint.take()
    }

    fn guest_ram(&self) -> Arc<GuestRam> {
        self.shared.ram.clone()
    }

    fn ram_digest(&mut self) -> Result<u64, VmError> {
        self.with(|s| xxhash_rust::xxh3::xxh3_64(s.ram.as_slice()))
    }

    async fn kill(&mut self) {
        self.stop_guest();
    }

    async fn died(&mut self) -> VmError {
        std::future::pending().await
    }
}

/// Launches [`MemVm`]s: a zeroed one at boot, one loaded from the replica file at failover.
pub struct MemLauncher {
    /// RAM size in bytes.
    pub ram_bytes: usize,
    /// Page size (the host's).
    pub page_size: usize,
    /// Guest write rate (`u32::MAX`: as fast as it can).
    pub pages_per_ms: u32,
    /// RNG seed of the guest.
    pub seed: u64,
    /// Options of the copy-on-write engine (cow captures).
    pub cow: CowOptions,
    /// Every VM launched, for tests to inspect.
    pub launched: Arc<Mutex<Vec<MemRam>>>,
    /// How many restores fail before starting a VM (fault injection for failover tests).
    pub failing_restores: u32,
}

impl VmLauncher for MemLauncher {
    type Vm = MemVm;

    async fn boot(&mut self) -> Result<MemVm, VmError> {
        self.launch(vec![0; self.ram_bytes], self.seed)
    }

    async fn restore(&mut self, from: RestorePoint) -> Result<MemVm, VmError> {
        if self.failing_restores > 0 {
            self.failing_restores -= 1;
            return Err(VmError::failed("restore", "injected start failure"));
        }
        let ram = std::fs::read(&from.ram_file).map_err(|source| VmError::Io {
            what: "read replica RAM",
            source,
        })?;
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
        self.launch(ram, self.seed ^ 0x5a5a)
    }
}

impl MemLauncher {
    /// Starts a VM with `ram` and this launcher's settings, and records it in `launched`.
    fn launch(&self, ram: Vec<u8>, seed: u64) -> Result<MemVm, VmError> {
        let mut vm = MemVm::start(ram, self.page_size, self.pages_per_ms, seed)?;
        vm.set_cow_options(self.cow);
        if let Ok(mut l) = self.launched.lock() {
            l.push(vm.ram());
        }
        Ok(vm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn finds_a_written_page_missing_from_the_log() {
        let log = [0, 2, 3, 7, 9];
        assert_eq!(first_unlogged([0, 3, 9].into_iter(), &log), None);
        assert_eq!(first_unlogged([].into_iter(), &log), None);
        assert_eq!(first_unlogged([2, 4, 7].into_iter(), &log), Some(4));
        assert_eq!(first_unlogged([9, 10].into_iter(), &log), Some(10));
        assert_eq!(first_unlogged([1].into_iter(), &[]), Some(1));
    }

    #[tokio::test]
    async fn a_paused_vm_holds_still_and_paused_send_leaves_pages_in_ram() {
        let ps = crate::dirty::page_size();
        let mut vm = MemVm::start(vec![0; 64 * ps], ps, u32::MAX, 1).unwrap();
        let ram = vm.guest_ram();
        tokio::time::sleep(Duration::from_millis(5)).await;
        vm.pause().await.unwrap();
        let at_pause = vm.ram_digest().unwrap();
        let writes = vm.ram().writes();
        assert!(writes > 0, "the guest never wrote");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            vm.ram_digest().unwrap(),
            at_pause,
            "RAM changed while paused"
        );
        assert_eq!(vm.ram().writes(), writes);

        let mut out = StagedCheckpoint::default();
        vm.capture(Epoch(1), Scope::Full, CaptureMode::PausedSend, &mut out)
            .await
            .unwrap();
        assert_eq!(
            out.indices,
            nonzero(&ram),
            "a full capture lists the non-zero pages"
        );
        assert!(out.data.is_empty(), "paused-send must not copy pages");
        // The read-only mapping the sender uses shows the guest's writes.
        assert_eq!(xxhash_rust::xxh3::xxh3_64(ram.as_slice()), at_pause);
        assert_eq!(ram.page(0).unwrap()[..8], writes.to_le_bytes());

        vm.resume().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        vm.pause().await.unwrap();
        assert!(vm.ram().writes() > writes, "the guest did not run again");
        let mut staged = StagedCheckpoint::default();
        vm.capture(Epoch(2), Scope::Epoch, CaptureMode::Staged, &mut staged)
            .await
            .unwrap();
        assert!(!staged.indices.is_empty());
        assert_eq!(staged.data.len(), staged.indices.len() * ps);
        for (i, &p) in staged.indices.iter().enumerate() {
            assert_eq!(&staged.data[i * ps..(i + 1) * ps], ram.page(p).unwrap());
        }
    }

    /// Lets `vm` run for `ms`, then pauses it and captures what it wrote into `out`.
    async fn run_and_capture(vm: &mut MemVm, ms: u64, out: &mut StagedCheckpoint) {
        run_and_capture_as(vm, ms, Epoch(2), Scope::Epoch, CaptureMode::PausedSend, out).await;
    }

    /// [`run_and_capture`] as checkpoint `epoch` of `scope`, in `mode`.
    async fn run_and_capture_as(
        vm: &mut MemVm,
        ms: u64,
        epoch: Epoch,
        scope: Scope,
        mode: CaptureMode,
        out: &mut StagedCheckpoint,
    ) {
        vm.resume().await.unwrap();
        tokio::time::sleep(Duration::from_millis(ms)).await;
        vm.pause().await.unwrap();
        vm.capture(epoch, scope, mode, out).await.unwrap();
    }

    /// A catch-up capture takes exactly the pages written after its base, however many
    /// epochs ago that was (the guest writes nothing during the catch-up's own epoch here, so
    /// that what it wrote is known), in each capture mode.
    async fn a_catch_up_takes_the_pages_written_since_its_base(mode: CaptureMode) {
        let ps = crate::dirty::page_size();
        let mut vm = MemVm::start(vec![0; 256 * ps], ps, 20, 3).unwrap();
        vm.pause().await.unwrap();
        let mut out = StagedCheckpoint::default();
        vm.capture(Epoch(1), Scope::Epoch, mode, &mut out)
            .await
            .unwrap();
        assert_eq!(out.indices.len(), 256, "the first capture takes every page");
        let mut written = BTreeMap::new();
        for e in 2..=5 {
            run_and_capture_as(&mut vm, 15, Epoch(e), Scope::Epoch, mode, &mut out).await;
            assert!(!out.indices.is_empty(), "the guest wrote nothing in {e}");
            written.insert(e, out.indices.clone());
        }
        vm.ram().set_frozen(true);
        let since = |base: u64| -> Vec<u64> {
            let pages: BTreeSet<u64> = written
                .range(base + 1..)
                .flat_map(|(_, p)| p.clone())
                .collect();
            pages.into_iter().collect()
        };
        run_and_capture_as(&mut vm, 5, Epoch(6), Scope::Since(Epoch(2)), mode, &mut out).await;
        assert_eq!(out.indices, since(2), "catch-up from 2");
        run_and_capture_as(&mut vm, 5, Epoch(7), Scope::Since(Epoch(4)), mode, &mut out).await;
        assert_eq!(out.indices, since(4), "catch-up from 4");
        run_and_capture_as(&mut vm, 5, Epoch(8), Scope::Since(Epoch(7)), mode, &mut out).await;
        assert!(out.indices.is_empty(), "nothing written since 7");
        run_and_capture_as(&mut vm, 5, Epoch(9), Scope::Full, mode, &mut out).await;
        let ram = vm.guest_ram();
        let full = nonzero(&ram);
        assert_eq!(out.indices, full, "a full capture lists the non-zero pages");
        if mode.copies_pages() {
            assert_eq!(out.data.len(), full.len() * ps);
            for (i, &p) in out.indices.iter().enumerate() {
                assert_eq!(&out.data[i * ps..(i + 1) * ps], ram.page(p).unwrap());
            }
        }
    }

    /// The pages of `ram` that are not all zero.
    fn nonzero(ram: &GuestRam) -> Vec<u64> {
        (0..ram.pages())
            .filter(|&p| !zero_pages::is_zero(ram.page(p).unwrap()))
            .collect()
    }

    #[tokio::test]
    async fn a_catch_up_takes_the_pages_written_since_its_base_when_staged() {
        a_catch_up_takes_the_pages_written_since_its_base(CaptureMode::Staged).await;
    }

    #[tokio::test]
    async fn a_catch_up_takes_the_pages_written_since_its_base_with_cow() {
        a_catch_up_takes_the_pages_written_since_its_base(CaptureMode::Cow).await;
    }

    #[tokio::test]
    async fn a_burst_writes_exactly_that_many_distinct_pages_per_resume() {
        let ps = crate::dirty::page_size();
        let mut vm = MemVm::start(vec![0; 1000 * ps], ps, u32::MAX, 1).unwrap();
        vm.pause().await.unwrap();
        let mut out = StagedCheckpoint::default();
        vm.capture(Epoch(1), Scope::Full, CaptureMode::PausedSend, &mut out)
            .await
            .unwrap();
        vm.ram().set_writes_per_resume(Some(700), true);
        let mut seen = BTreeSet::new();
        for _ in 0..3 {
            run_and_capture(&mut vm, 50, &mut out).await;
            assert_eq!(out.indices.len(), 701, "700 pages and page 0");
            seen.extend(out.indices.iter().copied());
        }
        // Consecutive bursts move on through RAM rather than rewriting the same pages.
        assert_eq!(seen.len(), 1000);
        // Runs: one burst is a run of neighbouring pages (wrapping around once at most).
        vm.ram().set_writes_per_resume(Some(300), false);
        run_and_capture(&mut vm, 50, &mut out).await;
        assert_eq!(out.indices.len(), 301);
        let gaps = out.indices[1..].windows(2).filter(|w| w[1] != w[0] + 1);
        assert!(gaps.count() <= 1, "not a run: {:?}", out.indices);
        vm.ram().set_writes_per_resume(Some(0), false);
        run_and_capture(&mut vm, 20, &mut out).await;
        assert!(out.indices.is_empty());
    }

    #[tokio::test]
    async fn capture_of_a_running_vm_is_refused() {
        let ps = crate::dirty::page_size();
        let mut vm = MemVm::start(vec![0; 4 * ps], ps, 1, 1).unwrap();
        let mut out = StagedCheckpoint::default();
        let e = vm
            .capture(Epoch(1), Scope::Epoch, CaptureMode::Staged, &mut out)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("running"), "{e}");
        assert!(MemVm::start(vec![0; 4 * ps], ps / 2, 1, 1).is_err());
    }

    /// The errors say what happened in their type: a killed VM, a replica file that is not
    /// there (with its I/O error as the source), an injected start failure.
    #[tokio::test]
    async fn failures_are_typed() {
        let ps = crate::dirty::page_size();
        let mut vm = MemVm::start(vec![0; 4 * ps], ps, 1, 1).unwrap();
        vm.kill().await;
        let e = vm.pause().await.unwrap_err();
        assert!(matches!(e, VmError::Killed), "{e:?}");
        assert!(e.is_gone());
        let e = vm.ram_digest().unwrap_err();
        assert!(matches!(e, VmError::Killed), "{e:?}");

        let mut launcher = MemLauncher {
            ram_bytes: 4 * ps,
            page_size: ps,
            pages_per_ms: 1,
            seed: 1,
            cow: CowOptions::default(),
            launched: Default::default(),
            failing_restores: 1,
        };
        let dir = tempfile::tempdir().unwrap();
        let point = RestorePoint {
            disk: None,
            ram_file: dir.path().join("missing.ram"),
            device: Vec::new(),
        };
        let e = launcher.restore(point.clone()).await.err().unwrap();
        assert!(
            matches!(
                e,
                VmError::Failed {
                    what: "restore",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(!e.is_gone());
        let e = launcher.restore(point).await.err().unwrap();
        match &e {
            VmError::Io { what, source } => {
                assert_eq!(*what, "read replica RAM");
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("expected an I/O error, got {other:?}"),
        }
        let source = std::error::Error::source(&e).expect("the I/O error as its source");
        assert!(source.downcast_ref::<std::io::Error>().is_some());
    }
}
