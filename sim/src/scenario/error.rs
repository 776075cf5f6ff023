//! Why a scenario file was refused.

use std::path::PathBuf;

/// A scenario that cannot be run. Every variant renders as one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("{path}: cannot read scenario: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why (already part of the message, so not a `source`).
        cause: std::io::Error,
    },
    /// Not valid TOML, or fields of the wrong type, or unknown fields.
    #[error("{origin}: bad scenario file: {message}")]
    Parse {
        /// File name or `<string>`.
        origin: String,
        /// The parser's message, on one line.
        message: String,
    },
    /// Well-formed but meaningless (zero durations, unknown hosts, missing fault fields...).
    #[error("{origin}: invalid scenario: {what}")]
    Invalid {
        /// File name or `<string>`.
        origin: String,
        /// What is wrong.
        what: String,
    },
}
