//! What the agent needs from a virtual machine. The real implementation drives QEMU
//! ([`super::qemu_vm`]); tests use an in-memory machine ([`super::mem_vm`]) so the agent's
//! protocol plumbing can be exercised without a hypervisor.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use ftvm_model::{Epoch, Scope};

use super::capture::CaptureMode;
use super::cow::{CowCheckpoint, CowError};
use crate::dirty::{DirtyError, GuestRam};
use crate::qemu::QemuError;
use crate::replica::StagedCheckpoint;
use crate::secure_fs::SecureFsError;

/// Errors of a VM backend. Each failure keeps its typed cause (a [`QemuError`], a
/// [`DirtyError`], ...) as its `source`, so a caller can tell a dead VM from a refused command
/// and match on what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// QEMU (or its monitor) went away while `what` was under way.
    #[error("the VM died during {what}: {source}")]
    Died {
        /// Operation under way.
        what: &'static str,
        /// How QEMU was found gone ([`QemuError::is_gone`]).
        #[source]
        source: QemuError,
    },
    /// The hypervisor process exited on its own while nothing was asked of it.
    #[error("the VM died: QEMU exited on its own ({0})")]
    Exited(std::process::ExitStatus),
    /// The VM was killed (fenced or shut down) before this call.
    #[error("the VM was killed")]
    Killed,
    /// The in-memory VM's state lock was poisoned: its guest thread panicked.
    #[error("the VM's state lock was poisoned (its guest thread panicked)")]
    Poisoned,
    /// QEMU failed or refused an operation (start, boot, a QMP command, a migration).
    #[error("{what}: {source}")]
    Qemu {
        /// Operation.
        what: &'static str,
        /// Cause.
        #[source]
        source: QemuError,
    },
    /// Mapping guest RAM or finding its written pages failed.
    #[error("{what}: {source}")]
    Dirty {
        /// Operation.
        what: &'static str,
        /// Cause.
        #[source]
        source: DirtyError,
    },
    /// The copy-on-write engine failed.
    #[error("{what}: {source}")]
    Cow {
        /// Operation.
        what: &'static str,
        /// Cause.
        #[source]
        source: CowError,
    },
    /// A file or directory the VM needs was refused or could not be made.
    #[error("{what}: {source}")]
    File {
        /// Operation.
        what: &'static str,
        /// Cause.
        #[source]
        source: SecureFsError,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// Operation.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The dirty-page log named a page beyond guest RAM.
    #[error("capture: page {page} out of range (guest RAM has {pages} pages)")]
    PageOutOfRange {
        /// The page.
        page: u64,
        /// Pages of guest RAM.
        pages: u64,
    },
    /// An operation refused for a reason of its own, with no underlying error: the VM's state
    /// or setup does not allow it (capturing a running VM, cow capture without cow support).
    #[error("{what}: {why}")]
    Failed {
        /// Operation.
        what: &'static str,
        /// Why it was refused.
        why: String,
    },
}

impl VmError {
    /// Shorthand for [`VmError::Failed`]. It takes text, not an error: a failure with a cause
    /// goes into the variant of that cause's type.
    pub fn failed(what: &'static str, why: impl Into<String>) -> VmError {
        VmError::Failed {
            what,
            why: why.into(),
        }
    }

    /// A QEMU failure during `what`: [`VmError::Died`] when QEMU is gone, else
    /// [`VmError::Qemu`].
    pub fn qemu(what: &'static str, source: QemuError) -> VmError {
        if source.is_gone() {
            VmError::Died { what, source }
        } else {
            VmError::Qemu { what, source }
        }
    }

    /// True when the VM is gone (died, exited or killed), not merely refusing an operation.
    pub fn is_gone(&self) -> bool {
        matches!(
            self,
            VmError::Died { .. } | VmError::Exited(_) | VmError::Killed | VmError::Poisoned
        )
    }
}

/// Timings of one capture, for the per-epoch metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CaptureStats {
    /// Pages captured.
    pub pages: u64,
    /// Microseconds spent finding dirty pages (cow: taking the fault log and write-protecting
    /// the pages).
    pub scan_us: u64,
    /// Microseconds spent copying pages into the staging area.
    pub copy_us: u64,
    /// Microseconds spent saving device state.
    pub device_us: u64,
    /// Pages write-protected early, while the VM ran, since the last capture (cow engine).
    pub early_protected: u64,
    /// Pages write-protected during this capture (cow engine).
    pub protected: u64,
    /// Disk blocks captured (written since the last capture; all holding data for a full one).
    pub disk_blocks: u64,
    /// Microseconds spent finding and reading them (paused).
    pub disk_us: u64,
}

/// What the caller of [`Vm::start_pre_copy`] does before the full capture, while the VM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreCopy {
    /// Nothing: the capture takes every page in its pause.
    None,
    /// Copy the non-zero pages of guest RAM into the capture's buffer (`out.indices`
    /// increasing, `out.data` their contents; [`super::zero_pages::copy_nonzero_pages`]), and
    /// mark it `full` with the capture's epoch. Dirty tracking was re-armed: the capture copies
    /// only the pages written since into it, in its pause.
    Copy,
    /// List the non-zero pages of guest RAM in the capture's buffer (`out.indices`, nothing
    /// copied; [`super::zero_pages::nonzero_pages`]), marked the same way: for capture modes
    /// that send from guest RAM. The capture adds the pages its dirty log holds (everything
    /// written since the last capture, which came before the scan).
    Scan,
}

/// A running VM the agent protects.
pub trait Vm: Send {
    /// Called right before [`Vm::pause`], with the VM still running: work that shortens the
    /// coming pause (the copy-on-write engine re-protects what the guest wrote since its last
    /// early pass). Not counted as paused time.
    fn prepare_pause(&mut self) -> impl Future<Output = Result<(), VmError>> + Send {
        async { Ok(()) }
    }
    /// Stops the vCPUs.
    fn pause(&mut self) -> impl Future<Output = Result<(), VmError>> + Send;
    /// Restarts the vCPUs.
    fn resume(&mut self) -> impl Future<Output = Result<(), VmError>> + Send;
    /// While paused: fills `out` with the pages of checkpoint `epoch` that `scope` names (those
    /// written since the last capture, every page, or every page written after a catch-up's
    /// base: [`ftvm_driver::WriteHistory`] picks them, the table the simulator uses) and the
    /// device state; a VM's first capture since it booted or was restored takes every page,
    /// whatever `scope` says ([`first_capture_scope`]). `out.generation`/`epoch` are set by the
    /// caller.
    /// [`CaptureMode::Staged`] copies the pages into `out.data`; [`CaptureMode::PausedSend`]
    /// lists them in `out.indices` and leaves `out.data` empty: they are sent from
    /// [`Vm::guest_ram`] while the VM stays paused. [`CaptureMode::Cow`] lists them too and
    /// write-protects them; the checkpoint handle to send them with is then taken with
    /// [`Vm::take_cow`].
    fn capture(
        &mut self,
        epoch: Epoch,
        scope: Scope,
        mode: CaptureMode,
        out: &mut StagedCheckpoint,
    ) -> impl Future<Output = Result<CaptureStats, VmError>> + Send;
    /// While the VM runs, before the full capture of `epoch` (`Action::PreCopy`): says what
    /// the caller is to do with guest RAM on a blocking thread while the VM runs, before that
    /// capture ([`PreCopy`]). A full capture given the result lists only the pages found
    /// non-zero, plus every page the guest wrote since (`super::zero_pages`).
    /// [`PreCopy::None`]: this VM or capture mode cannot (dirty tracking that can miss a write
    /// while the VM runs); the full capture then takes every page in its pause.
    fn start_pre_copy(&mut self, _epoch: Epoch, _mode: CaptureMode) -> Result<PreCopy, VmError> {
        Ok(PreCopy::None)
    }
    /// The guest RAM mapping, for sending pages straight from it while paused (paused-send).
    fn guest_ram(&self) -> Arc<GuestRam>;
    /// The copy-on-write checkpoint of the last [`CaptureMode::Cow`] capture (once). A VM
    /// without copy-on-write support returns `None` (and fails cow captures).
    fn take_cow(&mut self) -> Option<CowCheckpoint> {
        None
    }
    /// While paused: a digest (xxh3-64) of all of guest RAM, for verifying the replica.
    fn ram_digest(&mut self) -> Result<u64, VmError>;
    /// The disk snapshot of the last full capture (once): its disk blocks are read from it as
    /// they are sent, while the VM runs. None for a VM without a disk or a capture whose blocks
    /// were copied into the checkpoint.
    fn take_disk_sync(&mut self) -> Option<super::link::DiskSync> {
        None
    }
    /// While paused: a digest (xxh3-64) of the VM's disk, if it has one.
    fn disk_digest(&mut self) -> Result<Option<u64>, VmError> {
        Ok(None)
    }
    /// Stops the VM for good (fencing, shutdown).
    fn kill(&mut self) -> impl Future<Output = ()> + Send;
    /// Resolves when the VM dies on its own (never, for a VM that is still running).
    fn died(&mut self) -> impl Future<Output = VmError> + Send;
}

/// The scope a capture takes: the first one since the VM booted or was restored takes every
/// page and block, since nothing logged the writes before it (its dirty log is still stamped
/// into the write history, so later catch-ups see them).
pub fn first_capture_scope(scope: Scope, first: bool) -> Scope {
    if first {
        Scope::Full
    } else {
        scope
    }
}

/// Where a VM is resumed from at failover.
#[derive(Debug, Clone)]
pub struct RestorePoint {
    /// The replica's RAM file (the restored VM maps it as its RAM).
    pub ram_file: PathBuf,
    /// Device state of the committed checkpoint.
    pub device: Vec<u8>,
    /// The replica disk image (applied through the committed checkpoint), for a VM with a
    /// protected disk: the restored VM runs on it.
    pub disk: Option<PathBuf>,
}

/// Starts VMs: the first one on a fresh primary, and a restored one at failover.
pub trait VmLauncher: Send {
    /// The VM type.
    type Vm: Vm;
    /// Boots a fresh VM.
    fn boot(&mut self) -> impl Future<Output = Result<Self::Vm, VmError>> + Send;
    /// Starts a VM from a replica at failover; it is running when this returns.
    fn restore(
        &mut self,
        from: RestorePoint,
    ) -> impl Future<Output = Result<Self::Vm, VmError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;

    /// A QEMU that is gone makes a dead VM, a refused command does not; either way the
    /// [`QemuError`] stays reachable as the source, to match on.
    #[test]
    fn qemu_failures_keep_their_error_and_say_whether_the_vm_is_gone() {
        let gone = VmError::qemu("QMP stop", QemuError::QmpClosed);
        assert!(
            matches!(
                gone,
                VmError::Died {
                    what: "QMP stop",
                    source: QemuError::QmpClosed
                }
            ),
            "{gone:?}"
        );
        assert!(gone.is_gone());
        assert_eq!(
            gone.to_string(),
            "the VM died during QMP stop: QMP connection closed"
        );

        let refused = VmError::qemu(
            "QMP cont",
            QemuError::Qmp {
                command: "cont".into(),
                class: "GenericError".into(),
                desc: "no".into(),
            },
        );
        assert!(!refused.is_gone());
        let source = refused.source().expect("the QEMU error as source");
        match source.downcast_ref::<QemuError>() {
            Some(QemuError::Qmp { command, .. }) => assert_eq!(command, "cont"),
            other => panic!("expected the QMP error, got {other:?}"),
        }
        assert!(refused.to_string().starts_with("QMP cont: QMP cont failed"));
    }
}
