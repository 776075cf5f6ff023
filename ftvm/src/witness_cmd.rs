//! `ftvm witness`: the fencing party both agents must reach to change who may release output.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use ftvm_model::{NodeId, VmId};
use ftvm_real::agent::witness;
use ftvm_real::agent::witness_store::{Open, WitnessStore};
use ftvm_real::auth::Identity;
use ftvm_real::journal_file::JournalWriter;

/// Arguments of `ftvm witness`.
#[derive(clap::Args)]
pub struct Args {
    /// Address to serve on.
    #[arg(long)]
    listen: SocketAddr,
    /// The protected VM's id.
    #[arg(long, default_value_t = 1)]
    vm: u64,
    /// The node that is primary of generation 1 (used only with --init).
    #[arg(long, default_value_t = 1)]
    primary: u32,
    /// Where the register is persisted (written before every reply).
    #[arg(long)]
    state: PathBuf,
    /// Key directory (`ftvm keygen`): the witness's private key `witness.key` and the public
    /// keys of the nodes allowed to use it.
    #[arg(long)]
    keys: PathBuf,
    /// Create a fresh register (generation 1, --primary) for a new VM. Refused when the state
    /// file exists; without it, a missing state file is refused.
    #[arg(long)]
    init: bool,
    /// Log every request and decision to stderr.
    #[arg(long)]
    verbose: bool,
    /// Append every decision to this journal (JSON lines) for checking the run afterwards.
    #[arg(long)]
    journal: Option<PathBuf>,
    /// A TOML config file whose `[witness]` section gives these flags (flags given here win);
    /// `ftvm check-config` validates it.
    #[arg(long)]
    config: Option<PathBuf>,
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
    let how = if args.init {
        Open::Init {
            primary: NodeId(args.primary),
        }
    } else {
        Open::Existing
    };
    let (store, w) =
        WitnessStore::open(&args.state, VmId(args.vm), how).context("opening the witness state")?;
    tracing::info!(
        vm = args.vm,
        generation = w.state().generation.0,
        primary = w.state().primary.0,
        listen = %args.listen,
        "witness serving"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let limits = witness::ServeLimits::default();
    let journal = match &args.journal {
        Some(path) => Some(JournalWriter::open(path).context("opening the journal")?),
        None => None,
    };
    let serve = witness::serve_journaled(
        args.listen,
        store,
        w,
        Arc::new(identity),
        limits,
        args.verbose,
        journal,
    );
    rt.block_on(serve).context("serving the witness")?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(state: PathBuf, keys: &std::path::Path, init: bool) -> Args {
        Args {
            listen: "127.0.0.1:0".parse().unwrap(),
            vm: 1,
            primary: 1,
            state,
            keys: keys.to_path_buf(),
            init,
            verbose: false,
            journal: None,
            config: None,
        }
    }

    #[test]
    fn a_missing_register_without_init_and_init_over_an_existing_one_are_refused() {
        let d = std::env::temp_dir().join(format!("ftvm-witness-cmd-{}", std::process::id()));
        ftvm_real::secure_fs::fresh_private_dir(&d).unwrap();
        let state = d.join("witness.json");
        let keys = d.join("keys");
        for name in ["node-1", "witness"] {
            ftvm_real::auth::keys::generate_into(&keys, name).unwrap();
        }
        let e = run(args(state.clone(), &keys, false)).unwrap_err();
        assert!(format!("{e:#}").contains("start with --init"), "{e:#}");
        assert!(!state.exists());
        std::fs::write(&state, b"{}").unwrap();
        let e = run(args(state.clone(), &keys, true)).unwrap_err();
        assert!(format!("{e:#}").contains("refusing --init"), "{e:#}");
        assert_eq!(std::fs::read(&state).unwrap(), b"{}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
