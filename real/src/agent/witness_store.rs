//! The witness's register on disk. It is written before every reply (a restarted witness must
//! not forget a grant it gave) and it is the only memory of who may run the VM, so: a missing file
//! is never taken for a fresh register unless the operator says `--init`, and `--init` never
//! overwrites an existing one (a mistyped flag must not reset a register and allow two primaries).

use std::path::{Path, PathBuf};

use ftvm_model::{NodeId, VmId, Witness, WitnessState};

use crate::secure_fs::{self, Durability, SecureFsError, PRIVATE_FILE_MODE};

/// Errors of the witness's state file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No state file and no `--init`.
    #[error(
        "witness state {0} does not exist; start with --init to create a fresh register for a \
         new VM (never for a VM already protected: its register would be lost)"
    )]
    Missing(PathBuf),
    /// `--init` given, but a register exists.
    #[error(
        "witness state {0} already exists; refusing --init, which would reset the register \
         (start without --init to keep it)"
    )]
    Exists(PathBuf),
    /// Not a register we can read.
    #[error("witness state {path} is corrupt: {detail}")]
    Corrupt {
        /// File.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The register of another VM.
    #[error("witness state {path} belongs to VM {found}, not {expected}")]
    OtherVm {
        /// File.
        path: PathBuf,
        /// The VM it is about.
        found: VmId,
        /// The VM this witness serves.
        expected: VmId,
    },
    /// Reading or writing failed, or the file is not safely ours.
    #[error("witness state: {0}")]
    Fs(#[from] SecureFsError),
}

/// How to start from the state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// The file must exist and hold this VM's register.
    Existing,
    /// The file must not exist: create a fresh register naming `primary` (generation 1).
    Init {
        /// Primary of generation 1.
        primary: NodeId,
    },
}

/// The witness's state file.
#[derive(Debug, Clone)]
pub struct WitnessStore {
    path: PathBuf,
}

impl WitnessStore {
    /// Opens the register of `vm` at `path` as `how` says; with [`Open::Init`] the fresh
    /// register is on disk before this returns.
    pub fn open(path: &Path, vm: VmId, how: Open) -> Result<(WitnessStore, Witness), StoreError> {
        let store = WitnessStore {
            path: path.to_path_buf(),
        };
        let witness = match how {
            Open::Existing => store.load(vm)?,
            Open::Init { primary } => {
                let w = Witness::new(vm, primary);
                // O_EXCL: an existing register (or anything planted there) is never replaced.
                let mut f = match secure_fs::create_new(path, PRIVATE_FILE_MODE) {
                    Ok(f) => f,
                    Err(SecureFsError::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::AlreadyExists =>
                    {
                        return Err(StoreError::Exists(path.to_path_buf()));
                    }
                    Err(e) => return Err(e.into()),
                };
                use std::io::Write;
                let json = encode(path, w.state())?;
                let write = f.write_all(&json).and_then(|()| f.sync_all());
                write.map_err(|source| SecureFsError::Io {
                    path: path.to_path_buf(),
                    what: "write",
                    source,
                })?;
                secure_fs::sync_parent(path)?;
                w
            }
        };
        Ok((store, witness))
    }

    fn load(&self, vm: VmId) -> Result<Witness, StoreError> {
        let path = &self.path;
        let mut f = match secure_fs::open_existing(path, false) {
            Ok(f) => f,
            Err(SecureFsError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Err(StoreError::Missing(path.clone()));
            }
            Err(e) => return Err(e.into()),
        };
        let mut bytes = Vec::new();
        use std::io::Read;
        f.read_to_end(&mut bytes)
            .map_err(|source| SecureFsError::Io {
                path: path.clone(),
                what: "read",
                source,
            })?;
        let state: WitnessState =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        if state.vm != vm {
            return Err(StoreError::OtherVm {
                path: path.clone(),
                found: state.vm,
                expected: vm,
            });
        }
        Ok(Witness::from_state(state))
    }

    /// The state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Persists `state`; when this returns Ok the new register survives a crash of the witness
    /// or its host: the temporary file is fsynced before the rename and the directory after it
    /// (see [`secure_fs::sync_parent`]), so a reply sent afterwards never names a grant that a
    /// reboot could undo.
    pub fn save(&self, state: &WitnessState) -> Result<(), StoreError> {
        let json = encode(&self.path, state)?;
        secure_fs::write_replace(&self.path, &json, PRIVATE_FILE_MODE, Durability::Durable)?;
        Ok(())
    }
}

fn encode(path: &Path, state: &WitnessState) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(state).map_err(|e| StoreError::Corrupt {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ftvm_model::{Epoch, Registration, Time, WitnessRequest};
    use std::os::unix::fs::MetadataExt;

    const VM: VmId = VmId(7);

    /// Node 1 (primary) registers node 2 as its backup.
    fn register(generation: ftvm_model::Generation) -> WitnessRequest {
        WitnessRequest::RegisterBackup {
            generation,
            primary: NodeId(1),
            backup: Registration {
                node: NodeId(2),
                since: Epoch(3),
            },
        }
    }

    #[test]
    fn a_missing_file_without_init_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("witness.json");
        assert!(matches!(
            WitnessStore::open(&p, VM, Open::Existing),
            Err(StoreError::Missing(_))
        ));
        assert!(!p.exists(), "nothing was created");
    }

    #[test]
    fn init_creates_a_0600_register_and_refuses_an_existing_one() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("witness.json");
        let (store, mut w) = WitnessStore::open(&p, VM, Open::Init { primary: NodeId(1) }).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(w.state().primary, NodeId(1));
        // Move the register on, then try to reset it with a mistyped --init.
        let reply = w.handle(Time::ZERO, register(w.state().generation));
        assert!(reply.granted);
        store.save(w.state()).unwrap();
        let before = std::fs::read(&p).unwrap();
        assert!(matches!(
            WitnessStore::open(&p, VM, Open::Init { primary: NodeId(1) }),
            Err(StoreError::Exists(_))
        ));
        assert_eq!(
            std::fs::read(&p).unwrap(),
            before,
            "the register is untouched"
        );
        let (_, again) = WitnessStore::open(&p, VM, Open::Existing).unwrap();
        assert_eq!(again.state(), &reply.state);
    }

    #[test]
    fn the_register_survives_a_restart_and_the_rename_leaves_no_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("witness.json");
        let (store, mut w) = WitnessStore::open(&p, VM, Open::Init { primary: NodeId(1) }).unwrap();
        assert!(w.handle(Time::ZERO, register(w.state().generation)).granted);
        store.save(w.state()).unwrap();
        assert!(!secure_fs::temp_path(&p).exists());
        drop(store);
        let (_, restarted) = WitnessStore::open(&p, VM, Open::Existing).unwrap();
        assert_eq!(restarted.state(), w.state());
        assert_eq!(restarted.state().backup.map(|b| b.node), Some(NodeId(2)));
    }

    #[test]
    fn a_corrupt_file_or_another_vms_register_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("witness.json");
        secure_fs::write_replace(&p, b"{not json", PRIVATE_FILE_MODE, Durability::Atomic).unwrap();
        assert!(matches!(
            WitnessStore::open(&p, VM, Open::Existing),
            Err(StoreError::Corrupt { .. })
        ));
        std::fs::remove_file(&p).unwrap();
        WitnessStore::open(&p, VmId(8), Open::Init { primary: NodeId(1) }).unwrap();
        let err = WitnessStore::open(&p, VM, Open::Existing).unwrap_err();
        assert!(
            matches!(err, StoreError::OtherVm { found: VmId(8), .. }),
            "{err}"
        );
    }
}
