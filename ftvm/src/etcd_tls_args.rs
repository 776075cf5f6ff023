//! The flags that give an etcd witness's TLS files (all three or none), shared by the agents and
//! `ftvm witness-init` / `witness-show` / `witness-grant`.

use std::path::PathBuf;

use anyhow::Context;
use ftvm_real::etcd_witness::{EtcdTarget, EtcdTls, EtcdTlsFiles, EtcdWitness};

/// TLS towards an etcd witness run with `--client-cert-auth`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EtcdTlsArgs {
    /// With an etcd witness over TLS: the CA certificate (PEM) etcd's server certificates are
    /// checked against. Needs --witness-cert and --witness-key.
    #[arg(long, requires_all = ["witness_cert", "witness_key"])]
    pub witness_ca: Option<PathBuf>,
    /// This host's client certificate (PEM) that etcd checks.
    #[arg(long, requires = "witness_ca")]
    pub witness_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, requires = "witness_ca")]
    pub witness_key: Option<PathBuf>,
}

impl EtcdTlsArgs {
    /// The loaded TLS material, if the flags were given.
    pub fn load(&self) -> anyhow::Result<Option<EtcdTls>> {
        let (Some(ca), Some(cert), Some(key)) =
            (&self.witness_ca, &self.witness_cert, &self.witness_key)
        else {
            return Ok(None);
        };
        let files = EtcdTlsFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        };
        Ok(Some(
            EtcdTls::load(&files).context("the etcd witness's TLS files")?,
        ))
    }

    /// A witness on `target`, over TLS when the flags were given.
    pub fn witness(&self, target: EtcdTarget) -> anyhow::Result<EtcdWitness> {
        Ok(match self.load()? {
            Some(tls) => EtcdWitness::with_tls(target, tls),
            None => EtcdWitness::new(target),
        })
    }
}
