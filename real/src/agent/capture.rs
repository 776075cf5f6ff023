//! The `--capture` choice (DESIGN §1 "Capture modes"): when the primary resumes its VM relative
//! to sending the checkpoint, and where the pages are sent from.

use std::fmt;
use std::str::FromStr;

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

impl CaptureMode {
    /// Every implemented mode, in the order benchmarks report them.
    pub const ALL: [CaptureMode; 3] = [
        CaptureMode::PausedSend,
        CaptureMode::Staged,
        CaptureMode::Cow,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            CaptureMode::PausedSend => "paused-send",
            CaptureMode::Staged => "staged",
            CaptureMode::Cow => "cow",
        }
    }

    /// Whether pages are copied into a staging buffer at capture (else they are sent from the
    /// guest RAM mapping: while the VM stays paused, or write-protected for cow).
    pub fn copies_pages(self) -> bool {
        self == CaptureMode::Staged
    }
}

impl fmt::Display for CaptureMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CaptureMode {
    type Err = CaptureModeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CaptureMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| CaptureModeError::Unknown(s.to_string()))
    }
}

impl serde::Serialize for CaptureMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
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
