//! The layer between ftvm's executors and its model, shared by the simulator (`ftvm-sim`) and
//! the real agent (`ftvm-real`), so that the code production runs around the model is the code
//! the simulator tests.
//!
//! The model ([`ftvm_model::Node`]) decides everything, but it speaks of peers, epochs and
//! gates, while executors see connections, bytes and frames. Everything in between lives here,
//! without I/O and without clocks (times come in as arguments):
//!
//! - [`link::LinkReader`]: a checkpoint link's bytes → control messages and checkpoints, with
//!   the generation floor raised on every `SyncStart`, checkpoints staged under the VM's bounds
//!   ([`staging`]) and a checkpoint cut short reported damaged;
//! - [`peers::PeerTable`]: which connection speaks for which node, what replaces what;
//! - [`NodeDriver`]: the node with that table, the output gate (the model's
//!   [`ftvm_model::OutputGate`], the only one) and the staged checkpoints; it turns connection
//!   events into inputs and returns each action with the bookkeeping already done (frames
//!   released, the checkpoint to commit, connections to close);
//! - [`journal`]: the record of inputs and actions that a run is checked and replayed from;
//! - [`WriteHistory`]: which pages or disk blocks a capture sends, catch-ups included.
//!
//! An executor keeps only the I/O: sockets, the VM, files, timers.
//!
//! Everything here handles values a peer sent: casts that could truncate them are linted.
#![warn(clippy::cast_possible_truncation)]

pub mod checkpoint;
pub mod journal;
pub mod link;
mod node_driver;
pub mod peers;
pub mod staging;
pub mod write_history;

pub use checkpoint::StagedCheckpoint;
pub use journal::{Journal, Record};
pub use link::{ItemDecoder, LinkError, LinkEvent, LinkReader};
pub use node_driver::{Accepted, Effect, Emitted, NodeDriver, Verdict};
pub use peers::{Admission, PeerTable};
pub use staging::{StagingError, StagingLimits};
pub use write_history::WriteHistory;
