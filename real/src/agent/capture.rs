//! The `--capture` choice (docs/ARCHITECTURE.md, Capture modes): when the primary resumes its VM
//! relative to sending the checkpoint, and where the pages are sent from.

/// How a checkpoint's pages are captured and when the VM resumes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum CaptureMode {
    /// The VM stays paused while its dirty pages are sent straight from the mapped guest RAM
    /// (no copy); it resumes once the transport released every buffer (for zero-copy
    /// transports: after the completions).
    PausedSend,
    /// Dirty pages are copied into a staging buffer while paused; the VM resumes at once and the
    /// buffer is sent while it runs (Remus's design).
    #[default]
    Staged,
    /// The dirty pages are write-protected (userfaultfd) while paused and the VM resumes at
    /// once; they are sent straight from guest RAM while it runs. A guest write to a page not
    /// yet sent copies it first; to a page in flight waits for its release ([`super::cow`]).
    Cow,
}

/// Errors of [`CaptureMode::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaptureModeError {
    /// A name that is no capture mode.
    #[error("unknown capture mode {0:?} (expected paused-send, staged or cow)")]
    Unknown(String),
}

crate::named::named_choices!(CaptureMode, CaptureModeError, CaptureModeError::Unknown, {
    PausedSend => "paused-send",
    Staged => "staged",
    Cow => "cow",
});

impl CaptureMode {
    /// Whether pages are copied into a staging buffer at capture (else they are sent from the
    /// guest RAM mapping: while the VM stays paused, or write-protected for cow).
    pub fn copies_pages(self) -> bool {
        self == CaptureMode::Staged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in CaptureMode::ALL {
            assert_eq!(m.name().parse::<CaptureMode>().unwrap(), m);
            assert_eq!(m.to_string(), m.name());
        }
        assert_eq!(CaptureMode::default(), CaptureMode::Staged);
        assert!(CaptureMode::Staged.copies_pages());
        assert!(!CaptureMode::PausedSend.copies_pages());
        assert!(!CaptureMode::Cow.copies_pages());
        assert_eq!("cow".parse::<CaptureMode>().unwrap(), CaptureMode::Cow);
    }

    #[test]
    fn bad_names_are_clear_errors() {
        let e = "paused".parse::<CaptureMode>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown capture mode \"paused\" (expected paused-send, staged or cow)"
        );
        assert!("Staged".parse::<CaptureMode>().is_err());
        assert!("".parse::<CaptureMode>().is_err());
        assert!("COW".parse::<CaptureMode>().is_err());
    }
}
