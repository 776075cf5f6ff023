//! The binary's log: JSON lines with `--log-format json`, events of the libraries included
//! with their fields, and a plain error line by default. Needs no root and no QEMU.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ftvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ftvm"))
}

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ftvm-log-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn a_failure_is_one_json_line_with_json_and_a_plain_line_without() {
    let d = scratch("fail");
    let args = |dir: &Path| {
        vec![
            "witness".to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--state".into(),
            dir.join("w.json").display().to_string(),
            "--keys".into(),
            dir.join("no-keys").display().to_string(),
        ]
    };
    let out = ftvm()
        .args(["--log-format", "json"])
        .args(args(&d))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON line");
    assert_eq!(v["level"], "ERROR", "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("loading keys from"),
        "{v}"
    );

    let out = ftvm().args(args(&d)).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with("ftvm: error: loading keys from"),
        "{stderr}"
    );
}

#[test]
fn a_filter_that_does_not_parse_is_refused_before_the_command_runs() {
    let out = ftvm()
        .args(["keygen", "--dir", "/nonexistent/never", "--witness"])
        .args(["--log-level", "debug,=["])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("--log-level"), "{stderr}");
    assert!(!Path::new("/nonexistent/never").exists());
}

/// A running witness logs that it serves, from the library, as a JSON object whose fields are
/// numbers; `--log-level warn` silences it.
#[test]
fn a_serving_witness_logs_its_register_as_json_fields() {
    let d = scratch("witness");
    let keys = d.join("keys");
    let st = ftvm()
        .args(["keygen", "--nodes", "1,2", "--witness", "--dir"])
        .arg(&keys)
        .output()
        .unwrap();
    assert!(st.status.success(), "{st:?}");
    let start = |level: &str, state: &str| {
        ftvm()
            .args(["--log-format", "json", "--log-level", level, "witness"])
            .args([
                "--listen",
                "127.0.0.1:0",
                "--init",
                "--primary",
                "2",
                "--vm",
                "7",
            ])
            .arg("--state")
            .arg(d.join(state))
            .arg("--keys")
            .arg(&keys)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut w = start("info", "w1.json");
    let mut first = String::new();
    BufReader::new(w.stderr.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    w.kill().unwrap();
    w.wait().unwrap();
    let v: serde_json::Value = serde_json::from_str(&first).expect("a JSON line");
    assert_eq!(v["message"], "witness serving", "{v}");
    assert_eq!(v["level"], "INFO", "{v}");
    assert_eq!(v["vm"], 7, "{v}");
    assert_eq!(v["primary"], 2, "{v}");
    assert_eq!(v["generation"], 1, "{v}");

    // At warn, the witness says nothing while it serves: its state file appears, no log line.
    let mut w = start("warn", "w2.json");
    let t0 = Instant::now();
    while !d.join("w2.json").exists() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    w.kill().unwrap();
    let out = w.wait_with_output().unwrap();
    assert!(d.join("w2.json").exists());
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&d);
}
