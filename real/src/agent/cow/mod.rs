//! Copy-on-write capture (`--capture cow`, docs/ARCHITECTURE.md, Capture modes): at the capture
//! the epoch's dirty pages are write-protected with a blocking userfaultfd and the VM resumes at
//! once; the sender then sends the pages straight from guest RAM while the guest runs. A guest
//! write to a protected page blocks its thread in a fault that the [`CowEngine`]'s handler
//! thread resolves:
//!
//! - the page is in a checkpoint and not yet sent (`Unsent`): copy it into that checkpoint's side
//!   buffer (the sender will use the copy), then unprotect;
//! - the page is being sent from RAM (`InFlight`: handed to the transport, not yet released):
//!   wait until the sender reports it released (`Sent`), then unprotect;
//! - otherwise (not in a checkpoint, already copied or sent): unprotect.
//!
//! In every case the page is recorded dirty for the next epoch first. The fault stream *is* the
//! dirty log: every page is write-protected between its capture and its next write, so the first
//! write of each page in an epoch faults. (PAGEMAP_SCAN cannot be used with a blocking uffd.)
//!
//! Protecting the written pages is the one part of a capture that grows with the dirty set, so
//! most of it happens before the pause ([`early`]): passes while the VM runs re-protect the
//! pages written so far (a page written again faults once more and is logged again, which
//! changes nothing), and the capture protects only what was written since the last pass.
//!
//! # Locking and ordering
//!
//! One mutex (the engine lock) guards the dirty log and the list of active checkpoints; page
//! states live in each checkpoint's [`table::Table`] and change only under that lock (their
//! atomics only make the side buffers sound on their own). A condition variable signals releases.
//!
//! 1. **Capture** (VM paused) under the lock: (a) take the dirty log and start a new one,
//!    (b) register the checkpoint's table, (c) write-protect those of its pages that are still
//!    writable (one `UFFDIO_WRITEPROTECT` per run; the others were protected by an early pass,
//!    step 5, and not written since). (a) and (b) come before (c): once a page is protected, any
//!    write to it finds the table (and is copied) and lands in the new log. The other order
//!    would let a write between (c) and (a) go uncopied and into the old log — lost from both.
//! 2. **Fault** (handler thread) under the lock: wait (condvar, lock released) while any active
//!    checkpoint has the page `InFlight`; then copy it into every active checkpoint that has it
//!    `Unsent`; record it in the dirty log; and only then unprotect it, which wakes the writer.
//!    Recording before unprotecting means the write is in the log before it can happen, so a
//!    capture that follows the write sees it. Holding the lock across the unprotect means a
//!    capture cannot slip in between: were it to protect the page for a new checkpoint after the
//!    handler decided "no copy needed" but before its unprotect, the unprotect would leave a
//!    page of the new checkpoint writable and uncopied. (With the VM paused no vCPU faults, but
//!    QEMU's own threads may write guest RAM at any time.)
//! 3. **Send** (link writer thread): claim a batch under the lock (`Unsent → InFlight`; a
//!    `Copied` page is sent from its copy), compute its checksum and hand it to the transport;
//!    when the transport reports it released, mark it `Sent` and notify the condvar. An
//!    `InFlight` page stays write-protected (the handler never unprotects it), so the bytes the
//!    checksum covered are the bytes the transport reads.
//! 4. **Finish** (the checkpoint handle dropped, always after its transport released everything
//!    or was dropped): remaining `InFlight` pages count as `Sent`, the table leaves the active
//!    list, waiters are woken. Unsent pages of a checkpoint that was never sent stay protected:
//!    their next write is simply recorded dirty.
//!
//! 5. **Early passes** ([`early`]; a thread of their own, VM running): under the lock, take the
//!    set of pages the handler made writable (it adds each page there, under the lock, before
//!    unprotecting it); then, without the lock, write-protect them. The invariant that the
//!    capture relies on instead of protecting the whole dirty log: *every page outside the
//!    writable set is write-protected*. A pass breaks it only for the pages it has taken and not
//!    yet protected, so passes and captures exclude each other (the protect lock), and a capture
//!    that finds a pass running asks it to stop: the pass hands back the pages it has not
//!    protected yet. Protecting a page the handler made writable again meanwhile is harmless: it
//!    is in the writable set, so the capture protects it anyway. A page written again after an
//!    early pass protected it is hot ([`early`]) and stays writable until the last pass.
//!
//! Nothing in the handler waits on the agent's event loop: it waits only for the sender, and the
//! sender never waits for the handler, so a guest write cannot deadlock the agent. A sender that
//! stalls (peer not reading) fails after the transport's stall timeout and finishes its table.
//!
//! The handler closes nothing: the uffd lives as long as the engine and any checkpoint handle;
//! dropping the engine unprotects all of RAM first, so no writer stays blocked.

pub mod early;
mod page_set;
pub mod table;

use std::ops::Range;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use self::early::Schedule;
use self::page_set::PageSet;
use self::table::{OnWrite, PageState, Table, TableError};
use crate::dirty::{DirtyError, GuestRam, HandedUffd, WpFault};

/// Errors of copy-on-write capture.
#[derive(Debug, thiserror::Error)]
pub enum CowError {
    /// A userfaultfd operation failed (or the kernel lacks write-protect on shared memory).
    #[error(transparent)]
    Uffd(#[from] DirtyError),
    /// The uffd covers a different range than guest RAM.
    #[error("the userfaultfd covers {uffd} bytes but guest RAM is {ram} bytes")]
    RangeMismatch {
        /// Bytes the uffd covers.
        uffd: u64,
        /// Bytes of guest RAM.
        ram: u64,
    },
    /// The fault handler failed earlier; copy-on-write tracking is broken.
    #[error("the copy-on-write fault handler failed: {0}")]
    HandlerFailed(String),
    /// The sender misused a checkpoint table.
    #[error(transparent)]
    Table(#[from] TableError),
    /// A thread could not be started, or a lock was poisoned.
    #[error("copy-on-write engine: {0}")]
    Internal(String),
}

/// What copy-on-write cost one checkpoint.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CowStats {
    /// Pages the fault handler copied because the guest wrote them before they were sent.
    pub copies: u64,
    /// Guest writes that waited for a page in flight to be released.
    pub waits: u64,
}

/// What a capture did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProtectStats {
    /// Pages in the capture.
    pub pages: u64,
    /// Of those, pages still writable at the capture, write-protected while paused.
    pub protected: u64,
    /// `UFFDIO_WRITEPROTECT` calls while paused (runs of pages).
    pub ranges: u64,
    /// Microseconds taking the log and protecting.
    pub us: u64,
    /// Pages write-protected by early passes since the previous capture (VM running).
    pub early_pages: u64,
    /// Early passes since the previous capture.
    pub early_passes: u64,
}

/// How a [`CowEngine`] works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CowOptions {
    /// Re-protect written pages early, while the VM runs ([`early`]: scheduled passes and one
    /// right before the pause), so captures have less to protect while it is paused.
    pub early_passes: bool,
    /// A pass runs only when at least this many pages are writable (default
    /// [`early::MIN_PASS_PAGES`]).
    pub min_pass_pages: u64,
}

impl Default for CowOptions {
    fn default() -> Self {
        CowOptions {
            early_passes: true,
            min_pass_pages: early::MIN_PASS_PAGES,
        }
    }
}

/// Dirty pages at most this many pages apart are protected by one `UFFDIO_WRITEPROTECT` over
/// the gap too. Measured here (256 MiB, a VM host): one call costs ~3 µs — with 2,500 scattered
/// pages the calls are the whole pause — while each page of a range adds ~0.15–0.2 µs, so a call
/// saved pays for a gap of ~16 pages.
const MERGE_GAP: u64 = 16;

/// The runs of `pages` (ascending) to write-protect: runs of contiguous pages, merged across gaps
/// of at most [`MERGE_GAP`] pages. Protecting the pages of a gap is harmless: a page not in the
/// dirty log is already write-protected (a page is unprotected only by the fault handler, which
/// logs it first, or when the engine stops or fails — and captures refuse to run then), so the
/// call changes nothing for it.
fn protect_runs(pages: &[u64]) -> Vec<Range<u64>> {
    let mut runs: Vec<Range<u64>> = Vec::new();
    for &p in pages {
        match runs.last_mut() {
            Some(r) if p >= r.end && p - r.end <= MERGE_GAP => r.end = p + 1,
            _ => runs.push(p..p + 1),
        }
    }
    runs
}

/// The dirty log and active checkpoints (the engine lock).
struct Inner {
    /// Pages written since the last capture.
    dirty: PageSet,
    /// Pages the handler unprotected since they were last protected (module docs, step 5).
    writable: PageSet,
    /// Pages an early pass protected this epoch, and those of them the guest wrote again
    /// since: hot pages, which the scheduled passes leave to the capture (each further pass
    /// would only cost the guest another fault for them).
    early_done: PageSet,
    hot: PageSet,
    /// Checkpoints being sent (normally one; more only while a dropped link's send winds down).
    active: Vec<Arc<Table>>,
    /// Set when the handler failed.
    failed: Option<String>,
    /// Early passes since the last capture, and the pages they protected.
    early_passes: u64,
    early_pages: u64,
}

struct Shared {
    uffd: HandedUffd,
    /// Start of guest RAM in the address space the uffd acts on.
    base: u64,
    pages: u64,
    page_size: usize,
    /// The agent's view of guest RAM (read-only; not registered, so reading never faults).
    ram: Arc<GuestRam>,
    inner: Mutex<Inner>,
    /// Signalled when pages become `Sent` or a checkpoint finishes.
    released: Condvar,
    stopping: AtomicBool,
    /// Held by whoever write-protects pages taken from the writable set: a capture or an early
    /// pass (module docs, step 5). Taken before the engine lock, never while holding it.
    protecting: Mutex<()>,
    /// A capture waits for `protecting`: the early pass holding it stops.
    capture_waiting: AtomicBool,
    /// An early pass failed (and was logged).
    early_failed: AtomicBool,
    options: CowOptions,
    /// When captures ran, for the early passes.
    schedule: Mutex<Schedule>,
    /// Signalled on a capture and when the engine stops.
    schedule_changed: Condvar,
}

impl Shared {
    fn lock(&self) -> Result<MutexGuard<'_, Inner>, CowError> {
        self.inner
            .lock()
            .map_err(|_| CowError::Internal("engine lock poisoned".into()))
    }

    fn addr(&self, page: u64) -> u64 {
        self.base + page * self.page_size as u64
    }

    /// Write-protects `pages` (ascending), one ioctl per run of pages (`protect_runs`).
    /// Returns the number of ioctls.
    fn protect(&self, pages: &[u64]) -> Result<u64, DirtyError> {
        let ps = self.page_size as u64;
        let runs = protect_runs(pages);
        for r in &runs {
            self.uffd
                .write_protect(self.addr(r.start), (r.end - r.start) * ps, true)?;
        }
        Ok(runs.len() as u64)
    }

    /// Logs the first failed early pass (later ones would only repeat it).
    fn report_early_failure(&self, e: &CowError) {
        if !self.early_failed.swap(true, Ordering::AcqRel) {
            tracing::warn!(error = %e, "copy-on-write: an early write-protect pass failed");
        }
    }

    /// VM paused: takes the protect lock, then the dirty log, picks the capture's pages from
    /// it (`select`, given the log's pages in increasing order, returns them in increasing
    /// order), and protects what is still writable (all of RAM when `protect_all`), running
    /// `register` on the picked pages under the engine lock before anything is protected
    /// (module docs, steps 1 and 5).
    ///
    /// `select` may pick pages outside the log (a full or catch-up capture): those are
    /// write-protected already (every page outside the writable set is), so their contents are
    /// the capture's until their next write, which faults and finds them registered.
    fn capture<T>(
        &self,
        protect_all: bool,
        select: impl FnOnce(Vec<u64>) -> Vec<u64>,
        register: impl FnOnce(&mut Inner, Vec<u64>) -> Result<T, CowError>,
    ) -> Result<(T, ProtectStats), CowError> {
        // The protect lock first, stopping an early pass that holds it.
        self.capture_waiting.store(true, Ordering::Release);
        let protecting = self.protecting.lock();
        self.capture_waiting.store(false, Ordering::Release);
        let _protecting =
            protecting.map_err(|_| CowError::Internal("protect lock poisoned".into()))?;
        let t0 = Instant::now();
        let mut g = self.lock()?;
        if let Some(e) = &g.failed {
            return Err(CowError::HandlerFailed(e.clone()));
        }
        // (a) take the log: later writes go to the next epoch.
        let pages = select(g.dirty.take());
        let mut stats = ProtectStats {
            pages: pages.len() as u64,
            early_pages: std::mem::take(&mut g.early_pages),
            early_passes: std::mem::take(&mut g.early_passes),
            ..ProtectStats::default()
        };
        // (b) whatever must see the pages before they are protected.
        let registered = register(&mut g, pages)?;
        // (c) protect, still under the lock (no fault is resolved in between).
        let writable = g.writable.take();
        g.early_done.clear();
        g.hot.clear();
        let done = if protect_all {
            let all = self.uffd.range();
            stats.protected = self.pages;
            self.uffd
                .write_protect(all.start, all.end - all.start, true)
                .map(|()| 1)
        } else {
            stats.protected = writable.len() as u64;
            self.protect(&writable)
        };
        match done {
            Ok(ranges) => stats.ranges = ranges,
            Err(e) => {
                // Some of them may still be writable: keep them in the set (harmless if not).
                g.writable.extend(&writable);
                return Err(e.into());
            }
        }
        drop(g);
        stats.us = t0.elapsed().as_micros() as u64;
        if let Ok(mut s) = self.schedule.lock() {
            s.captured(Instant::now());
            self.schedule_changed.notify_all();
        }
        Ok((registered, stats))
    }

    /// One early pass (module docs, step 5), protect lock held: protects the pages the handler
    /// made writable (but for hot pages when `skip_hot`), a chunk at a time, stopping when a
    /// capture waits. Returns the pages protected.
    fn early_pass(&self, skip_hot: bool) -> Result<u64, CowError> {
        /// Pages protected between two looks at `capture_waiting` (well under a millisecond).
        const CHUNK: usize = 256;
        let pages = {
            let mut g = self.lock()?;
            if let Some(e) = &g.failed {
                return Err(CowError::HandlerFailed(e.clone()));
            }
            // Too few to be worth it: the capture protects them in well under a millisecond,
            // while each one protected now may cost the guest one more fault (with a TCG guest
            // at 10 ms epochs, passes over its few hundred hot kernel pages cost a third of
            // its replies).
            if g.writable.len() < self.options.min_pass_pages.max(1) {
                return Ok(0);
            }
            let mut pages = g.writable.take();
            if skip_hot && g.hot.len() > 0 {
                let (hot, cold): (Vec<u64>, Vec<u64>) =
                    pages.into_iter().partition(|&p| g.hot.contains(p));
                g.writable.extend(&hot);
                pages = cold;
            }
            pages
        };
        let mut done = 0;
        for chunk in pages.chunks(CHUNK) {
            let result = if self.capture_waiting.load(Ordering::Acquire) {
                Ok(false)
            } else {
                self.protect(chunk).map(|_| true)
            };
            match result {
                Ok(true) => {
                    done += chunk.len();
                    self.lock()?.early_done.extend(chunk);
                }
                stopped_or_failed => {
                    // Hand back what is not known to be protected (this chunk on failure).
                    let mut g = self.lock()?;
                    g.writable.extend(&pages[done..]);
                    stopped_or_failed?;
                    break;
                }
            }
        }
        let mut g = self.lock()?;
        g.early_passes += 1;
        g.early_pages += done as u64;
        Ok(done as u64)
    }

    /// Resolves one fault (module docs, step 2).
    fn handle(&self, f: WpFault) -> Result<(), CowError> {
        let ps = self.page_size as u64;
        let Some(page) = f
            .address
            .checked_sub(self.base)
            .map(|o| o / ps)
            .filter(|&p| p < self.pages)
        else {
            // Not guest RAM (cannot happen with our registration): let the writer go.
            self.uffd.write_protect(f.address & !(ps - 1), ps, false)?;
            return Ok(());
        };
        let mut g = self.lock()?;
        let mut waited = false;
        // Wait while a checkpoint sends this page from RAM. The condvar releases the lock, so
        // the sender can mark pages Sent meanwhile.
        while !self.stopping.load(Ordering::Acquire) {
            let busy = g.active.iter().find(|t| t.on_write(page) == OnWrite::Wait);
            match busy {
                Some(t) => {
                    if !waited {
                        t.note_wait();
                        waited = true;
                    }
                    g = self
                        .released
                        .wait(g)
                        .map_err(|_| CowError::Internal("engine lock poisoned".into()))?;
                }
                None => break,
            }
        }
        // Still write-protected, so RAM holds the contents of every checkpoint that has the page
        // Unsent (it was not written since their captures).
        let mut contents = None;
        for t in &g.active {
            if let OnWrite::Copy(pos) = t.on_write(page) {
                let c = *contents.get_or_insert_with(|| self.ram.page(page).unwrap_or_default());
                t.copy_in(pos, c);
            }
        }
        g.dirty.insert(page);
        g.writable.insert(page);
        if g.early_done.contains(page) {
            g.hot.insert(page);
        }
        // Last, still under the lock: unprotect, which wakes the writer.
        self.uffd.write_protect(self.addr(page), ps, false)?;
        drop(g);
        Ok(())
    }
}

/// The fault handler and the dirty log of one VM's guest RAM.
pub struct CowEngine {
    shared: Arc<Shared>,
    handler: Option<JoinHandle<()>>,
    /// The early-pass thread, if enabled.
    early: Option<JoinHandle<()>>,
    /// Written to stop the handler.
    stop: OwnedFd,
}

impl std::fmt::Debug for CowEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CowEngine")
            .field("pages", &self.shared.pages)
            .finish()
    }
}

impl CowEngine {
    /// [`CowEngine::start_with`] the default options.
    pub fn start(uffd: HandedUffd, ram: Arc<GuestRam>) -> Result<CowEngine, CowError> {
        CowEngine::start_with(uffd, ram, CowOptions::default())
    }

    /// Takes over `uffd` (a blocking write-protect uffd registered on all of guest RAM, whose
    /// contents the agent reads through `ram`), starts the handler thread (and the early-pass
    /// thread), then write-protects all of RAM so every page's next write is logged.
    pub fn start_with(
        uffd: HandedUffd,
        ram: Arc<GuestRam>,
        options: CowOptions,
    ) -> Result<CowEngine, CowError> {
        let range = uffd.range();
        if range.end - range.start != ram.bytes() {
            return Err(CowError::RangeMismatch {
                uffd: range.end - range.start,
                ram: ram.bytes(),
            });
        }
        let pages = ram.pages();
        // An eventfd to wake the handler out of poll when the engine stops.
        // SAFETY: eventfd takes an initial value and flags and returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(CowError::Internal(format!(
                "eventfd: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: a fresh fd that nothing else owns.
        let stop = unsafe { OwnedFd::from_raw_fd(efd) };
        let shared = Arc::new(Shared {
            base: range.start,
            uffd,
            pages,
            page_size: ram.page_size(),
            ram,
            inner: Mutex::new(Inner {
                dirty: PageSet::new(pages),
                writable: PageSet::new(pages),
                early_done: PageSet::new(pages),
                hot: PageSet::new(pages),
                active: Vec::new(),
                failed: None,
                early_passes: 0,
                early_pages: 0,
            }),
            released: Condvar::new(),
            stopping: AtomicBool::new(false),
            protecting: Mutex::new(()),
            capture_waiting: AtomicBool::new(false),
            early_failed: AtomicBool::new(false),
            options,
            schedule: Mutex::new(Schedule::default()),
            schedule_changed: Condvar::new(),
        });
        let stop_fd = stop
            .try_clone()
            .map_err(|e| CowError::Internal(format!("dup eventfd: {e}")))?;
        let s = shared.clone();
        let handler = std::thread::Builder::new()
            .name("cow-faults".into())
            .spawn(move || handler(&s, &stop_fd))
            .map_err(|e| CowError::Internal(format!("start the fault handler: {e}")))?;
        let mut engine = CowEngine {
            shared,
            handler: Some(handler),
            early: None,
            stop,
        };
        if options.early_passes {
            let s = engine.shared.clone();
            engine.early = Some(
                std::thread::Builder::new()
                    .name("cow-early".into())
                    .spawn(move || early_passes(&s))
                    .map_err(|e| CowError::Internal(format!("start the early passes: {e}")))?,
            );
        }
        // The handler runs before anything is protected, so no write ever waits unserved.
        let all = engine.shared.uffd.range();
        engine
            .shared
            .uffd
            .write_protect(all.start, all.end - all.start, true)?;
        Ok(engine)
    }

    /// Pages of guest RAM.
    pub fn pages(&self) -> u64 {
        self.shared.pages
    }

    /// VM paused: starts a copy-on-write checkpoint of the pages written since the last capture
    /// (all pages when `full`) and write-protects them (module docs, step 1).
    pub fn begin(&self, full: bool) -> Result<(CowCheckpoint, ProtectStats), CowError> {
        self.begin_with(full, self.log_or_all(full))
    }

    /// [`CowEngine::begin`] with the checkpoint's pages picked by `select` from the dirty log
    /// it takes over (both in increasing order): a catch-up picks every page written since its
    /// base. Only `protect_all` protects all of RAM; otherwise only the writable set is
    /// protected, which suffices for any pick (see the module docs' invariant).
    pub fn begin_with(
        &self,
        protect_all: bool,
        select: impl FnOnce(Vec<u64>) -> Vec<u64>,
    ) -> Result<(CowCheckpoint, ProtectStats), CowError> {
        // The table is registered before anything is protected. On failure the checkpoint is
        // dropped, which unregisters it.
        self.shared.capture(protect_all, select, |g, pages| {
            let table = Arc::new(Table::new(pages, self.shared.page_size)?);
            g.active.push(table.clone());
            Ok(CowCheckpoint {
                shared: self.shared.clone(),
                table,
                finished: false,
            })
        })
    }

    /// VM still running, right before it is paused for a capture: one last early pass, so the
    /// capture only has to protect what the guest writes during this call. Only an
    /// optimisation: pages it fails to protect stay in the writable set and the capture
    /// protects them (or reports a broken engine) itself, so a failure is only logged.
    pub fn protect_before_pause(&self) {
        if !self.shared.options.early_passes {
            return;
        }
        let Ok(_p) = self.shared.protecting.lock() else {
            return;
        };
        if let Err(e) = self.shared.early_pass(false) {
            self.shared.report_early_failure(&e);
        }
    }

    /// VM paused: the pages written since the last capture (all pages when `full`), protected
    /// again to log their next write — for capture modes that copy or send while paused.
    pub fn rearm(&self, full: bool) -> Result<(Vec<u64>, ProtectStats), CowError> {
        self.rearm_with(full, self.log_or_all(full))
    }

    /// [`CowEngine::rearm`] with the pages picked by `select`, as for
    /// [`CowEngine::begin_with`].
    pub fn rearm_with(
        &self,
        protect_all: bool,
        select: impl FnOnce(Vec<u64>) -> Vec<u64>,
    ) -> Result<(Vec<u64>, ProtectStats), CowError> {
        self.shared
            .capture(protect_all, select, |_, pages| Ok(pages))
    }

    /// The pick of a capture that takes the dirty log, or every page when `full`.
    fn log_or_all(&self, full: bool) -> impl FnOnce(Vec<u64>) -> Vec<u64> {
        let pages = self.shared.pages;
        move |logged| if full { (0..pages).collect() } else { logged }
    }
}

impl Drop for CowEngine {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        // Wake a handler waiting for a release, under the lock so the wake-up is not missed.
        if let Ok(_g) = self.shared.inner.lock() {
            self.shared.released.notify_all();
        }
        // Wake the early passes.
        if let Ok(mut s) = self.shared.schedule.lock() {
            s.stopping = true;
            self.shared.schedule_changed.notify_all();
        }
        // Wake a handler in poll.
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from `one` to the eventfd, as eventfd(2) requires.
        let _ = unsafe {
            libc::write(
                std::os::fd::AsRawFd::as_raw_fd(&self.stop),
                (&one as *const u64).cast(),
                8,
            )
        };
        if let Some(h) = self.early.take() {
            let _ = h.join();
        }
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
        // No handler is left to resolve faults: let every blocked or future writer through.
        let all = self.shared.uffd.range();
        let _ = self
            .shared
            .uffd
            .write_protect(all.start, all.end - all.start, false);
    }
}

/// The early-pass thread ([`early`]): after each capture, runs the passes of its plan until the
/// next capture or the engine stops.
fn early_passes(shared: &Shared) {
    let Ok(mut s) = shared.schedule.lock() else {
        return;
    };
    loop {
        let capture = s.captures;
        let plan = s.plan();
        for at in plan {
            // Sleep until the pass is due; a capture (or the end) meanwhile drops the plan.
            loop {
                if s.stopping || s.captures != capture {
                    break;
                }
                let now = Instant::now();
                if now >= at {
                    break;
                }
                s = match shared.schedule_changed.wait_timeout(s, at - now) {
                    Ok((s, _)) => s,
                    Err(_) => return,
                };
            }
            if s.stopping {
                return;
            }
            if s.captures != capture {
                break;
            }
            drop(s);
            let Ok(protecting) = shared.protecting.lock() else {
                return;
            };
            if let Err(e) = shared.early_pass(true) {
                // Not fatal: the capture protects whatever the pass left (or reports the
                // handler's failure itself).
                shared.report_early_failure(&e);
            }
            drop(protecting);
            s = match shared.schedule.lock() {
                Ok(s) => s,
                Err(_) => return,
            };
        }
        // Wait for the next capture.
        while !s.stopping && s.captures == capture {
            s = match shared.schedule_changed.wait(s) {
                Ok(s) => s,
                Err(_) => return,
            };
        }
        if s.stopping {
            return;
        }
    }
}

/// How long the handler keeps looking for the next fault before it sleeps.
const HANDLER_SPIN: std::time::Duration = std::time::Duration::from_micros(50);

/// The handler thread: resolves faults until stopped or broken.
fn handler(shared: &Shared, stop: &OwnedFd) {
    let failure = loop {
        match shared.uffd.poll_with(stop.as_fd(), None) {
            Err(e) => break e.to_string(),
            Ok((_, true)) => return,
            Ok((false, false)) => continue,
            Ok((true, false)) => {}
        }
        let mut broken = None;
        let mut idle_since: Option<Instant> = None;
        loop {
            match shared.uffd.read_fault() {
                Ok(Some(f)) => {
                    idle_since = None;
                    if let Err(e) = shared.handle(f) {
                        broken = Some(e.to_string());
                        break;
                    }
                }
                // A writer's next fault usually follows within microseconds: look again for a
                // short while before sleeping in poll, whose wake-up costs each fault far more.
                Ok(None) if idle_since.is_none_or(|t| t.elapsed() < HANDLER_SPIN) => {
                    idle_since.get_or_insert_with(Instant::now);
                    std::hint::spin_loop();
                }
                Ok(None) => break,
                Err(e) => {
                    broken = Some(e.to_string());
                    break;
                }
            }
        }
        if let Some(b) = broken {
            break b;
        }
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
    };
    tracing::error!(%failure, "copy-on-write fault handler failed; unprotecting guest RAM");
    if let Ok(mut g) = shared.inner.lock() {
        g.failed = Some(failure);
    }
    // Nobody resolves faults any more: no writer may stay blocked.
    let all = shared.uffd.range();
    if let Err(e) = shared
        .uffd
        .write_protect(all.start, all.end - all.start, false)
    {
        tracing::error!(
            error = %e,
            "copy-on-write: unprotecting guest RAM failed; guest writes may stay blocked"
        );
    }
}

/// One copy-on-write checkpoint, for its sender: the pages' states and side copies. Dropping it
/// finishes the checkpoint (module docs, step 4) — only once the transport released every page
/// claimed from it, or was dropped.
pub struct CowCheckpoint {
    shared: Arc<Shared>,
    table: Arc<Table>,
    finished: bool,
}

impl std::fmt::Debug for CowCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CowCheckpoint")
            .field("table", &self.table)
            .finish()
    }
}

impl CowCheckpoint {
    /// The checkpoint's page indices, ascending.
    pub fn indices(&self) -> &[u64] {
        self.table.indices()
    }

    /// Hands the pages at positions `range` to the sender (module docs, step 3). Their contents
    /// ([`CowCheckpoint::page`]) hold still until [`CowCheckpoint::released`].
    pub fn claim(&self, range: Range<usize>) -> Result<(), CowError> {
        let _g = self.shared.lock()?;
        self.table.claim(range)?;
        Ok(())
    }

    /// The contents of the claimed page at position `pos`, or `None` if it is not claimed.
    pub fn page(&self, pos: usize) -> Option<&[u8]> {
        let index = *self.table.indices().get(pos)?;
        self.table.contents(pos, self.shared.ram.page(index)?)
    }

    /// The transport released the pages at positions `range`: writes to them may go ahead.
    pub fn released(&self, range: Range<usize>) {
        if let Ok(_g) = self.shared.lock() {
            self.table.release(range);
            self.shared.released.notify_all();
        }
    }

    /// State of the page at position `pos` (for tests and logs).
    pub fn state(&self, pos: usize) -> PageState {
        self.table.state(pos)
    }

    /// Finishes the checkpoint now and returns what copy-on-write cost it. The caller must be
    /// done with every page it claimed (see the type docs).
    pub fn finish(mut self) -> CowStats {
        self.finish_now()
    }

    fn finish_now(&mut self) -> CowStats {
        if !self.finished {
            self.finished = true;
            let g = self.shared.inner.lock();
            self.table.release(0..self.table.len());
            if let Ok(mut g) = g {
                g.active.retain(|t| !Arc::ptr_eq(t, &self.table));
            }
            self.shared.released.notify_all();
        }
        CowStats {
            copies: self.table.copies(),
            waits: self.table.waits(),
        }
    }
}

impl Drop for CowCheckpoint {
    fn drop(&mut self) {
        self.finish_now();
    }
}

#[cfg(test)]
mod tests_support {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::dirty::{page_size, GuestRamMut};

    /// A guest thread writing pages of `rw` on command; acks each write when it went through.
    pub(super) struct Writer {
        cmd: mpsc::Sender<(u64, u8)>,
        done: mpsc::Receiver<u64>,
    }

    impl Writer {
        fn start(mut rw: GuestRamMut) -> Writer {
            let (cmd, rx) = mpsc::channel::<(u64, u8)>();
            let (tx, done) = mpsc::channel();
            std::thread::spawn(move || {
                for (page, byte) in rx {
                    rw.page_mut(page).unwrap().fill(byte);
                    let _ = tx.send(page);
                }
            });
            Writer { cmd, done }
        }

        pub(super) fn write(&self, page: u64, byte: u8) {
            self.cmd.send((page, byte)).unwrap();
        }

        pub(super) fn went_through(&self, within: Duration) -> Option<u64> {
            self.done.recv_timeout(within).ok()
        }

        /// Writes `byte` all over `page` and checks the write went through (within 5 s).
        pub(super) fn write_now(&self, page: u64, byte: u8) {
            self.write(page, byte);
            assert_eq!(self.went_through(Duration::from_secs(5)), Some(page));
        }
    }

    /// RAM of `pages` pages, page `i` filled with `i`, mapped for a writer thread (registered
    /// with the uffd) and read-only for the engine.
    /// With early passes that run for any number of pages.
    pub(super) fn setup(pages: u64) -> (tempfile::NamedTempFile, Writer, Arc<GuestRam>, CowEngine) {
        let options = CowOptions {
            min_pass_pages: 1,
            ..CowOptions::default()
        };
        setup_with(pages, options)
    }

    pub(super) fn setup_with(
        pages: u64,
        options: CowOptions,
    ) -> (tempfile::NamedTempFile, Writer, Arc<GuestRam>, CowEngine) {
        let ps = page_size();
        let f = tempfile::NamedTempFile::new_in("/dev/shm").unwrap();
        f.as_file().set_len(pages * ps as u64).unwrap();
        let mut rw = GuestRamMut::open(f.path(), pages * ps as u64).unwrap();
        for p in 0..pages {
            rw.page_mut(p).unwrap().fill(p as u8);
        }
        let ro = Arc::new(GuestRam::open(f.path(), pages * ps as u64).unwrap());
        let uffd = HandedUffd::register_local(rw.base_addr(), rw.bytes()).unwrap();
        let engine = CowEngine::start_with(uffd, ro.clone(), options).unwrap();
        (f, Writer::start(rw), ro, engine)
    }

    pub(super) fn setup_n(
        pages: u64,
    ) -> (tempfile::NamedTempFile, Writer, Arc<GuestRam>, CowEngine) {
        setup(pages)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::tests_support::*;
    use super::*;
    use crate::dirty::page_size;

    const SOON: Duration = Duration::from_secs(5);

    #[test]
    fn a_write_waits_for_its_page_in_flight_and_copies_unsent_pages() {
        let ps = page_size();
        let (_f, w, ram, engine) = setup(16);
        let (cp, stats) = engine.begin(true).unwrap();
        assert_eq!((stats.pages, stats.ranges), (16, 1));

        // An unsent page is copied, then written.
        w.write_now(3, 0xA3);
        assert_eq!(cp.state(3), PageState::Copied);
        assert_eq!(ram.page(3).unwrap(), &vec![0xA3; ps][..]);

        // The sender takes pages 0..8: 3 comes from its copy, the others from RAM.
        cp.claim(0..8).unwrap();
        assert_eq!(cp.page(3).unwrap(), &vec![3; ps][..]);
        assert_eq!(cp.state(5), PageState::InFlight);
        // A write to a page in flight waits for its release...
        w.write(5, 0xA5);
        assert_eq!(w.went_through(Duration::from_millis(150)), None);
        assert_eq!(ram.page(5).unwrap(), &vec![5; ps][..], "changed in flight");
        assert_eq!(cp.page(5).unwrap(), &vec![5; ps][..]);
        // ...and goes through once the transport released it.
        cp.released(0..8);
        assert_eq!(w.went_through(SOON), Some(5));
        assert_eq!(ram.page(5).unwrap(), &vec![0xA5; ps][..]);

        // An unclaimed page of the second half is copied too; a sent one is simply free.
        w.write_now(12, 0xAC);
        w.write_now(6, 0xA6);
        cp.claim(8..16).unwrap();
        assert_eq!(cp.page(12).unwrap(), &vec![12; ps][..]);
        assert_eq!(cp.page(13).unwrap(), &vec![13; ps][..]);
        let cow = cp.finish();
        assert_eq!(
            cow,
            CowStats {
                copies: 2,
                waits: 1
            }
        );

        // Every written page is in the next epoch's log, and protected again by the capture.
        let (dirty, _) = engine.rearm(false).unwrap();
        assert_eq!(dirty, vec![3, 5, 6, 12]);
        w.write(5, 0xB5);
        w.write_now(5, 0xC5);
        assert_eq!(w.went_through(SOON), Some(5));
        let (dirty, _) = engine.rearm(false).unwrap();
        assert_eq!(dirty, vec![5]);
        let (dirty, _) = engine.rearm(false).unwrap();
        assert!(dirty.is_empty());
    }

    #[test]
    fn runs_merge_small_gaps() {
        assert!(protect_runs(&[]).is_empty());
        assert_eq!(protect_runs(&[4]), vec![4..5]);
        assert_eq!(protect_runs(&[1, 2, 3, 10, 11]), vec![1..12]);
        assert_eq!(
            protect_runs(&[0, 1 + MERGE_GAP, 3 + 2 * MERGE_GAP]),
            vec![0..2 + MERGE_GAP, 3 + 2 * MERGE_GAP..4 + 2 * MERGE_GAP]
        );
    }

    #[test]
    fn contiguous_pages_are_protected_in_one_call() {
        let (_f, w, _ram, engine) = setup(64);
        for p in [1, 2, 3, 10, 11, 40] {
            // 1..=11 is one run across a small gap; 40 another.
            w.write_now(p, 0xEE);
        }
        let (cp, stats) = engine.begin(false).unwrap();
        assert_eq!(cp.indices(), &[1, 2, 3, 10, 11, 40]);
        assert_eq!((stats.pages, stats.ranges), (6, 2));
        // The pages are protected: a write copies.
        w.write_now(11, 0xEF);
        assert_eq!(cp.finish().copies, 1);
    }

    #[test]
    fn a_page_protected_early_is_still_copied_when_written_after_the_capture() {
        let ps = page_size();
        let (_f, w, _ram, engine) = setup(64);
        for p in [7, 20] {
            w.write_now(p, 0x70);
        }
        // An early pass while the VM runs protects both; then the guest writes 20 again (it
        // faults once more) and 33 for the first time.
        assert_eq!(engine.shared.early_pass(true).unwrap(), 2);
        for p in [20, 33] {
            w.write_now(p, 0x71);
        }
        let (cp, stats) = engine.begin(false).unwrap();
        assert_eq!(cp.indices(), &[7, 20, 33]);
        // Only the pages written since the pass were protected while paused.
        assert_eq!((stats.pages, stats.protected), (3, 2));
        assert_eq!((stats.early_passes, stats.early_pages), (1, 2));
        // Page 7 was protected by the pass only: a write after the capture still copies it
        // first, so the checkpoint keeps the contents it had at the capture.
        w.write_now(7, 0x72);
        assert_eq!(cp.state(0), PageState::Copied);
        cp.claim(0..3).unwrap();
        assert_eq!(cp.page(0).unwrap(), &vec![0x70; ps][..]);
        assert_eq!(cp.page(1).unwrap(), &vec![0x71; ps][..]);
        cp.released(0..3);
        assert_eq!(cp.finish().copies, 1);
        let (dirty, stats) = engine.rearm(false).unwrap();
        assert_eq!(dirty, vec![7]);
        assert_eq!((stats.protected, stats.early_passes), (1, 0));
    }

    #[test]
    fn without_early_passes_the_capture_protects_everything() {
        let options = CowOptions {
            early_passes: false,
            ..CowOptions::default()
        };
        let (_f, w, _ram, engine) = setup_with(64, options);
        w.write_now(5, 1);
        engine.protect_before_pause();
        let (_, stats) = engine.rearm(false).unwrap();
        assert_eq!((stats.protected, stats.early_pages), (1, 0));
        // With them, the last pass before the pause did the work.
        let (_f, w, _ram, engine) = setup(64);
        w.write_now(5, 1);
        engine.protect_before_pause();
        let (_, stats) = engine.rearm(false).unwrap();
        assert_eq!((stats.protected, stats.early_pages), (0, 1));
    }

    #[test]
    fn a_pass_waits_for_enough_pages() {
        let options = CowOptions {
            min_pass_pages: 3,
            ..CowOptions::default()
        };
        let (_f, w, _ram, engine) = setup_with(64, options);
        let write = |p| w.write_now(p, 3);
        write(1);
        write(2);
        assert_eq!(engine.shared.early_pass(true).unwrap(), 0);
        write(3);
        assert_eq!(engine.shared.early_pass(true).unwrap(), 3);
    }

    #[test]
    fn hot_pages_are_left_to_the_last_pass() {
        let (_f, w, _ram, engine) = setup(64);
        let write = |p| w.write_now(p, 3);
        write(4);
        write(9);
        assert_eq!(engine.shared.early_pass(true).unwrap(), 2);
        // 9 is written again after the pass: hot. The next scheduled pass skips it...
        write(9);
        write(30);
        assert_eq!(engine.shared.early_pass(true).unwrap(), 1);
        // No fault: 9 is still writable. ...the last pass before the pause does not skip it.
        write(9);
        assert_eq!(engine.shared.early_pass(false).unwrap(), 1);
        let (cp, stats) = engine.begin(false).unwrap();
        assert_eq!(cp.indices(), &[4, 9, 30]);
        assert_eq!((stats.protected, stats.early_pages), (0, 4));
        // Protected, so a write after the capture copies it.
        write(9);
        assert_eq!(cp.finish().copies, 1);
        // A new epoch forgets what was hot.
        assert_eq!(engine.shared.early_pass(true).unwrap(), 1);
    }

    #[test]
    fn a_pass_that_a_capture_stops_hands_its_pages_back() {
        let (_f, w, _ram, engine) = setup(64);
        for p in [1, 40] {
            w.write_now(p, 1);
        }
        engine.shared.capture_waiting.store(true, Ordering::Release);
        assert_eq!(engine.shared.early_pass(true).unwrap(), 0);
        engine
            .shared
            .capture_waiting
            .store(false, Ordering::Release);
        let (cp, stats) = engine.begin(false).unwrap();
        assert_eq!((stats.pages, stats.protected), (2, 2));
        // Protected by the capture after all: a write copies.
        w.write_now(40, 2);
        assert_eq!(cp.finish().copies, 1);
    }

    #[test]
    fn early_passes_follow_the_epoch_and_leave_the_capture_little_to_protect() {
        let (_f, w, _ram, engine) = setup(256);
        let epoch = Duration::from_millis(100);
        let (_, _) = engine.rearm(false).unwrap();
        std::thread::sleep(epoch);
        let (_, _) = engine.rearm(false).unwrap();
        // Written early in the epoch: the passes (from 50 ms on) protect them all before the
        // next capture.
        for p in (0..256).step_by(3) {
            w.write_now(p, 9);
        }
        std::thread::sleep(epoch + epoch / 2);
        let (pages, stats) = engine.rearm(false).unwrap();
        assert_eq!(pages.len(), 86);
        assert_eq!(stats.protected, 0, "{stats:?}");
        assert!(stats.early_passes >= 1, "{stats:?}");
        assert_eq!(stats.early_pages, 86, "{stats:?}");
    }

    #[test]
    fn dropping_a_checkpoint_or_the_engine_never_leaves_a_writer_stuck() {
        let (_f, w, _ram, engine) = setup(8);
        let (cp, _) = engine.begin(true).unwrap();
        cp.claim(0..8).unwrap();
        w.write(2, 1);
        assert_eq!(w.went_through(Duration::from_millis(100)), None);
        drop(cp); // the link failed: its transport is gone
        assert_eq!(w.went_through(SOON), Some(2));

        let (cp, _) = engine.begin(true).unwrap();
        cp.claim(0..8).unwrap();
        w.write(4, 1);
        assert_eq!(w.went_through(Duration::from_millis(100)), None);
        drop(engine); // the VM is gone
        assert_eq!(w.went_through(SOON), Some(4));
        drop(cp);
        w.write_now(4, 2);
    }
}

/// What write-protecting costs on this machine (a measurement, not a check):
/// `cargo test -p ftvm-real --lib protect_cost -- --ignored --nocapture`.
#[cfg(test)]
mod timing {
    use super::tests_support::*;

    #[test]
    #[ignore]
    fn protect_cost() {
        let pages = 65536u64;
        let (_f, w, _ram, engine) = setup_n(pages);
        for (n, stride) in [(2500u64, 26u64), (10000, 6), (20000, 3), (2500, 1)] {
            for i in 0..n {
                w.write((i * stride) % pages, 1);
            }
            for _ in 0..n {
                w.went_through(std::time::Duration::from_secs(5)).unwrap();
            }
            let (cp, st) = engine.begin(false).unwrap();
            eprintln!(
                "{n} pages stride {stride}: {} ranges, {} us",
                st.ranges, st.us
            );
            drop(cp);
        }
        let t = std::time::Instant::now();
        let all = engine.shared.uffd.range();
        engine
            .shared
            .uffd
            .write_protect(all.start, all.end - all.start, true)
            .unwrap();
        eprintln!("all of RAM re-protected: {:?}", t.elapsed());
    }
}
