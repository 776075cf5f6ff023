//! What can end an NBD connection. Requests the server can refuse (out of range, too large,
//! unknown command) are answered with an error reply instead and are not errors here.

use thiserror::Error;

/// Why an NBD connection ended abnormally.
#[derive(Debug, Error)]
pub enum NbdError {
    /// The socket failed or the peer closed it mid-message.
    #[error("NBD connection I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The client did not accept the fixed newstyle handshake (the only one served).
    #[error("client flags {0:#x} lack fixed newstyle")]
    NotFixedNewstyle(u32),
    /// The client set flags this server does not know.
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("bad option magic {0:#x}")]
    BadOptionMagic(u64),
    /// An option's data is longer than any option this server understands.
    #[error("option {option} carries {length} bytes (at most {max})")]
    OptionTooLong {
        /// Option number.
        option: u32,
        /// Length the client announced.
        length: u32,
        /// Longest accepted.
        max: u32,
    },
    /// The client kept negotiating past the limit.
    #[error("more than {0} options without starting transmission")]
    TooManyOptions(u32),
    /// `NBD_OPT_EXPORT_NAME` named another export (the protocol's answer is to hang up).
    #[error("client asked for unknown export {0:?}")]
    UnknownExport(String),
    /// A request header did not start with the request magic: the stream is out of step.
    #[error("bad request magic {0:#x}")]
    BadRequestMagic(u32),
    /// (client side) The server broke the protocol.
    #[error("server protocol violation: {0}")]
    ServerViolation(&'static str),
    /// (client side) The server refused the export or an option.
    #[error("server refused option {option} with reply {reply:#x}")]
    OptionRefused {
        /// Option number.
        option: u32,
        /// Reply type (an error type).
        reply: u32,
    },
    /// (client side) The server answered a request with this error value.
    #[error("server replied error {0}")]
    ErrorReply(u32),
}
