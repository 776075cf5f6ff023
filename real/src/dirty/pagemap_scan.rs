//! Dirty pages of QEMU's guest RAM from outside QEMU: the `PAGEMAP_SCAN` ioctl (Linux 6.7+) on
//! `/proc/<pid>/pagemap` reports the pages written since they were last write-protected and
//! write-protects them again, in one call. It relies on the preload library having registered
//! a `UFFD_FEATURE_WP_ASYNC` userfaultfd on the RAM mapping inside QEMU (docs/ARCHITECTURE.md,
//! Dirty pages).
//!
//! Debian 12's headers lack the interface, so the struct and constants are defined here.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::maps::{ram_vmas, RamVma};
use super::{page_size, DirtyError, DirtyPages, DirtyTracker};

/// `struct page_region` (uapi/linux/fs.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `struct pm_scan_arg` (uapi/linux/fs.h, 96 bytes).
#[repr(C)]
#[derive(Debug, Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong =
    ((3u64 << 30) | ((std::mem::size_of::<PmScanArg>() as u64) << 16) | ((b'f' as u64) << 8) | 16)
        as libc::c_ulong;
/// Write-protect the pages reported (re-arms tracking for the next epoch).
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail with EPERM on a range without a WP_ASYNC uffd instead of silently reporting nothing.
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// Written since last write-protected (pages never touched count as written).
const PAGE_IS_WRITTEN: u64 = 1 << 1;

/// Regions returned per ioctl; more mean another ioctl from where the walk stopped.
const REGIONS_PER_CALL: usize = 4096;

/// Counters of the last scan (for metrics and the benchmark).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// ioctl calls made.
    pub ioctls: u32,
    /// Regions the kernel returned.
    pub regions: u64,
}

/// Tracks QEMU's guest RAM through `/proc/<pid>/pagemap`.
#[derive(Debug)]
pub struct PagemapScanner {
    pid: u32,
    ram_file: PathBuf,
    pagemap: File,
    vmas: Vec<RamVma>,
    pages: u64,
    page_size: u64,
    buf: Vec<PageRegion>,
    last: ScanStats,
}

impl PagemapScanner {
    /// Finds the RAM file's shared mapping(s) in process `pid` and opens its pagemap read-only
    /// (enough for PAGEMAP_SCAN, which also write-protects). Call after QEMU has mapped its RAM.
    pub fn open(pid: u32, ram_file: &Path) -> Result<PagemapScanner, DirtyError> {
        let bytes = std::fs::metadata(ram_file)
            .map_err(DirtyError::io("stat RAM file", ram_file))?
            .len();
        let vmas = ram_vmas(pid, ram_file)?;
        let path = format!("/proc/{pid}/pagemap");
        let pagemap = File::open(&path).map_err(DirtyError::io("open", path.as_str()))?;
        let page_size = page_size() as u64;
        Ok(PagemapScanner {
            pid,
            ram_file: ram_file.to_path_buf(),
            pagemap,
            vmas,
            pages: bytes / page_size,
            page_size,
            buf: vec![PageRegion::default(); REGIONS_PER_CALL],
            last: ScanStats::default(),
        })
    }

    /// The process scanned.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The RAM file's mappings in that process.
    pub fn mappings(&self) -> &[RamVma] {
        &self.vmas
    }

    /// Counters of the last [`DirtyTracker::scan`].
    pub fn last_stats(&self) -> ScanStats {
        self.last
    }

    /// Scans and re-protects one address range, appending file page ranges to `out`.
    fn scan_vma(
        &mut self,
        vma: RamVma,
        out: &mut Vec<std::ops::Range<u64>>,
    ) -> Result<(), DirtyError> {
        // Only the part of the mapping that lies inside the file is guest RAM.
        let file_end = self.pages * self.page_size;
        if vma.offset >= file_end {
            return Ok(());
        }
        let end = vma.end.min(vma.start + (file_end - vma.offset));
        let first_page = vma.offset / self.page_size;
        let mut start = vma.start;
        while start < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start,
                end,
                vec: self.buf.as_mut_ptr() as u64,
                vec_len: self.buf.len() as u64,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..PmScanArg::default()
            };
            // SAFETY: PAGEMAP_SCAN reads `arg` and writes `walk_end` into it and at most
            // `vec_len` `page_region`s into `buf`, which is that long and outlives the call.
            let n = unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
            self.last.ioctls += 1;
            if n < 0 {
                return Err(self.ioctl_error(std::io::Error::last_os_error()));
            }
            let n = n as usize;
            self.last.regions += n as u64;
            for r in &self.buf[..n.min(self.buf.len())] {
                let a = r.start.max(vma.start).min(end);
                let b = r.end.max(vma.start).min(end);
                out.push(
                    first_page + (a - vma.start) / self.page_size
                        ..first_page + (b - vma.start).div_ceil(self.page_size),
                );
            }
            // A full buffer means the walk stopped early: go on from where it stopped. (With
            // fewer regions the walk finished, even if walk_end lags behind: docs/ARCHITECTURE.md,
            // Dirty pages.)
            if n < self.buf.len() || arg.walk_end >= end {
                break;
            }
            if arg.walk_end <= start {
                // Never seen; stopping here could miss pages, so say so instead.
                return Err(self.ioctl_error(std::io::Error::other(format!(
                    "walk made no progress at {start:#x} with a full buffer"
                ))));
            }
            start = arg.walk_end;
        }
        Ok(())
    }

    fn ioctl_error(&self, e: std::io::Error) -> DirtyError {
        match e.raw_os_error() {
            Some(libc::EPERM) => DirtyError::NotTracked { pid: self.pid },
            Some(libc::ENOTTY) => DirtyError::Unsupported(e),
            _ => DirtyError::io("PAGEMAP_SCAN of", format!("/proc/{}/pagemap", self.pid))(e),
        }
    }
}

impl DirtyTracker for PagemapScanner {
    fn logs_every_write(&self) -> bool {
        // Each page's write-protection is cleared by its first write and re-armed by the scan
        // that reports it, page by page atomically.
        true
    }

    fn scan(&mut self) -> Result<DirtyPages, DirtyError> {
        self.last = ScanStats::default();
        let mut ranges = Vec::new();
        for vma in self.vmas.clone() {
            self.scan_vma(vma, &mut ranges)?;
        }
        Ok(DirtyPages::from_ranges(ranges))
    }

    fn pages(&self) -> u64 {
        self.pages
    }

    fn describe(&self) -> String {
        format!(
            "PAGEMAP_SCAN of process {} ({})",
            self.pid,
            self.ram_file.display()
        )
    }
}
