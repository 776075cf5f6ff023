//! `ftvm`: fault tolerance for unmodified QEMU VMs by continuous checkpointing.
//!
//! One binary for every role: the simulator (`sim`), the real agents (`primary`, `backup`,
//! `witness`), the local demo (`demo`), a client of the demo guest's service (`client`) and the
//! benchmarks (`bench`).

use clap::{Parser, Subcommand};

mod client_cmd;

#[derive(Parser)]
#[command(name = "ftvm", version, about = "Fault tolerance for unmodified QEMU VMs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Drive the demo guest's counter service and report what a client saw (JSON on stdout).
    Client(client_cmd::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Client(args) => client_cmd::run(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ftvm: error: {e:#}");
            std::process::exit(1);
        }
    }
}
