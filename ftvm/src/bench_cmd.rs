//! `ftvm bench`: benchmarks that write JSON, a Markdown table and a PNG plot.

use std::path::{Path, PathBuf};

use anyhow::Context;
use ftvm_real::transport::bench::{bench_transports, BenchOptions, BenchPath};
use ftvm_real::transport::TransportKind;

/// Arguments of `ftvm bench`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand)]
enum What {
    /// Checkpoint transports: scattered 4 KiB pages over loopback and veth, with raw TCP as the
    /// reference, every transport and batch size in one run.
    Transport(TransportArgs),
    /// End to end: client response times, checkpoint pauses, send-updated-states time and VM
    /// idle rate for an unprotected VM and for each epoch × load × transport × capture mode.
    E2e(crate::bench_e2e::E2eArgs),
    /// Capture modes: checkpoint pause and send-updated-states time against the dirty set, with
    /// the in-memory VM and real agents, transports and replica over loopback.
    Capture(crate::bench_capture::CaptureArgs),
    /// Link protection: pause and send-updated-states time with frames unprotected (baseline),
    /// tagged (the default) and encrypted, interleaved in one run.
    Auth(crate::bench_auth::AuthArgs),
    /// MAC and AEAD candidates for authenticated checkpoint frames: GiB/s on one core over
    /// scattered 4 KiB pages, every candidate side by side in one run.
    Mac(crate::bench_mac::MacArgs),
    /// Takeover time with `ftvm witness` against an etcd witness (a local 3-member cluster), and
    /// with the etcd leader killed as the primary dies: median of N failovers each, interleaved.
    Witness(crate::bench_witness::WitnessArgs),
    /// Re-protection against QEMU's own live migration of the same guest: a backup restarted
    /// empty (full sync) or on its replica (catch-up), or after a cut of the replication link,
    /// each timed from restart to protected; the ratio full sync / migration.
    Sync(crate::bench_sync::SyncArgs),
    /// Re-render the PNG plots from the JSON files a benchmark wrote.
    Plot(PlotArgs),
}

#[derive(clap::Args)]
struct PlotArgs {
    /// Directory holding `capture.json`, `transport.json`, `e2e.json` and/or `mac.json`.
    #[arg(long, default_value = "docs/bench")]
    dir: PathBuf,
}

#[derive(clap::Args)]
struct TransportArgs {
    /// Output directory for `transport.json` and `transport.md`.
    #[arg(long, default_value = "docs/bench")]
    out: PathBuf,
    /// Measured repetitions per case (medians are reported).
    #[arg(long, default_value_t = 9)]
    repetitions: usize,
    /// MiB sent per repetition.
    #[arg(long, default_value_t = 128)]
    mib_per_rep: usize,
    /// Batch sizes in KiB (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024,4096")]
    batch_kib: Vec<usize>,
    /// Transports (comma separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "copy,msg-zerocopy,uring-zc,auto"
    )]
    transports: Vec<String>,
    /// Skip the veth path (it needs root and iproute2).
    #[arg(long)]
    loopback_only: bool,
}

/// Runs a benchmark.
pub fn run(args: Args) -> anyhow::Result<i32> {
    match args.what {
        What::Transport(a) => transport(a),
        What::E2e(a) => crate::bench_e2e::run(a),
        What::Capture(a) => crate::bench_capture::run(a),
        What::Auth(a) => crate::bench_auth::run(a),
        What::Mac(a) => crate::bench_mac::run(a),
        What::Witness(a) => crate::bench_witness::run(a),
        What::Sync(a) => crate::bench_sync::run(a),
        What::Plot(a) => {
            for p in crate::plot::all(&a.dir)? {
                eprintln!("wrote {}", p.display());
            }
            Ok(0)
        }
    }
}

fn transport(a: TransportArgs) -> anyhow::Result<i32> {
    if a.repetitions == 0 || a.mib_per_rep == 0 || a.batch_kib.iter().any(|&b| b == 0 || b % 4 != 0)
    {
        anyhow::bail!("repetitions and MiB per repetition must be positive; batch sizes positive multiples of 4 KiB");
    }
    let transports = a
        .transports
        .iter()
        .map(|t| t.parse::<TransportKind>())
        .collect::<Result<Vec<_>, _>>()
        .context("--transports")?;
    let opts = BenchOptions {
        bytes_per_rep: a.mib_per_rep << 20,
        batch_bytes: a.batch_kib.iter().map(|k| k << 10).collect(),
        transports,
        paths: if a.loopback_only {
            vec![BenchPath::Loopback]
        } else {
            vec![BenchPath::Loopback, BenchPath::Veth]
        },
        repetitions: a.repetitions,
        ..BenchOptions::default()
    };
    eprintln!(
        "ftvm bench transport: {} repetitions per case; this takes a minute or two",
        opts.repetitions
    );
    let report = bench_transports(&opts).context("running the transport benchmark")?;
    write_results(&a.out, "transport", &report, &report.to_markdown(), || {
        crate::plot::transport(&a.out)
    })?;
    Ok(0)
}

/// Writes a benchmark's `<out>/<name>.json` and `<out>/<name>.md`, prints the table, then has
/// `plot` draw `<out>/<name>.png` (after the JSON, which some plots read back) and says where
/// everything went.
pub(crate) fn write_results<T: serde::Serialize>(
    out: &Path,
    name: &str,
    report: &T,
    table: &str,
    plot: impl FnOnce() -> anyhow::Result<PathBuf>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = out.join(format!("{name}.json"));
    std::fs::write(&json, serde_json::to_vec_pretty(report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let md = out.join(format!("{name}.md"));
    std::fs::write(&md, table).with_context(|| format!("writing {}", md.display()))?;
    println!("{table}");
    let png = plot().with_context(|| format!("plotting {name}.png"))?;
    eprintln!(
        "wrote {}, {} and {}",
        json.display(),
        md.display(),
        png.display()
    );
    Ok(())
}
