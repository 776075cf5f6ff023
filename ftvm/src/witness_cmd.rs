//! `ftvm witness`: the fencing party both agents must reach to change who may release output.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use ftvm_model::{NodeId, VmId};
use ftvm_real::agent::witness;
use ftvm_real::auth::Identity;

/// Arguments of `ftvm witness`.
#[derive(clap::Args)]
pub struct Args {
    /// Address to serve on.
    #[arg(long)]
    listen: SocketAddr,
    /// The protected VM's id.
    #[arg(long, default_value_t = 1)]
    vm: u64,
    /// The node that is primary of generation 1 (used only when no state file exists yet).
    #[arg(long, default_value_t = 1)]
    primary: u32,
    /// Where the register is persisted (written before every reply).
    #[arg(long)]
    state: PathBuf,
    /// Key directory (`ftvm keygen`): the witness's private key `witness.key` and the public
    /// keys of the nodes allowed to use it.
    #[arg(long)]
    keys: PathBuf,
    /// Log every request and decision to stderr.
    #[arg(long)]
    verbose: bool,
}

/// Runs the witness until killed.
pub fn run(args: Args) -> anyhow::Result<i32> {
    let identity = Identity::load_witness(&args.keys)
        .with_context(|| format!("loading keys from {}", args.keys.display()))?;
    if identity.trust.nodes.is_empty() {
        anyhow::bail!(
            "no node public keys (node-<ID>.pub) in {}: nobody could use this witness",
            args.keys.display()
        );
    }
    let w = witness::load_state(&args.state, VmId(args.vm), NodeId(args.primary))
        .context("loading the witness state")?;
    eprintln!(
        "ftvm witness: VM {} generation {} primary {} on {}",
        args.vm,
        w.state().generation,
        w.state().primary,
        args.listen
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let limits = witness::ServeLimits::default();
    let serve = witness::serve(
        args.listen,
        args.state,
        w,
        Arc::new(identity),
        limits,
        args.verbose,
    );
    rt.block_on(serve).context("serving the witness")?;
    Ok(0)
}
