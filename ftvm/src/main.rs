//! `ftvm`: fault tolerance for unmodified QEMU VMs by continuous checkpointing.
//!
//! One binary for every role: the simulator (`sim`), the real agents (`primary`, `backup`,
//! `witness`), their keys (`keygen`), the local demo (`demo`), a client of the demo guest's service (`client`) and the
//! benchmarks (`bench`).

use clap::{Parser, Subcommand};

mod agent_cmd;
mod bench_auth;
mod bench_capture;
mod bench_cmd;
mod bench_e2e;
mod bench_mac;
mod bench_sync;
mod bench_sync_migrate;
mod bench_sync_report;
mod bench_sysbench;
mod bench_witness;
mod client_cmd;
mod config_check;
mod config_file;
mod db_workload;
mod demo_cmd;
mod deploy;
mod deploy_etcd;
mod disk_args;
mod epoch_policy_args;
mod etcd_tls_args;
mod guest_args;
mod keygen_cmd;
mod logging;
mod mac_candidates;
mod plot;
mod real_faults;
mod real_faults_etcd;
mod reprotect;
mod run_check;
mod scenario_cmd;
mod service_cmd;
mod sim_cmd;
mod status_cmd;
mod vm_cmd;
mod witness_cmd;
mod witness_etcd_cmd;

#[derive(Parser)]
#[command(
    name = "ftvm",
    version,
    about = "Fault tolerance for unmodified QEMU VMs"
)]
struct Cli {
    #[command(flatten)]
    log: logging::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario in the deterministic simulator over one seed or a range of seeds.
    Sim(sim_cmd::Args),
    /// Run the protected VM on this host and ship its checkpoints to a backup.
    Primary(agent_cmd::Args),
    /// Hold a replica of the VM and take over when the primary dies.
    Backup(agent_cmd::Args),
    /// Run this host's agent of one VM from a config file (first start: the file's role; later
    /// starts rejoin through the witness). For `ftvm-agent@.service`.
    Agent(service_cmd::Args),
    /// Serve the witness (fencing party) both agents consult before changing roles.
    Witness(witness_cmd::Args),
    /// Validate a config file: one line per problem, exit 1 if any.
    CheckConfig(config_check::Args),
    /// Show a VM's agents (role, phase, protection, generation, lag, failover) and register.
    Status(status_cmd::Args),
    /// Create a new VM's register in an etcd witness (refused if it exists).
    WitnessInit(witness_etcd_cmd::InitArgs),
    /// Print a VM's register from an etcd witness (JSON).
    WitnessShow(witness_etcd_cmd::ShowArgs),
    /// Turn on an etcd witness's access control: the named agents' certificates may touch the
    /// registers only, and only root's may manage etcd.
    WitnessGrant(witness_etcd_cmd::GrantArgs),
    /// Make the key pairs that authenticate the nodes and the witness to each other.
    Keygen(keygen_cmd::Args),
    /// Protect a demo VM with a local primary+backup pair in network namespaces, then fail over.
    Demo(demo_cmd::Args),
    /// Boot the demo guest unprotected, its network straight on a tap (the benchmark baseline).
    Vm(vm_cmd::Args),
    /// Run a scenario file on real hosts (`--real`) or once in the simulator.
    Scenario(scenario_cmd::Args),
    /// Benchmarks (JSON + Markdown + PNG plots).
    Bench(bench_cmd::Args),
    /// Drive the demo guest's counter service and report what a client saw (JSON on stdout).
    Client(client_cmd::Args),
}

fn main() {
    // `--config FILE` of `primary`, `backup` and `witness`: the file's flags go before the
    // command line's, which win.
    let argv = match config_file::expand_argv(std::env::args_os().collect()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("ftvm: error: {e:#}");
            std::process::exit(2);
        }
    };
    let cli = Cli::parse_from(argv);
    if let Err(e) = logging::init(&cli.log) {
        eprintln!("ftvm: error: {e:#}");
        std::process::exit(2);
    }
    let result = match cli.command {
        Command::Sim(args) => sim_cmd::run(args),
        Command::Primary(args) => agent_cmd::run(agent_cmd::Role::Primary, args),
        Command::Backup(args) => agent_cmd::run(agent_cmd::Role::Backup, args),
        Command::Agent(args) => service_cmd::run(args),
        Command::Witness(args) => witness_cmd::run(args),
        Command::CheckConfig(args) => config_check::run(args),
        Command::Status(args) => status_cmd::run(args),
        Command::WitnessInit(args) => witness_etcd_cmd::init(args),
        Command::WitnessShow(args) => witness_etcd_cmd::show(args),
        Command::WitnessGrant(args) => witness_etcd_cmd::grant(args),
        Command::Keygen(args) => keygen_cmd::run(args),
        Command::Demo(args) => demo_cmd::run(args),
        Command::Client(args) => client_cmd::run(args),
        Command::Bench(args) => bench_cmd::run(args),
        Command::Vm(args) => vm_cmd::run(args),
        Command::Scenario(args) => scenario_cmd::run(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // A log collector reading JSON lines gets the failure as one of them.
            if logging::is_json() {
                tracing::error!(error = format!("{e:#}"), "ftvm failed");
            } else {
                eprintln!("ftvm: error: {e:#}");
            }
            std::process::exit(1);
        }
    }
}
