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
}

/// Errors of [`CaptureMode::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaptureModeError {
    /// A name that is no capture mode.
    #[error("unknown capture mode {0:?} (expected paused-send or staged)")]
    Unknown(String),
    /// A mode of the design that this build does not implement.
    #[error("capture mode {0:?} is not implemented (use paused-send or staged)")]
    NotImplemented(&'static str),
}

impl CaptureMode {
    /// Every implemented mode, in the order benchmarks report them.
    pub const ALL: [CaptureMode; 2] = [CaptureMode::PausedSend, CaptureMode::Staged];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            CaptureMode::PausedSend => "paused-send",
            CaptureMode::Staged => "staged",
        }
    }

    /// Whether pages are copied into a staging buffer at capture (else they are sent from the
    /// guest RAM mapping while the VM stays paused).
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
        if s == "cow" {
            return Err(CaptureModeError::NotImplemented("cow"));
        }
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
    }

    #[test]
    fn bad_names_are_clear_errors() {
        let e = "paused".parse::<CaptureMode>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown capture mode \"paused\" (expected paused-send or staged)"
        );
        assert!("Staged".parse::<CaptureMode>().is_err());
        assert!("".parse::<CaptureMode>().is_err());
        let e = "cow".parse::<CaptureMode>().unwrap_err();
        assert_eq!(e, CaptureModeError::NotImplemented("cow"));
        assert_eq!(
            e.to_string(),
            "capture mode \"cow\" is not implemented (use paused-send or staged)"
        );
    }
}
