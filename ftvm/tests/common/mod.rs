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

/// What one `ftvm demo` run left: its exit, its output and its JSON summary.
pub struct DemoRun {
    /// The demo exited 0.
    pub ok: bool,
    /// Its standard output.
    pub stdout: String,
    /// The `--summary` file (Null if the demo wrote none).
    pub summary: serde_json::Value,
    /// Its work directory (logs, metrics, disks).
    pub work: PathBuf,
}

/// Runs `ftvm demo` on the small guest with a 128 MiB VM in namespaces `<prefix>*` on
/// `subnet`, plus `extra` arguments; its work directory is named after `name`.
pub fn run_demo(name: &str, prefix: &str, subnet: u8, extra: &[&str]) -> DemoRun {
    let work = std::env::temp_dir().join(format!("ftvm-test-{name}"));
    let summary = work.with_extension("json");
    let _ = std::fs::remove_file(&summary);
    let out = Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .args(["demo", "--guest-dir"])
        .arg(guest_dir())
        .arg("--work-dir")
        .arg(&work)
        .arg("--summary")
        .arg(&summary)
        .args(["--prefix", prefix, "--subnet", &subnet.to_string()])
        .args(["--ram-mb", "128"])
        .args(extra)
        .output()
        .expect("running ftvm demo");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let summary = std::fs::read(&summary)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    DemoRun {
        ok: out.status.success(),
        stdout,
        summary,
        work,
    }
}

/// [`run_demo`] that must succeed and pass the journals' invariant check; returns the summary
/// and the work directory.
pub fn passing_demo(
    name: &str,
    prefix: &str,
    subnet: u8,
    extra: &[&str],
) -> (serde_json::Value, PathBuf) {
    let run = run_demo(name, prefix, subnet, extra);
    assert!(
        run.ok,
        "ftvm demo {name} failed; logs in {}",
        run.work.display()
    );
    let s = run.summary;
    // The hosts' journals went through the simulator's invariant checkers.
    assert_eq!(s["invariants"]["passed"], true, "{name}: {s}");
    assert!(
        run.stdout.contains("== invariants: pass demo"),
        "{}",
        run.stdout
    );
    (s, run.work)
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
