//! # ftvm-model: the ftvm checkpoint protocol as sans-IO state machines
//!
//! This crate decides everything and does nothing: no sockets, clocks, threads or randomness.
//! A driver (the turmoil simulator in `ftvm-sim`, the tokio executor in `ftvm-real`) feeds
//! [`Input`]s with the current [`Time`] and carries out the returned [`Action`]s. Same inputs in
//! the same order ⇒ same actions. These docs are the authoritative API description.
//!
//! ## Driving a node
//!
//! ```
//! use ftvm_model::{Action, Config, Input, Node, NodeId, Start, Time, VmId};
//!
//! let cfg = Config::new(VmId(7), 1024, NodeId(0)); // vm, RAM pages, witness
//! let mut primary = Node::new(cfg, NodeId(1), Start::Primary);
//! // The first handle() call (any input) emits the start actions.
//! let actions = primary.handle(Time::ZERO, Input::Timeout);
//! assert!(actions.contains(&Action::ResumeVm { epoch: ftvm_model::Epoch(1) }));
//! // Then: call handle(now, Input::Timeout) whenever now >= primary.poll_timeout().
//! ```
//!
//! * [`Node::new`]`(config, me, start)`, [`Node::handle`]`(now, input) -> Vec<Action>`,
//!   [`Node::poll_timeout`]` -> Option<Time>`, [`Node::status`]` -> Status`.
//! * [`Witness::new`]`(vm, primary)`, [`Witness::handle`]`(now, request) -> WitnessReply`,
//!   [`Witness::state`] (persist it before replying), [`Witness::from_state`].
//! * [`wire`]: versioned binary frames for [`PeerMsg`], witness requests/replies and
//!   checkpoints (guest pages, then the epoch's disk blocks of [`wire::DISK_BLOCK_SIZE`], then
//!   device state), with typed [`wire::WireError`]s.
//! * [`OutputGate`]: the reference semantics of `ResumeVm` tags, `ReleaseOutput`,
//!   `SetOutputGate` and `Fence` for frames, usable by drivers and checkers.
//!
//! ## Roles and phases
//!
//! A [`Node`] holds one [`Role`]: `Primary` (phases `Waiting`, `Syncing`, `Registering`,
//! `Protected`, `Dropping`, `Degraded`), `Backup` (`Joining`, `Syncing`, `Protecting`,
//! `TakingOver`, `Restoring`), `Joiner` (`Locating`: asking the witness whom to join) or
//! `Fenced`. A backup whose takeover is granted becomes a primary with `failed_over` set.
//!
//! ## Rules worth knowing (docs/PROTOCOL.md describes the whole protocol)
//!
//! 1. **Registration tokens.** A backup registration is `Registration { node, since }`, where
//!    `since` is the epoch of the full sync the replica came from. `RegisterBackup`,
//!    `DropBackup` and `Takeover` carry one, and the witness register keeps a `floor` (tokens
//!    `<= floor` are void) and the last `promoted` registration. Without them a late duplicate
//!    `RegisterBackup` could re-register a dropped backup behind a degraded primary's back
//!    (split brain and lost output); see [`witness`] for the argument. The register's field is
//!    spelled `generation` (`gen` is reserved in Rust 2024).
//! 2. **A joiner vanishing with `RegisterBackup` outstanding** is dropped at once: the primary
//!    does not wait for the reply but sends `DropBackup` with that token. The drop raises
//!    `floor`, so the outstanding register can no longer apply, whatever order they arrive in.
//! 3. **Replies carry their request** (`WitnessReply { request, granted, state }`) so nodes
//!    ignore stale replies. Nodes resend a request every `witness_retry` until answered.
//! 4. **Start actions** come out of the first `handle` call; `poll_timeout` is `Time::ZERO`
//!    before it.
//! 5. **Signs of life**: `Heard { from }` (bytes arrived: liveness only, so a long full sync
//!    does not look like silence) and `CheckpointStarted { epoch }` (always accepted; the
//!    `AckBeforeCommit` mutant acks on it).
//! 6. **Generations on the wire**: `SendCheckpoint` carries `generation` (for the frame
//!    header); `Join` carries `known`, the newest generation the joiner heard of; `Reject`
//!    carries the sender's generation.
//! 7. **Primary phases around the witness**: `Waiting` (no backup yet, gate held),
//!    `Registering` (`RegisterBackup` outstanding) and `Dropping` (`DropBackup` outstanding,
//!    gate held).
//! 8. **Release needs registration**: acks of a joiner release output only once its
//!    `RegisterBackup` is granted (before that, a takeover by it is impossible).
//! 9. **Fenced nodes rejoin** as joiners after `Config::rejoin_after_fence` (default: the
//!    failure timeout); `None` keeps them fenced. A joiner refused for a permanent reason
//!    (wrong VM, RAM, page or disk size) is fenced for good.
//! 10. `StartVm { from, generation }` starts the VM with frames tagged `from + 1`; the model
//!     does not emit a `ResumeVm` after it. The gate is set `Open` just before `StartVm`.
//! 11. **A denied `Takeover` voids its token** at the witness (raises `floor`): the backup
//!     throws its replica away on a denial, so a `RegisterBackup` for that token still in
//!     flight must not later name a backup that has nothing to resume from.
//! 12. **Deposition is the witness's word**: a primary fences itself on *any* witness reply
//!     showing a newer generation (or another primary for its own), not only on a denied drop.
//!     A peer's frame showing a newer generation is only a claim: the primary closes that link
//!     (its backup's link counts as the backup lost), asks the witness (`Query`, resent every
//!     `witness_retry`, one at a time however many claims arrive) and fences only if the reply
//!     confirms; meanwhile it runs under the usual output rules, which never depended on such
//!     claims (see [`Primary`]'s module docs). A `Join` whose `known` is beyond our generation,
//!     however absurd, is such a claim: its link is closed and it costs one `Query`.
//! 13. A primary's own backup sending a fresh `Join` counts as that backup lost (drop it, then
//!     `Reject { Busy }`; the joiner retries). A backup treats `Reject { Busy | HaveBackup }`
//!     of its primary's generation as a sign of life (no needless takeover); `Heard` counts
//!     as life only while a stream is under way (`Syncing`, `Protecting`), never while joining.
//! 14. Wire: a `Join` frame travels under the joiner's VM and known generation; `Join` and
//!     witness frames are exempt from the stale-generation check (see [`wire::Expect`]).
//! 15. **A fenced node is silent.** The primary closes its peer's link before `Fence`, and the
//!     fenced role answers a `Join` by closing its link, never with a `Reject` or a heartbeat,
//!     so a backup still following it sees only silence and takes over after the failure
//!     timeout. Drivers close every other checkpoint link at `Fence`.
//!
//! ## What a driver must guarantee
//!
//! * Carry out actions in order. Answer every `Capture` with `CaptureDone`, every `Commit`
//!   with `Committed` (even after a disconnect: a commit is local and atomic), `StartVm` with
//!   `VmStarted`; `Connect` with `Connected` or `Disconnected`.
//! * Per connection, deliver messages and checkpoint inputs in order, after its `Connected` and
//!   before its `Disconnected` (see [`Input`]). After the model emits `Disconnect` or the link
//!   drops, a `CheckpointSent` is optional (the primary stops waiting for it), but capture
//!   buffers still in flight must not be reused before the kernel is done with them.
//! * The node never answers a `Disconnected` with `Disconnect`: by then the driver may hold a
//!   new link of that peer, which it would close.
//! * Witness: call [`Witness::handle`] one request at a time and persist [`Witness::state`]
//!   before sending the reply; requests/replies may be lost, delayed or duplicated.
//! * Tag frames with the epoch of the last `ResumeVm` (or `from + 1` after `StartVm`) and gate
//!   them exactly as [`OutputGate`] does. Report the first frame of an epoch the gate holds
//!   with `OutputHeld` (the output epoch policy ends epochs on it; see [`EpochPolicy`]).
//! * At `Fence`, close every checkpoint link, not only the peer the model disconnects: a
//!   node that stopped its VM must look dead to every backup.
//!
//! ## Mutants
//!
//! With the cargo feature `mutants`, `Config::mutant: Option<Mutant>` switches on one
//! deliberate bug (see [`mutants`]); without the feature neither the field nor the enum exist.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod action;
mod backup;
mod config;
mod ctx;
mod epoch_policy;
mod fenced;
mod gate;
mod ids;
mod input;
mod joiner;
mod msg;
pub mod mutants;
mod node;
mod primary;
#[cfg(test)]
mod scenarios;
mod status;
#[cfg(test)]
mod testkit;
mod time;
pub mod wire;
pub mod witness;
mod witness_msg;

pub use action::{Action, Event, FullSyncReason, Gate, Scope};
pub use backup::Backup;
pub use config::{Config, ConfigError, Start};
pub use epoch_policy::{EpochPolicy, OutputDriven};
pub use fenced::{FenceReason, Fenced};
pub use gate::OutputGate;
pub use ids::{Epoch, Generation, NodeId, VmId};
pub use input::Input;
pub use joiner::Joiner;
pub use msg::{PeerMsg, RejectReason, ReplicaAt};
#[cfg(feature = "mutants")]
pub use mutants::Mutant;
pub use node::{Node, Role};
pub use primary::Primary;
pub use status::{Phase, RoleKind, Status};
pub use time::Time;
pub use witness::Witness;
pub use witness_msg::{Registration, WitnessReply, WitnessRequest, WitnessState};
