//! `ftvm witness-init` and `ftvm witness-show`: create and read a VM's register in an etcd
//! witness. Agents never create a register (a missing one is refused, as `ftvm witness` refuses a
//! missing state file without `--init`), so a new VM's register is made here, once.

use std::time::Duration;

use anyhow::Context;
use ftvm_model::{NodeId, VmId};
use ftvm_real::etcd_witness::{EtcdTarget, EtcdWitness, DEFAULT_PREFIX};

/// Where the register is.
#[derive(clap::Args, Debug)]
pub struct Target {
    /// The etcd cluster: `etcd://HOST:PORT[,HOST:PORT...]`.
    #[arg(long)]
    witness: String,
    /// Key prefix; the register of VM N is `<prefix>/vm/N`.
    #[arg(long, default_value = DEFAULT_PREFIX)]
    witness_prefix: String,
    /// The protected VM's id.
    #[arg(long, default_value_t = 1)]
    vm: u64,
    /// How long to wait for etcd, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    #[command(flatten)]
    tls: crate::etcd_tls_args::EtcdTlsArgs,
}

impl Target {
    fn open(&self) -> anyhow::Result<(EtcdWitness, VmId, Duration)> {
        let target = EtcdTarget::parse(&self.witness, &self.witness_prefix).context("--witness")?;
        let witness = self.tls.witness(target)?;
        Ok((
            witness,
            VmId(self.vm),
            Duration::from_millis(self.timeout_ms),
        ))
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
