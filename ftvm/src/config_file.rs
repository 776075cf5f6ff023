//! The TOML config file of the long-running roles: an `[agent]` section for `ftvm agent`,
//! `ftvm primary` and `ftvm backup`, a `[witness]` section for `ftvm witness`. Each key is the
//! command's long flag with `_` for `-` (`state_dir` is `--state-dir`; `peers` is a table of
//! `--peer`s). The file becomes the flags it stands for, placed before those on the command
//! line; a flag given on the command line replaces the file's value (for `peers`, all of them).
//! Keeping the flags as the one definition means a file can say nothing a command line cannot,
//! and clap checks both the same way.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Largest config file read (a real one is a few KiB; the file is input we do not trust).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// A whole config file.
#[derive(serde::Deserialize, serde::Serialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// `ftvm agent|primary|backup`.
    pub agent: Option<AgentSection>,
    /// `ftvm witness`.
    pub witness: Option<WitnessSection>,
}

/// The `[agent]` section: `ftvm primary|backup` flags, plus the role `ftvm agent` starts in.
/// Addresses stay strings here so that `ftvm check-config` can report every bad one at once.
#[derive(serde::Deserialize, serde::Serialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// `primary` or `backup`: how `ftvm agent` starts the first time (later starts rejoin).
    pub role: Option<String>,
    pub node: Option<u32>,
    pub listen: Option<String>,
    /// Node id (a TOML key is a string) → checkpoint-link address.
    pub peers: Option<BTreeMap<String, String>>,
    pub primary: Option<u32>,
    pub rejoin: Option<bool>,
    pub witness: Option<String>,
    pub witness_prefix: Option<String>,
    pub witness_ca: Option<PathBuf>,
    pub witness_cert: Option<PathBuf>,
    pub witness_key: Option<PathBuf>,
    pub keys: Option<PathBuf>,
    pub encrypt: Option<bool>,
    pub vm: Option<u64>,
    pub guest_dir: Option<PathBuf>,
    pub ram_mb: Option<u64>,
    pub accel: Option<String>,
    pub mac: Option<String>,
    pub vm_ip: Option<String>,
    pub dirty_pages: Option<u64>,
    pub disk_write: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub disk: Option<PathBuf>,
    pub ram_dir: Option<PathBuf>,
    pub tap: Option<String>,
    pub epoch_ms: Option<u64>,
    pub epoch_policy: Option<String>,
    pub min_gap_us: Option<u64>,
    pub max_idle_pct: Option<u8>,
    pub heartbeat_ms: Option<u64>,
    pub failure_timeout_ms: Option<u64>,
    pub transport: Option<String>,
    pub capture: Option<String>,
    pub tracking: Option<String>,
    pub qemu_user: Option<String>,
    pub verify_every: Option<u64>,
    pub durable_replica: Option<bool>,
    pub discard_replica: Option<bool>,
    pub output_cap_mb: Option<u64>,
    pub link_buffer_kib: Option<u64>,
    pub verbose: Option<bool>,
    pub journal: Option<PathBuf>,
    pub metrics_listen: Option<String>,
}

/// The `[witness]` section: `ftvm witness` flags.
#[derive(serde::Deserialize, serde::Serialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct WitnessSection {
    pub listen: Option<String>,
    pub vm: Option<u64>,
    pub primary: Option<u32>,
    pub state: Option<PathBuf>,
    pub keys: Option<PathBuf>,
    pub init: Option<bool>,
    pub verbose: Option<bool>,
    pub journal: Option<PathBuf>,
}

/// Keys of a section that are not flags of the command it configures.
const NOT_FLAGS: [&str; 1] = ["role"];

/// Parses config text; a syntax error, a wrong type or an unknown key is one line naming the
/// place (`FILE:LINE:COL: ...`) and, for an unknown key, the key.
pub fn parse(text: &str, name: &str) -> anyhow::Result<ConfigFile> {
    toml::from_str(text).map_err(|e| {
        let at = e
            .span()
            .map(|s| {
                let before = &text[..s.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
                format!("{name}:{line}:{col}")
            })
            .unwrap_or_else(|| name.to_string());
        anyhow::anyhow!("{at}: {}", e.message().replace('\n', " "))
    })
}

/// Reads and parses `path` (at most [`MAX_CONFIG_BYTES`]).
pub fn load(path: &Path) -> anyhow::Result<ConfigFile> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).with_context(|| format!("config file {}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("config file {} (not UTF-8 text?)", path.display()))?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        bail!(
            "config file {} is larger than {MAX_CONFIG_BYTES} bytes",
            path.display()
        );
    }
    parse(&text, &path.display().to_string())
}

/// The flag a key stands for.
fn flag_of(key: &str) -> String {
    match key {
        "peers" => "--peer".into(),
        k => format!("--{}", k.replace('_', "-")),
    }
}

/// The command-line flags a section stands for, without those in `given` (flags the user
/// typed, which win).
pub fn section_args<T: serde::Serialize>(
    section: &T,
    given: &[String],
) -> anyhow::Result<Vec<OsString>> {
    let value = serde_json::to_value(section).context("config section")?;
    let serde_json::Value::Object(map) = value else {
        bail!("config section is not a table");
    };
    let mut out = Vec::new();
    for (key, v) in map {
        let flag = flag_of(&key);
        if NOT_FLAGS.contains(&key.as_str()) || given.contains(&flag) {
            continue;
        }
        match v {
            serde_json::Value::Null | serde_json::Value::Bool(false) => {}
            serde_json::Value::Bool(true) => out.push(flag.into()),
            serde_json::Value::String(s) => out.extend([flag.into(), s.into()]),
            serde_json::Value::Number(n) => out.extend([flag.into(), n.to_string().into()]),
            serde_json::Value::Object(peers) => {
                for (id, addr) in peers {
                    let addr = addr.as_str().unwrap_or_default();
                    out.extend([flag.clone().into(), format!("{id}={addr}").into()]);
                }
            }
            serde_json::Value::Array(_) => bail!("config key {key}: a list is not expected"),
        }
    }
    Ok(out)
}

/// The long flags in `args` (`--name` of `--name value` and `--name=value`).
pub fn given_flags(args: &[OsString]) -> Vec<String> {
    args.iter()
        .filter_map(|a| a.to_str())
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_string())
        .collect()
}

/// Subcommands that take `--config`, and the section each reads.
const CONFIGURED: [(&str, &str); 3] = [
    ("primary", "agent"),
    ("backup", "agent"),
    ("witness", "witness"),
];

/// `argv` with the flags of the `--config FILE` of a `primary`, `backup` or `witness`
/// command inserted right after the subcommand (so the command line's own flags follow and
/// win); unchanged for other commands or without `--config`.
pub fn expand_argv(argv: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    let Some((at, section)) = argv.iter().enumerate().skip(1).find_map(|(i, a)| {
        CONFIGURED
            .iter()
            .find(|(cmd, _)| a.to_str() == Some(cmd))
            .map(|(_, s)| (i, *s))
    }) else {
        return Ok(argv);
    };
    let rest = &argv[at + 1..];
    let mut path = None;
    for (i, a) in rest.iter().enumerate() {
        match a.to_str() {
            Some("--config") => path = rest.get(i + 1).map(PathBuf::from),
            Some(s) if s.starts_with("--config=") => path = Some(PathBuf::from(&s[9..])),
            _ => {}
        }
    }
    let Some(path) = path else {
        return Ok(argv);
    };
    let file = load(&path)?;
    let given = given_flags(rest);
    let inserted = match section {
        "agent" => {
            let Some(agent) = &file.agent else {
                bail!("config file {}: no [agent] section", path.display());
            };
            section_args(agent, &given)?
        }
        _ => {
            let Some(witness) = &file.witness else {
                bail!("config file {}: no [witness] section", path.display());
            };
            section_args(witness, &given)?
        }
    };
    let mut out = argv[..=at].to_vec();
    out.extend(inserted);
    out.extend_from_slice(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line() {
        let e = parse("[agent]\nnode = 1\nlisten_addr = \"x\"\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("f.toml:3:1: "), "{e}");
        assert!(e.contains("listen_addr"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = parse("[agnet]\n", "f.toml").unwrap_err().to_string();
        assert!(e.contains("agnet"), "{e}");
        let e = parse("[agent]\nnode = \"one\"\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("f.toml:2:"), "{e}");
    }

    #[test]
    fn a_section_becomes_flags_and_the_command_line_wins() {
        let f = parse(
            "[agent]\nrole = \"backup\"\nnode = 2\nlisten = \"10.0.0.2:7001\"\nrejoin = true\n\
             encrypt = false\npeers = { 1 = \"10.0.0.1:7001\", 3 = \"10.0.0.3:7001\" }\n\
             state_dir = \"/var/lib/ftvm/vm1\"\n",
            "f",
        )
        .unwrap();
        let agent = f.agent.unwrap();
        let args = section_args(&agent, &[]).unwrap();
        let s: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        for want in [
            &["--node", "2"][..],
            &["--listen", "10.0.0.2:7001"],
            &["--peer", "1=10.0.0.1:7001", "--peer", "3=10.0.0.3:7001"],
            &["--rejoin"],
            &["--state-dir", "/var/lib/ftvm/vm1"],
        ] {
            assert!(
                s.windows(want.len()).any(|w| w == want),
                "{want:?} in {s:?}"
            );
        }
        assert!(!s.contains(&"--encrypt") && !s.contains(&"--role"), "{s:?}");
        let args = section_args(&agent, &["--listen".into(), "--peer".into()]).unwrap();
        let s: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        assert!(!s.contains(&"--listen") && !s.contains(&"--peer"), "{s:?}");
    }

    #[test]
    fn expand_argv_puts_the_file_before_the_command_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("w.toml");
        std::fs::write(
            &p,
            "[witness]\nlisten = \"127.0.0.1:7000\"\nvm = 3\nstate = \"/s\"\n",
        )
        .unwrap();
        let conf = p.to_str().unwrap();
        let argv = os(&["ftvm", "witness", "--config", conf, "--vm", "4"]);
        let out = expand_argv(argv).unwrap();
        let s: Vec<&str> = out.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(&s[..2], ["ftvm", "witness"]);
        assert!(s.windows(2).any(|w| w == ["--listen", "127.0.0.1:7000"]));
        assert!(!s.windows(2).any(|w| w == ["--vm", "3"]), "{s:?}");
        assert_eq!(&s[s.len() - 4..], ["--config", conf, "--vm", "4"]);
        let argv = os(&["ftvm", "sim", "--config", conf]);
        assert_eq!(expand_argv(argv.clone()).unwrap(), argv);
        let argv = os(&["ftvm", "primary", "--config", conf]);
        let e = expand_argv(argv).unwrap_err().to_string();
        assert!(e.contains("no [agent] section"), "{e}");
    }
}
