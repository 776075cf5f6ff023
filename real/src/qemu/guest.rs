//! The test guest built by `real/guest/build.sh`: a directory with `vmlinuz`, `initrd.img` and
//! `cmdline`, whose path is the script's last line of output.

use std::path::{Path, PathBuf};

use super::config::QemuConfig;
use super::error::{QemuError, Result};

/// A bootable guest: kernel, initramfs and kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Kernel command line (from the `cmdline` file, trimmed).
    pub cmdline: String,
}

impl GuestImage {
    /// Reads a guest directory (`vmlinuz`, `initrd.img`, `cmdline`).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<GuestImage> {
        let dir = dir.as_ref();
        let kernel = dir.join("vmlinuz");
        let initrd = dir.join("initrd.img");
        for (what, p) in [("guest kernel", &kernel), ("guest initrd", &initrd)] {
            if !p.is_file() {
                return Err(QemuError::FileNotFound {
                    what,
                    path: p.clone(),
                });
            }
        }
        let cmdline_path = dir.join("cmdline");
        let cmdline = std::fs::read_to_string(&cmdline_path)
            .map_err(|e| QemuError::io(format!("read {cmdline_path:?}"), e))?
            .trim()
            .to_owned();
        Ok(GuestImage {
            kernel,
            initrd,
            cmdline,
        })
    }

    /// Runs the guest build script (cached by the script itself) and reads the directory named
    /// on its last line of output.
    pub async fn build(script: impl AsRef<Path>) -> Result<GuestImage> {
        let script = script.as_ref();
        if !script.is_file() {
            return Err(QemuError::FileNotFound {
                what: "guest build script",
                path: script.to_path_buf(),
            });
        }
        let out = tokio::process::Command::new("bash")
            .arg(script)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .output()
            .await
            .map_err(|e| QemuError::io(format!("run {script:?}"), e))?;
        if !out.status.success() {
            return Err(QemuError::InvalidConfig(format!(
                "guest build script {script:?} failed: {}",
                out.status
            )));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let dir = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .ok_or_else(|| {
                QemuError::InvalidConfig(format!("guest build script {script:?} printed nothing"))
            })?;
        GuestImage::from_dir(dir.trim())
    }

    /// Points a configuration at this guest.
    pub fn apply(&self, config: &mut QemuConfig) {
        config.kernel = self.kernel.clone();
        config.initrd = Some(self.initrd.clone());
        config.append = self.cmdline.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_guest_dir_and_names_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let e = GuestImage::from_dir(dir.path()).unwrap_err();
        assert!(e.to_string().contains("vmlinuz"), "{e}");
        std::fs::write(dir.path().join("vmlinuz"), b"k").unwrap();
        std::fs::write(dir.path().join("initrd.img"), b"i").unwrap();
        std::fs::write(dir.path().join("cmdline"), "console=ttyS0 quiet\n").unwrap();
        let g = GuestImage::from_dir(dir.path()).unwrap();
        assert_eq!(g.cmdline, "console=ttyS0 quiet");
        let mut c = QemuConfig::new("/x", "/dev/shm/r", 1 << 20, dir.path());
        g.apply(&mut c);
        assert_eq!(c.kernel, dir.path().join("vmlinuz"));
        assert_eq!(c.append, "console=ttyS0 quiet");
    }
}
