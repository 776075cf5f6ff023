//! The VM's network path: QEMU's stream netdev on one side, a tap device on the other, and the
//! output gate in between.

pub mod backpressure;
pub mod frame;
pub mod output;
pub mod tap;
