//! `ftvm keygen`: the key pairs that authenticate nodes and the witness to each other.

use std::path::PathBuf;

use anyhow::Context;
use ftvm_model::NodeId;
use ftvm_real::auth::keys;

/// Arguments of `ftvm keygen`.
#[derive(clap::Args)]
pub struct Args {
    /// Directory to write the keys into (created 0700 if missing). Existing private keys are
    /// never overwritten.
    #[arg(long)]
    dir: PathBuf,
    /// Node ids to make key pairs for (comma-separated), e.g. `1,2`.
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<u32>,
    /// Also make the witness's key pair.
    #[arg(long)]
    witness: bool,
}

/// Writes the key pairs and says what goes where.
pub fn run(args: Args) -> anyhow::Result<i32> {
    if args.nodes.is_empty() && !args.witness {
        anyhow::bail!("nothing to generate: give --nodes and/or --witness");
    }
    let mut names: Vec<String> = args
        .nodes
        .iter()
        .map(|&n| keys::node_name(NodeId(n)))
        .collect();
    if args.witness {
        names.push("witness".into());
    }
    for name in &names {
        keys::generate_into(&args.dir, name)
            .with_context(|| format!("generating {name}'s key pair"))?;
        eprintln!(
            "ftvm keygen: {}/{name}.key (private) and .pub",
            args.dir.display()
        );
    }
    eprintln!(
        "ftvm keygen: every host needs every .pub; each private .key belongs only on its own host"
    );
    Ok(0)
}
