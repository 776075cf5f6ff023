//! Static key pairs and the key directory.
//!
//! A key directory holds one file pair per party: `node-<id>.key` (the private key, hex, mode
//! 0600, only on that node's host) and `node-<id>.pub` (the public key, hex), and the same for
//! `witness`. `ftvm keygen` writes them. A node loads its own private key and every `.pub` it
//! finds; in a real deployment each host's directory holds only its own private key.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ftvm_model::NodeId;

/// Length of keys (X25519).
pub const KEY_LEN: usize = 32;

/// The Noise protocol every ftvm connection uses.
/// AES-256-GCM, not ChaCha20-Poly1305: `ftvm bench mac` measured it twice as fast here (AES-NI
/// and CLMUL), and with `--encrypt` every page goes through it.
pub(crate) const NOISE_PARAMS: &str = "Noise_IK_25519_AESGCM_BLAKE2s";

/// Errors loading or writing keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A key file does not hold a hex key of the right length.
    #[error("key file {0}: not a {KEY_LEN}-byte hex key")]
    Malformed(PathBuf),
    /// A private key file others may read.
    #[error("private key {path} has mode {mode:o}: it must not be readable by group or others (chmod 600)")]
    Exposed {
        /// File.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// A needed public key is missing.
    #[error("no public key for {0} in the key directory")]
    Missing(String),
    /// Key generation failed.
    #[error("key generation: {0}")]
    Generate(#[from] snow::Error),
}

/// A public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; KEY_LEN]);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", &hex(&self.0)[..16])
    }
}

/// A static key pair.
#[derive(Clone)]
pub struct KeyPair {
    pub(crate) private: [u8; KEY_LEN],
    /// The public half.
    pub public: PublicKey,
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyPair({:?}, private key hidden)", self.public)
    }
}

impl KeyPair {
    /// A fresh key pair from the OS's randomness.
    pub fn generate() -> Result<KeyPair, KeyError> {
        let kp = snow::Builder::new(NOISE_PARAMS.parse().expect("valid noise params"))
            .generate_keypair()?;
        let mut private = [0; KEY_LEN];
        let mut public = [0; KEY_LEN];
        private.copy_from_slice(&kp.private);
        public.copy_from_slice(&kp.public);
        Ok(KeyPair {
            private,
            public: PublicKey(public),
        })
    }
}

/// The public keys of the parties one may talk to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trust {
    /// Agents, by node id.
    pub nodes: BTreeMap<NodeId, PublicKey>,
    /// The witness.
    pub witness: Option<PublicKey>,
}

impl Trust {
    /// The node whose key is `key`, if any.
    pub fn node_of(&self, key: &[u8]) -> Option<NodeId> {
        self.nodes
            .iter()
            .find(|(_, k)| k.0.as_slice() == key)
            .map(|(n, _)| *n)
    }
}

/// What a party needs to authenticate: its own key pair and the others' public keys.
#[derive(Clone, Debug)]
pub struct Identity {
    /// This party's key pair.
    pub me: KeyPair,
    /// Everybody else's public keys.
    pub trust: Trust,
}

impl Identity {
    /// Loads node `node`'s identity from `dir` (its private key, every public key).
    pub fn load_node(dir: &Path, node: NodeId) -> Result<Identity, KeyError> {
        let me = load_pair(dir, &node_name(node))?;
        let trust = load_trust(dir)?;
        if trust.witness.is_none() {
            return Err(KeyError::Missing("the witness".into()));
        }
        Ok(Identity { me, trust })
    }

    /// As [`Identity::load_node`], for an agent whose witness is not an `ftvm witness` (etcd
    /// as the witness authenticates no Noise key): the witness's public key may be absent.
    pub fn load_node_without_witness_key(dir: &Path, node: NodeId) -> Result<Identity, KeyError> {
        Ok(Identity {
            me: load_pair(dir, &node_name(node))?,
            trust: load_trust(dir)?,
        })
    }

    /// Loads the witness's identity from `dir`.
    pub fn load_witness(dir: &Path) -> Result<Identity, KeyError> {
        Ok(Identity {
            me: load_pair(dir, WITNESS)?,
            trust: load_trust(dir)?,
        })
    }

    /// In-memory identities for nodes `nodes` and a witness, all trusting each other (tests and
    /// single-process benchmarks): returns the witness's and each node's.
    pub fn generate_set(
        nodes: &[NodeId],
    ) -> Result<(Identity, BTreeMap<NodeId, Identity>), KeyError> {
        let witness = KeyPair::generate()?;
        let mut pairs = BTreeMap::new();
        for &n in nodes {
            pairs.insert(n, KeyPair::generate()?);
        }
        let trust = Trust {
            nodes: pairs.iter().map(|(n, k)| (*n, k.public)).collect(),
            witness: Some(witness.public),
        };
        let ids = pairs
            .into_iter()
            .map(|(n, me)| {
                (
                    n,
                    Identity {
                        me,
                        trust: trust.clone(),
                    },
                )
            })
            .collect();
        Ok((Identity { me: witness, trust }, ids))
    }
}

const WITNESS: &str = "witness";

/// The file stem of node `n`'s keys.
pub fn node_name(n: NodeId) -> String {
    format!("node-{}", n.0)
}

/// Writes a fresh key pair for `name` (`node-<id>` or `witness`) into `dir` (created 0700 if
/// missing): `<name>.key` (0600, refused if it exists) and `<name>.pub`.
pub fn generate_into(dir: &Path, name: &str) -> Result<PublicKey, KeyError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| KeyError::Io { path, source }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    let kp = KeyPair::generate()?;
    let key = dir.join(format!("{name}.key"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&key)
        .map_err(io(&key))?;
    f.write_all(format!("{}\n", hex(&kp.private)).as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(io(&key))?;
    let public = dir.join(format!("{name}.pub"));
    std::fs::write(&public, format!("{}\n", hex(&kp.public.0))).map_err(io(&public))?;
    Ok(kp.public)
}

fn load_pair(dir: &Path, name: &str) -> Result<KeyPair, KeyError> {
    let path = dir.join(format!("{name}.key"));
    let io = |source| KeyError::Io {
        path: path.clone(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io)?;
    let meta = f.metadata().map_err(io)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 || meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(KeyError::Exposed { path, mode });
    }
    let text = std::io::read_to_string(f).map_err(io)?;
    let private = parse_hex(text.trim()).ok_or_else(|| KeyError::Malformed(path.clone()))?;
    let public = x25519_public(&private)?;
    Ok(KeyPair { private, public })
}

/// The public key of a private key: X25519 with the base point, by the same implementation the
/// handshakes use (so a key file holds only the private half and cannot disagree with itself).
fn x25519_public(private: &[u8; KEY_LEN]) -> Result<PublicKey, KeyError> {
    use snow::resolvers::{CryptoResolver, DefaultResolver};
    let mut dh = DefaultResolver
        .resolve_dh(&snow::params::DHChoice::Curve25519)
        .ok_or_else(|| KeyError::Missing("an X25519 implementation".into()))?;
    dh.set(private);
    let mut public = [0; KEY_LEN];
    public.copy_from_slice(dh.pubkey());
    Ok(PublicKey(public))
}

fn load_trust(dir: &Path) -> Result<Trust, KeyError> {
    let io = |source| KeyError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut trust = Trust::default();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".pub"))
        else {
            continue;
        };
        let text = std::fs::read_to_string(&path).map_err(|source| KeyError::Io {
            path: path.clone(),
            source,
        })?;
        let key =
            PublicKey(parse_hex(text.trim()).ok_or_else(|| KeyError::Malformed(path.clone()))?);
        if stem == WITNESS {
            trust.witness = Some(key);
        } else if let Some(id) = stem.strip_prefix("node-").and_then(|i| i.parse().ok()) {
            trust.nodes.insert(NodeId(id), key);
        }
    }
    Ok(trust)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex(s: &str) -> Option<[u8; KEY_LEN]> {
    if s.len() != 2 * KEY_LEN || !s.is_ascii() {
        return None;
    }
    let mut out = [0; KEY_LEN];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_directory_loads_back_with_matching_public_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p1 = generate_into(dir.path(), "node-1").unwrap();
        let p2 = generate_into(dir.path(), "node-2").unwrap();
        let pw = generate_into(dir.path(), "witness").unwrap();
        let id = Identity::load_node(dir.path(), NodeId(1)).unwrap();
        assert_eq!(id.me.public, p1);
        assert_eq!(id.trust.nodes[&NodeId(2)], p2);
        assert_eq!(id.trust.witness, Some(pw));
        assert_eq!(id.trust.node_of(&p2.0), Some(NodeId(2)));
        let w = Identity::load_witness(dir.path()).unwrap();
        assert_eq!(w.me.public, pw);
    }

    #[test]
    fn keygen_refuses_to_overwrite_a_private_key() {
        let dir = tempfile::tempdir().unwrap();
        generate_into(dir.path(), "node-1").unwrap();
        assert!(matches!(
            generate_into(dir.path(), "node-1"),
            Err(KeyError::Io { .. })
        ));
    }

    #[test]
    fn a_private_key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        generate_into(dir.path(), "node-1").unwrap();
        generate_into(dir.path(), "witness").unwrap();
        let key = dir.path().join("node-1.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identity::load_node(dir.path(), NodeId(1)).unwrap_err();
        assert!(
            matches!(err, KeyError::Exposed { mode: 0o644, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_symlinked_private_key_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        generate_into(dir.path(), "witness").unwrap();
        std::os::unix::fs::symlink(
            dir.path().join("witness.key"),
            dir.path().join("node-1.key"),
        )
        .unwrap();
        assert!(matches!(
            Identity::load_node(dir.path(), NodeId(1)),
            Err(KeyError::Io { .. })
        ));
    }

    #[test]
    fn an_agent_on_another_witness_needs_no_witness_key() {
        let dir = tempfile::tempdir().unwrap();
        let p1 = generate_into(dir.path(), "node-1").unwrap();
        generate_into(dir.path(), "node-2").unwrap();
        assert!(Identity::load_node(dir.path(), NodeId(1)).is_err());
        let id = Identity::load_node_without_witness_key(dir.path(), NodeId(1)).unwrap();
        assert_eq!(id.me.public, p1);
        assert_eq!(id.trust.witness, None);
        assert!(id.trust.nodes.contains_key(&NodeId(2)));
    }

    #[test]
    fn a_missing_witness_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        generate_into(dir.path(), "node-1").unwrap();
        let err = Identity::load_node(dir.path(), NodeId(1)).unwrap_err();
        assert!(err.to_string().contains("witness"), "{err}");
    }

    #[test]
    fn malformed_key_text_is_refused() {
        assert_eq!(parse_hex("zz"), None);
        assert_eq!(parse_hex(&"0".repeat(63)), None);
        assert_eq!(parse_hex(&"é".repeat(32)), None);
        assert_eq!(parse_hex(&"ab".repeat(32)), Some([0xab; 32]));
    }
}
