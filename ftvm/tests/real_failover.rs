//! The real thing: QEMU guests protected by ftvm agents in network namespaces (root, TCG), driven
//! by a client over one TCP connection, through `ftvm demo`. Each run boots the guest, protects
//! it, kills a host with SIGKILL and checks what the client saw.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

/// Real deployments share the namespace names and the machine's two cores: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn demo(name: &str, subnet: u8, extra: &[&str]) -> serde_json::Value {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    common::passing_demo(name, &format!("ftt{subnet}"), subnet, extra).0
}

#[test]
fn primary_killed_at_random_moments_loses_nothing() {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    eprintln!("kill moments seed: {seed}");
    let mut x = seed | 1;
    let mut takeovers = Vec::new();
    for run in 0..5u8 {
        // xorshift: a kill moment between 2 and 6 s into the client's run.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let before = 2.0 + (x % 4000) as f64 / 1000.0;
        let verify = if run == 0 {
            vec!["--verify-every", "5"]
        } else {
            vec![]
        };
        let before_s = before.to_string();
        let mut args = vec![
            "--kill",
            "primary",
            "--before-kill",
            &before_s,
            "--after-kill",
            "5",
            "--dirty-pages",
            "2000",
        ];
        args.extend(verify);
        let s = demo(&format!("kill-primary-{run}"), 40 + run, &args);
        let client = &s["client"];
        assert_eq!(
            client["lost"], 0,
            "run {run}: the client saw state go back: {s}"
        );
        assert!(client["replies"].as_u64().unwrap() > 10, "run {run}: {s}");
        assert_eq!(
            client["connections"], 1,
            "run {run}: the TCP connection did not survive: {s}"
        );
        assert!(
            client["longest_gap_us"].as_u64().unwrap() < 4_000_000,
            "run {run}: service did not resume: {s}"
        );
        assert_eq!(s["survivor"]["generation"], 2, "run {run}: {s}");
        let t = s["takeover_ms"].as_f64().unwrap();
        assert!(
            t < 1000.0,
            "run {run}: backup ran the VM only {t} ms after the kill"
        );
        takeovers.push(t);
        if run == 0 {
            let n = s["verified_checkpoints"].as_u64().unwrap();
            assert!(
                n >= 10,
                "only {n} checkpoints verified (need ≥ 50 epochs at every 5th)"
            );
        }
    }
    eprintln!("takeover after kill (ms): {takeovers:?}");
}

#[test]
fn backup_killed_primary_degrades_then_is_reprotected() {
    let s = demo(
        "kill-backup",
        50,
        &[
            "--kill",
            "backup",
            "--before-kill",
            "3",
            "--after-kill",
            "4",
            "--dirty-pages",
            "2000",
        ],
    );
    assert_eq!(s["client"]["lost"], 0, "{s}");
    assert_eq!(s["client"]["connections"], 1, "{s}");
    assert!(s["reprotect_ms"].as_f64().is_some(), "{s}");
    assert_eq!(s["survivor"]["phase"], "protected", "{s}");
    assert_eq!(s["survivor"]["generation"], 1, "{s}");
    // The demo probed from the client's namespace before the kill: the VM's service accepted a
    // connection, and each agent port and the witness port refused or was unreachable.
    let iso = &s["isolation"];
    assert_eq!(iso["vm"], "reachable", "{s}");
    for port in ["primary agent", "backup agent", "witness"] {
        let seen = iso[port].as_str().unwrap_or_default();
        assert!(seen.starts_with("unreachable"), "{port}: {s}");
    }
}

/// The same two failures with etcd as the witness (`--witness etcd`: a 3-member cluster on the
/// witness host): the takeover is decided by a compare-and-set in etcd, the register there names
/// the new primary, and the run's journals (the agents' register writes standing in for a
/// witness's own) pass the invariant check.
#[test]
fn the_etcd_witness_decides_the_failover_and_the_reprotection() {
    let s = demo(
        "etcd-kill-primary",
        56,
        &[
            "--witness",
            "etcd",
            "--kill",
            "primary",
            "--before-kill",
            "3",
            "--after-kill",
            "4",
        ],
    );
    assert_eq!(s["witness"], "etcd", "{s}");
    assert_eq!(s["client"]["lost"], 0, "{s}");
    assert_eq!(s["client"]["connections"], 1, "{s}");
    assert_eq!(s["survivor"]["generation"], 2, "{s}");
    assert!(s["takeover_ms"].as_f64().unwrap() < 1000.0, "{s}");
    let reg = &s["etcd_register"];
    assert_eq!(reg["generation"], 2, "the register in etcd: {s}");
    assert_eq!(reg["primary"], 2, "the register in etcd: {s}");
    assert_eq!(s["invariants"]["passed"], true, "{s}");
    for i in 1..=3 {
        let port = format!("witness (etcd member {i})");
        let seen = s["isolation"][&port].as_str().unwrap_or_default();
        assert!(seen.starts_with("unreachable"), "{port}: {s}");
    }

    let s = demo(
        "etcd-kill-backup",
        57,
        &[
            "--witness",
            "etcd",
            "--kill",
            "backup",
            "--before-kill",
            "3",
            "--after-kill",
            "4",
        ],
    );
    assert_eq!(s["client"]["lost"], 0, "{s}");
    assert_eq!(s["survivor"]["phase"], "protected", "{s}");
    let reg = &s["etcd_register"];
    assert_eq!(reg["generation"], 1, "{s}");
    assert_eq!(reg["backup"]["node"], 2, "re-registered in etcd: {s}");
    assert_eq!(s["invariants"]["passed"], true, "{s}");
}
