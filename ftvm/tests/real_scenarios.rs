//! Scenario files that the simulator runs, run again on real hosts (QEMU in network namespaces)
//! through `ftvm scenario run --real`, every fault produced (loss by nftables; latency,
//! bandwidth, holds and corruption by the link relays): each test asserts that no fault was
//! skipped. Wall time per file on a 2-core machine with TCG guests, measured with
//! `ftvm scenario run scenarios/FILE --real`: 9-27 s (noted per test).

mod common;

use std::process::Command;

use common::{guest_dir, repo};

/// Real deployments share the namespace names and the machine's two cores: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run_real(name: &str) -> serde_json::Value {
    run_real_file(name, &repo().join("scenarios").join(format!("{name}.toml")))
}

fn run_real_file(name: &str, file: &std::path::Path) -> serde_json::Value {
    run_real_with(name, file, &[])
}

/// Scenario `file` on real hosts with the etcd witness (a 3-member cluster over TLS with access
/// control); its files are named `<file's name>-etcd`.
fn run_real_on_etcd(file: &str) -> serde_json::Value {
    let path = repo().join("scenarios").join(format!("{file}.toml"));
    run_real_with(&format!("{file}-etcd"), &path, &["--witness", "etcd"])
}

fn run_real_with(name: &str, file: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let summary = std::env::temp_dir().join(format!("ftvm-scenario-{name}.json"));
    let _ = std::fs::remove_file(&summary);
    let out = Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .args(["scenario", "run"])
        .arg(file)
        .args(extra)
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
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&summary).expect("summary")).unwrap();
    assert_eq!(s["client"]["lost"], 0);
    assert!(s["failures"].as_array().unwrap().is_empty(), "{s}");
    assert!(
        s["skipped_faults"].as_array().unwrap().is_empty(),
        "faults skipped on real hosts: {}",
        s["skipped_faults"]
    );
    // The hosts' journals went through the simulator's invariant checkers.
    assert_eq!(s["invariants"]["passed"], true, "{s}");
    s
}

/// The entries node `node`'s journal recorded in the run of scenario `name`.
fn journal_entries(name: &str, node: u32) -> Vec<ftvm_driver::journal::HostEntry> {
    use ftvm_driver::journal::HostLine;
    let path = std::env::temp_dir()
        .join(format!("ftvm-scenario-{name}"))
        .join("journals")
        .join(format!("node-{node}.jsonl"));
    let text = std::fs::read_to_string(&path).expect("the node's journal");
    text.lines()
        .filter_map(|l| match serde_json::from_str::<HostLine>(l) {
            Ok(HostLine::Entry(e)) => Some(e),
            Ok(HostLine::Config { .. }) => None,
            Err(e) => panic!("{}: {e}: {l}", path.display()),
        })
        .collect()
}

/// The model inputs node `node`'s journal recorded in the run of scenario `name`.
fn journaled_inputs(name: &str, node: u32) -> Vec<ftvm_model::Input> {
    journal_entries(name, node)
        .into_iter()
        .filter_map(|e| match e.entry.record {
            ftvm_driver::journal::Record::Input(input) => Some(input),
            _ => None,
        })
        .collect()
}

/// The lines of the run's applied faults that contain `what`.
fn applied(s: &serde_json::Value, what: &str) -> Vec<String> {
    s["applied_faults"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l.as_str())
        .filter(|l| l.contains(what))
        .map(str::to_string)
        .collect()
}

// ~11 s
#[test]
fn primary_crash_mid_epoch_on_real_hosts() {
    let s = run_real("primary-crash-mid-epoch");
    assert_eq!(applied(&s, "SIGKILL to node").len(), 1);
    assert_eq!(
        applied(&s, "when the primary was writing no checkpoint").len(),
        1
    );
}

// ~13 s
#[test]
fn link_cut_with_both_alive_on_real_hosts() {
    let s = run_real("link-cut");
    assert_eq!(applied(&s, "blackhole routes").len(), 2);
}

// ~12 s
#[test]
fn primary_isolated_on_real_hosts() {
    let s = run_real("primary-isolated");
    assert_eq!(applied(&s, "links to the switch down").len(), 1);
}

// ~12 s
#[test]
fn five_percent_loss_everywhere_on_real_hosts() {
    let s = run_real("loss-5pct");
    assert_eq!(applied(&s, "loss 0.05 on every link (nftables").len(), 1);
}

// ~14 s
#[test]
fn slow_link_stretches_epochs_on_real_hosts() {
    let s = run_real("slow-link");
    // 1,000 B/ms for 512-byte pages is 8,000 B/ms for the real guest's 4 KiB pages.
    assert_eq!(applied(&s, "paces both directions at 8000 B/ms").len(), 1);
}

// ~12 s
#[test]
fn corrupt_checkpoints_on_real_hosts() {
    let s = run_real("corrupt-checkpoint");
    // Both armed corruptions reached a checkpoint on the wire.
    assert_eq!(applied(&s, "relay: damaged the checkpoint").len(), 2);
    // And reached the backup's model as the simulator reports one (tests/tests/journals.rs
    // shows the simulated side): a checkpoint received not ok, the replica kept.
    let damaged = journaled_inputs("corrupt-checkpoint", 2)
        .into_iter()
        .filter(|i| matches!(i, ftvm_model::Input::CheckpointReceived { ok: false, .. }))
        .count();
    assert!(
        damaged >= 1,
        "no damaged checkpoint reached the backup's model"
    );
}

// ~13 s
#[test]
fn flapping_link_on_real_hosts() {
    let s = run_real("flapping-link");
    assert_eq!(applied(&s, "blackhole routes").len(), 20);
}

// ~13 s
#[test]
fn witness_outage_on_real_hosts() {
    let s = run_real("witness-outage");
    assert_eq!(applied(&s, "SIGKILL to the witness").len(), 2);
}

// ~15 s. With a majority of etcd down the register can be neither read nor written: the
// primary that lost its backup then holds its output until etcd is back, and nobody takes over.
#[test]
fn witness_outage_on_the_etcd_witness() {
    let s = run_real_on_etcd("witness-outage");
    assert_eq!(applied(&s, "SIGKILL to 2 of the 3 etcd members").len(), 2);
    assert_eq!(applied(&s, "etcd members started again").len(), 2);
}

// ~14 s. etcd grants the takeover and the deposed primary's rejoin.
#[test]
fn primary_isolated_on_the_etcd_witness() {
    let s = run_real_on_etcd("primary-isolated");
    assert_eq!(applied(&s, "links to the switch down").len(), 1);
}

/// A scenario whose faults act on witness exchanges is refused on etcd, before any host starts,
/// with the reason: it would otherwise run without them and pass.
#[test]
fn witness_exchange_faults_are_refused_on_the_etcd_witness() {
    let out = Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .args(["scenario", "run"])
        .arg(repo().join("scenarios/stale-witness-traffic.toml"))
        .args(["--real", "--witness", "etcd", "--guest-dir", "unused"])
        .output()
        .expect("running ftvm scenario");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot run on the etcd witness") && err.contains("--witness ftvm"),
        "{err}"
    );
}

// ~14 s
#[test]
fn new_primary_failure_on_real_hosts() {
    let s = run_real("new-primary-failure");
    assert_eq!(applied(&s, "when the primary reported protected").len(), 1);
}

// ~7 s
#[test]
fn crash_during_initial_sync_on_real_hosts() {
    let s = run_real("crash-during-initial-sync");
    assert_eq!(applied(&s, "when the primary reported syncing").len(), 1);
}

// ~10 s
#[test]
fn backup_crash_then_reprotection_on_real_hosts() {
    let s = run_real("backup-crash-reprotect");
    assert_eq!(applied(&s, "started again, empty, rejoining").len(), 1);
}

// ~12 s
#[test]
fn primary_crash_mid_transfer_on_a_paced_network_on_real_hosts() {
    let s = run_real("primary-crash-mid-transfer");
    // [network] bytes_per_ms = 2000 for 512-byte pages: 16,000 B/ms for 4 KiB pages.
    assert_eq!(applied(&s, "bandwidth 16000 B/ms").len(), 1);
    assert_eq!(
        applied(
            &s,
            "when the primary had written half of a checkpoint, not all"
        )
        .len(),
        1
    );
}

// ~10 s
#[test]
fn steady_on_real_hosts() {
    let s = run_real("steady");
    assert_eq!(s["primary"]["generation"], 1, "{s}");
    assert_eq!(s["primary"]["phase"], "protected", "{s}");
    assert_eq!(s["backup"]["phase"], "protecting", "{s}");
    assert!(s["spare"].is_null(), "{s}");
}

// ~10 s
// The spare's join connections carry one frame each before they are refused: the relay slips
// the forged Join in ahead of it, with the VM id learnt from the other links' frames.
#[test]
fn forged_generation_with_a_spare_third_node_on_real_hosts() {
    let s = run_real("forged-generation");
    // The spare host ran (node 3) and its link to the primary carried the forged Join.
    assert_eq!(s["spare"]["node"], 3, "{s}");
    assert_eq!(applied(&s, "relay: forged Join").len(), 1, "{s}");
    assert_eq!(applied(&s, "slipped into n3 -> n1").len(), 2, "{s}");
    assert_eq!(applied(&s, "relay: forged Heartbeat").len(), 1, "{s}");
    // Each forgery's connection was dropped by its receiver; no failover, no fence.
    assert_eq!(applied(&s, "refused").len(), 2, "{s}");
    assert_eq!(s["primary"]["generation"], 1, "{s}");
    assert_eq!(s["primary"]["role"], "Primary", "{s}");
}

// The simulator's forged witness reply fences the primary; a real one cannot be sealed (the
// relay can only damage it) and the forged Join that would make the primary ask is refused at
// its tag, so nothing fences. The file's `[expect_real]` says so; both faults run. ~12 s
#[test]
fn fenced_primary_goes_silent_on_real_hosts_where_the_forged_reply_is_refused() {
    let s = run_real("fenced-primary-goes-silent");
    assert_eq!(applied(&s, "relay: forged Join").len(), 1, "{s}");
    // The reply damage is armed; on real hosts the refused Join never makes the primary ask
    // the witness, so no reply may come to damage (the simulator's primary does ask).
    assert_eq!(
        applied(&s, "the relay damages the next witness reply to n1").len(),
        1,
        "{s}"
    );
    assert_eq!(s["primary"]["generation"], 1, "{s}");
    assert_eq!(s["primary"]["role"], "Primary", "{s}");
}

/// Forgeries on real hosts: not a file of `scenarios/` (there a forged witness reply makes the
/// simulated primary fence, which a real one cannot be made to do), but the same fault kinds,
/// produced by the relays. Real links authenticate every frame and witness exchanges are
/// sealed, so each forgery must end the connection that carried it.
const FORGERIES: &str = r#"
name = "forgeries-refused"
description = "a forged heartbeat of a newer generation on the backup's link, a forged witness reply"
duration_ms = 3000

[[fault]]
kind = "forge-generation"
a = "backup"
b = "primary"
frame = "heartbeat"
generation = 2
at_ms = 800
when = "protected"

[[fault]]
kind = "forge-witness-reply"
host = "primary"
at_ms = 1800
when = "protected"

[[fault]]
kind = "crash"
host = "backup"
silent = false
at_ms = 1900
"#;

// ~12 s
#[test]
fn forged_frames_and_witness_replies_are_refused_on_real_hosts() {
    let dir = std::env::temp_dir().join("ftvm-forgeries-scenario");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("forgeries-refused.toml");
    std::fs::write(&file, FORGERIES).unwrap();
    let s = run_real_file("forgeries-refused", &file);
    assert_eq!(applied(&s, "relay: forged Heartbeat").len(), 1, "{s}");
    assert_eq!(
        applied(&s, "relay: witness reply witness -> n1 damaged").len(),
        1,
        "{s}"
    );
    // Each forgery's connection was dropped by its receiver.
    assert_eq!(applied(&s, "refused").len(), 2, "{s}");
}

/// The witness's journaled replies to `request` (a `WitnessRequest` variant's name) in the run
/// of scenario `name`, in order.
fn witness_replies(name: &str, request: &str) -> Vec<serde_json::Value> {
    let path = std::env::temp_dir()
        .join(format!("ftvm-scenario-{name}"))
        .join("journals")
        .join("witness.jsonl");
    let text = std::fs::read_to_string(&path).expect("the witness's journal");
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            let r = &v["reply"]["request"];
            r == request || r.get(request).is_some()
        })
        .collect()
}

// ~24 s
#[test]
fn register_overtaken_on_real_hosts() {
    let s = run_real("register-overtaken");
    // The primary's witness link was held from the hosts' start, and the scenario's clock
    // started when the relay held its first exchange: its first RegisterBackup.
    assert_eq!(
        applied(
            &s,
            "held the primary's first witness exchange (its RegisterBackup)"
        )
        .len(),
        1
    );
    assert_eq!(applied(&s, "release n1 <-> witness").len(), 1);
    assert_eq!(applied(&s, "witness traffic: duplicate 0.6").len(), 1);
    assert_eq!(applied(&s, "relay: witness disorder:").len(), 1);
    // The held registration (or its resend) reached the witness and was answered.
    assert!(!witness_replies("register-overtaken", "RegisterBackup").is_empty());
}

// ~26 s
#[test]
fn stale_witness_traffic_on_real_hosts() {
    let s = run_real("stale-witness-traffic");
    assert_eq!(
        applied(
            &s,
            "held the primary's first witness exchange (its RegisterBackup)"
        )
        .len(),
        1
    );
    assert_eq!(
        applied(
            &s,
            "witness traffic: duplicate 0.3, reorder 0.3, reply loss 0.1"
        )
        .len(),
        1
    );
    assert_eq!(applied(&s, "relay: witness disorder:").len(), 1);
}

// ~24 s
#[test]
fn witness_retried_transaction_on_real_hosts() {
    let s = run_real("witness-retried-transaction");
    assert_eq!(
        applied(
            &s,
            "witness traffic: duplicate 0.5, reorder 0, reply loss 0.3"
        )
        .len(),
        1
    );
    assert_eq!(applied(&s, "crash primary").len(), 1);
    assert_eq!(applied(&s, "relay: witness disorder:").len(), 1);
    assert_eq!(applied(&s, "restart n1").len(), 1);
}

/// When node `node` started each incremental capture in the run of scenario `name` (µs on the
/// journal's clock).
fn journaled_captures(name: &str, node: u32) -> Vec<u64> {
    use ftvm_driver::journal::Record;
    use ftvm_model::Action;
    journal_entries(name, node)
        .into_iter()
        .filter_map(|e| match e.entry.record {
            Record::Action(Action::Capture {
                scope: ftvm_model::Scope::Epoch,
                ..
            }) => Some(e.wall_us),
            _ => None,
        })
        .collect()
}

// ~15 s
#[test]
fn output_driven_epochs_on_real_hosts() {
    // The agents run the file's output policy: held replies end epochs early. (The file's
    // response and idle bounds are simulated figures; `ftvm bench e2e --policies` measures the
    // real ones.)
    let s = run_real("output-driven-epochs");
    assert_eq!(s["client"]["errors"], 0, "{s}");
    let held = journaled_inputs("output-driven-epochs", 1)
        .into_iter()
        .filter(|i| matches!(i, ftvm_model::Input::OutputHeld { .. }))
        .count();
    assert!(held > 10, "the primary heard of held output {held} times");
    // Some captures came sooner than the 25 ms epoch would have: output ended those epochs.
    let at = journaled_captures("output-driven-epochs", 1);
    let early = at.windows(2).filter(|w| w[1] - w[0] < 20_000).count();
    assert!(
        early * 4 > at.len(),
        "{early} of {} captures came less than 20 ms after the previous one",
        at.len()
    );
}

// The disk scenarios: the VM's disk is served by its agent, the small guest's disk writer
// writes it at the scenario's rate, and the journals' invariant check covers the run.

#[test]
fn disk_crash_mid_epoch_on_real_hosts() {
    let s = run_real("disk-crash-mid-epoch");
    assert_eq!(applied(&s, "SIGKILL to node").len(), 1, "{s}");
}

#[test]
fn disk_failover_during_sync_on_real_hosts() {
    let s = run_real("disk-failover-during-sync");
    assert_eq!(applied(&s, "SIGKILL to node").len(), 3, "{s}");
}

// Catch-up resyncs: a broken stream or a restarted backup gets what changed since its
// committed replica, not a full sync.

#[test]
fn corrupt_then_crash_during_catch_up_on_real_hosts() {
    let s = run_real("corrupt-then-crash-during-catch-up");
    assert_eq!(applied(&s, "relay: damaged the checkpoint").len(), 1, "{s}");
    assert_eq!(
        applied(&s, "when the primary had captured a catch-up").len(),
        1,
        "{s}"
    );
}

#[test]
fn flapping_link_30_on_real_hosts() {
    let s = run_real("flapping-link-30");
    assert_eq!(applied(&s, "blackhole routes").len(), 60);
}

#[test]
fn backup_restart_keeps_replica_on_real_hosts() {
    let s = run_real("backup-restart-keeps-replica");
    assert_eq!(applied(&s, "started again on its replica").len(), 1, "{s}");
    // The restarted backup offered its replica and the primary caught it up.
    let caught_up = journal_entries("backup-restart-keeps-replica", 1)
        .into_iter()
        .any(|e| {
            matches!(
                e.entry.record,
                ftvm_driver::journal::Record::Action(ftvm_model::Action::Capture {
                    scope: ftvm_model::Scope::Since(_),
                    ..
                })
            )
        });
    assert!(caught_up, "no catch-up capture on the primary");
}

#[test]
fn reprotect_large_vm_on_real_hosts() {
    use ftvm_driver::journal::Record;
    use ftvm_model::{Action, Event, Gate, Scope};
    let s = run_real("reprotect-large-vm");
    assert_eq!(applied(&s, "paces both directions").len(), 1, "{s}");
    // The primary's re-protection of the empty backup: the full sync's capture, the gate
    // closing once the joiner caught up, and the first release after it.
    let entries = journal_entries("reprotect-large-vm", 1);
    let full_captures: Vec<_> = entries
        .iter()
        .filter(|e| {
            matches!(
                e.entry.record,
                Record::Action(Action::Capture {
                    scope: Scope::Full,
                    ..
                })
            )
        })
        .map(|e| e.entry.at)
        .collect();
    assert_eq!(
        full_captures.len(),
        2,
        "first protection and the re-protection"
    );
    let sync = full_captures[1];
    let after = |t: ftvm_model::Time| entries.iter().filter(move |e| e.entry.at >= t);
    let held_at = after(sync)
        .find(|e| e.entry.record == Record::Action(Action::SetOutputGate(Gate::Held)))
        .map(|e| e.entry.at)
        .expect("the gate closed again after the sync");
    let closing = after(sync)
        .find(|e| {
            matches!(
                e.entry.record,
                Record::Action(Action::Log(Event::GateClosing { .. }))
            )
        })
        .map(|e| e.entry.at)
        .expect("the primary logged the end of the pre-copy");
    assert_eq!(held_at, closing, "output flowed until the joiner caught up");
    let released = after(held_at)
        .find(|e| matches!(e.entry.record, Record::Action(Action::ReleaseOutput { .. })))
        .map(|e| e.entry.at)
        .expect("output released once the joiner was registered");
    let precopy = closing.saturating_since(sync);
    let held = released.saturating_since(held_at);
    eprintln!("pre-copy {precopy:?} with output flowing, then output held {held:?}");
    assert!(
        held < precopy && held < std::time::Duration::from_secs(1),
        "output held {held:?} (pre-copy {precopy:?})"
    );
}

/// Every file of `scenarios/` runs on real hosts in this suite (a new file needs its test here).
#[test]
fn every_scenario_file_has_a_real_host_test() {
    let me = include_str!("real_scenarios.rs");
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(repo().join("scenarios")).expect("scenarios/") {
        let path = entry.expect("a directory entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            if !me.contains(&format!("run_real(\"{name}\")")) {
                missing.push(name);
            }
        }
    }
    assert!(missing.is_empty(), "no real-host test for {missing:?}");
}
