//! Where the etcd witness lives: `etcd://host:port,host:port,...` and the key prefix under which
//! each VM's register is kept. Parsed strictly, since a typo here would name another register.

/// The URL scheme of an etcd witness.
pub const SCHEME: &str = "etcd://";
/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/ftvm/witness";
/// More members than any etcd cluster has.
const MAX_ENDPOINTS: usize = 16;
const MAX_PREFIX_BYTES: usize = 256;

/// Why a witness target is not usable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    /// Not `etcd://...`.
    #[error("an etcd witness is written etcd://host:port[,host:port...]; got {0:?}")]
    Scheme(String),
    /// No member named, or too many.
    #[error("an etcd witness names 1 to {MAX_ENDPOINTS} members; got {0}")]
    Count(usize),
    /// One member is not `host:port`.
    #[error("etcd member {0:?} is not host:port")]
    Endpoint(String),
    /// The key prefix is unusable.
    #[error(
        "witness key prefix {0:?}: must start with '/', be printable ASCII without spaces, \
         not end with '/', and be at most {MAX_PREFIX_BYTES} bytes"
    )]
    Prefix(String),
    /// TLS files given for a witness that is not etcd.
    #[error(
        "the witness's TLS files are for an etcd witness; {0} is an ftvm witness (its \
         exchanges are authenticated with the node's keys)"
    )]
    TlsWithoutEtcd(String),
}

/// An etcd cluster and the prefix of the witness's keys in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTarget {
    /// `host:port` of each member (the client speaks plain HTTP/2 to them).
    pub endpoints: Vec<String>,
    /// Keys are `<prefix>/vm/<id>`.
    pub prefix: String,
}

impl EtcdTarget {
    /// Parses `etcd://a:2379,b:2379` with key prefix `prefix`.
    pub fn parse(url: &str, prefix: &str) -> Result<EtcdTarget, TargetError> {
        let rest = url
            .strip_prefix(SCHEME)
            .ok_or_else(|| TargetError::Scheme(url.to_string()))?;
        let endpoints: Vec<String> = rest.split(',').map(str::to_string).collect();
        if rest.is_empty() || endpoints.len() > MAX_ENDPOINTS {
            return Err(TargetError::Count(if rest.is_empty() {
                0
            } else {
                endpoints.len()
            }));
        }
        for e in &endpoints {
            if !valid_endpoint(e) {
                return Err(TargetError::Endpoint(e.clone()));
            }
        }
        if !valid_prefix(prefix) {
            return Err(TargetError::Prefix(prefix.to_string()));
        }
        Ok(EtcdTarget {
            endpoints,
            prefix: prefix.to_string(),
        })
    }

    /// The key holding `vm`'s register.
    pub fn key(&self, vm: ftvm_model::VmId) -> String {
        format!("{}{}", self.register_prefix(), vm.0)
    }

    /// What every register's key starts with, `<prefix>/vm/`: the keys the agents may touch
    /// once etcd's access control is on.
    pub fn register_prefix(&self) -> String {
        format!("{}/vm/", self.prefix)
    }

    /// The witness written back as a URL.
    pub fn url(&self) -> String {
        format!("{SCHEME}{}", self.endpoints.join(","))
    }
}

/// `host:port`, with a host of letters, digits, '.', '-' (or a bracketed IPv6 address) and a
/// port number: nothing that could smuggle a path, user or scheme into the URI the client builds.
fn valid_endpoint(e: &str) -> bool {
    let Some((host, port)) = e.rsplit_once(':') else {
        return false;
    };
    let host_ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        inner.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    };
    host_ok && port.parse::<u16>().is_ok_and(|p| p != 0)
}

fn valid_prefix(p: &str) -> bool {
    p.len() <= MAX_PREFIX_BYTES
        && p.starts_with('/')
        && p.len() > 1
        && !p.ends_with('/')
        && p.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_and_prefix_are_parsed() {
        let t = EtcdTarget::parse("etcd://127.0.0.1:2379,etcd-b:2381,[::1]:2383", "/x/y").unwrap();
        assert_eq!(t.endpoints, ["127.0.0.1:2379", "etcd-b:2381", "[::1]:2383"]);
        assert_eq!(t.key(ftvm_model::VmId(12)), "/x/y/vm/12");
        assert_eq!(t.register_prefix(), "/x/y/vm/");
        assert_eq!(t.url(), "etcd://127.0.0.1:2379,etcd-b:2381,[::1]:2383");
    }

    #[test]
    fn bad_targets_are_refused() {
        let p = DEFAULT_PREFIX;
        let err = |u: &str| EtcdTarget::parse(u, p).unwrap_err();
        assert!(matches!(err("127.0.0.1:2379"), TargetError::Scheme(_)));
        assert!(matches!(err("http://a:1"), TargetError::Scheme(_)));
        assert_eq!(err("etcd://"), TargetError::Count(0));
        assert_eq!(err("etcd://a:1,"), TargetError::Endpoint(String::new()));
        assert_eq!(err("etcd://a"), TargetError::Endpoint("a".into()));
        assert_eq!(err("etcd://a:0"), TargetError::Endpoint("a:0".into()));
        assert_eq!(
            err("etcd://a:99999"),
            TargetError::Endpoint("a:99999".into())
        );
        assert_eq!(err("etcd://u@a:1"), TargetError::Endpoint("u@a:1".into()));
        assert_eq!(err("etcd://a:1/p"), TargetError::Endpoint("a:1/p".into()));
        let many = format!("etcd://{}", vec!["a:1"; 17].join(","));
        assert_eq!(err(&many), TargetError::Count(17));
        for bad in ["", "/", "x", "/a/", "/a b", "/\u{e9}"] {
            assert_eq!(
                EtcdTarget::parse("etcd://a:1", bad),
                Err(TargetError::Prefix(bad.into())),
                "{bad:?}"
            );
        }
    }
}
