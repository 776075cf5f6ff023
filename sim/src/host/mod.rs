//! The software each simulated host runs: protocol nodes, the witness, and the clients.

pub(crate) mod clients;
pub(crate) mod node;
pub(crate) mod witness;
