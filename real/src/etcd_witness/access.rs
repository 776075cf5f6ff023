//! etcd's access control for the witness: without it, any certificate the CA signed may read and
//! write every key of the cluster. [`EtcdWitness::grant_access`] sets up etcd's RBAC so that
//!
//! - the user `root` (etcd's administrator, whose certificate has CN `root`) exists, holds
//!   etcd's built-in `root` role and is the only one who may change users, roles or auth;
//! - one role (by default [`DEFAULT_ROLE`]) may read and write the keys of the registers,
//!   `<prefix>/vm/...`, and nothing else;
//! - each named agent is a user without a password holding that role: with `--client-cert-auth`
//!   etcd takes the user of a request from the common name (CN) of its client certificate, so
//!   the agent of node N, whose certificate says `CN=node-N`, is the user `node-N`;
//! - auth is on, so a certificate whose CN is not such a user gets "permission denied".
//!
//! Every step checks what exists first or is one etcd accepts again, so the setup can run again:
//! to add an agent to a cluster whose auth is already on (with the root certificate then, the only
//! one etcd lets change users and roles).

use std::time::{Duration, Instant};

use etcd_client::{Client, Permission, UserAddOptions};

use super::{grpc_code, EtcdWitness, EtcdWitnessError, GRPC_PERMISSION_DENIED};

/// etcd's administrator: its user, and the CN of its certificate.
pub const ROOT: &str = "root";
/// The role of the agents unless told otherwise.
pub const DEFAULT_ROLE: &str = "ftvm-agent";
const MAX_NAME_BYTES: usize = 128;
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(400);

/// gRPC status codes (the wire protocol's numbers) of refusals that retrying will not change.
const GRPC_NOT_FOUND: i32 = 5;
const GRPC_ALREADY_EXISTS: i32 = 6;
const GRPC_FAILED_PRECONDITION: i32 = 9;
const GRPC_UNAUTHENTICATED: i32 = 16;

/// Why access control could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The witness is reached without TLS.
    #[error(
        "etcd access control needs TLS with client certificates: etcd names each user after its \
         certificate's CN, and without one nobody could authenticate once auth is on"
    )]
    NoTls,
    /// A user or role name etcd would take, but a certificate's CN should not be.
    #[error(
        "etcd user or role name {0:?}: must be 1 to {MAX_NAME_BYTES} printable ASCII characters \
         without spaces or commas"
    )]
    Name(String),
    /// `root` named as an agent (or as the agents' role).
    #[error("{0:?} is etcd's administrator: agents need certificates and a role of their own")]
    Reserved(String),
    /// etcd refused the caller: once auth is on, only `root` may manage users and roles.
    #[error(
        "etcd refused {step}: {detail} (once etcd's auth is on, only the root certificate, \
         CN={ROOT}, may change users and roles)"
    )]
    Denied {
        /// The step refused.
        step: &'static str,
        /// etcd's message.
        detail: String,
    },
    /// etcd refused a step for another reason that will not go away by retrying.
    #[error("etcd refused {step}: {detail}")]
    Refused {
        /// The step refused.
        step: &'static str,
        /// etcd's message.
        detail: String,
    },
    /// The client could not be set up (bad endpoint).
    #[error("etcd client: {0}")]
    Client(#[source] etcd_client::Error),
    /// Not done within the time allowed: etcd unreachable, or without a leader or quorum. The
    /// steps taken stand; running the setup again finishes it.
    #[error("etcd at {url}: access control not set up within {timeout:?} (last error: {last})")]
    Timeout {
        /// The cluster.
        url: String,
        /// The time allowed.
        timeout: Duration,
        /// The last failure seen.
        last: String,
    },
}

/// What [`EtcdWitness::grant_access`] set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessGranted {
    /// The agents' role.
    pub role: String,
    /// The keys it may read and write: every key starting with this.
    pub key_prefix: String,
    /// The agents holding it.
    pub users: Vec<String>,
    /// Users this call created (the others existed).
    pub created: Vec<String>,
    /// Other key ranges the role was already allowed before (granted by someone else): left as
    /// they are, but worth an operator's look.
    pub other_permissions: Vec<String>,
}

/// Checks a name given as a user or role.
pub fn check_name(name: &str) -> Result<(), AccessError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b',');
    if !ok {
        return Err(AccessError::Name(name.to_string()));
    }
    if name == ROOT {
        return Err(AccessError::Reserved(name.to_string()));
    }
    Ok(())
}

/// A failed step: `Ok` if it will fail again, `Err` (what happened) if retrying may help.
fn classify(step: &'static str, e: etcd_client::Error) -> Result<AccessError, String> {
    let Some((code, message)) = grpc_code(&e) else {
        return Err(format!("{step}: {e}"));
    };
    let detail = message.to_string();
    match code {
        GRPC_PERMISSION_DENIED | GRPC_UNAUTHENTICATED => Ok(AccessError::Denied { step, detail }),
        GRPC_NOT_FOUND | GRPC_ALREADY_EXISTS | GRPC_FAILED_PRECONDITION => {
            Ok(AccessError::Refused { step, detail })
        }
        // Unavailable, deadline exceeded, an auth revision that moved meanwhile, ...
        _ => Err(format!("{step}: {e}")),
    }
}

/// Runs one etcd call of step `step`, its error classified.
async fn step<T>(
    step: &'static str,
    call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, Result<AccessError, String>> {
    call.await.map_err(|e| classify(step, e))
}

impl EtcdWitness {
    /// Sets up etcd's access control for this witness's registers (see the module's doc): the
    /// `root` user, role `role` allowed to read and write `<prefix>/vm/...` only, a user for
    /// each of `users` (the CNs of the agents' certificates) holding it, and auth on. Runs over
    /// this witness's TLS connection, whose certificate must be root's once auth is on (before,
    /// any certificate of the CA may set it up). Transient failures are retried until
    /// `timeout`; every step may run again, so a setup cut short is finished by running it again.
    pub async fn grant_access(
        &self,
        role: &str,
        users: &[String],
        timeout: Duration,
    ) -> Result<AccessGranted, AccessError> {
        if self.tls.is_none() {
            return Err(AccessError::NoTls);
        }
        check_name(role)?;
        for u in users {
            check_name(u)?;
        }
        let mut users = users.to_vec();
        users.sort();
        users.dedup();
        let key_prefix = self.target.register_prefix();
        let deadline = Instant::now() + timeout;
        let mut client = self.client().await.map_err(|e| match e {
            EtcdWitnessError::Client(e) => AccessError::Client(e),
            other => AccessError::Refused {
                step: "connecting",
                detail: other.to_string(),
            },
        })?;
        let mut backoff = BACKOFF_MIN;
        let mut last = String::from("none");
        // Users this call made (a user whose creation's answer was lost is counted as existing).
        let mut created = Vec::new();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(self.access_timeout(timeout, last));
            }
            let round = setup_round(&mut client, role, &users, &key_prefix, &mut created);
            match tokio::time::timeout(remaining, round).await {
                Err(_) => return Err(self.access_timeout(timeout, last)),
                Ok(Ok(other_permissions)) => {
                    return Ok(AccessGranted {
                        role: role.to_string(),
                        key_prefix,
                        users,
                        created,
                        other_permissions,
                    })
                }
                Ok(Err(Ok(permanent))) => return Err(permanent),
                Ok(Err(Err(transient))) => {
                    last = transient;
                    tokio::time::sleep(backoff.min(remaining)).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    fn access_timeout(&self, timeout: Duration, last: String) -> AccessError {
        AccessError::Timeout {
            url: self.target.url(),
            timeout,
            last,
        }
    }
}

/// One pass over every step; returns the role's permissions other than ours.
async fn setup_round(
    client: &mut Client,
    role: &str,
    users: &[String],
    key_prefix: &str,
    created: &mut Vec<String>,
) -> Result<Vec<String>, Result<AccessError, String>> {
    let existing_users = step("listing users", client.user_list()).await?;
    let existing_users = existing_users.users().to_vec();
    let existing_roles = step("listing roles", client.role_list()).await?;
    if !existing_roles.roles().iter().any(|r| r == role) {
        step("adding the role", client.role_add(role)).await?;
    }
    let ours = Permission::read_write(key_prefix).with_prefix();
    step(
        "granting the role the registers' keys",
        client.role_grant_permission(role, ours.clone()),
    )
    .await?;
    for user in std::iter::once(ROOT).chain(users.iter().map(String::as_str)) {
        if existing_users.iter().any(|u| u == user) {
            continue;
        }
        // No password: the user is whoever shows a certificate of the CA with this CN.
        step(
            "adding a user",
            client.user_add(user, "", Some(UserAddOptions::new().with_no_pwd())),
        )
        .await?;
        if user != ROOT && !created.iter().any(|c| c == user) {
            created.push(user.to_string());
        }
    }
    step(
        "granting root the root role",
        client.user_grant_role(ROOT, ROOT),
    )
    .await?;
    for user in users {
        step(
            "granting an agent the role",
            client.user_grant_role(user.as_str(), role),
        )
        .await?;
    }
    step("enabling auth", client.auth_enable()).await?;
    let granted = step("reading the role back", client.role_get(role)).await?;
    Ok(granted
        .permissions()
        .into_iter()
        .filter(|p| *p != ours)
        .map(|p| {
            format!(
                "{} [{}, {})",
                perm_type(p.get_type()),
                String::from_utf8_lossy(p.key()),
                String::from_utf8_lossy(p.range_end())
            )
        })
        .collect())
}

fn perm_type(t: i32) -> &'static str {
    match t {
        0 => "read",
        1 => "write",
        2 => "readwrite",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd_witness::EtcdTarget;

    #[test]
    fn names_are_checked_and_root_is_reserved() {
        for ok in ["node-1", "ftvm-agent", "a.b_c"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a,b", "n\u{e9}", &"x".repeat(MAX_NAME_BYTES + 1)] {
            assert!(
                matches!(check_name(bad), Err(AccessError::Name(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(check_name(ROOT), Err(AccessError::Reserved(_))));
    }

    #[tokio::test]
    async fn access_control_is_refused_without_tls() {
        let w = EtcdWitness::new(EtcdTarget::parse("etcd://127.0.0.1:9", "/x").unwrap());
        let e = w
            .grant_access(DEFAULT_ROLE, &["node-1".into()], Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(e, AccessError::NoTls), "{e}");
    }
}
