//! TLS with client certificates towards etcd: the CA that signed etcd's server certificates,
//! and this host's client certificate and key, which etcd (run with `--client-cert-auth`)
//! checks before it serves a request. The files are PEM, read once when the witness is opened.

use std::path::{Path, PathBuf};

use etcd_client::{Certificate, Identity, TlsOptions};

/// Why the TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum EtcdTlsError {
    /// A file could not be read.
    #[error("etcd TLS file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A file holds no PEM block of the kind expected.
    #[error("etcd TLS file {path}: no PEM {what} in it")]
    NotPem {
        /// The file.
        path: PathBuf,
        /// What it should hold.
        what: &'static str,
    },
}

/// The files of a TLS connection to etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTlsFiles {
    /// The CA certificate etcd's server certificates are checked against.
    pub ca: PathBuf,
    /// This host's client certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// TLS material loaded from [`EtcdTlsFiles`].
#[derive(Clone)]
pub struct EtcdTls {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.write_str("EtcdTls { .. }")
    }
}

fn read_pem(path: &Path, what: &'static str, marker: &str) -> Result<Vec<u8>, EtcdTlsError> {
    let bytes = std::fs::read(path).map_err(|source| EtcdTlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    if !text.contains("-----BEGIN ") || !text.contains(marker) {
        return Err(EtcdTlsError::NotPem {
            path: path.to_path_buf(),
            what,
        });
    }
    Ok(bytes)
}

impl EtcdTls {
    /// Reads the three files and checks each holds PEM of its kind (the TLS handshake checks
    /// the rest: a wrong CA or a certificate etcd does not trust fails the connection).
    pub fn load(files: &EtcdTlsFiles) -> Result<EtcdTls, EtcdTlsError> {
        Ok(EtcdTls {
            ca: read_pem(&files.ca, "certificate", "CERTIFICATE")?,
            cert: read_pem(&files.cert, "certificate", "CERTIFICATE")?,
            key: read_pem(&files.key, "private key", "PRIVATE KEY")?,
        })
    }

    /// The client's TLS options.
    pub fn options(&self) -> TlsOptions {
        TlsOptions::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_non_pem_files_are_refused_with_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let files = EtcdTlsFiles {
            ca: ca.clone(),
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
        };
        assert!(
            matches!(EtcdTls::load(&files), Err(EtcdTlsError::Read { path, .. }) if path == ca)
        );
        std::fs::write(&ca, "not a certificate").unwrap();
        let e = EtcdTls::load(&files).unwrap_err();
        assert!(matches!(e, EtcdTlsError::NotPem { .. }), "{e}");
        assert!(e.to_string().contains("ca.pem"), "{e}");
    }
}
