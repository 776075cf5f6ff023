//! Shared pieces of the tests that boot the real test guest under QEMU.

#![allow(dead_code)] // each test file uses a different subset

use std::path::{Path, PathBuf};

use ftvm_real::qemu::GuestImage;

/// One guest boot at a time in a test binary (two TCG guests on a 2-core host hang more often).
pub static BOOT_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A RAM file in /dev/shm removed when the test ends (pass or fail).
pub struct ShmFile(pub PathBuf);

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The test guest, built (or found in its cache) once per test binary.
pub async fn guest() -> GuestImage {
    static GUEST: tokio::sync::OnceCell<GuestImage> = tokio::sync::OnceCell::const_new();
    GUEST
        .get_or_init(|| async {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build.sh");
            GuestImage::build(&script)
                .await
                .expect("building the test guest with real/guest/build.sh")
        })
        .await
        .clone()
}
