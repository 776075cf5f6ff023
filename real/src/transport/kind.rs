//! The `--transport` choice.

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

crate::named::named_choices!(TransportKind, TransportError, TransportError::UnknownKind, {
    Copy => "copy",
    MsgZeroCopy => "msg-zerocopy",
    UringZc => "uring-zc",
    Auto => "auto",
});

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
