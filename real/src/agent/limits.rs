//! The bounds an agent puts on what peers and its VM can make it hold: checkpoint staging, the
//! inbound connections of its listener, the output gate's queue, and the kernel buffers of its
//! link sockets. docs/SECURITY.md lists them with their defaults.

use super::accept::ConnLimits;
use super::link::socket_buffer::DEFAULT_LINK_BUFFER_BYTES;
use super::staging::DEFAULT_MAX_DEVICE_BYTES;
use crate::net::backpressure::DEFAULT_OUTPUT_CAP_BYTES;

/// An agent's resource limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentLimits {
    /// Largest device state a backup accepts in one checkpoint.
    pub max_device_bytes: u64,
    /// The checkpoint listener's limits.
    pub conn: ConnLimits,
    /// Bytes of guest frames the output gate may hold before the agent stops reading the VM's
    /// network (the guest's transmit stalls; nothing is dropped).
    pub output_cap_bytes: u64,
    /// Cap on each kernel buffer of a checkpoint link's socket, in bytes (`None`: the
    /// kernel's autotuning). Bytes queued in the sockets are bytes an ack waits behind.
    pub link_buffer_bytes: Option<usize>,
}

impl Default for AgentLimits {
    fn default() -> Self {
        AgentLimits {
            max_device_bytes: DEFAULT_MAX_DEVICE_BYTES,
            conn: ConnLimits::default(),
            output_cap_bytes: DEFAULT_OUTPUT_CAP_BYTES,
            link_buffer_bytes: Some(DEFAULT_LINK_BUFFER_BYTES),
        }
    }
}
