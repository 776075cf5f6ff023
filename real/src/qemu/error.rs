//! Errors of the QEMU control layer: one enum so callers can tell "QEMU refused a command" from
//! "QEMU is gone" from "we gave up waiting".

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while starting, talking to or checkpointing a QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// The configuration cannot produce a working command line.
    #[error("invalid QEMU configuration: {0}")]
    InvalidConfig(String),
    /// The QEMU binary is not installed (or not executable) where we looked.
    #[error(
        "QEMU binary {0:?} not found (install Debian's qemu-system-x86 or set the binary path)"
    )]
    BinaryNotFound(PathBuf),
    /// A file the command line names (kernel, initrd) does not exist.
    #[error("{what} {path:?} not found")]
    FileNotFound {
        /// Which input it is.
        what: &'static str,
        /// Where we looked.
        path: PathBuf,
    },
    /// An operating-system call failed.
    #[error("{what}: {source}")]
    Io {
        /// Step that failed.
        what: String,
        /// OS error.
        source: std::io::Error,
    },
    /// QEMU exited (or was killed) while we still needed it.
    #[error("QEMU (pid {pid}) exited on its own: {status}{}", stderr_suffix(.stderr_tail))]
    Died {
        /// Process id it had.
        pid: u32,
        /// Exit status as printed by the OS.
        status: String,
        /// Last lines QEMU wrote to stderr (its reason, usually).
        stderr_tail: String,
    },
    /// The QMP connection closed under us (QEMU exited or closed the monitor).
    #[error("QMP connection closed")]
    QmpClosed,
    /// QEMU answered a command with a QMP error.
    #[error("QMP {command} failed: {class}: {desc}")]
    Qmp {
        /// Command that failed.
        command: String,
        /// QMP error class (`GenericError`, `CommandNotFound`, ...).
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// QEMU sent something that is not the QMP we know.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// Something did not happen in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What we were waiting for.
        what: String,
        /// How long we waited.
        after: Duration,
    },
    /// A migration (device-state capture or restore) ended in a state other than `completed`.
    #[error("migration {0}")]
    MigrationFailed(String),
    /// QEMU's stream netdev failed to connect to the agent's socket. QEMU 7.2 keeps running
    /// without a network in that case and never retries.
    #[error("QEMU netdev could not connect to {0:?} (is the agent listening?)")]
    NetdevNotConnected(PathBuf),
    /// A file QEMU is given (RAM, logs) is not safely ours.
    #[error(transparent)]
    File(#[from] crate::secure_fs::SecureFsError),
    /// Every boot attempt failed; the last reason is attached.
    #[error("guest did not boot in {tries} tries; last: {last_reason}")]
    BootFailed {
        /// Attempts made.
        tries: u32,
        /// Why the last attempt failed.
        last_reason: String,
    },
}

fn stderr_suffix(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; stderr: {tail}")
    }
}

impl QemuError {
    /// Wraps an I/O error with the step it came from.
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        QemuError::Io {
            what: what.into(),
            source,
        }
    }

    /// True when the error means QEMU (or its monitor) is gone, not that a command was refused.
    pub fn is_gone(&self) -> bool {
        matches!(self, QemuError::Died { .. } | QemuError::QmpClosed)
    }
}

/// Result alias of this module.
pub type Result<T, E = QemuError> = std::result::Result<T, E>;
