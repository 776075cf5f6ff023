//! `ftvm client`: drives the guest's counter service over persistent connections (one per
//! client).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;

/// Arguments of `ftvm client`.
#[derive(clap::Args)]
pub struct Args {
    /// Address of the VM's service.
    #[arg(long)]
    addr: SocketAddr,
    /// How long to drive it, in seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Per-request timeout, in milliseconds (a request in flight at failover waits this long at most).
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Print every reply value as it arrives (one line each, on stderr).
    #[arg(long)]
    progress: bool,
    /// Clients at once, each on its own connection, each sending its next request when its
    /// reply came.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    clients: u32,
}

/// Runs the client and prints its report as one JSON line; exits 2 if any state was lost.
pub fn run(args: Args) -> anyhow::Result<i32> {
    if !(args.seconds > 0.0 && args.seconds.is_finite()) {
        anyhow::bail!("--seconds must be a positive number, not {}", args.seconds);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let progress = args.progress;
    let report = rt.block_on(ftvm_real::client::run_counter_clients(
        args.addr,
        args.clients as usize,
        Duration::from_millis(args.timeout_ms),
        deadline,
        std::sync::Arc::new(move |v| {
            if progress {
                eprintln!("reply {v}");
            }
        }),
    ));
    println!(
        "{}",
        serde_json::to_string(&report).context("encoding the report")?
    );
    Ok(if report.lost > 0 { 2 } else { 0 })
}
