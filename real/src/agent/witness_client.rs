//! Which witness an agent asks: the standalone `ftvm witness` service (Noise-authenticated TCP,
//! `witness::request`) or an etcd cluster (`crate::etcd_witness`). Either way the agent's model
//! sees the same thing: a request goes out, a `WitnessReply` comes back or nothing does.

use std::net::SocketAddr;
use std::time::Duration;

use ftvm_driver::journal::WitnessEntry;
use ftvm_model::{NodeId, VmId, WitnessReply, WitnessRequest};

use super::witness::{self, WitnessError};
use crate::auth::Identity;
use crate::etcd_witness::{EtcdTarget, EtcdTls, EtcdWitness, EtcdWitnessError, TargetError};

/// The witness an agent asks.
#[derive(Debug, Clone)]
pub enum WitnessClient {
    /// An `ftvm witness` process at this address.
    Service(SocketAddr),
    /// An etcd cluster holding the VM's register.
    Etcd(EtcdWitness),
}

impl From<SocketAddr> for WitnessClient {
    fn from(addr: SocketAddr) -> Self {
        WitnessClient::Service(addr)
    }
}

/// Why a witness exchange gave no reply.
#[derive(Debug, thiserror::Error)]
pub enum WitnessClientError {
    /// The `ftvm witness` service.
    #[error(transparent)]
    Service(#[from] WitnessError),
    /// The etcd witness.
    #[error(transparent)]
    Etcd(#[from] EtcdWitnessError),
}

impl WitnessClientError {
    /// Failures that will not heal by resending (refused authentication, a missing or foreign
    /// register): the agent logs them as errors; the others are a witness that did not answer.
    pub fn is_permanent(&self) -> bool {
        match self {
            WitnessClientError::Service(e) => {
                matches!(e, WitnessError::Auth { .. } | WitnessError::NoWitnessKey)
            }
            WitnessClientError::Etcd(e) => e.is_permanent(),
        }
    }
}

impl WitnessClient {
    /// The same witness reached over TLS with `tls` (etcd only: `ftvm witness` exchanges are
    /// authenticated with the node's keys instead).
    pub fn with_etcd_tls(self, tls: EtcdTls) -> Result<WitnessClient, TargetError> {
        match self {
            WitnessClient::Etcd(e) => Ok(WitnessClient::Etcd(EtcdWitness::with_tls(
                e.target().clone(),
                tls,
            ))),
            WitnessClient::Service(a) => Err(TargetError::TlsWithoutEtcd(a.to_string())),
        }
    }

    /// Parses `--witness`: `HOST:PORT` of an `ftvm witness`, or `etcd://HOST:PORT,...` with its
    /// key prefix `etcd_prefix`.
    pub fn parse(witness: &str, etcd_prefix: &str) -> Result<WitnessClient, TargetError> {
        if witness.starts_with(crate::etcd_witness::target::SCHEME) {
            let target = EtcdTarget::parse(witness, etcd_prefix)?;
            return Ok(WitnessClient::Etcd(EtcdWitness::new(target)));
        }
        witness
            .parse::<SocketAddr>()
            .map(WitnessClient::Service)
            .map_err(|_| TargetError::Scheme(witness.to_string()))
    }

    /// Asks the witness, as node `node`, and waits at most `timeout` for its reply. With an
    /// `ftvm witness` the exchange is authenticated by `identity`; with etcd the rule runs here
    /// with `node` as the sender (etcd's own access control decides who may write the key).
    pub async fn request(
        &self,
        identity: &Identity,
        node: NodeId,
        vm: VmId,
        req: WitnessRequest,
        timeout: Duration,
    ) -> Result<WitnessAnswer, WitnessClientError> {
        match self {
            WitnessClient::Service(addr) => Ok(WitnessAnswer {
                reply: witness::request(*addr, identity, vm, req, timeout).await?,
                decided: None,
            }),
            WitnessClient::Etcd(etcd) => {
                let applied = etcd.request(node, vm, req, timeout).await?;
                Ok(WitnessAnswer {
                    decided: applied.written_us.map(|wall_us| WitnessEntry {
                        wall_us,
                        reply: applied.reply,
                    }),
                    reply: applied.reply,
                })
            }
        }
    }
}

/// A witness's reply, and the decision this request made, if it made one here.
#[derive(Debug, Clone, Copy)]
pub struct WitnessAnswer {
    /// The reply.
    pub reply: WitnessReply,
    /// With etcd, the write to the register this request made (its entry in the register's
    /// history, for the run check: no witness process keeps one). `ftvm witness` journals
    /// its decisions itself.
    pub decided: Option<WitnessEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_kinds_of_witness_parse() {
        let w = WitnessClient::parse("127.0.0.1:7100", "/p").unwrap();
        assert!(matches!(w, WitnessClient::Service(a) if a.port() == 7100));
        let w = WitnessClient::parse("etcd://127.0.0.1:2379,127.0.0.1:2381", "/p").unwrap();
        let WitnessClient::Etcd(e) = w else {
            panic!("not etcd: {w:?}")
        };
        assert_eq!(e.target().endpoints.len(), 2);
        assert_eq!(e.target().prefix, "/p");
        assert!(WitnessClient::parse("witness-host", "/p").is_err());
        assert!(WitnessClient::parse("etcd://", "/p").is_err());
    }

    #[test]
    fn an_etcd_permission_refusal_is_permanent_with_a_one_line_reason() {
        let e = WitnessClientError::Etcd(EtcdWitnessError::Denied {
            key: "/p/vm/1".into(),
            detail: "etcdserver: permission denied".into(),
        });
        assert!(e.is_permanent());
        let reason = e.to_string();
        assert!(!reason.contains('\n'), "{reason}");
        assert!(
            reason.contains("/p/vm/1") && reason.contains("permission denied"),
            "{reason}"
        );
    }
}
