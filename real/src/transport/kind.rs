//! The `--transport` choice.

use std::fmt;
use std::str::FromStr;

use super::TransportError;

/// Which transport sends checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// Batched plain `sendmsg`.
    Copy,
    /// `SO_ZEROCOPY` + `MSG_ZEROCOPY`, completions from the socket error queue.
    MsgZeroCopy,
    /// io_uring `SENDMSG_ZC`, released by notification CQEs.
    UringZc,
    /// `msg-zerocopy` that falls back to `copy` where the kernel copies anyway.
    Auto,
}

impl TransportKind {
    /// Every kind, in the order benchmarks report them.
    pub const ALL: [TransportKind; 4] = [
        TransportKind::Copy,
        TransportKind::MsgZeroCopy,
        TransportKind::UringZc,
        TransportKind::Auto,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Copy => "copy",
            TransportKind::MsgZeroCopy => "msg-zerocopy",
            TransportKind::UringZc => "uring-zc",
            TransportKind::Auto => "auto",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TransportKind {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TransportKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| TransportError::UnknownKind(s.to_string()))
    }
}

impl serde::Serialize for TransportKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for k in TransportKind::ALL {
            assert_eq!(k.name().parse::<TransportKind>().unwrap(), k);
            assert_eq!(k.to_string(), k.name());
        }
    }

    #[test]
    fn bad_name_is_a_clear_error() {
        let err = "zerocopy".parse::<TransportKind>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown transport \"zerocopy\" (expected one of: copy, msg-zerocopy, uring-zc, auto)"
        );
        assert!("Copy".parse::<TransportKind>().is_err());
        assert!("".parse::<TransportKind>().is_err());
    }
}
