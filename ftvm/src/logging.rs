//! The diagnostics log: every `tracing` event of the binary and its libraries goes to stderr,
//! human-readable by default or one JSON object a line with `--log-format json`. What a command
//! prints as its result (a report, progress of a benchmark) is not log and stays plain output.

use std::io::IsTerminal;
use std::sync::OnceLock;

use anyhow::anyhow;
use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One line per event, for people: time, level, where, message, fields.
    #[default]
    Text,
    /// One JSON object a line (`timestamp`, `level`, `target`, `message` and the event's
    /// fields), for log collectors.
    Json,
}

impl LogFormat {
    fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// The log options every subcommand takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LogArgs {
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to log: a level (error, warn, info, debug, trace) or `tracing` filter directives
    /// such as `info,ftvm_real::transport=debug`. Without it, `RUST_LOG` decides, else `info`.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
}

/// The options the log was set up with, passed on to the agents a command starts.
static CHOSEN: OnceLock<LogArgs> = OnceLock::new();

/// What is logged by default: ours at `info`; the simulator's network library only warnings
/// (at `info` it prints every simulated host and bind of every seed).
const DEFAULT_FILTER: &str = "turmoil=warn,info";

/// The filter: `--log-level`, else `RUST_LOG`, else [`DEFAULT_FILTER`]. A filter that does not parse is an
/// error rather than a silently empty log.
fn filter(args: &LogArgs, rust_log: Option<&str>) -> anyhow::Result<EnvFilter> {
    match (args.log_level.as_deref(), rust_log) {
        // The parse error already quotes its cause: a context would print it twice.
        (Some(f), _) => EnvFilter::try_new(f).map_err(|e| anyhow!("--log-level {f:?}: {e}")),
        (None, Some(f)) if !f.trim().is_empty() => {
            EnvFilter::try_new(f).map_err(|e| anyhow!("RUST_LOG={f:?}: {e}"))
        }
        _ => Ok(EnvFilter::new(DEFAULT_FILTER)),
    }
}

/// Installs the subscriber for the whole process (once; later calls keep the first).
pub fn init(args: &LogArgs) -> anyhow::Result<()> {
    let rust_log = std::env::var(EnvFilter::DEFAULT_ENV).ok();
    let filter = filter(args, rust_log.as_deref())?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match args.log_format {
        // Colours only on a terminal: agents' logs are files.
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    if installed.is_ok() {
        let _ = CHOSEN.set(args.clone());
    }
    Ok(())
}

/// The log options of this process as arguments for an `ftvm` it starts, so the agents of a
/// demo or a real scenario log in the same format and at the same level.
pub fn child_args() -> Vec<String> {
    let Some(a) = CHOSEN.get() else {
        return Vec::new();
    };
    let mut out = vec!["--log-format".to_string(), a.log_format.name().to_string()];
    if let Some(level) = &a.log_level {
        out.extend(["--log-level".to_string(), level.clone()]);
    }
    out
}

/// True when log lines are JSON (the top-level error is then logged, not printed).
pub fn is_json() -> bool {
    CHOSEN
        .get()
        .is_some_and(|a| a.log_format == LogFormat::Json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        log: LogArgs,
        #[command(subcommand)]
        cmd: Sub,
    }

    #[derive(clap::Subcommand)]
    enum Sub {
        Run,
    }

    #[test]
    fn the_log_options_are_accepted_before_and_after_the_subcommand() {
        let c = Cli::try_parse_from(["ftvm", "--log-format", "json", "run"]).unwrap();
        assert_eq!(c.log.log_format, LogFormat::Json);
        let c = Cli::try_parse_from(["ftvm", "run", "--log-level", "debug"]).unwrap();
        assert_eq!(c.log.log_format, LogFormat::Text);
        assert_eq!(c.log.log_level.as_deref(), Some("debug"));
        assert!(Cli::try_parse_from(["ftvm", "--log-format", "xml", "run"]).is_err());
    }

    #[test]
    fn the_flag_wins_over_rust_log_and_a_bad_filter_is_an_error() {
        let flag = LogArgs {
            log_level: Some("debug".into()),
            ..LogArgs::default()
        };
        assert_eq!(filter(&flag, Some("error")).unwrap().to_string(), "debug");
        let none = LogArgs::default();
        assert_eq!(filter(&none, Some("warn")).unwrap().to_string(), "warn");
        assert_eq!(filter(&none, None).unwrap().to_string(), DEFAULT_FILTER);
        assert_eq!(
            filter(&none, Some(" ")).unwrap().to_string(),
            DEFAULT_FILTER
        );
        let bad = LogArgs {
            log_level: Some("info,=[".into()),
            ..LogArgs::default()
        };
        let e = format!("{:#}", filter(&bad, None).unwrap_err());
        assert!(e.contains("--log-level"), "{e}");
        let e = format!("{:#}", filter(&none, Some("ftvm=nonsense")).unwrap_err());
        assert!(e.contains("RUST_LOG"), "{e}");
    }
}
