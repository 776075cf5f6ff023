//! Certificates for a local etcd cluster that requires client certificates (the demo's and the
//! tests'): one CA, a server certificate for the members' client address, and client
//! certificates the CA signs. A client certificate's common name (CN) is the name it was issued
//! under: with etcd's access control on, that is its etcd user (`node-N` for an agent, `root`
//! for the administrator). Real deployments bring their own PKI; the agents only read PEM
//! files (`crate::etcd_witness::EtcdTlsFiles`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

use super::etcd_cluster::{ClusterAccess, ClusterTls};
use crate::etcd_witness::EtcdTlsFiles;
use crate::secure_fs::{self, Durability, SecureFsError, PRIVATE_FILE_MODE, READABLE_FILE_MODE};

/// Why certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum EtcdCertsError {
    /// Generating a key or signing a certificate failed.
    #[error("generating {what}: {source}")]
    Generate {
        /// Which certificate.
        what: String,
        /// Cause.
        source: rcgen::Error,
    },
    /// Writing a file failed.
    #[error(transparent)]
    Write(#[from] SecureFsError),
}

/// A CA that signs certificates into one directory.
pub struct LocalCa {
    dir: PathBuf,
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn generated<T>(what: &str, r: Result<T, rcgen::Error>) -> Result<T, EtcdCertsError> {
    r.map_err(|source| EtcdCertsError::Generate {
        what: what.to_string(),
        source,
    })
}

impl LocalCa {
    /// A new CA named `name`, its certificate written to `<dir>/<name>.pem`.
    pub fn create(dir: &Path, name: &str) -> Result<LocalCa, EtcdCertsError> {
        secure_fs::private_dir(dir)?;
        let key = generated(name, KeyPair::generate())?;
        let mut params = generated(name, CertificateParams::new(Vec::<String>::new()))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = generated(name, params.self_signed(&key))?;
        let ca = LocalCa {
            dir: dir.to_path_buf(),
            cert,
            key,
        };
        ca.write(
            &ca.ca_path(name),
            ca.cert.pem().as_bytes(),
            READABLE_FILE_MODE,
        )?;
        Ok(ca)
    }

    fn ca_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    fn write(&self, path: &Path, pem: &[u8], mode: u32) -> Result<(), EtcdCertsError> {
        Ok(secure_fs::write_replace(
            path,
            pem,
            mode,
            Durability::Atomic,
        )?)
    }

    /// Signs a certificate named `name` valid for `sans` (IP addresses or host names), and
    /// writes `<name>.pem` and `<name>.key` (0600). Returns their paths.
    pub fn issue(&self, name: &str, sans: &[String]) -> Result<(PathBuf, PathBuf), EtcdCertsError> {
        let key = generated(name, KeyPair::generate())?;
        let mut params = generated(name, CertificateParams::new(sans.to_vec()))?;
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = generated(name, params.signed_by(&key, &self.cert, &self.key))?;
        let (cert_path, key_path) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        );
        self.write(&cert_path, cert.pem().as_bytes(), READABLE_FILE_MODE)?;
        self.write(&key_path, key.serialize_pem().as_bytes(), PRIVATE_FILE_MODE)?;
        Ok((cert_path, key_path))
    }

    /// The files a client named `name` (signed by this CA, CN `name`) connects with.
    pub fn client(&self, ca_name: &str, name: &str) -> Result<EtcdTlsFiles, EtcdCertsError> {
        let (cert, key) = self.issue(name, &[name.to_string()])?;
        Ok(EtcdTlsFiles {
            ca: self.ca_path(ca_name),
            cert,
            key,
        })
    }
}

/// The CA's name: its certificate is `<dir>/etcd-ca.pem`.
pub const CA_NAME: &str = "etcd-ca";

/// A CA `etcd-ca` in `dir`, a server certificate for `ip`, a client certificate for the
/// cluster's own checks and the administrator's (CN `root`, `<dir>/root.pem`): the TLS setup
/// of a cluster whose members listen on `ip`, with the default access control (no agent yet:
/// add their CNs to its `users`). Returns it and the CA, to issue the agents' client
/// certificates with.
pub fn cluster_tls(dir: &Path, ip: IpAddr) -> Result<(ClusterTls, LocalCa), EtcdCertsError> {
    let ca = LocalCa::create(dir, CA_NAME)?;
    let (server_cert, server_key) = ca.issue("etcd-server", &[ip.to_string()])?;
    let client = ca.client(CA_NAME, "etcd-health")?;
    let admin = ca.client(CA_NAME, crate::etcd_witness::ROOT)?;
    let tls = ClusterTls {
        ca: ca.ca_path(CA_NAME),
        server_cert,
        server_key,
        client,
        admin,
        access: Some(ClusterAccess::default()),
    };
    Ok((tls, ca))
}
