//! Shared pieces of the real-host test suites.

#![allow(dead_code)] // each test file uses a different subset

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds (or reuses the cached) guest and returns its directory.
pub fn guest_dir() -> PathBuf {
    let out = Command::new("bash")
        .arg(repo().join("real/guest/build.sh"))
        .output()
        .expect("running real/guest/build.sh");
    assert!(
        out.status.success(),
        "guest build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("build.sh printed its directory")
            .trim(),
    )
}

/// Builds (or reuses the cached) database guest (`real/guest/build-db.sh`: MariaDB on a raw
/// disk image) and returns its directory.
pub fn db_guest_dir() -> PathBuf {
    let out = Command::new("bash")
        .arg(repo().join("real/guest/build-db.sh"))
        .output()
        .expect("running real/guest/build-db.sh");
    assert!(
        out.status.success(),
        "database guest build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("build-db.sh printed its directory")
            .trim(),
    );
    assert!(
        dir.join("disk.raw").is_file(),
        "{} has no disk.raw",
        dir.display()
    );
    dir
}
