//! What the agent needs from a virtual machine. The real implementation drives QEMU
//! ([`super::qemu_vm`]); tests use an in-memory machine ([`super::mem_vm`]) so the agent's
//! protocol plumbing can be exercised without a hypervisor.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use super::capture::CaptureMode;
use super::cow::CowCheckpoint;
use crate::dirty::GuestRam;
use crate::replica::StagedCheckpoint;

/// Errors of a VM backend.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The VM (its hypervisor process) is gone.
    #[error("the VM died: {0}")]
    Died(String),
    /// An operation on the VM failed.
    #[error("{what}: {detail}")]
    Failed {
        /// Operation.
        what: &'static str,
        /// Cause.
        detail: String,
    },
}

impl VmError {
    /// Shorthand for [`VmError::Failed`].
    pub fn failed(what: &'static str, detail: impl std::fmt::Display) -> VmError {
        VmError::Failed {
            what,
            detail: detail.to_string(),
        }
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
    /// While paused: fills `out` with the pages written since the last capture (every page
    /// when `full`) and the device state. `out.generation`/`epoch` are set by the caller.
    /// [`CaptureMode::Staged`] copies the pages into `out.data`; [`CaptureMode::PausedSend`]
    /// lists them in `out.indices` and leaves `out.data` empty: they are sent from
    /// [`Vm::guest_ram`] while the VM stays paused. [`CaptureMode::Cow`] lists them too and
    /// write-protects them; the checkpoint handle to send them with is then taken with
    /// [`Vm::take_cow`].
    fn capture(
        &mut self,
        full: bool,
        mode: CaptureMode,
        out: &mut StagedCheckpoint,
    ) -> impl Future<Output = Result<CaptureStats, VmError>> + Send;
    /// The guest RAM mapping, for sending pages straight from it while paused (paused-send).
    fn guest_ram(&self) -> Arc<GuestRam>;
    /// The copy-on-write checkpoint of the last [`CaptureMode::Cow`] capture (once). A VM
    /// without copy-on-write support returns `None` (and fails cow captures).
    fn take_cow(&mut self) -> Option<CowCheckpoint> {
        None
    }
    /// While paused: a digest (xxh3-64) of all of guest RAM, for verifying the replica.
    fn ram_digest(&mut self) -> Result<u64, VmError>;
    /// Stops the VM for good (fencing, shutdown).
    fn kill(&mut self) -> impl Future<Output = ()> + Send;
    /// Resolves when the VM dies on its own (never, for a VM that is still running).
    fn died(&mut self) -> impl Future<Output = VmError> + Send;
}

/// Where a VM is resumed from at failover.
#[derive(Debug, Clone)]
pub struct RestorePoint {
    /// The replica's RAM file (the restored VM maps it as its RAM).
    pub ram_file: PathBuf,
    /// Device state of the committed checkpoint.
    pub device: Vec<u8>,
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
