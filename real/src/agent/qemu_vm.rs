//! The agent's VM backed by a stock QEMU: pause/resume over QMP, dirty pages from the
//! LD_PRELOAD + PAGEMAP_SCAN tracker (or the hash-diff cross-check), page contents read from the
//! shared RAM file (copied at capture, or sent straight from it in paused-send mode), device
//! state through the migration stream with `x-ignore-shared`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::capture::CaptureMode;
use super::vm::{CaptureStats, RestorePoint, Vm, VmError, VmLauncher};
use crate::dirty::{self, DirtyTracker, GuestRam};
use crate::qemu::{self, BootOptions, ExitWatch, Qemu, QemuConfig};
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
    tracker: Box<dyn DirtyTracker + Send>,
    page_size: usize,
    first: bool,
}

fn vm_err(what: &'static str) -> impl FnOnce(qemu::QemuError) -> VmError {
    move |e| {
        if e.is_gone() {
            VmError::Died(e.to_string())
        } else {
            VmError::failed(what, e)
        }
    }
}

impl QemuVm {
    fn new(qemu: Qemu, tracking: Tracking, page_size: usize) -> Result<QemuVm, VmError> {
        let cfg = qemu.config();
        let ram = GuestRam::open(&cfg.ram_file, cfg.ram_bytes)
            .map(Arc::new)
            .map_err(|e| VmError::failed("map guest RAM", e))?;
        let tracker: Box<dyn DirtyTracker + Send> = match tracking {
            Tracking::Pagemap => Box::new(
                dirty::PagemapScanner::open(qemu.pid(), &cfg.ram_file)
                    .map_err(|e| VmError::failed("open PAGEMAP_SCAN tracker", e))?,
            ),
            Tracking::Hash => Box::new(
                dirty::HashTracker::open(&cfg.ram_file, cfg.ram_bytes)
                    .map_err(|e| VmError::failed("open hash tracker", e))?,
            ),
        };
        Ok(QemuVm {
            exit: qemu.exit_watch(),
            qemu,
            ram,
            tracker,
            page_size,
            first: true,
        })
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.qemu.pid()
    }
}

impl Vm for QemuVm {
    async fn pause(&mut self) -> Result<(), VmError> {
        self.qemu.stop().await.map_err(vm_err("QMP stop"))
    }

    async fn resume(&mut self) -> Result<(), VmError> {
        self.qemu.cont().await.map_err(vm_err("QMP cont"))
    }

    async fn capture(
        &mut self,
        full: bool,
        mode: CaptureMode,
        out: &mut StagedCheckpoint,
    ) -> Result<CaptureStats, VmError> {
        let t0 = Instant::now();
        // The scan also re-arms tracking, so it runs even when everything is sent anyway.
        let dirty = self
            .tracker
            .collect()
            .map_err(|e| VmError::failed("dirty-page scan", e))?;
        let pages: Vec<u64> = if full || self.first {
            (0..self.ram.pages()).collect()
        } else {
            dirty
        };
        self.first = false;
        let t1 = Instant::now();
        if let Some(&p) = pages.iter().find(|&&p| p >= self.ram.pages()) {
            return Err(VmError::failed("capture", format!("page {p} out of range")));
        }
        out.data.clear();
        if mode.copies_pages() {
            out.data.reserve(pages.len() * self.page_size);
            for &p in &pages {
                out.data
                    .extend_from_slice(self.ram.page(p).unwrap_or_default());
            }
        }
        out.indices = pages;
        let t2 = Instant::now();
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
            device_us: (t3 - t2).as_micros() as u64,
        })
    }

    fn guest_ram(&self) -> Arc<GuestRam> {
        self.ram.clone()
    }

    fn ram_digest(&mut self) -> Result<u64, VmError> {
        Ok(xxhash_rust::xxh3::xxh3_64(self.ram.as_slice()))
    }

    async fn kill(&mut self) {
        let _ = self.qemu.kill().await;
    }

    async fn died(&mut self) -> VmError {
        let st = self.exit.ended().await;
        VmError::Died(format!("QEMU exited on its own ({st})"))
    }
}

/// Starts the protected QEMU on the primary and the restored one at failover.
pub struct QemuLauncher {
    /// The machine (kernel, RAM size, network, accel…) as the primary runs it.
    pub base: QemuConfig,
    /// Directory for the restored QEMU's sockets and logs.
    pub restore_dir: PathBuf,
    /// Dirty-page tracking.
    pub tracking: Tracking,
    /// The LD_PRELOAD tracker library (required for [`Tracking::Pagemap`]).
    pub preload: Option<PathBuf>,
    /// Boot retries and timeout.
    pub boot: BootOptions,
    /// Page size.
    pub page_size: usize,
}

impl QemuLauncher {
    fn with_tracking(&self, mut cfg: QemuConfig) -> QemuConfig {
        if let (Tracking::Pagemap, Some(lib)) = (self.tracking, &self.preload) {
            cfg.env
                .push(("LD_PRELOAD".into(), lib.display().to_string()));
            cfg.env
                .push(("FTVM_RAM_FILE".into(), cfg.ram_file.display().to_string()));
        }
        cfg
    }
}

impl VmLauncher for QemuLauncher {
    type Vm = QemuVm;

    async fn boot(&mut self) -> Result<QemuVm, VmError> {
        let cfg = self.with_tracking(self.base.clone());
        let booted = qemu::boot(&cfg, &self.boot)
            .await
            .map_err(|e| VmError::failed("boot", e))?;
        for (i, r) in booted.retry_reasons.iter().enumerate() {
            eprintln!("ftvm: boot try {} failed and was retried: {r}", i + 1);
        }
        eprintln!(
            "ftvm: guest ready after {:?} ({} tries)",
            booted.boot_time, booted.tries
        );
        let mut q = booted.qemu;
        qemu::enable_ignore_shared(q.qmp())
            .await
            .map_err(vm_err("enable x-ignore-shared"))?;
        QemuVm::new(q, self.tracking, self.page_size)
    }

    async fn restore(&mut self, from: RestorePoint) -> Result<QemuVm, VmError> {
        std::fs::create_dir_all(&self.restore_dir)
            .map_err(|e| VmError::failed("create restore directory", e))?;
        let cfg = self.with_tracking(self.base.incoming(&from.ram_file, &self.restore_dir));
        let mut q = Qemu::spawn_incoming(cfg)
            .await
            .map_err(|e| VmError::failed("start the restore QEMU", e))?;
        q.restore_device_state(&from.device)
            .await
            .map_err(vm_err("restore device state"))?;
        QemuVm::new(q, self.tracking, self.page_size)
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
