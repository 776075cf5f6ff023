//! One running QEMU: the child process, its QMP connection, and how it ended.
//!
//! A task owns the child and reaps it; the exit status is published on a watch channel so any
//! number of waiters (and `select!` loops) can learn that QEMU is gone. Killing goes through the
//! same task, so we never signal a pid that was already reaped and reused.

use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio::sync::{oneshot, watch};

use super::config::{NetBackend, NetConfig, QemuConfig};
use super::devstate;
use super::error::{QemuError, Result};
use super::qmp::{Qmp, VmStatus, DEFAULT_TIMEOUT};
use super::serial::SerialLog;
use crate::secure_fs;

/// How long QEMU gets to create its QMP socket and greet us.
const QMP_STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

/// How long to wait for the exit status once QMP reported the connection gone.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// How long the stream netdev may take to connect to the agent.
const NETDEV_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Lines of stderr quoted in [`QemuError::Died`].
const STDERR_TAIL_LINES: usize = 4;

/// Makes sure guest RAM lives in a file only we can open: an absent file is created empty (QEMU
/// sizes it) with mode 0600 and `O_EXCL|O_NOFOLLOW`, instead of by QEMU (0644, following links);
/// an existing one (a replica restored at failover) must be a regular file of ours that nobody
/// else may write. Once created in a sticky directory such as /dev/shm nobody else can replace it.
///
/// A fresh boot's file is also given all its pages now (`posix_fallocate`), before QEMU maps
/// it. Unallocated tmpfs pages would be allocated one fault at a time by whoever touches them
/// first: the first full checkpoint copy, which reads all of RAM while the VM is paused and
/// the agent's event loop waits; 1 GiB of such faults took 4.6 s here, past any failure
/// timeout, so the joining backup gave up on each sync. Allocated up front it is one call at
/// boot (0.09 s per GiB), and a /dev/shm too small for the guest is an error now rather
/// than a SIGBUS in the guest later. A restore target's file is the replica, already written.
fn prepare_ram_file(config: &QemuConfig) -> Result<()> {
    let (file, _) = secure_fs::open_or_create_private(&config.ram_file)?;
    if config.incoming_defer {
        return Ok(());
    }
    let len = i64::try_from(config.ram_bytes)
        .map_err(|_| QemuError::InvalidConfig(format!("RAM size {}", config.ram_bytes)))?;
    match nix::fcntl::posix_fallocate(&file, 0, len) {
        Ok(()) => Ok(()),
        // A file system that cannot allocate ahead: QEMU sizes the file and faults it in.
        Err(nix::errno::Errno::EOPNOTSUPP) => Ok(()),
        Err(e) => Err(QemuError::io(
            format!(
                "allocate {} MiB of guest RAM in {}",
                config.ram_bytes >> 20,
                config.ram_file.display()
            ),
            e.into(),
        )),
    }
}

/// A clonable view of a QEMU's exit: resolves once the process has ended.
#[derive(Debug, Clone)]
pub struct ExitWatch(watch::Receiver<Option<ExitStatus>>);

impl ExitWatch {
    /// The exit status if QEMU has ended.
    pub fn status(&self) -> Option<ExitStatus> {
        *self.0.borrow()
    }

    /// Waits until QEMU has ended.
    pub async fn ended(&mut self) -> ExitStatus {
        loop {
            if let Some(st) = *self.0.borrow_and_update() {
                return st;
            }
            if self.0.changed().await.is_err() {
                // The reaper task is gone without publishing: only possible at runtime shutdown.
                if let Some(st) = *self.0.borrow() {
                    return st;
                }
                std::future::pending::<()>().await;
            }
        }
    }
}

/// A running QEMU with its QMP connection. Dropping it kills QEMU.
#[derive(Debug)]
pub struct Qemu {
    pid: u32,
    config: QemuConfig,
    qmp: Qmp,
    exit: ExitWatch,
    kill_tx: Option<oneshot::Sender<()>>,
    killed_by_us: bool,
}

impl Qemu {
    /// Starts QEMU as configured and connects to its QMP socket.
    pub async fn spawn(config: QemuConfig) -> Result<Qemu> {
        let binary = config.validate()?;
        let args = config.args()?;
        match std::fs::remove_file(&config.qmp_socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(QemuError::io("remove stale QMP socket", e)),
        }
        prepare_ram_file(&config)?;
        // QEMU truncates the serial log at start anyway; creating it here makes it 0600 and
        // never a link QEMU would write through.
        drop(secure_fs::replace(
            &config.serial_log,
            secure_fs::PRIVATE_FILE_MODE,
        )?);
        let stderr = secure_fs::replace(&config.stderr_log, secure_fs::PRIVATE_FILE_MODE)?;
        let stdout = stderr
            .try_clone()
            .map_err(|e| QemuError::io("dup stderr log", e))?;

        let mut cmd = Command::new(&binary);
        if config.run_as.is_some() {
            // -runas clears the parent-death signal; the preload library arms it again after
            // QEMU's setuid, given our pid. Without the library QEMU could outlive us.
            if !config.env.iter().any(|(k, _)| k == "LD_PRELOAD") {
                return Err(QemuError::InvalidConfig(
                    "QEMU running as another user (-runas) needs the ftvm preload library to                      die with its agent"
                        .into(),
                ));
            }
            cmd.env("FTVM_PDEATHSIG", std::process::id().to_string());
        }
        cmd.args(&args)
            .envs(config.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                // prctl(PR_SET_PDEATHSIG): if the agent dies, QEMU gets SIGKILL instead of running
                // on as an orphan (a VM whose output nobody gates). The signal follows the
                // spawning *thread*: spawn from a long-lived runtime thread.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| QemuError::io(format!("start {binary:?}"), e))?;
        let pid = child
            .id()
            .ok_or_else(|| QemuError::Protocol("QEMU exited before it got a pid".into()))?;

        let (status_tx, status_rx) = watch::channel(None);
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let status = tokio::select! {
                st = child.wait() => st,
                // A kill request, or the Qemu handle was dropped.
                _ = kill_rx => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            match status {
                Ok(st) => {
                    let _ = status_tx.send(Some(st));
                }
                Err(e) => tracing::error!(pid, "waiting for QEMU failed: {e}"),
            }
        });
        let exit = ExitWatch(status_rx);
        tracing::debug!(pid, ?binary, "QEMU started");

        let qmp = match connect_qmp(&config, exit.clone()).await {
            Ok(q) => q,
            Err(e) => {
                // Whether QEMU had already ended decides whose fault it was: its own exit (report
                // its status and last words) or our giving up (report `e`, not our own SIGKILL).
                let ours = !e.is_gone() && exit.status().is_none();
                let _ = kill_tx.send(());
                let mut exit = exit;
                let _ = tokio::time::timeout(EXIT_GRACE, exit.ended()).await;
                return Err(died_or(e, pid, &config, &exit, ours));
            }
        };
        let mut qemu = Qemu {
            pid,
            config,
            qmp,
            exit,
            kill_tx: Some(kill_tx),
            killed_by_us: false,
        };
        if let Some(NetConfig {
            backend: NetBackend::Stream { socket },
            ..
        }) = &qemu.config.net
        {
            let socket = socket.clone();
            qemu.wait_netdev_connected(&socket).await?;
        }
        Ok(qemu)
    }

    /// Waits until the stream netdev reports its connection (`...,type=stream,unix:PATH`;
    /// blank while connecting, `connection error` on failure). QEMU 7.2 prints nothing on
    /// stderr and runs on with a dead network when the connect fails: refuse that here.
    async fn wait_netdev_connected(&mut self, socket: &std::path::Path) -> Result<()> {
        let start = Instant::now();
        loop {
            let info = self.netdev_info().await?;
            if info.contains("connection error") {
                let _ = self.kill().await;
                return Err(QemuError::NetdevNotConnected(socket.to_path_buf()));
            }
            if info.contains("unix:") {
                return Ok(());
            }
            if start.elapsed() > NETDEV_CONNECT_TIMEOUT {
                let _ = self.kill().await;
                return Err(QemuError::Timeout {
                    what: format!("netdev to connect to {socket:?} (state {info:?})"),
                    after: NETDEV_CONNECT_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// QEMU's description of the guest's netdev (`n0`) from `info network`, e.g.
    /// `index=0,type=stream,connection error` or `index=0,type=user,net=10.0.2.0,...`.
    pub async fn netdev_info(&mut self) -> Result<String> {
        let r = self
            .qmp
            .execute(
                "human-monitor-command",
                Some(serde_json::json!({"command-line": "info network"})),
            )
            .await;
        let text = self.explain(r).await?;
        let text = text.as_str().unwrap_or_default();
        Ok(text
            .lines()
            .find_map(|l| l.trim_start_matches([' ', '\\']).strip_prefix("n0: "))
            .unwrap_or_default()
            .trim()
            .to_owned())
    }

    /// Starts the same machine waiting for a device-state restore (`-incoming defer`).
    pub async fn spawn_incoming(mut config: QemuConfig) -> Result<Qemu> {
        config.incoming_defer = true;
        Qemu::spawn(config).await
    }

    /// Process id (for `/proc/<pid>/pagemap`).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &QemuConfig {
        &self.config
    }

    /// Its QMP connection, for commands this wrapper has no method for.
    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    /// A handle that resolves when QEMU ends; usable while `self` is borrowed elsewhere.
    pub fn exit_watch(&self) -> ExitWatch {
        self.exit.clone()
    }

    /// A reader of its serial console log.
    pub fn serial(&self) -> SerialLog {
        SerialLog::new(&self.config.serial_log)
    }

    /// `Ok` while QEMU runs; [`QemuError::Died`] (with QEMU's last stderr lines) once it ended.
    pub fn check_alive(&self) -> Result<()> {
        match self.exit.status() {
            None => Ok(()),
            Some(_) => Err(self.died_error()),
        }
    }

    /// Pauses the VM.
    pub async fn stop(&mut self) -> Result<()> {
        let r = self.qmp.stop().await;
        self.explain(r).await
    }

    /// Resumes the VM.
    pub async fn cont(&mut self) -> Result<()> {
        let r = self.qmp.cont().await;
        self.explain(r).await
    }

    /// The VM's run state.
    pub async fn query_status(&mut self) -> Result<VmStatus> {
        let r = self.qmp.query_status().await;
        self.explain(r).await
    }

    /// [`devstate::capture_device_state`], with QEMU's death reported as such.
    pub async fn capture_device_state(&mut self) -> Result<Vec<u8>> {
        let r = devstate::capture_device_state(&mut self.qmp).await;
        self.explain(r).await
    }

    /// [`devstate::load_device_state`] (leaves the VM paused), with QEMU's death reported.
    pub async fn load_device_state(&mut self, blob: &[u8]) -> Result<()> {
        let r = devstate::load_device_state(&mut self.qmp, blob).await;
        self.explain(r).await
    }

    /// [`devstate::restore_device_state`] (load, then resume), with QEMU's death reported.
    pub async fn restore_device_state(&mut self, blob: &[u8]) -> Result<()> {
        let r = devstate::restore_device_state(&mut self.qmp, blob).await;
        self.explain(r).await
    }

    /// Kills QEMU with SIGKILL and waits for it to be reaped.
    pub async fn kill(&mut self) -> Result<ExitStatus> {
        self.killed_by_us = true;
        if let Some(tx) = self.kill_tx.take() {
            let _ = tx.send(());
        }
        self.wait_timeout(EXIT_GRACE * 5).await
    }

    /// Waits for QEMU to end by itself (after `quit`, a guest shutdown, a crash).
    pub async fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        tokio::time::timeout(timeout, self.exit.ended())
            .await
            .map_err(|_| QemuError::Timeout {
                what: format!("QEMU pid {} to exit", self.pid),
                after: timeout,
            })
    }

    /// Turns "QMP connection gone" into "QEMU died: <status>; stderr: <its last words>".
    pub async fn explain<T>(&mut self, r: Result<T>) -> Result<T> {
        match r {
            Err(e) if e.is_gone() => {
                let _ = tokio::time::timeout(EXIT_GRACE, self.exit.ended()).await;
                Err(died_or(
                    e,
                    self.pid,
                    &self.config,
                    &self.exit,
                    self.killed_by_us,
                ))
            }
            other => other,
        }
    }

    fn died_error(&self) -> QemuError {
        died_error(self.pid, &self.config, self.exit.status())
    }
}

/// Connects to QMP once the socket appears, giving up if QEMU exits first.
async fn connect_qmp(config: &QemuConfig, mut exit: ExitWatch) -> Result<Qmp> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(1);
    loop {
        match tokio::net::UnixStream::connect(&config.qmp_socket).await {
            Ok(stream) => return Qmp::handshake(stream, DEFAULT_TIMEOUT).await,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                if start.elapsed() > QMP_STARTUP_TIMEOUT {
                    return Err(QemuError::Timeout {
                        what: format!("QMP socket {:?}", config.qmp_socket),
                        after: QMP_STARTUP_TIMEOUT,
                    });
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = exit.ended() => return Err(QemuError::QmpClosed),
                }
                delay = (delay * 2).min(Duration::from_millis(20));
            }
            Err(e) => return Err(QemuError::io("connect to QMP socket", e)),
        }
    }
}

/// `e` unless QEMU has ended, in which case the reason it ended.
fn died_or(
    e: QemuError,
    pid: u32,
    config: &QemuConfig,
    exit: &ExitWatch,
    killed: bool,
) -> QemuError {
    match exit.status() {
        Some(_) if !killed => died_error(pid, config, exit.status()),
        _ => e,
    }
}

fn died_error(pid: u32, config: &QemuConfig, status: Option<ExitStatus>) -> QemuError {
    QemuError::Died {
        pid,
        status: status.map_or_else(|| "unknown status".to_owned(), |s| s.to_string()),
        stderr_tail: stderr_tail(config),
    }
}

/// The last few non-empty lines of QEMU's stderr log, joined with " | ".
fn stderr_tail(config: &QemuConfig) -> String {
    let Ok(lines) = crate::log_tail::last_lines(&config.stderr_log, STDERR_TAIL_LINES) else {
        return String::new();
    };
    lines.join(" | ").chars().take(600).collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// A fresh boot's RAM file has all its blocks before QEMU maps it; a restore target's file
    /// (the replica) is left exactly as it is.
    #[test]
    fn a_fresh_boots_ram_file_is_allocated_a_restore_targets_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let ram = dir.path().join("vm.ram");
        let bytes = 4 << 20;
        let mut cfg = QemuConfig::new("/nonexistent/kernel", &ram, bytes, dir.path());
        prepare_ram_file(&cfg).unwrap();
        let meta = std::fs::metadata(&ram).unwrap();
        assert_eq!(meta.len(), bytes);
        assert!(meta.blocks() * 512 >= bytes, "{} blocks", meta.blocks());

        let replica = dir.path().join("replica.ram");
        std::fs::write(&replica, b"committed").unwrap();
        std::fs::set_permissions(
            &replica,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        cfg = cfg.incoming(&replica, dir.path());
        prepare_ram_file(&cfg).unwrap();
        assert_eq!(std::fs::read(&replica).unwrap(), b"committed");
    }
}
