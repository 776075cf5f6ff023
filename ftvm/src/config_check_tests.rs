use super::*;
use crate::config_file::parse;

/// A directory with keys for nodes 1 and 2 and the witness, a guest dir and a state dir.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        for name in ["node-1", "node-2", "witness"] {
            ftvm_real::auth::keys::generate_into(&keys, name).unwrap();
        }
        std::fs::create_dir(dir.path().join("guest")).unwrap();
        Setup { dir }
    }

    fn path(&self, p: &str) -> String {
        self.dir.path().join(p).display().to_string()
    }

    /// A valid backup agent's file with `extra` lines appended to its `[agent]` section.
    fn agent(&self, extra: &str) -> String {
        format!(
            "[agent]\nrole = \"backup\"\nnode = 2\nlisten = \"10.0.0.2:7001\"\n\
             witness = \"10.0.0.3:7000\"\nkeys = \"{}\"\nstate_dir = \"{}\"\n\
             guest_dir = \"{}\"\nrejoin = true\n{extra}\n[agent.peers]\n1 = \"10.0.0.1:7001\"\n",
            self.path("keys"),
            self.path("state"),
            self.path("guest"),
        )
    }

    fn problems(&self, text: &str) -> Vec<String> {
        match parse(text, "f.toml") {
            Ok(f) => check(&f),
            Err(e) => vec![e.to_string()],
        }
    }
}

fn has(problems: &[String], needle: &str) -> bool {
    problems.iter().any(|p| p.contains(needle))
}

#[test]
fn a_valid_agent_and_witness_file_has_no_problem() {
    let s = Setup::new();
    let text = format!(
        "{}\n[witness]\nlisten = \"10.0.0.3:7000\"\nstate = \"{}\"\nkeys = \"{}\"\n",
        s.agent("metrics_listen = \"10.0.0.2:9100\"\ncapture = \"cow\""),
        s.path("witness.json"),
        s.path("keys"),
    );
    assert_eq!(s.problems(&text), Vec::<String>::new());
}

#[test]
fn the_example_in_deploy_parses() {
    let text = include_str!("../../deploy/ftvm-example.toml");
    let f = parse(text, "ftvm-example.toml").unwrap();
    let a = f.agent.unwrap();
    assert_eq!(a.role.as_deref(), Some("backup"));
    assert_eq!(
        a.rejoin,
        Some(true),
        "a backup service must rejoin on restart"
    );
    assert!(f.witness.is_none(), "an agent host's file has no [witness]");
    let text = include_str!("../../deploy/witness-example.toml");
    let w = parse(text, "witness-example.toml")
        .unwrap()
        .witness
        .unwrap();
    assert_eq!(w.init, None, "the service must never --init");
}

#[test]
fn unknown_keys_are_named() {
    let s = Setup::new();
    let p = s.problems(&s.agent("state_directory = \"/x\""));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(has(&p, "state_directory") && has(&p, "f.toml:"), "{p:?}");
}

#[test]
fn bad_addresses_and_ports_are_each_reported() {
    let s = Setup::new();
    let text = s
        .agent("metrics_listen = \"10.0.0.2:0\"")
        .replace("10.0.0.2:7001", "10.0.0.2")
        .replace("10.0.0.3:7000", "witness.example:7000")
        .replace(
            "1 = \"10.0.0.1:7001\"",
            "1 = \"10.0.0.1:99999\"\nx = \"10.0.0.4:1\"",
        );
    let p = s.problems(&text);
    for needle in [
        "agent.listen: \"10.0.0.2\" is not IP:PORT",
        "agent.witness: \"witness.example:7000\" is not IP:PORT",
        "agent.metrics_listen: \"10.0.0.2:0\" has port 0",
        "agent.peers.1: \"10.0.0.1:99999\" is not IP:PORT",
        "agent.peers.x: \"x\" is not a node id",
    ] {
        assert!(has(&p, needle), "{needle} not in {p:?}");
    }
    assert_eq!(p.len(), 5, "one line per problem: {p:?}");
}

#[test]
fn a_missing_key_dir_or_key_is_reported() {
    let s = Setup::new();
    let p = s.problems(&s.agent("").replace(&s.path("keys"), &s.path("nokeys")));
    assert!(
        has(&p, "agent.keys:") && has(&p, "not a directory"),
        "{p:?}"
    );
    std::fs::remove_file(s.dir.path().join("keys/node-1.pub")).unwrap();
    let p = s.problems(&s.agent(""));
    assert!(has(&p, "no public key for node 1"), "{p:?}");
    let p = s.problems("[agent]\nnode = 1\n");
    for key in [
        "role",
        "listen",
        "witness",
        "keys",
        "state_dir",
        "guest_dir",
        "peers",
    ] {
        assert!(has(&p, &format!("agent.{key}: missing")), "{key}: {p:?}");
    }
}

#[test]
fn contradictory_options_are_reported() {
    let s = Setup::new();
    let primary = s
        .agent("")
        .replace("role = \"backup\"", "role = \"primary\"");
    let p = s.problems(&primary);
    assert!(has(&p, "agent.rejoin: only for a backup"), "{p:?}");
    let p = s.problems(&s.agent("capture = \"cow\"\ntracking = \"hash\""));
    assert!(has(&p, "cannot use tracking"), "{p:?}");
    let p = s.problems(&s.agent("metrics_listen = \"10.0.0.2:7001\""));
    assert!(has(&p, "the same address as agent.listen"), "{p:?}");
    let p = s.problems(&s.agent("heartbeat_ms = 400"));
    assert!(has(&p, "failure_timeout_ms"), "{p:?}");
    let p = s.problems(&s.agent("primary = 3"));
    assert!(has(&p, "node 3 is not in agent.peers"), "{p:?}");
    let self_peer = s
        .agent("")
        .replace("1 = \"10.0.0.1:7001\"", "2 = \"10.0.0.1:7001\"");
    assert!(has(&s.problems(&self_peer), "lists this node itself"));
    let w = format!(
        "[witness]\nlisten = \"10.0.0.3:7000\"\nstate = \"{}\"\nkeys = \"{}\"\ninit = true\n",
        s.path("guest"),
        s.path("keys")
    );
    assert!(has(&s.problems(&w), "init would be refused"));
}

#[test]
fn check_config_exits_non_zero_on_a_bad_file() {
    let s = Setup::new();
    let f = s.dir.path().join("bad.toml");
    std::fs::write(&f, "[agent]\nnode = 1\n").unwrap();
    assert_eq!(run(Args { file: f.clone() }).unwrap(), 1);
    std::fs::write(&f, s.agent("")).unwrap();
    assert_eq!(run(Args { file: f }).unwrap(), 0);
    let missing = s.dir.path().join("none.toml");
    assert_eq!(run(Args { file: missing }).unwrap(), 1);
}
