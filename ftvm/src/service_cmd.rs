//! `ftvm agent --config FILE`: an agent as a service (one per protected VM on a host, e.g.
//! `ftvm-agent@.service`). The file's `role` says how this host starts the *first* time; every
//! later start of the same state directory (a crash, a reboot, `systemctl restart`) starts as a
//! backup with `--rejoin`, asking the witness who the primary is. A restarted primary must
//! never boot a fresh VM: its backup has taken over (or will, after the failure timeout), and
//! a joiner that the witness still names as primary keeps asking until it has.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Parser;

use crate::agent_cmd::{self, Role};
use crate::config_file;

/// Arguments of `ftvm agent`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The config file (its `[agent]` section; `ftvm check-config` validates it).
    #[arg(long)]
    config: PathBuf,
    /// `ftvm primary|backup` flags overriding the file's values (after `--`).
    #[arg(last = true)]
    overrides: Vec<OsString>,
}

/// The marker of an earlier start, in the state directory.
pub const STARTED_MARKER: &str = "agent-started";

/// `ftvm primary|backup`'s arguments on their own, to parse the file's flags with.
#[derive(Parser, Debug)]
#[command(name = "ftvm agent", no_binary_name = true)]
struct AgentFlags {
    #[command(flatten)]
    args: agent_cmd::Args,
}

/// The role and the full flag list this start uses: the file's role the first time, a
/// rejoining backup once `state_dir` holds the marker of an earlier start.
pub fn plan(
    file: &config_file::AgentSection,
    overrides: &[OsString],
    state_dir: &Path,
) -> anyhow::Result<(Role, Vec<OsString>)> {
    let given = config_file::given_flags(overrides);
    let mut argv = config_file::section_args(file, &given)?;
    let restarted = state_dir.join(STARTED_MARKER).exists();
    let role = match (file.role.as_deref(), restarted) {
        (_, true) => {
            tracing::info!(
                "{} exists: an earlier start ran here, so this one rejoins as a backup",
                state_dir.join(STARTED_MARKER).display()
            );
            // A primary's file has no `primary` key; a backup's names its first primary,
            // which may not be the primary any more: the witness knows.
            argv.retain(|a| a != "--rejoin");
            argv.push("--rejoin".into());
            Role::Backup
        }
        (Some("primary"), false) => Role::Primary,
        (Some("backup"), false) => Role::Backup,
        (other, false) => bail!("agent.role is {other:?}: say \"primary\" or \"backup\""),
    };
    if role == Role::Backup && restarted {
        drop_flag_with_value(&mut argv, "--primary");
    }
    argv.extend_from_slice(overrides);
    Ok((role, argv))
}

fn drop_flag_with_value(argv: &mut Vec<OsString>, flag: &str) {
    if let Some(i) = argv.iter().position(|a| a == flag) {
        argv.drain(i..(i + 2).min(argv.len()));
    }
}

/// Runs the agent the file describes.
pub fn run(args: Args) -> anyhow::Result<i32> {
    let file = config_file::load(&args.config)?;
    let Some(section) = file.agent else {
        bail!("config file {}: no [agent] section", args.config.display());
    };
    let problems = crate::config_check::check(&config_file::ConfigFile {
        agent: Some(section.clone()),
        witness: None,
    });
    if !problems.is_empty() {
        bail!(
            "config file {}:\n  {}",
            args.config.display(),
            problems.join("\n  ")
        );
    }
    // The state directory this start uses (the file's, or an override's) holds the marker.
    let mut probe =
        config_file::section_args(&section, &config_file::given_flags(&args.overrides))?;
    probe.extend_from_slice(&args.overrides);
    let flags = AgentFlags::try_parse_from(probe).context("the config file and overrides")?;
    let state_dir = flags.args.state_dir().to_path_buf();
    let (role, argv) = plan(&section, &args.overrides, &state_dir)?;
    let flags = AgentFlags::try_parse_from(argv).context("the config file and overrides")?;
    ftvm_real::secure_fs::private_dir(&state_dir).context("the state directory")?;
    // Written before the agent starts: if this start dies at any point, the next one must not
    // boot a second fresh VM.
    std::fs::write(state_dir.join(STARTED_MARKER), format!("{role:?}\n"))
        .context("writing the start marker")?;
    agent_cmd::run(role, flags.args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(text: &str) -> config_file::AgentSection {
        config_file::parse(text, "f").unwrap().agent.unwrap()
    }

    fn strs(v: &[OsString]) -> Vec<&str> {
        v.iter().map(|a| a.to_str().unwrap()).collect()
    }

    #[test]
    fn the_first_start_takes_the_files_role_and_later_ones_rejoin() {
        let d = tempfile::tempdir().unwrap();
        let p = section("[agent]\nrole = \"primary\"\nnode = 1\nlisten = \"10.0.0.1:7001\"\n");
        let (role, argv) = plan(&p, &[], d.path()).unwrap();
        assert_eq!(role, Role::Primary);
        assert!(!strs(&argv).contains(&"--rejoin"));
        std::fs::write(d.path().join(STARTED_MARKER), "Primary\n").unwrap();
        let (role, argv) = plan(&p, &[], d.path()).unwrap();
        assert_eq!(role, Role::Backup);
        assert!(strs(&argv).contains(&"--rejoin"), "{argv:?}");

        let b = section("[agent]\nrole = \"backup\"\nnode = 2\nprimary = 1\n");
        let (role, argv) = plan(&b, &[], d.path()).unwrap();
        assert_eq!(role, Role::Backup);
        let argv = strs(&argv);
        assert!(
            argv.contains(&"--rejoin") && !argv.contains(&"--primary"),
            "{argv:?}"
        );
    }

    #[test]
    fn command_line_overrides_win_over_the_file() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().display().to_string();
        let text = format!(
            "[agent]\nrole = \"backup\"\nnode = 2\nlisten = \"10.0.0.2:7001\"\n\
             witness = \"10.0.0.3:7000\"\nkeys = \"{dir}\"\nstate_dir = \"{dir}\"\n\
             guest_dir = \"{dir}\"\nepoch_ms = 25\n[agent.peers]\n1 = \"10.0.0.1:7001\"\n"
        );
        let s = section(&text);
        let overrides: Vec<OsString> = ["--epoch-ms", "50", "--listen=10.0.0.2:7999"]
            .map(OsString::from)
            .to_vec();
        let (_, argv) = plan(&s, &overrides, d.path()).unwrap();
        let flags = AgentFlags::try_parse_from(argv).unwrap();
        assert_eq!(flags.args.epoch_ms(), 50);
        assert_eq!(flags.args.listen(), "10.0.0.2:7999".parse().unwrap());
        // Without overrides the file's values stand.
        let (_, argv) = plan(&s, &[], d.path()).unwrap();
        let flags = AgentFlags::try_parse_from(argv).unwrap();
        assert_eq!(flags.args.epoch_ms(), 25);
    }
}
