//! The agent's VM backed by a stock QEMU: pause/resume over QMP, dirty pages from the
//! LD_PRELOAD + PAGEMAP_SCAN tracker (or the hash-diff cross-check), page contents read from the
//! shared RAM file (copied at capture, or sent straight from it in paused-send mode), device
//! state through the migration stream with `x-ignore-shared`.
//!
//! For copy-on-write capture ([`CaptureMode::Cow`]) QEMU is started with the preload library in
//! handoff mode: it hands a blocking write-protect userfaultfd on guest RAM to the agent (and keeps
//! no copy); the agent's [`CowEngine`] resolves the faults and keeps the dirty log from them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftvm_driver::WriteHistory;
use ftvm_model::{Epoch, Scope};

use super::capture::CaptureMode;
use super::cow::{CowCheckpoint, CowEngine, CowError, ProtectStats};
use super::link::DiskSync;
use super::vm::{
    first_capture_scope, CaptureStats, PreCopy, RestorePoint, Vm, VmError, VmLauncher,
};
use super::zero_pages;
use crate::dirty::{self, DirtyTracker, GuestRam, HandedUffd, HandoffListener};
use crate::disk::{DiskImage, DiskServer, DiskServerConfig};
use crate::qemu::{self, BootOptions, DiskConfig, ExitWatch, Qemu, QemuConfig};
use crate::replica::StagedCheckpoint;

/// How dirty pages are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracking {
    /// userfaultfd write-protection in QEMU (LD_PRELOAD) + PAGEMAP_SCAN from the agent.
    Pagemap,
    /// Compare page hashes with the last capture (slow; a cross-check).
    Hash,
}

impl std::str::FromStr for Tracking {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pagemap" => Ok(Tracking::Pagemap),
            "hash" => Ok(Tracking::Hash),
            o => Err(format!(
                "unknown dirty tracking {o:?} (expected pagemap or hash)"
            )),
        }
    }
}

/// A QEMU VM under protection.
pub struct QemuVm {
    qemu: Qemu,
    exit: ExitWatch,
    ram: Arc<GuestRam>,
    /// Dirty pages without copy-on-write (PAGEMAP_SCAN or hashes).
    tracker: Option<Box<dyn DirtyTracker + Send>>,
    /// Copy-on-write fault handling and dirty log (QEMU started for cow capture).
    cow: Option<CowEngine>,
    /// The checkpoint of the last cow capture, until the agent takes it.
    cow_checkpoint: Option<CowCheckpoint>,
    page_size: usize,
    first: bool,
    /// The epoch whose full capture finds RAM copied or scanned ahead, and how
    /// ([`Vm::start_pre_copy`]).
    pre_copy: Option<(Epoch, PreCopy)>,
    /// The VM's disk, served by this agent (declared after `qemu`: it stops after QEMU is
    /// gone, never under a running guest).
    disk: Option<DiskServer>,
    /// The snapshot of the last sync capture (full or catch-up), until the agent takes it.
    disk_sync: Option<DiskSync>,
    /// The last capture that wrote each page, since this QEMU started (catch-up captures).
    history: WriteHistory,
    /// The same for the disk's blocks (empty without a disk).
    disk_history: WriteHistory,
}

fn vm_err(what: &'static str) -> impl FnOnce(qemu::QemuError) -> VmError {
    move |source| VmError::qemu(what, source)
}

fn dirty_err(what: &'static str) -> impl FnOnce(dirty::DirtyError) -> VmError {
    move |source| VmError::Dirty { what, source }
}

fn cow_err(what: &'static str) -> impl FnOnce(CowError) -> VmError {
    move |source| VmError::Cow { what, source }
}

impl QemuVm {
    /// A VM over a started QEMU: dirty pages from `uffd` (handed over by QEMU for cow) if
    /// given, else by `tracking`.
    fn new(
        qemu: Qemu,
        tracking: Tracking,
        page_size: usize,
        uffd: Option<HandedUffd>,
        disk: Option<DiskServer>,
    ) -> Result<QemuVm, VmError> {
        let cfg = qemu.config();
        let ram = GuestRam::open(&cfg.ram_file, cfg.ram_bytes)
            .map(Arc::new)
            .map_err(dirty_err("map guest RAM"))?;
        let (tracker, cow): (Option<Box<dyn DirtyTracker + Send>>, _) = match (uffd, tracking) {
            (Some(uffd), _) => (
                None,
                Some(
                    CowEngine::start(uffd, ram.clone())
                        .map_err(cow_err("start copy-on-write capture"))?,
                ),
            ),
            (None, Tracking::Pagemap) => (
                Some(Box::new(
                    dirty::PagemapScanner::open(qemu.pid(), &cfg.ram_file)
                        .map_err(dirty_err("open PAGEMAP_SCAN tracker"))?,
                )),
                None,
            ),
            (None, Tracking::Hash) => (
                Some(Box::new(
                    dirty::HashTracker::open(&cfg.ram_file, cfg.ram_bytes)
                        .map_err(dirty_err("open hash tracker"))?,
                )),
                None,
            ),
        };
        // Fresh at boot and at restore alike: the model only catches up replicas made after
        // this VM started, whose sync holds everything written before (see `WriteHistory`).
        let history = WriteHistory::new(ram.pages());
        let disk_history = WriteHistory::new(disk.as_ref().map_or(0, DiskServer::blocks));
        Ok(QemuVm {
            exit: qemu.exit_watch(),
            qemu,
            history,
            disk_history,
            ram,
            tracker,
            cow,
            cow_checkpoint: None,
            page_size,
            first: true,
            pre_copy: None,
            disk,
            disk_sync: None,
        })
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.qemu.pid()
    }
}

impl QemuVm {
    /// While paused (QEMU's `stop` drained the guest's disk requests): the disk blocks of
    /// checkpoint `epoch` that `scope` names. Those written since the last capture (an
    /// ordinary epoch) are copied into `out` now, because the guest overwrites the image in
    /// place once it runs again. A sync's are only listed, and read from a snapshot as they are
    /// sent, while the VM runs (a few GiB would otherwise pause it for seconds and sit in
    /// memory): every block holding data for a full one (the backup zeroes its disk first),
    /// every block written after the base for a catch-up. Every capture stamps the blocks
    /// written since the last one into the disk's write history.
    fn capture_disk(
        &mut self,
        epoch: Epoch,
        scope: Scope,
        out: &mut StagedCheckpoint,
    ) -> Result<u64, VmError> {
        out.disk_indices.clear();
        out.disk_data.clear();
        self.disk_sync = None;
        let Some(disk) = &self.disk else {
            return Ok(0);
        };
        let dirty = disk.take_dirty();
        let blocks = match scope {
            Scope::Full => {
                // Stamped as an ordinary epoch: the history would list every block, while a
                // full sync sends only those holding data.
                self.disk_history.capture(epoch, Scope::Epoch, dirty);
                disk.image()
                    .data_blocks()
                    .map_err(|e| VmError::failed("find the disk's data blocks", e.to_string()))?
            }
            Scope::Since(_) => self.disk_history.capture(epoch, scope, dirty),
            Scope::Epoch => {
                out.disk_indices = self.disk_history.capture(epoch, scope, dirty);
                disk.read_blocks(&out.disk_indices, &mut out.disk_data)
                    .map_err(|e| VmError::failed("read dirty disk blocks", e.to_string()))?;
                return Ok(out.disk_indices.len() as u64);
            }
        };
        out.disk_indices.clone_from(&blocks);
        self.disk_sync = Some(DiskSync {
            snapshot: disk.snapshot(blocks),
            reader: disk.snapshot_reader(),
        });
        Ok(out.disk_indices.len() as u64)
    }

    /// The pages of checkpoint `epoch` for `scope` (already made full for a first capture), and
    /// what protecting them cost (cow engine). The dirty log is taken (and tracking re-armed)
    /// whatever the scope, and stamped into the write history; with `log`, it is also kept
    /// there (a pre-copied capture copies just those pages).
    fn capture_pages(
        &mut self,
        epoch: Epoch,
        scope: Scope,
        mode: CaptureMode,
        mut log: Option<&mut Vec<u64>>,
        nonzero: Option<&[u64]>,
    ) -> Result<(Vec<u64>, ProtectStats), VmError> {
        let all = scope == Scope::Full;
        let history = &mut self.history;
        let mut select = |logged: Vec<u64>| {
            if let Some(log) = log.as_deref_mut() {
                log.clone_from(&logged);
            }
            let Some(nonzero) = nonzero else {
                return history.capture(epoch, scope, logged);
            };
            // A full capture scanned ahead: the pages found non-zero, and every page written
            // since the last capture (which came before the scan), whatever it holds now.
            let mut written = logged.clone();
            written.sort_unstable();
            written.dedup();
            history.capture(epoch, scope, logged);
            zero_pages::union_sorted(nonzero, &written)
        };
        match (&self.cow, self.tracker.as_mut()) {
            (Some(engine), _) if mode == CaptureMode::Cow => {
                let (cp, st) = engine
                    .begin_with(all, select)
                    .map_err(cow_err("cow capture"))?;
                let pages = cp.indices().to_vec();
                self.cow_checkpoint = Some(cp);
                Ok((pages, st))
            }
            (Some(engine), _) => engine
                .rearm_with(all, select)
                .map_err(cow_err("dirty-page log")),
            (None, _) if mode == CaptureMode::Cow => Err(VmError::failed(
                "cow capture",
                "QEMU was not started for copy-on-write capture (no userfaultfd handed over)",
            )),
            (None, Some(tracker)) => {
                // The scan also re-arms tracking, so it runs even when everything is sent anyway.
                let dirty = tracker.collect().map_err(dirty_err("dirty-page scan"))?;
                Ok((select(dirty), ProtectStats::default()))
            }
            (None, None) => Err(VmError::failed("capture", "no dirty-page tracking")),
        }
    }
}

impl Vm for QemuVm {
    async fn prepare_pause(&mut self) -> Result<(), VmError> {
        if let Some(engine) = &self.cow {
            engine.protect_before_pause();
        }
        Ok(())
    }

    async fn pause(&mut self) -> Result<(), VmError> {
        self.qemu.stop().await.map_err(vm_err("QMP stop"))
    }

    async fn resume(&mut self) -> Result<(), VmError> {
        self.qemu.cont().await.map_err(vm_err("QMP cont"))
    }

    async fn capture(
        &mut self,
        epoch: Epoch,
        scope: Scope,
        mode: CaptureMode,
        out: &mut StagedCheckpoint,
    ) -> Result<CaptureStats, VmError> {
        let t0 = Instant::now();
        let scope = first_capture_scope(scope, self.first);
        // RAM copied or scanned ahead for this very capture (a buffer the agent marked as
        // such): only what was written since is left to take.
        let ahead = self
            .pre_copy
            .take()
            .filter(|&(e, _)| e == epoch && scope == Scope::Full && out.full)
            .filter(|_| out.epoch == epoch.0)
            .map(|(_, how)| how);
        let pre_copied = ahead == Some(PreCopy::Copy)
            && mode.copies_pages()
            && out.data.len() == out.indices.len() * self.page_size;
        let scanned = (ahead == Some(PreCopy::Scan) && !mode.copies_pages())
            .then(|| std::mem::take(&mut out.indices));
        let mut written = Vec::new();
        let log = pre_copied.then_some(&mut written);
        let (pages, protect) = self.capture_pages(epoch, scope, mode, log, scanned.as_deref())?;
        self.first = false;
        let t1 = Instant::now();
        if let Some(&p) = pages
            .iter()
            .chain(&written)
            .find(|&&p| p >= self.ram.pages())
        {
            return Err(VmError::PageOutOfRange {
                page: p,
                pages: self.ram.pages(),
            });
        }
        if pre_copied {
            // The non-zero pages are in the buffer; the pages written since are copied again
            // (or added, if they were zero then), whatever they hold now.
            let ram = &self.ram;
            zero_pages::merge_written(
                &mut out.indices,
                &mut out.data,
                self.page_size,
                &written,
                |p| ram.page(p),
            );
        } else {
            out.data.clear();
        }
        if mode.copies_pages() && !pre_copied {
            out.data.reserve(pages.len() * self.page_size);
            for &p in &pages {
                out.data
                    .extend_from_slice(self.ram.page(p).unwrap_or_default());
            }
        }
        if !pre_copied {
            out.indices = pages;
        }
        let t2 = Instant::now();
        let disk_blocks = self.capture_disk(epoch, scope, out)?;
        let t_disk = Instant::now();
        out.device = self
            .qemu
            .capture_device_state()
            .await
            .map_err(vm_err("device-state capture"))?;
        let t3 = Instant::now();
        Ok(CaptureStats {
            pages: out.indices.len() as u64,
            scan_us: (t1 - t0).as_micros() as u64,
            copy_us: (t2 - t1).as_micros() as u64,
            device_us: (t3 - t_disk).as_micros() as u64,
            disk_blocks,
            disk_us: (t_disk - t2).as_micros() as u64,
            early_protected: protect.early_pages,
            protected: protect.protected,
        })
    }

    fn start_pre_copy(&mut self, epoch: Epoch, mode: CaptureMode) -> Result<PreCopy, VmError> {
        self.pre_copy = None;
        let exact_tracker = self.tracker.as_ref().is_some_and(|t| t.logs_every_write());
        if mode.copies_pages() {
            // The cow engine re-arms only while paused; a hash tracker can miss a write.
            if self.cow.is_some() || !exact_tracker {
                return Ok(PreCopy::None);
            }
            // What the guest wrote so far in this epoch is stamped as the epoch's writes
            // (catch-ups of older replicas need them); what it writes from here on is in the
            // capture's log.
            self.capture_pages(epoch, Scope::Epoch, mode, None, None)?;
            self.first = false;
            self.pre_copy = Some((epoch, PreCopy::Copy));
            return Ok(PreCopy::Copy);
        }
        // Sent from guest RAM: a scan for zero pages needs no re-arm, the capture's log holds
        // every page written since the last capture, which came before the scan. Not before
        // the first capture (nothing logged the writes before it), nor with hashes (a page
        // written and written back between two captures looks clean).
        let logs_every_write = self.cow.is_some() || exact_tracker;
        if self.first || !logs_every_write {
            return Ok(PreCopy::None);
        }
        self.pre_copy = Some((epoch, PreCopy::Scan));
        Ok(PreCopy::Scan)
    }

    fn guest_ram(&self) -> Arc<GuestRam> {
        self.ram.clone()
    }

    fn take_cow(&mut self) -> Option<CowCheckpoint> {
        self.cow_checkpoint.take()
    }

    fn ram_digest(&mut self) -> Result<u64, VmError> {
        Ok(xxhash_rust::xxh3::xxh3_64(self.ram.as_slice()))
    }

    fn take_disk_sync(&mut self) -> Option<DiskSync> {
        self.disk_sync.take()
    }

    fn disk_digest(&mut self) -> Result<Option<u64>, VmError> {
        self.disk
            .as_ref()
            .map(|d| d.image().digest())
            .transpose()
            .map_err(|e| VmError::failed("digest of the disk", e.to_string()))
    }

    async fn kill(&mut self) {
        if let Err(e) = self.qemu.kill().await {
            tracing::error!(
                pid = self.qemu.pid(),
                error = %e,
                "killing QEMU failed; it may still run"
            );
        }
    }

    async fn died(&mut self) -> VmError {
        VmError::Exited(self.exit.ended().await)
    }
}

/// Starts the protected QEMU on the primary and the restored one at failover.
pub struct QemuLauncher {
    /// The machine (kernel, RAM size, network, accel…) as the primary runs it.
    pub base: QemuConfig,
    /// Directory for the restored QEMU's sockets and logs.
    pub restore_dir: PathBuf,
    /// Dirty-page tracking (without cow).
    pub tracking: Tracking,
    /// The LD_PRELOAD tracker library (required for [`Tracking::Pagemap`] and for cow).
    pub preload: Option<PathBuf>,
    /// Boot retries and timeout.
    pub boot: BootOptions,
    /// Page size.
    pub page_size: usize,
    /// The capture mode the agent uses: [`CaptureMode::Cow`] starts QEMU with the preload
    /// library in handoff mode, and dirty pages then come from write faults.
    pub capture: CaptureMode,
    /// The VM's disk image (raw) on this host, served by the agent to QEMU's NBD client; a
    /// restored VM runs on the replica disk its restore point names instead.
    pub disk: Option<PathBuf>,
}

/// Export name of the VM's disk on the agent's NBD socket.
const DISK_EXPORT: &str = "vda";

/// Serves `image` on `socket` and points `cfg` at it; the server must run before QEMU starts.
fn serve_disk(image: &Path, socket: PathBuf, cfg: &mut QemuConfig) -> Result<DiskServer, VmError> {
    let disk_err = |what| move |e: crate::disk::DiskError| VmError::failed(what, e.to_string());
    let image = DiskImage::open(image).map_err(disk_err("open the VM's disk image"))?;
    let server = DiskServer::start(image, socket, DiskServerConfig::new(DISK_EXPORT))
        .map_err(disk_err("serve the VM's disk"))?;
    cfg.disk = Some(DiskConfig {
        socket: server.socket().to_path_buf(),
        export: DISK_EXPORT.into(),
    });
    Ok(server)
}

/// How long a started QEMU may take to hand over its uffd (it does so while mapping RAM, before
/// the guest runs).
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(10);

impl QemuLauncher {
    /// The configuration with the preload library's environment; for cow, also the socket the
    /// uffd is handed to (next to QMP's), which the caller must listen on.
    fn with_tracking(&self, mut cfg: QemuConfig) -> Result<(QemuConfig, Option<PathBuf>), VmError> {
        let cow = self.capture == CaptureMode::Cow;
        if cow && self.tracking == Tracking::Hash {
            return Err(VmError::failed(
                "start QEMU",
                "cow capture takes its dirty log from write faults; it cannot use hash tracking",
            ));
        }
        let lib = match (&self.preload, self.tracking, cow) {
            (Some(lib), _, true) | (Some(lib), Tracking::Pagemap, false) => lib,
            (None, _, true) => {
                return Err(VmError::failed(
                    "start QEMU",
                    "cow capture needs the ftvm preload library (none configured)",
                ))
            }
            _ => return Ok((cfg, None)),
        };
        cfg.env
            .push(("LD_PRELOAD".into(), lib.display().to_string()));
        cfg.env
            .push(("FTVM_RAM_FILE".into(), cfg.ram_file.display().to_string()));
        if !cow {
            return Ok((cfg, None));
        }
        let sock = cfg.qmp_socket.with_file_name("uffd.sock");
        cfg.env
            .push((dirty::UFFD_MODE_ENV.into(), "handoff".into()));
        cfg.env
            .push((dirty::UFFD_SOCK_ENV.into(), sock.display().to_string()));
        Ok((cfg, Some(sock)))
    }
}

fn listen_for_uffd(sock: Option<&Path>) -> Result<Option<HandoffListener>, VmError> {
    sock.map(HandoffListener::bind)
        .transpose()
        .map_err(dirty_err("listen for QEMU's userfaultfd"))
}

fn take_uffd(listener: Option<&HandoffListener>, pid: u32) -> Result<Option<HandedUffd>, VmError> {
    listener
        .map(|l| l.take(pid, HANDOFF_TIMEOUT))
        .transpose()
        .map_err(dirty_err("take QEMU's userfaultfd"))
}

impl VmLauncher for QemuLauncher {
    type Vm = QemuVm;

    async fn boot(&mut self) -> Result<QemuVm, VmError> {
        let (mut cfg, sock) = self.with_tracking(self.base.clone())?;
        let disk = match &self.disk {
            Some(image) => Some(serve_disk(
                image,
                cfg.qmp_socket.with_file_name("disk.sock"),
                &mut cfg,
            )?),
            None => None,
        };
        // Listening before QEMU starts: it blocks in its RAM mmap until the handover is acked.
        let listener = listen_for_uffd(sock.as_deref())?;
        let booted = qemu::boot(&cfg, &self.boot).await.map_err(vm_err("boot"))?;
        // Each failed try was logged as it failed (`qemu::boot`).
        tracing::info!(
            pid = booted.qemu.pid(),
            boot_time = ?booted.boot_time,
            tries = booted.tries,
            "guest ready"
        );
        let mut q = booted.qemu;
        let uffd = take_uffd(listener.as_ref(), q.pid())?;
        drop(listener);
        qemu::enable_ignore_shared(q.qmp())
            .await
            .map_err(vm_err("enable x-ignore-shared"))?;
        let vm = QemuVm::new(q, self.tracking, self.page_size, uffd, disk)?;
        // Before any backup joins: the sync's full copy then runs at memory speed.
        vm.ram.populate().map_err(dirty_err("populate guest RAM"))?;
        Ok(vm)
    }

    async fn restore(&mut self, from: RestorePoint) -> Result<QemuVm, VmError> {
        let restored = self.start_restored(from).await;
        // The caller may try again; each failed start is worth a line in the log either way.
        if let Err(e) = &restored {
            tracing::warn!(error = %e, "starting the restored QEMU failed");
        }
        restored
    }
}

impl QemuLauncher {
    /// [`VmLauncher::restore`] without the log line.
    async fn start_restored(&mut self, from: RestorePoint) -> Result<QemuVm, VmError> {
        crate::secure_fs::private_dir(&self.restore_dir).map_err(|source| VmError::File {
            what: "create restore directory",
            source,
        })?;
        let (mut cfg, sock) =
            self.with_tracking(self.base.incoming(&from.ram_file, &self.restore_dir))?;
        let disk = match (&from.disk, &self.disk) {
            (Some(image), _) => Some(serve_disk(
                image,
                self.restore_dir.join("disk.sock"),
                &mut cfg,
            )?),
            (None, Some(_)) => {
                return Err(VmError::failed(
                    "restore",
                    "the VM has a disk but the restore point names no replica disk",
                ))
            }
            (None, None) => None,
        };
        let listener = listen_for_uffd(sock.as_deref())?;
        let mut q = Qemu::spawn_incoming(cfg)
            .await
            .map_err(vm_err("start the restore QEMU"))?;
        let uffd = take_uffd(listener.as_ref(), q.pid())?;
        drop(listener);
        q.restore_device_state(&from.device)
            .await
            .map_err(vm_err("restore device state"))?;
        let vm = QemuVm::new(q, self.tracking, self.page_size, uffd, disk)?;
        // The next backup's full copy reads all of RAM; fault the mapping in meanwhile, off the
        // takeover's path (the replica's pages are in memory already: minor faults only).
        let ram = vm.ram.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = ram.populate() {
                tracing::warn!(error = %e, "populating the restored guest RAM mapping");
            }
        });
        Ok(vm)
    }
}

/// Waits for `path` to exist (a socket another process creates), up to `timeout`.
pub async fn wait_for_path(path: &Path, timeout: Duration) -> bool {
    let t0 = Instant::now();
    while !path.exists() {
        if t0.elapsed() > timeout {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}
