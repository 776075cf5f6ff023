//! The real ftvm executor: drives a stock QEMU and runs the `ftvm-model` protocol with real effects.

pub mod agent;
pub mod auth;
pub mod client;
pub mod dirty;
pub mod disk;
pub mod etcd_witness;
pub mod host;
pub mod journal_file;
pub mod log_tail;
mod named;
pub mod net;
pub mod qemu;
pub mod replica;
pub mod secure_fs;
pub mod transport;
