//! `ftvm witness-init` and `ftvm witness-show`: create and read a VM's register in an etcd
//! witness. Agents never create a register (a missing one is refused, as `ftvm witness` refuses a
//! missing state file without `--init`), so a new VM's register is made here, once.
//! `ftvm witness-grant`: turn on etcd's access control so that only the named agents'
//! certificates may touch the registers (see `ftvm_real::etcd_witness::access`).

use std::time::Duration;

use anyhow::Context;
use ftvm_model::{NodeId, VmId};
use ftvm_real::etcd_witness::{EtcdTarget, EtcdWitness, DEFAULT_PREFIX, DEFAULT_ROLE, ROOT};

/// The etcd cluster and the registers' prefix in it.
#[derive(clap::Args, Debug)]
pub struct Cluster {
    /// The etcd cluster: `etcd://HOST:PORT[,HOST:PORT...]`.
    #[arg(long)]
    witness: String,
    /// Key prefix; the register of VM N is `<prefix>/vm/N`.
    #[arg(long, default_value = DEFAULT_PREFIX)]
    witness_prefix: String,
    /// How long to wait for etcd, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    #[command(flatten)]
    tls: crate::etcd_tls_args::EtcdTlsArgs,
}

impl Cluster {
    fn open(&self) -> anyhow::Result<(EtcdWitness, Duration)> {
        let target = EtcdTarget::parse(&self.witness, &self.witness_prefix).context("--witness")?;
        let witness = self.tls.witness(target)?;
        Ok((witness, Duration::from_millis(self.timeout_ms)))
    }
}

/// Where the register is.
#[derive(clap::Args, Debug)]
pub struct Target {
    #[command(flatten)]
    cluster: Cluster,
    /// The protected VM's id.
    #[arg(long, default_value_t = 1)]
    vm: u64,
}

impl Target {
    fn open(&self) -> anyhow::Result<(EtcdWitness, VmId, Duration)> {
        let (witness, timeout) = self.cluster.open()?;
        Ok((witness, VmId(self.vm), timeout))
    }
}

/// Arguments of `ftvm witness-init`.
#[derive(clap::Args, Debug)]
pub struct InitArgs {
    #[command(flatten)]
    target: Target,
    /// The node that is primary of generation 1.
    #[arg(long)]
    primary: u32,
}

/// Arguments of `ftvm witness-show`.
#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    #[command(flatten)]
    target: Target,
}

/// Arguments of `ftvm witness-grant`.
#[derive(clap::Args, Debug)]
pub struct GrantArgs {
    #[command(flatten)]
    cluster: Cluster,
    /// The agents allowed to read and write the registers: the common names (CN) of their
    /// client certificates, which become etcd users, e.g. `node-1,node-2`.
    #[arg(long, value_delimiter = ',', required = true)]
    grant: Vec<String>,
    /// The agents' etcd role (read-write on `<prefix>/vm/` only).
    #[arg(long, default_value = DEFAULT_ROLE)]
    role: String,
}

/// A runtime for one blocking call into the etcd client.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Creates the register; refused if the key exists.
pub fn init(args: InitArgs) -> anyhow::Result<i32> {
    let (etcd, vm, timeout) = args.target.open()?;
    let key = etcd.target().key(vm);
    let state = runtime()?
        .block_on(etcd.init(vm, NodeId(args.primary), timeout))
        .with_context(|| format!("creating the register {key}"))?;
    println!("{}", serde_json::to_string(&state)?);
    eprintln!(
        "witness-init: register {key} created: generation {}, primary {}",
        state.generation.0, state.primary.0
    );
    Ok(0)
}

/// Prints the register (JSON) from a linearizable read.
pub fn show(args: ShowArgs) -> anyhow::Result<i32> {
    let (etcd, vm, timeout) = args.target.open()?;
    let key = etcd.target().key(vm);
    let state = runtime()?
        .block_on(etcd.query(vm, timeout))
        .with_context(|| format!("reading the register {key}"))?;
    println!("{}", serde_json::to_string(&state)?);
    Ok(0)
}

/// Sets up etcd's access control: the agents named may read and write the registers, nothing
/// else; only `root` may manage etcd. Run again to add agents (with root's certificate then).
pub fn grant(args: GrantArgs) -> anyhow::Result<i32> {
    let (etcd, timeout) = args.cluster.open()?;
    let url = etcd.target().url();
    let granted = runtime()?
        .block_on(etcd.grant_access(&args.role, &args.grant, timeout))
        .with_context(|| format!("setting up access control on {url}"))?;
    for other in &granted.other_permissions {
        eprintln!(
            "witness-grant: warning: role {} may also {other} (granted before; left as is)",
            granted.role
        );
    }
    eprintln!(
        "witness-grant: auth on at {url}; role {} may read and write {}* only; users {} hold it \
         (created now: {}); only the certificate with CN={ROOT} may manage etcd",
        granted.role,
        granted.key_prefix,
        granted.users.join(","),
        if granted.created.is_empty() {
            "none".to_string()
        } else {
            granted.created.join(",")
        },
    );
    Ok(0)
}
