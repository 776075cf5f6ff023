//! How one VM's register is stored as an etcd value: the witness state type the standalone
//! witness persists (`witness_store`), inside an envelope that names the format and its version,
//! so that a value written by something else, or by a later incompatible ftvm, is refused instead
//! of being read as a register. Whatever is in etcd is treated as hostile: bounded size, typed
//! errors, never a panic.

use ftvm_model::{VmId, WitnessState};
use serde::{Deserialize, Serialize};

/// The envelope's format name.
pub const FORMAT: &str = "ftvm-witness-register";
/// The envelope's version; bump it on any change of meaning.
pub const VERSION: u32 = 1;
/// A register is about 300 bytes of JSON; anything far larger is not one of ours.
pub const MAX_VALUE_BYTES: usize = 4096;

/// Why a value is not this VM's register.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegisterError {
    /// Too large to be a register.
    #[error("value of {0} bytes is larger than any register ({MAX_VALUE_BYTES} bytes at most)")]
    TooLarge(usize),
    /// Not the envelope (not JSON, wrong fields, wrong types).
    #[error("not an ftvm witness register: {0}")]
    Malformed(String),
    /// The envelope of something else.
    #[error("format {found:?}, expected {FORMAT:?}")]
    Format {
        /// What the value calls itself.
        found: String,
    },
    /// A version this build does not know.
    #[error("register version {found}, this build reads version {VERSION}")]
    Version {
        /// The value's version.
        found: u32,
    },
    /// The register of another VM.
    #[error("the register of VM {found}, not of VM {expected}")]
    OtherVm {
        /// The VM it is about.
        found: VmId,
        /// The VM asked about.
        expected: VmId,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    format: String,
    version: u32,
    state: WitnessState,
}

/// The value stored for `state`.
pub fn encode(state: &WitnessState) -> Vec<u8> {
    let envelope = Envelope {
        format: FORMAT.to_string(),
        version: VERSION,
        state: *state,
    };
    // Plain integers, options and strings: serializing cannot fail.
    serde_json::to_vec(&envelope).unwrap_or_default()
}

/// The register of `vm` stored in `value`.
pub fn decode(value: &[u8], vm: VmId) -> Result<WitnessState, RegisterError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(RegisterError::TooLarge(value.len()));
    }
    let envelope: Envelope =
        serde_json::from_slice(value).map_err(|e| RegisterError::Malformed(e.to_string()))?;
    if envelope.format != FORMAT {
        // Bounded by MAX_VALUE_BYTES already.
        return Err(RegisterError::Format {
            found: envelope.format,
        });
    }
    if envelope.version != VERSION {
        return Err(RegisterError::Version {
            found: envelope.version,
        });
    }
    if envelope.state.vm != vm {
        return Err(RegisterError::OtherVm {
            found: envelope.state.vm,
            expected: vm,
        });
    }
    Ok(envelope.state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ftvm_model::{Epoch, NodeId, Registration};

    const VM: VmId = VmId(3);

    fn state() -> WitnessState {
        let mut s = WitnessState::initial(VM, NodeId(1));
        s.backup = Some(Registration {
            node: NodeId(2),
            since: Epoch(9),
        });
        s.floor = Epoch(4);
        s
    }

    #[test]
    fn a_register_round_trips_and_fits_the_bound() {
        let bytes = encode(&state());
        assert!(bytes.len() < MAX_VALUE_BYTES, "{}", bytes.len());
        assert_eq!(decode(&bytes, VM), Ok(state()));
    }

    #[test]
    fn hostile_values_are_refused_with_their_reason() {
        assert!(matches!(
            decode(b"{not json", VM),
            Err(RegisterError::Malformed(_))
        ));
        assert!(matches!(decode(b"", VM), Err(RegisterError::Malformed(_))));
        // The standalone witness's file format (no envelope) is not taken for a register.
        let bare = serde_json::to_vec(&state()).unwrap();
        assert!(matches!(
            decode(&bare, VM),
            Err(RegisterError::Malformed(_))
        ));
        let big = vec![b' '; MAX_VALUE_BYTES + 1];
        assert_eq!(
            decode(&big, VM),
            Err(RegisterError::TooLarge(MAX_VALUE_BYTES + 1))
        );
        let with = |format: &str, version: u32| {
            serde_json::to_vec(&Envelope {
                format: format.into(),
                version,
                state: state(),
            })
            .unwrap()
        };
        assert_eq!(
            decode(&with("something-else", VERSION), VM),
            Err(RegisterError::Format {
                found: "something-else".into()
            })
        );
        assert_eq!(
            decode(&with(FORMAT, VERSION + 1), VM),
            Err(RegisterError::Version { found: VERSION + 1 })
        );
        assert_eq!(
            decode(&encode(&state()), VmId(4)),
            Err(RegisterError::OtherVm {
                found: VM,
                expected: VmId(4)
            })
        );
    }
}
