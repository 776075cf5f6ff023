//! The VM-disk options of `ftvm demo` and `ftvm bench e2e`: whether the protected VM has a
//! disk, what it starts from, and whether the guest writes to it.

use std::path::PathBuf;

use anyhow::bail;

use crate::deploy::DeployDisk;

/// `--disk-image`, `--disk-mb`, `--disk-write`.
#[derive(clap::Args, Debug, Clone)]
pub struct DiskArgs {
    /// Give the VM this disk: a raw image the primary's copy starts from (the image itself is
    /// never written; the database guest's `disk.raw`, for example).
    #[arg(long, conflicts_with = "disk_mb")]
    pub disk_image: Option<PathBuf>,
    /// Give the VM an empty disk of this many MiB.
    #[arg(long)]
    pub disk_mb: Option<u64>,
    /// The small guest's disk writer: 4 KiB blocks per second, or `max` (needs a disk).
    #[arg(long)]
    pub disk_write: Option<String>,
}

impl DiskArgs {
    /// The deployment's disk, if any.
    pub fn deploy_disk(&self) -> anyhow::Result<Option<DeployDisk>> {
        if let Some(rate) = &self.disk_write {
            if rate != "max" && rate.parse::<u64>().is_err() {
                bail!("--disk-write {rate:?}: a number of blocks per second or `max`");
            }
        }
        match (&self.disk_image, self.disk_mb) {
            (None, None) if self.disk_write.is_some() => {
                bail!("--disk-write needs a disk (--disk-mb or --disk-image)")
            }
            (None, None) => Ok(None),
            (_, Some(0)) => bail!("--disk-mb must be at least 1"),
            (source, mb) => Ok(Some(DeployDisk {
                source: source.clone(),
                bytes: mb.unwrap_or(0) << 20,
                guest_write: self.disk_write.clone(),
            })),
        }
    }
}
