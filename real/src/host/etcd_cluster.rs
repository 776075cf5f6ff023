//! A real etcd cluster of local `etcd` processes (Debian's `etcd-server`), for the tests, the demo
//! and the benchmark of the etcd witness: members on one address (loopback, or a namespace's
//! address when run inside one) with their own ports and data directories. Members can be killed
//! and restarted on their data to take the leader or the quorum away. Every process is this
//! struct's child and is killed when it is dropped.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::Client;

/// Errors of a local etcd cluster.
#[derive(Debug, thiserror::Error)]
pub enum EtcdClusterError {
    /// No `etcd` binary.
    #[error(
        "cannot run `{binary}`: {source} (install Debian's etcd-server: real/host/install-deps.sh)"
    )]
    Binary {
        /// The command.
        binary: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A member's directory or log could not be made.
    #[error("etcd member directory {path}: {source}")]
    Dir {
        /// Directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// No free port.
    #[error("no free port: {0}")]
    Port(#[source] std::io::Error),
    /// A member exited on its own.
    #[error("etcd member {index} exited ({status}); see {log}")]
    Exited {
        /// Member.
        index: usize,
        /// Exit status.
        status: std::process::ExitStatus,
        /// Its log.
        log: PathBuf,
    },
    /// The cluster did not get a leader in time.
    #[error("etcd cluster has no leader after {0:?}")]
    NoLeader(Duration),
    /// A member index out of range, or one not running when it must be.
    #[error("etcd member {0}: {1}")]
    Member(usize, &'static str),
    /// Its access control could not be set up.
    #[error("etcd access control: {0}")]
    Access(#[from] crate::etcd_witness::AccessError),
    /// The access control's key prefix is unusable.
    #[error("etcd access control: {0}")]
    Prefix(#[from] crate::etcd_witness::TargetError),
    /// The administrator's certificate could not be read.
    #[error("etcd administrator: {0}")]
    AdminTls(#[from] crate::etcd_witness::EtcdTlsError),
    /// Waiting on a child failed.
    #[error("etcd member {index}: {source}")]
    Wait {
        /// Member.
        index: usize,
        /// Cause.
        source: std::io::Error,
    },
}

/// Where one member listens.
#[derive(Debug, Clone, Copy)]
pub struct MemberAddrs {
    /// Client URL address.
    pub client: SocketAddr,
    /// Peer URL address.
    pub peer: SocketAddr,
}

/// How to start the cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Each member's addresses.
    pub members: Vec<MemberAddrs>,
    /// Data directories and logs go under here.
    pub dir: PathBuf,
    /// Run each member under this command prefix (e.g. `ip netns exec NS`); empty: directly.
    pub wrap: Vec<String>,
    /// Raft timings in ms (heartbeat, election timeout): short ones make tests quick.
    pub raft_ms: (u64, u64),
    /// Serve clients over TLS and require their certificates (`--client-cert-auth`), with
    /// etcd's access control on unless [`ClusterTls::access`] is `None` (users named after the
    /// certificates' CN); peers keep plain HTTP between themselves (they share a host here).
    pub tls: Option<ClusterTls>,
}

/// The TLS files of a cluster that requires client certificates.
#[derive(Debug, Clone)]
pub struct ClusterTls {
    /// The CA that signs the server's and the clients' certificates.
    pub ca: PathBuf,
    /// The members' server certificate (valid for their client address).
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// A client certificate the cluster's own health checks use (its CN is no etcd user: it
    /// may ask a member's status and nothing else).
    pub client: crate::etcd_witness::EtcdTlsFiles,
    /// The administrator's certificate (CN `root`), which sets up the access control.
    pub admin: crate::etcd_witness::EtcdTlsFiles,
    /// Who may touch the witness's registers once the cluster runs; `None` leaves etcd's auth
    /// off (any certificate of the CA may do anything), as a cluster is before its setup.
    pub access: Option<ClusterAccess>,
}

/// The access control a TLS cluster gets once it has a leader (see
/// [`crate::etcd_witness::access`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterAccess {
    /// The witness's key prefix: the agents' role may read and write `<prefix>/vm/...` only.
    pub prefix: String,
    /// The agents' role.
    pub role: String,
    /// The agents' users: the CNs of their certificates.
    pub users: Vec<String>,
}

impl Default for ClusterAccess {
    /// The default prefix and role, and no agent yet.
    fn default() -> Self {
        ClusterAccess {
            prefix: crate::etcd_witness::DEFAULT_PREFIX.to_string(),
            role: crate::etcd_witness::DEFAULT_ROLE.to_string(),
            users: Vec::new(),
        }
    }
}

impl ClusterSpec {
    /// `n` members on 127.0.0.1 on free ports, under `dir`, with quick elections.
    pub fn loopback(n: usize, dir: &Path) -> Result<ClusterSpec, EtcdClusterError> {
        let ip: IpAddr = [127, 0, 0, 1].into();
        // All held at once, so no two members get the same port.
        let held = (0..2 * n)
            .map(|_| TcpListener::bind((ip, 0)).map_err(EtcdClusterError::Port))
            .collect::<Result<Vec<_>, _>>()?;
        let addrs = held
            .iter()
            .map(|l| l.local_addr().map_err(EtcdClusterError::Port))
            .collect::<Result<Vec<_>, _>>()?;
        let members = addrs
            .chunks(2)
            .map(|p| MemberAddrs {
                client: p[0],
                peer: p[1],
            })
            .collect();
        Ok(ClusterSpec {
            members,
            dir: dir.to_path_buf(),
            wrap: Vec::new(),
            raft_ms: (50, 500),
            tls: None,
        })
    }
}

/// A running local etcd cluster.
pub struct EtcdCluster {
    spec: ClusterSpec,
    children: Vec<Option<Child>>,
    /// How many times each member was started (names its log).
    starts: Vec<u32>,
}

impl EtcdCluster {
    /// Starts every member and waits until the cluster has a leader; with TLS, then sets up
    /// its access control ([`ClusterTls::access`]) with the administrator's certificate.
    pub async fn start(spec: ClusterSpec) -> Result<EtcdCluster, EtcdClusterError> {
        let n = spec.members.len();
        let mut c = EtcdCluster {
            spec,
            children: (0..n).map(|_| None).collect(),
            starts: vec![0; n],
        };
        for i in 0..n {
            c.restart(i)?;
        }
        c.wait_leader(Duration::from_secs(20)).await?;
        if let Some(access) = c.spec.tls.as_ref().and_then(|t| t.access.clone()) {
            c.grant_access(&access.users).await?;
        }
        Ok(c)
    }

    /// With TLS: makes `users` (certificate CNs) agents of the witness under the access's
    /// prefix and role (the defaults if the spec has none), turning auth on, or adding them
    /// once it is (the administrator's certificate may). Without TLS there is no access control
    /// to set up: an error.
    pub async fn grant_access(
        &self,
        users: &[String],
    ) -> Result<crate::etcd_witness::AccessGranted, EtcdClusterError> {
        use crate::etcd_witness::{AccessError, EtcdTarget, EtcdTls, EtcdWitness};
        let tls = self.spec.tls.as_ref().ok_or(AccessError::NoTls)?;
        let access = tls.access.clone().unwrap_or_default();
        let target = EtcdTarget::parse(&self.url(), &access.prefix)?;
        let admin = EtcdTls::load(&tls.admin)?;
        let granted = EtcdWitness::with_tls(target, admin)
            .grant_access(&access.role, users, Duration::from_secs(20))
            .await?;
        Ok(granted)
    }

    /// `n` members on loopback (see [`ClusterSpec::loopback`]). A port picked free can be taken
    /// by another socket's outgoing connection before the member binds it; a member that exits
    /// at start is therefore tried again on fresh ports, twice at most, each failure logged.
    pub async fn start_loopback(n: usize, dir: &Path) -> Result<EtcdCluster, EtcdClusterError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let spec = ClusterSpec::loopback(n, &dir.join(format!("try{tries}")))?;
            match EtcdCluster::start(spec).await {
                Err(e @ EtcdClusterError::Exited { .. }) if tries < 3 => {
                    tracing::warn!(error = %e, "etcd member did not start; new ports");
                }
                other => return other,
            }
        }
    }

    /// `etcd://...` naming every member.
    pub fn url(&self) -> String {
        let eps: Vec<String> = self
            .spec
            .members
            .iter()
            .map(|m| m.client.to_string())
            .collect();
        format!("etcd://{}", eps.join(","))
    }

    /// The members' client addresses.
    pub fn endpoints(&self) -> Vec<String> {
        self.spec
            .members
            .iter()
            .map(|m| m.client.to_string())
            .collect()
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.spec.members.len()
    }

    /// Always false: a cluster has members.
    pub fn is_empty(&self) -> bool {
        self.spec.members.is_empty()
    }

    fn name(i: usize) -> String {
        format!("m{i}")
    }

    /// Starts member `i` (again, on its data directory if it ran before).
    pub fn restart(&mut self, i: usize) -> Result<(), EtcdClusterError> {
        let spec = &self.spec;
        let m = *spec
            .members
            .get(i)
            .ok_or(EtcdClusterError::Member(i, "none"))?;
        if self.children[i].is_some() {
            return Err(EtcdClusterError::Member(i, "already running"));
        }
        let data = spec.dir.join(Self::name(i));
        std::fs::create_dir_all(&spec.dir).map_err(|source| EtcdClusterError::Dir {
            path: spec.dir.clone(),
            source,
        })?;
        let log_path = spec
            .dir
            .join(format!("{}-{}.log", Self::name(i), self.starts[i]));
        let log = std::fs::File::create(&log_path).map_err(|source| EtcdClusterError::Dir {
            path: log_path.clone(),
            source,
        })?;
        let log2 = log.try_clone().map_err(|source| EtcdClusterError::Dir {
            path: log_path.clone(),
            source,
        })?;
        let initial: Vec<String> = spec
            .members
            .iter()
            .enumerate()
            .map(|(j, mj)| format!("{}=http://{}", Self::name(j), mj.peer))
            .collect();
        let scheme = if spec.tls.is_some() { "https" } else { "http" };
        let mut args: Vec<String> = vec![
            "etcd".into(),
            format!("--name={}", Self::name(i)),
            format!("--data-dir={}", data.display()),
            format!("--listen-client-urls={scheme}://{}", m.client),
            format!("--advertise-client-urls={scheme}://{}", m.client),
            format!("--listen-peer-urls=http://{}", m.peer),
            format!("--initial-advertise-peer-urls=http://{}", m.peer),
            format!("--initial-cluster={}", initial.join(",")),
            "--initial-cluster-token=ftvm-witness".into(),
            "--initial-cluster-state=new".into(),
            format!("--heartbeat-interval={}", spec.raft_ms.0),
            format!("--election-timeout={}", spec.raft_ms.1),
            "--logger=zap".into(),
        ];
        if let Some(t) = &spec.tls {
            args.extend([
                "--client-cert-auth".into(),
                format!("--trusted-ca-file={}", t.ca.display()),
                format!("--cert-file={}", t.server_cert.display()),
                format!("--key-file={}", t.server_key.display()),
            ]);
        }
        let argv: Vec<&String> = spec.wrap.iter().chain(args.iter()).collect();
        let child = Command::new(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|source| EtcdClusterError::Binary {
                binary: argv[0].clone(),
                source,
            })?;
        self.children[i] = Some(child);
        self.starts[i] += 1;
        Ok(())
    }

    /// SIGKILLs member `i` (its data stays for a restart).
    pub fn kill(&mut self, i: usize) -> Result<(), EtcdClusterError> {
        let mut child = self
            .children
            .get_mut(i)
            .and_then(Option::take)
            .ok_or(EtcdClusterError::Member(i, "not running"))?;
        let _ = child.kill();
        child
            .wait()
            .map_err(|source| EtcdClusterError::Wait { index: i, source })?;
        Ok(())
    }

    /// Whether member `i` runs.
    pub fn is_running(&self, i: usize) -> bool {
        self.children.get(i).is_some_and(Option::is_some)
    }

    /// A member that exited on its own is an error (a port taken, a bad flag).
    fn check_alive(&mut self) -> Result<(), EtcdClusterError> {
        for (i, slot) in self.children.iter_mut().enumerate() {
            if let Some(child) = slot {
                if let Some(status) = child
                    .try_wait()
                    .map_err(|source| EtcdClusterError::Wait { index: i, source })?
                {
                    *slot = None;
                    return Err(EtcdClusterError::Exited {
                        index: i,
                        status,
                        log: self.spec.dir.join(format!(
                            "{}-{}.log",
                            Self::name(i),
                            self.starts[i].saturating_sub(1)
                        )),
                    });
                }
            }
        }
        Ok(())
    }

    /// The index of the current leader as the running members see it, once they agree.
    pub async fn leader(&mut self, within: Duration) -> Result<usize, EtcdClusterError> {
        let t0 = Instant::now();
        loop {
            self.check_alive()?;
            if let Some(l) = self.find_leader().await {
                return Ok(l);
            }
            if t0.elapsed() > within {
                return Err(EtcdClusterError::NoLeader(within));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the cluster has a leader.
    pub async fn wait_leader(&mut self, within: Duration) -> Result<(), EtcdClusterError> {
        self.leader(within).await.map(|_| ())
    }

    /// Asks each running member for its status: the member whose own id is the leader id they
    /// all report.
    async fn find_leader(&self) -> Option<usize> {
        let mut leader_id = None;
        let mut ids = Vec::new();
        for (i, m) in self.spec.members.iter().enumerate() {
            if !self.is_running(i) {
                continue;
            }
            let mut opts = etcd_client::ConnectOptions::new()
                .with_connect_timeout(Duration::from_millis(300))
                .with_timeout(Duration::from_millis(300));
            if let Some(t) = &self.spec.tls {
                let tls = crate::etcd_witness::EtcdTls::load(&t.client).ok()?;
                opts = opts.with_tls(tls.options());
            }
            let mut c = Client::connect([m.client.to_string()], Some(opts))
                .await
                .ok()?;
            let st = c.status().await.ok()?;
            let me = st.header()?.member_id();
            if st.leader() == 0 || leader_id.is_some_and(|l| l != st.leader()) {
                return None;
            }
            leader_id = Some(st.leader());
            ids.push((i, me));
        }
        let l = leader_id?;
        ids.into_iter().find(|&(_, me)| me == l).map(|(i, _)| i)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for child in self.children.iter_mut().filter_map(Option::take) {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
