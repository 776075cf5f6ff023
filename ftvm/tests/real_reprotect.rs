//! Issue 12's real-QEMU test: a guest rewriting 5,000 pages/s is protected, then in one run
//! (one deployment, through `ftvm bench sync`) the backup agent is SIGKILLed and restarted on
//! its replica, then SIGKILLed and restarted empty, then the replication link is cut for 2 s.
//! Each time the pair must be protected again; the full sync must leave zero pages out and the
//! catch-ups move far less than RAM; the client must lose nothing and never wait long.
//!
//! RAM: `FTVM_REPROTECT_RAM_MB` (default 256, which keeps the test near a minute in CI; the
//! issue's 1 GiB figures come from running it with 1024). Capture: `FTVM_REPROTECT_CAPTURE`
//! (default cow).
//!
//! cow starts QEMU with the preload library, which the agents look for beside the test's
//! binaries: build it first (`cargo build -p ftvm-preload`) or point `FTVM_PRELOAD` at it;
//! without it the backup agent exits at start and the test fails saying so.

mod common;

use std::process::Command;

/// Re-protection, any kind, must end within this: a full sync of 1 GiB takes a few seconds
/// here (docs/bench/sync.md); ten times that means something waited on a timeout.
const REPROTECT_LIMIT_MS: f64 = 30_000.0;

/// The client's longest pause from restart (or repair) to protected. The primary runs degraded
/// with its output flowing while a sync's pre-copy rounds go out, and holds output only for the
/// last catch-up epoch: a pause is a few 25 ms epochs plus that epoch's commit, ~50 ms measured
/// (docs/bench/sync.md), and the target is 200 ms at 1 GiB. 500 ms leaves room for a
/// loaded CI machine, yet a sync that holds output while it copies all of RAM (1.6 s at 256 MiB
/// before issue 12) fails it.
const PAUSE_LIMIT_MS: f64 = 500.0;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

#[test]
fn link_cut_and_backup_restarts_reprotect_by_catch_up_then_full_sync() {
    let ram_mb = env_or("FTVM_REPROTECT_RAM_MB", "256");
    let capture = env_or("FTVM_REPROTECT_CAPTURE", "cow");
    let out = std::env::temp_dir().join("ftvm-test-reprotect");
    let _ = std::fs::remove_dir_all(&out);
    let t0 = std::time::Instant::now();
    let run = Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .args(["bench", "sync", "--guest-dir"])
        .arg(common::guest_dir())
        .arg("--out")
        .arg(&out)
        .arg("--work-dir")
        .arg(out.join("work"))
        .args([
            "--name",
            "reprotect",
            "--ram-mb",
            &ram_mb,
            "--capture",
            &capture,
        ])
        // The cut last: a backup that reaches the witness before the primary's drop takes over
        // (a race the protocol allows), and the bench then skips the deployment's later cases.
        .args(["--cases", "ftvm-catch-up,ftvm-full,ftvm-link-cut"])
        .args(["--runs", "1", "--dirty-pages", "5000", "--cut-ms", "2000"])
        .args(["--window-s", "12", "--prefix", "ftr90", "--subnet", "90"])
        .output()
        .expect("running ftvm bench sync");
    let stdout = String::from_utf8_lossy(&run.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    // Exit 0: the client lost no reply and the journals passed the invariant checks.
    assert!(run.status.success(), "ftvm bench sync failed");
    assert!(stdout.contains("== invariants: pass"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("reprotect.json")).unwrap()).unwrap();
    let case = |name: &str| {
        report["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["case"] == name)
            .unwrap_or_else(|| panic!("no {name} in {report}"))["median"]
            .clone()
    };
    let (cut, restart, full) = (
        case("ftvm-link-cut"),
        case("ftvm-catch-up"),
        case("ftvm-full"),
    );
    // A takeover during the cut re-protects too, by a full sync of the deposed primary.
    let cut_took_over = cut["took_over"] == true;
    let cut_kind = if cut_took_over { "full" } else { "catch-up" };
    for (name, c, kind) in [
        ("link cut", &cut, cut_kind),
        ("restart on the replica", &restart, "catch-up"),
        ("restart empty", &full, "full"),
    ] {
        assert_eq!(c["sync_kind"], kind, "{name}: {c}");
        assert_eq!(c["client_lost"], 0, "{name}: {c}");
        let ms = c["time_ms"].as_f64().unwrap();
        assert!(
            ms < REPROTECT_LIMIT_MS,
            "{name}: re-protected after {ms} ms"
        );
        let pause = c["client_pause_ms"].as_f64().unwrap();
        assert!(
            pause < PAUSE_LIMIT_MS,
            "{name}: the client waited {pause} ms during the re-protection"
        );
    }
    let full_bytes = full["bytes"].as_u64().unwrap();
    let ram_bytes = ram_mb.parse::<u64>().unwrap() << 20;
    // Zero pages are not sent: this guest has touched well under its RAM.
    assert!(
        full_bytes < ram_bytes,
        "a full sync moved {full_bytes} bytes, all of RAM: zero pages were sent"
    );
    let mut catch_ups = vec![("restart on the replica", &restart)];
    if !cut_took_over {
        catch_ups.push(("link cut", &cut));
    }
    for (name, c) in catch_ups {
        let b = c["bytes"].as_u64().unwrap();
        assert!(
            b < ram_bytes / 4,
            "{name}: catch-up moved {b} bytes, not far below RAM's {ram_bytes}"
        );
    }
    eprintln!(
        "{ram_mb} MiB, {capture}, 5000 pages/s: link cut → {cut_kind} {} B in {} ms; restart \
         on replica → catch-up {} B in {} ms; restart empty → full {} B in {} ms; longest \
         client pauses {} / {} / {} ms; takeover during the cut: {cut_took_over}; test took \
         {:.0} s",
        cut["bytes"],
        cut["time_ms"],
        restart["bytes"],
        restart["time_ms"],
        full["bytes"],
        full["time_ms"],
        cut["client_pause_ms"],
        restart["client_pause_ms"],
        full["client_pause_ms"],
        t0.elapsed().as_secs_f64()
    );
}
