//! etcd as the witness (`--witness etcd://...`): each VM's register is one etcd key, and the
//! witness rule — `ftvm_model::Witness`, unchanged — runs in the requesting agent as a
//! compare-and-set on the key's mod revision:
//!
//! 1. read the register and its `mod_revision` (a linearizable read: it needs etcd's quorum);
//! 2. apply the request to it with `Witness::handle_from`, this agent's node as the sender (the
//!    check the standalone witness makes against the authenticated connection);
//! 3. if the register changed, write it in a transaction guarded by `mod_revision == seen`; if
//!    another request got in between, the guard fails and the request starts again from 1 on the
//!    newer register.
//!
//! Every write is thus a decision taken on the latest register, in etcd's single order of writes:
//! the register is linearizable across etcd's members, and two takeovers of one generation
//! cannot both be granted (the second reads the first's result and is denied). A write whose
//! reply was lost (leader killed, connection reset) is retried the same way; that is safe because
//! the rule answers a request that already took effect with "granted" again, changing nothing.
//!
//! Failure looks like silence: an etcd that cannot be reached, has no leader or no quorum makes
//! a request end with an error after its timeout, which the agent treats as a witness that did
//! not answer (the primary holds output, the backup does not take over), never as a denial.
//!
//! A request etcd refuses for lack of permission (etcd's auth is on and this host's certificate
//! is not a user allowed the register's key: see [`access`]) ends at once with
//! [`EtcdWitnessError::Denied`], which no retry would change.
//!
//! A register that does not exist is never taken as fresh: it is created only by [`EtcdWitness::init`]
//! (`ftvm witness-init`), guarded by `create_revision == 0` so an existing register is never reset.

pub mod access;
pub mod register;
pub mod target;
pub mod tls;

use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp};
use ftvm_model::{NodeId, Time, VmId, Witness, WitnessReply, WitnessRequest, WitnessState};

pub use self::access::{AccessError, AccessGranted, DEFAULT_ROLE, ROOT};
pub use self::register::RegisterError;
pub use self::target::{EtcdTarget, TargetError, DEFAULT_PREFIX};
pub use self::tls::{EtcdTls, EtcdTlsError, EtcdTlsFiles};

/// Errors of the etcd witness.
#[derive(Debug, thiserror::Error)]
pub enum EtcdWitnessError {
    /// The key holds something that is not this VM's register.
    #[error("etcd key {key}: {source}")]
    Register {
        /// The key.
        key: String,
        /// What is wrong with its value.
        source: RegisterError,
    },
    /// No register for the VM, and requests never create one.
    #[error(
        "etcd key {0} does not exist: create the register of a new VM with `ftvm witness-init` \
         (never for a VM already protected: its register would be lost)"
    )]
    Missing(String),
    /// `init` found a register already there.
    #[error("etcd key {key} already holds a register ({state}); refusing to reset it")]
    Exists {
        /// The key.
        key: String,
        /// What it holds, as far as it could be read.
        state: String,
    },
    /// etcd refused the request: its auth is on and this host's certificate (its CN) is not a
    /// user whose role may read and write the key.
    #[error(
        "etcd denied access to {key}: {detail} (the CN of this host's certificate must be an \
         etcd user with read-write on the witness's keys: `ftvm witness-grant`)"
    )]
    Denied {
        /// The key.
        key: String,
        /// etcd's message.
        detail: String,
    },
    /// etcd answered something no etcd answers to this request.
    #[error("etcd key {key}: unexpected answer: {detail}")]
    Unexpected {
        /// The key.
        key: String,
        /// What was odd.
        detail: String,
    },
    /// The client could not be set up (bad endpoint).
    #[error("etcd client: {0}")]
    Client(#[source] etcd_client::Error),
    /// No decision within the time allowed: etcd unreachable, without a leader or quorum, or
    /// too many competing writes. The request may or may not have taken effect.
    #[error("etcd witness at {url}: no decision within {timeout:?} (last error: {last})")]
    Timeout {
        /// The cluster.
        url: String,
        /// The time allowed.
        timeout: Duration,
        /// The last failure seen, if any.
        last: String,
    },
}

impl EtcdWitnessError {
    /// Errors that retrying will not fix (the register is missing or not ours, etcd denies
    /// access to it): worth an operator's attention, unlike a timeout.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, EtcdWitnessError::Timeout { .. })
    }
}

/// What one request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// The witness's answer.
    pub reply: WitnessReply,
    /// Compare-and-set attempts that lost to another write and were retried.
    pub conflicts: u32,
    /// Whether this request wrote the register (false: it changed nothing).
    pub wrote: bool,
    /// When it wrote: the wall clock (µs, [`crate::journal_file::clock_us`]) just before the
    /// compare-and-set that succeeded. The write took effect after this and before any
    /// later write read it, so these times order the register's history as etcd did.
    pub written_us: Option<u64>,
}

/// An etcd cluster acting as the witness of any number of VMs (one key each).
#[derive(Clone)]
pub struct EtcdWitness {
    target: EtcdTarget,
    /// With TLS: the CA and this host's client certificate (etcd checks it).
    tls: Option<EtcdTls>,
    client: std::sync::Arc<tokio::sync::OnceCell<Client>>,
}

impl std::fmt::Debug for EtcdWitness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdWitness")
            .field("target", &self.target)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// One read of the register: what it holds and the revision that wrote it.
struct Seen {
    state: WitnessState,
    mod_revision: i64,
    create_revision: i64,
}

/// A failure worth retrying until the deadline (etcd down, no leader, a reset connection).
struct Transient(String);

impl From<etcd_client::Error> for Transient {
    fn from(e: etcd_client::Error) -> Self {
        Transient(e.to_string())
    }
}

/// gRPC's status code for "permission denied" (a number of the wire protocol): what etcd
/// answers, with auth on, to a user not allowed the key, or to a certificate whose CN is no user.
pub(crate) const GRPC_PERMISSION_DENIED: i32 = 7;

/// The gRPC status code and message of an error etcd answered, if it is one.
pub(crate) fn grpc_code(e: &etcd_client::Error) -> Option<(i32, &str)> {
    match e {
        etcd_client::Error::GRpcStatus(s) => Some((i32::from(s.code()), s.message())),
        _ => None,
    }
}

/// A failed call on `key`: permission denied is final, anything else is worth retrying.
fn failed(key: &str, e: etcd_client::Error) -> Result<EtcdWitnessError, Transient> {
    match grpc_code(&e) {
        Some((GRPC_PERMISSION_DENIED, message)) => Ok(EtcdWitnessError::Denied {
            key: key.to_string(),
            detail: message.to_string(),
        }),
        _ => Err(Transient::from(e)),
    }
}

/// Each etcd call gets at most this long, so one dead member cannot eat a request's budget.
const CALL_TIMEOUT: Duration = Duration::from_millis(500);
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_millis(200);

impl EtcdWitness {
    /// A witness on `target`; nothing is contacted until the first request.
    pub fn new(target: EtcdTarget) -> EtcdWitness {
        EtcdWitness {
            target,
            tls: None,
            client: Default::default(),
        }
    }

    /// A witness on `target` reached over TLS, showing the client certificate of `tls`.
    pub fn with_tls(target: EtcdTarget, tls: EtcdTls) -> EtcdWitness {
        EtcdWitness {
            tls: Some(tls),
            ..EtcdWitness::new(target)
        }
    }

    /// The cluster and key prefix.
    pub fn target(&self) -> &EtcdTarget {
        &self.target
    }

    /// The client, set up on first use. The balanced channel connects lazily, so a cluster
    /// that is down does not fail this: its requests time out instead.
    async fn client(&self) -> Result<Client, EtcdWitnessError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(1), CALL_TIMEOUT)
            // A member cut off from its leader answers at once instead of waiting.
            .with_require_leader(true);
        if let Some(tls) = &self.tls {
            // `host:port` endpoints are then dialled as https.
            opts = opts.with_tls(tls.options());
        }
        let client = self
            .client
            .get_or_try_init(|| Client::connect(&self.target.endpoints, Some(opts)))
            .await
            .map_err(EtcdWitnessError::Client)?;
        Ok(client.clone())
    }

    /// Creates the register of a new VM `vm` whose first primary is `primary`; refuses if the
    /// key exists (whatever it holds). Failures are retried until `timeout`. A write whose
    /// answer was lost may have created the register: the next read then finds it, and it is
    /// taken as this init's only if it is exactly the register this init writes and was never
    /// written again since its creation (an identical concurrent init could be mistaken for
    /// ours, which is harmless: same register).
    pub async fn init(
        &self,
        vm: VmId,
        primary: NodeId,
        timeout: Duration,
    ) -> Result<WitnessState, EtcdWitnessError> {
        let deadline = Instant::now() + timeout;
        let key = self.target.key(vm);
        let state = WitnessState::initial(vm, primary);
        let mut client = self.client().await?;
        let mut backoff = BACKOFF_MIN;
        let mut maybe_written = false;
        let mut last = String::from("none");
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(self.timeout(timeout, last));
            }
            let round = async {
                let existing = match self.read(&mut client, vm).await {
                    Ok(None) => None,
                    Ok(Some(seen))
                        if maybe_written
                            && seen.state == state
                            && seen.create_revision == seen.mod_revision =>
                    {
                        return Ok(Ok(()));
                    }
                    Ok(Some(seen)) => Some(format!("{:?}", seen.state)),
                    Err(Ok(e @ EtcdWitnessError::Denied { .. })) => return Ok(Err(e)),
                    Err(Ok(e)) => Some(e.to_string()),
                    Err(Err(t)) => return Err((t, false)),
                };
                if let Some(existing) = existing {
                    return Ok(Err(EtcdWitnessError::Exists {
                        key: key.clone(),
                        state: existing,
                    }));
                }
                let txn = Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.clone(), register::encode(&state), None)]);
                match client.txn(txn).await {
                    Ok(a) if a.succeeded() => Ok(Ok(())),
                    // Created by someone else since the read: the next read says what.
                    Ok(_) => Err((Transient("created concurrently".into()), false)),
                    Err(e) => match failed(&key, e) {
                        Ok(denied) => Ok(Err(denied)),
                        Err(t) => Err((t, true)),
                    },
                }
            };
            match tokio::time::timeout(remaining, round).await {
                Err(_) => return Err(self.timeout(timeout, last)),
                Ok(Ok(Ok(()))) => return Ok(state),
                Ok(Ok(Err(e))) => return Err(e),
                Ok(Err((Transient(e), sent))) => {
                    maybe_written |= sent;
                    last = e;
                    tokio::time::sleep(backoff.min(remaining)).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// The register of `vm` (a linearizable read).
    pub async fn query(
        &self,
        vm: VmId,
        timeout: Duration,
    ) -> Result<WitnessState, EtcdWitnessError> {
        let applied = self
            .request(NodeId(0), vm, WitnessRequest::Query, timeout)
            .await?;
        Ok(applied.reply.state)
    }

    /// Applies `req`, sent by node `from`, to the register of `vm` and answers it, retrying
    /// lost compare-and-sets and transient failures until `timeout`.
    pub async fn request(
        &self,
        from: NodeId,
        vm: VmId,
        req: WitnessRequest,
        timeout: Duration,
    ) -> Result<Applied, EtcdWitnessError> {
        self.request_hooked(from, vm, req, timeout, |_| async {})
            .await
    }

    /// As [`EtcdWitness::request`], calling `after_read(attempt)` between each read of the
    /// register and its compare-and-set: tests use it to make another write win the race.
    #[doc(hidden)]
    pub async fn request_hooked<F, Fut>(
        &self,
        from: NodeId,
        vm: VmId,
        req: WitnessRequest,
        timeout: Duration,
        mut after_read: F,
    ) -> Result<Applied, EtcdWitnessError>
    where
        F: FnMut(u32) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let deadline = Instant::now() + timeout;
        let key = self.target.key(vm);
        let mut client = self.client().await?;
        let mut conflicts = 0;
        let mut attempt = 0;
        let mut backoff = BACKOFF_MIN;
        let mut last = String::from("none");
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(self.timeout(timeout, last));
            }
            let this_attempt = attempt;
            attempt += 1;
            let round = async {
                let seen = match self.read(&mut client, vm).await {
                    Ok(Some(seen)) => seen,
                    Ok(None) => return Ok(Err(EtcdWitnessError::Missing(key.clone()))),
                    Err(Ok(e)) => return Ok(Err(e)),
                    Err(Err(t)) => return Err(t),
                };
                let mut witness = Witness::from_state(seen.state);
                // The rule needs no clock.
                let reply = witness.handle_from(Time::ZERO, from, req);
                if *witness.state() == seen.state {
                    // Nothing to write: the answer stands on a linearizable read.
                    return Ok(Ok(Some((reply, None))));
                }
                after_read(this_attempt).await;
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        seen.mod_revision,
                    )])
                    .and_then([TxnOp::put(
                        key.clone(),
                        register::encode(witness.state()),
                        None,
                    )]);
                let sent_us = crate::journal_file::clock_us();
                let answer = match client.txn(txn).await {
                    Ok(answer) => answer,
                    Err(e) => return failed(&key, e).map(Err),
                };
                Ok(Ok(answer.succeeded().then_some((reply, Some(sent_us)))))
            };
            match tokio::time::timeout(remaining, round).await {
                Err(_) => return Err(self.timeout(timeout, last)),
                Ok(Ok(Ok(Some((reply, written_us))))) => {
                    return Ok(Applied {
                        reply,
                        conflicts,
                        wrote: written_us.is_some(),
                        written_us,
                    })
                }
                Ok(Ok(Err(e))) => return Err(e),
                Ok(Ok(Ok(None))) => {
                    // Another write got in between: decide again on the newer register.
                    conflicts += 1;
                    last = format!("{conflicts} lost compare-and-sets");
                }
                Ok(Err(Transient(e))) => {
                    last = e;
                    tokio::time::sleep(backoff.min(remaining)).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Reads the register of `vm`: `Ok(None)` when the key does not exist, `Err(Ok(_))` when it
    /// holds something else, `Err(Err(_))` when etcd did not answer.
    async fn read(
        &self,
        client: &mut Client,
        vm: VmId,
    ) -> Result<Option<Seen>, Result<EtcdWitnessError, Transient>> {
        let key = self.target.key(vm);
        let answer = client
            .get(key.clone(), None)
            .await
            .map_err(|e| failed(&key, e))?;
        let kv = match answer.kvs() {
            [] => return Ok(None),
            [kv] if kv.key() == key.as_bytes() => kv,
            kvs => {
                return Err(Ok(EtcdWitnessError::Unexpected {
                    key,
                    detail: format!("{} key-values for one key", kvs.len()),
                }))
            }
        };
        let state = register::decode(kv.value(), vm).map_err(|source| {
            Ok(EtcdWitnessError::Register {
                key: key.clone(),
                source,
            })
        })?;
        Ok(Some(Seen {
            state,
            mod_revision: kv.mod_revision(),
            create_revision: kv.create_revision(),
        }))
    }

    fn timeout(&self, timeout: Duration, last: String) -> EtcdWitnessError {
        EtcdWitnessError::Timeout {
            url: self.target.url(),
            timeout,
            last,
        }
    }
}
