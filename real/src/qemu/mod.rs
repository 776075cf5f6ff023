//! Controlling a stock QEMU: its command line, a QMP client, device-state capture and restore
//! through the migration stream, boot with retries, and the process itself.
//!
//! Typical primary epoch: [`Qemu::stop`] → scan dirty RAM → [`Qemu::capture_device_state`] →
//! [`Qemu::cont`]. Failover: [`Qemu::spawn_incoming`] on the replica RAM file →
//! [`Qemu::restore_device_state`] with the committed blob.

pub mod boot;
pub mod config;
pub mod devstate;
pub mod error;
pub mod guest;
pub mod process;
pub mod qmp;
pub mod serial;

pub use boot::{boot, BootOptions, Booted, GUEST_READY_MARKER};
pub use config::{
    find_binary, unprivileged_user_exists, Accel, DiskConfig, NetBackend, NetConfig, QemuConfig,
    DEFAULT_BINARY, DEFAULT_QEMU_USER,
};
pub use devstate::{
    capture_device_state, enable_ignore_shared, load_device_state, restore_device_state,
};
pub use error::{QemuError, Result};
pub use guest::GuestImage;
pub use process::{ExitWatch, Qemu};
pub use qmp::{Qmp, QmpEvent, VmStatus};
pub use serial::SerialLog;
