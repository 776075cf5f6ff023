//! Shared by the dirty-tracking tests: a RAM file in /dev/shm and the QEMU stand-in
//! (`ftvm-dirty-test-child`) started with the preload library.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// A sparse RAM file in /dev/shm, deleted on drop.
pub fn ram_file(bytes: u64) -> tempfile::NamedTempFile {
    let f = tempfile::Builder::new()
        .prefix("ftvm-dirty-test-")
        .tempfile_in("/dev/shm")
        .unwrap();
    f.as_file().set_len(bytes).unwrap();
    f
}

/// How the child is started.
pub struct ChildOpts<'a> {
    /// `mmap64` (like QEMU) or `mmap`.
    pub via: &'a str,
    /// Load the preload library at all.
    pub preload: bool,
    /// What `FTVM_RAM_FILE` says (defaults to the real RAM file).
    pub ram_env: Option<&'a str>,
    /// More environment for the child.
    pub env: Vec<(&'a str, String)>,
}

impl Default for ChildOpts<'_> {
    fn default() -> Self {
        ChildOpts {
            via: "mmap64",
            preload: true,
            ram_env: None,
            env: Vec::new(),
        }
    }
}

/// The QEMU stand-in process, killed on drop.
pub struct FakeQemu {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// Address of the RAM mapping in the child.
    pub base: u64,
}

impl FakeQemu {
    pub fn start(ram: &Path, bytes: u64, opts: ChildOpts) -> FakeQemu {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ftvm-dirty-test-child"));
        cmd.arg(ram)
            .arg(bytes.to_string())
            .arg(opts.via)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if opts.preload {
            let lib = ftvm_real::dirty::preload_library_path().expect("preload library");
            cmd.env("LD_PRELOAD", lib);
        }
        cmd.env(
            "FTVM_RAM_FILE",
            opts.ram_env
                .map(str::to_owned)
                .unwrap_or_else(|| ram.display().to_string()),
        );
        cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
        let mut child = cmd.spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let base = line
            .trim()
            .strip_prefix("ready 0x")
            .and_then(|a| u64::from_str_radix(a, 16).ok());
        let mut q = FakeQemu {
            child,
            stdin,
            stdout,
            base: base.unwrap_or(0),
        };
        assert!(
            base.is_some(),
            "child did not start: {line:?} {}",
            q.stderr()
        );
        q
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one command and waits for its `ok`.
    pub fn cmd(&mut self, cmd: &str, pages: &[u64]) {
        self.send(cmd, pages);
        self.wait_ok();
    }

    /// Sends one command without waiting for its answer.
    pub fn send(&mut self, cmd: &str, pages: &[u64]) {
        let mut line = String::from(cmd);
        for p in pages {
            line.push(' ');
            line.push_str(&p.to_string());
        }
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).unwrap();
        self.stdin.flush().unwrap();
    }

    /// Waits for the answer to the last command sent.
    pub fn wait_ok(&mut self) {
        let mut reply = String::new();
        self.stdout.read_line(&mut reply).unwrap();
        assert_eq!(reply.trim(), "ok", "child failed");
    }

    /// Writes new content (derived from `tag`) into each page.
    pub fn write(&mut self, tag: u64, pages: &[u64]) {
        self.cmd(&format!("write {tag}"), pages);
    }

    /// Ends the child and returns what it wrote to stderr.
    pub fn stderr(&mut self) -> String {
        let _ = self.stdin.write_all(b"quit\n");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for FakeQemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
