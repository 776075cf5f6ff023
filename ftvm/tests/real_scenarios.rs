//! Scenario files that the simulator runs, run again on real hosts (QEMU in network namespaces)
//! through `ftvm scenario run --real`. Faults real hosts cannot produce here are skipped and
//! listed by the runner; these scenarios use only crashes, restarts, cuts and isolation.

mod common;

use std::process::Command;

use common::{guest_dir, repo};

/// Real deployments share the namespace names and the machine's two cores: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run_real(name: &str) -> serde_json::Value {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let summary = std::env::temp_dir().join(format!("ftvm-scenario-{name}.json"));
    let _ = std::fs::remove_file(&summary);
    let out = Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .args(["scenario", "run"])
        .arg(repo().join("scenarios").join(format!("{name}.toml")))
        .arg("--real")
        .arg("--guest-dir")
        .arg(guest_dir())
        .arg("--work-dir")
        .arg(std::env::temp_dir().join(format!("ftvm-scenario-{name}")))
        .arg("--summary")
        .arg(&summary)
        .output()
        .expect("running ftvm scenario");
    eprintln!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "scenario {name} failed on real hosts");
    serde_json::from_slice(&std::fs::read(&summary).expect("summary")).unwrap()
}

#[test]
fn primary_crash_mid_epoch_on_real_hosts() {
    let s = run_real("primary-crash-mid-epoch");
    assert_eq!(s["client"]["lost"], 0);
    assert!(s["failures"].as_array().unwrap().is_empty());
}

#[test]
fn link_cut_with_both_alive_on_real_hosts() {
    let s = run_real("link-cut");
    assert_eq!(s["client"]["lost"], 0);
    assert!(s["failures"].as_array().unwrap().is_empty());
}

#[test]
fn primary_isolated_on_real_hosts() {
    let s = run_real("primary-isolated");
    assert_eq!(s["client"]["lost"], 0);
    assert!(s["failures"].as_array().unwrap().is_empty());
}
