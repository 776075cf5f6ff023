//! The guest options `ftvm primary|backup` and `ftvm vm` share, and how they shape the QEMU
//! configuration and the guest's kernel command line.

use std::path::PathBuf;

use anyhow::Context;
use ftvm_real::qemu::{Accel, GuestImage, QemuConfig};

/// Which guest to boot, and how.
#[derive(clap::Args, Debug)]
pub struct GuestArgs {
    /// Directory with the guest's `vmlinuz`, `initrd.img` and `cmdline` (real/guest/build.sh).
    #[arg(long)]
    pub guest_dir: PathBuf,
    /// Guest RAM in MiB (the same on every host of a protected VM).
    #[arg(long, default_value_t = 256)]
    pub ram_mb: u64,
    /// QEMU accelerator: tcg, or kvm on hosts whose /dev/kvm runs stock guests.
    #[arg(long, default_value = "tcg")]
    pub accel: String,
    /// The VM's MAC address (the same on every host of a protected VM).
    #[arg(long, default_value = "52:54:00:f7:00:0a")]
    pub mac: String,
    /// The VM's address and prefix, passed to the guest on its kernel command line.
    #[arg(long)]
    pub vm_ip: Option<String>,
    /// Pages per second the guest's dirtying workload rewrites (0: idle).
    #[arg(long, default_value_t = 0)]
    pub dirty_pages: u64,
    /// The guest's disk writer: 4 KiB blocks per second it writes to its disk, or `max`
    /// (`ftvm.diskwrite=` on the kernel command line; needs a VM with a disk).
    #[arg(long, value_parser = parse_disk_write)]
    pub disk_write: Option<String>,
}

impl GuestArgs {
    /// `--accel`, parsed.
    pub fn accel(&self) -> anyhow::Result<Accel> {
        self.accel.parse().context("--accel")
    }

    /// The guest image in `--guest-dir`.
    pub fn image(&self) -> anyhow::Result<GuestImage> {
        GuestImage::from_dir(&self.guest_dir).context("reading the guest directory")
    }

    /// Puts the guest's kernel, command line and these options into `cfg`.
    pub fn apply(&self, guest: &GuestImage, accel: Accel, cfg: &mut QemuConfig) {
        guest.apply(cfg);
        // Without a TSC frequency given, the guest kernel calibrates the TSC against the PIT;
        // under TCG on a busy host that fails, and most such boots then hang with no timer tick
        // (seen here in 4 of 5 boots; with the frequency given, 9 of 9 booted).
        if !cfg.append.contains("tsc_early_khz") {
            cfg.append.push_str(" tsc_early_khz=2000000");
        }
        cfg.accel = accel;
        if let Some(ip) = &self.vm_ip {
            cfg.append.push_str(&format!(" ftvm.ip={ip}"));
        }
        if let Some(rate) = &self.disk_write {
            cfg.append.push_str(&format!(" ftvm.diskwrite={rate}"));
        }
        if self.dirty_pages > 0 {
            cfg.append
                .push_str(&format!(" ftvm.dirty={}", self.dirty_pages));
        }
    }
}

/// `--disk-write`: a number of blocks per second or `max` (it goes onto the kernel command
/// line, so nothing else is let through).
fn parse_disk_write(s: &str) -> Result<String, String> {
    if s == "max" || s.parse::<u64>().is_ok() {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is neither a number of blocks per second nor `max`"
        ))
    }
}
