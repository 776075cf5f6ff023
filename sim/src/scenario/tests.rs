use super::*;

fn parse(text: &str) -> Result<Scenario, ScenarioError> {
    Scenario::from_toml(text, "t.toml")
}

fn err(text: &str) -> String {
    match parse(text) {
        Ok(_) => panic!("accepted a bad scenario:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn minimal_file_gets_defaults() {
    let s = parse("name = \"x\"\nduration_ms = 500\n").unwrap();
    assert_eq!(s.duration, Duration::from_millis(500));
    assert_eq!(s.topology.nodes, 2);
    assert_eq!(s.timing.epoch, Duration::from_millis(25));
    assert_eq!(s.expect.invariants.len(), Invariant::ALL.len());
    assert!(s.faults.is_empty());
    assert_eq!(s.model_config().page_size, s.vm.page_size);
}

#[test]
fn faults_parse_into_actions() {
    let s = parse(
        r#"
name = "f"
duration_ms = 2000
[[fault]]
kind = "crash"
host = "primary"
at_ms = 100
when = "sending"
[[fault]]
kind = "partition"
a = "n1"
b = "witness"
oneway = true
at_ms = 200
[[fault]]
kind = "flap"
a = "n1"
b = "n2"
period_ms = 50
count = 2
at_ms = 300
[[fault]]
kind = "loss"
rate = 0.05
at_ms = 0
"#,
    )
    .unwrap();
    assert_eq!(s.faults.len(), 2 + 4 + 1 - 1 + 1);
    assert_eq!(
        s.faults[0].action,
        FaultAction::Crash {
            host: HostRef::Primary,
            silent: true
        }
    );
    assert_eq!(s.faults[0].when, Trigger::Sending);
    assert_eq!(s.faults[3].at, Duration::from_millis(350));
    assert_eq!(
        s.faults[5].action,
        FaultAction::Repair {
            a: HostRef::Node(1),
            b: HostRef::Node(2),
            oneway: false
        }
    );
    assert_eq!(
        s.faults[6].action,
        FaultAction::Loss {
            link: None,
            rate: 0.05
        }
    );
}

#[test]
fn forgery_faults_parse_with_their_defaults() {
    let s = parse(
        r#"
name = "f"
duration_ms = 2000
[topology]
nodes = 3
[[fault]]
kind = "forge-generation"
a = "spare"
b = "primary"
at_ms = 100
[[fault]]
kind = "forge-generation"
a = "backup"
b = "n1"
frame = "heartbeat"
generation = 2
at_ms = 200
[[fault]]
kind = "forge-witness-reply"
host = "primary"
at_ms = 300
[expect]
max_fences = 0
"#,
    )
    .unwrap();
    assert_eq!(
        s.faults[0].action,
        FaultAction::ForgeGeneration {
            from: HostRef::Spare,
            to: HostRef::Primary,
            frame: ForgedFrame::Join,
            generation: u64::MAX,
        }
    );
    assert_eq!(
        s.faults[1].action,
        FaultAction::ForgeGeneration {
            from: HostRef::Backup,
            to: HostRef::Node(1),
            frame: ForgedFrame::Heartbeat,
            generation: 2,
        }
    );
    assert_eq!(
        s.faults[2].action,
        FaultAction::ForgeWitnessReply {
            host: HostRef::Primary
        }
    );
    assert_eq!(s.expect.max_fences, Some(0));
}

#[test]
fn forgery_faults_refuse_what_cannot_be_forged() {
    let base = "name = \"x\"\nduration_ms = 5\n[[fault]]\nat_ms = 1\n";
    let cases: &[(&str, &str)] = &[
        (
            "kind = \"forge-generation\"\na = \"n2\"\nb = \"n1\"\nframe = \"ping\"\n",
            "unknown frame `ping`",
        ),
        (
            "kind = \"forge-generation\"\na = \"n2\"\nb = \"n1\"\ngeneration = 1\n",
            "at least 2",
        ),
        (
            "kind = \"forge-generation\"\na = \"witness\"\nb = \"n1\"\n",
            "not a node",
        ),
        (
            "kind = \"forge-witness-reply\"\nhost = \"clients\"\n",
            "not a node",
        ),
        (
            "kind = \"forge-witness-reply\"\nhost = \"n1\"\nframe = \"join\"\n",
            "`frame` does not apply",
        ),
    ];
    for (fault, needle) in cases {
        let e = err(&format!("{base}{fault}"));
        assert!(e.contains(needle), "error `{e}` lacks `{needle}`");
    }
}

#[test]
fn errors_are_one_line_and_name_the_problem() {
    let cases: &[(&str, &str)] = &[
        ("name = \"x\"\n", "duration_ms"),
        ("name = \"x\"\nduration_ms = 5\nbogus = 1\n", "bogus"),
        ("name = \"x\"\nduration_ms = \"long\"\n", "line 2"),
        ("name = \"x\"\nduration_ms = 0\n", "duration_ms"),
        ("name = \"x\"\nduration_ms = 5\n[vm]\npage_size = 1000\n", "page_size"),
        ("name = \"x\"\nduration_ms = 5\n[timing]\nheartbeat_ms = 0\n", "heartbeat"),
        ("name = \"x\"\nduration_ms = 5\n[network]\nloss = 1.5\n", "loss"),
        (
            "name = \"x\"\nduration_ms = 5\n[expect]\ninvariants = [\"nope\"]\n",
            "unknown invariant `nope`",
        ),
        (
            "name = \"x\"\nduration_ms = 5\n[[fault]]\nkind = \"explode\"\nat_ms = 1\n",
            "unknown kind",
        ),
        (
            "name = \"x\"\nduration_ms = 5\n[[fault]]\nkind = \"crash\"\nat_ms = 1\n",
            "missing field `host`",
        ),
        (
            "name = \"x\"\nduration_ms = 5\n[[fault]]\nkind = \"crash\"\nhost = \"n7\"\nat_ms = 1\n",
            "n7 does not exist",
        ),
        (
            "name = \"x\"\nduration_ms = 5\n[[fault]]\nkind = \"crash\"\nhost = \"mars\"\nat_ms = 1\n",
            "unknown host `mars`",
        ),
        (
            "name = \"x\"\nduration_ms = 5\n[[fault]]\nkind = \"crash\"\nhost = \"n1\"\nrate = 0.1\nat_ms = 1\n",
            "`rate` does not apply",
        ),
        (
            "name = \"x\"\nduration_ms = 5\n[[fault]]\nkind = \"partition\"\na = \"n1\"\nb = \"n1\"\nat_ms = 1\n",
            "two different hosts",
        ),
        (
            "name = \"x\"\nduration_ms = 5\n[[fault]]\nkind = \"crash\"\nhost = \"n1\"\nwhen = \"later\"\nat_ms = 1\n",
            "unknown trigger",
        ),
        ("this is = = not toml", "bad scenario file"),
    ];
    for (text, needle) in cases {
        let e = err(text);
        assert!(e.contains(needle), "error `{e}` lacks `{needle}`");
        assert!(
            e.starts_with("t.toml: "),
            "error `{e}` does not name the file"
        );
        assert!(!e.contains('\n'), "error `{e}` spans lines");
    }
}

#[test]
fn missing_file_is_an_io_error() {
    let e = Scenario::load(Path::new("/nonexistent/x.toml")).unwrap_err();
    assert!(matches!(e, ScenarioError::Io { .. }));
    assert!(e.to_string().contains("/nonexistent/x.toml"));
}

#[test]
fn witness_disorder_parses_from_the_network_table_and_as_a_fault() {
    let s = parse(
        r#"
name = "d"
duration_ms = 2000
swarm = true

[network]
witness_duplicate = 0.25
witness_reorder = 0.5
witness_reply_loss = 0.1
witness_delay_max_ms = 700

[[fault]]
kind = "witness-disorder"
duplicate = 0.3
max_ms = 100
at_ms = 500
when = "registering"

[[fault]]
kind = "witness-disorder"
at_ms = 900
"#,
    )
    .unwrap();
    assert!(s.swarm);
    assert_eq!(
        s.network.witness,
        WitnessDisorder {
            duplicate: 0.25,
            reorder: 0.5,
            reply_loss: 0.1,
            max_delay: Duration::from_millis(700),
        }
    );
    assert_eq!(s.faults[0].when, Trigger::Registering);
    assert_eq!(
        s.faults[0].action,
        FaultAction::WitnessDisorder(WitnessDisorder {
            duplicate: 0.3,
            reorder: 0.0,
            reply_loss: 0.0,
            max_delay: Duration::from_millis(100),
        })
    );
    // No rates: back to in-order traffic.
    assert_eq!(
        s.faults[1].action,
        FaultAction::WitnessDisorder(WitnessDisorder::default())
    );
    assert!(!parse("name = \"x\"\nduration_ms = 5\n").unwrap().swarm);
}

#[test]
fn witness_disorder_out_of_range_is_refused() {
    let head = "name = \"x\"\nduration_ms = 500\n";
    for (body, want) in [
        (
            "[network]\nwitness_duplicate = 1.5\nwitness_delay_max_ms = 5\n",
            "duplicate",
        ),
        (
            "[network]\nwitness_duplicate = 0.6\nwitness_reorder = 0.6\nwitness_delay_max_ms = 5\n",
            "duplicate + reorder",
        ),
        ("[network]\nwitness_reorder = 0.2\n", "delay bound"),
        (
            "[[fault]]\nkind = \"witness-disorder\"\nat_ms = 1\nreply_loss = -0.1\n",
            "reply_loss",
        ),
        (
            "[[fault]]\nkind = \"witness-disorder\"\nat_ms = 1\nduplicate = 0.1\nmax_ms = 90000\n",
            "at most 60000",
        ),
        (
            "[[fault]]\nkind = \"crash\"\nhost = \"n1\"\nat_ms = 1\nreorder = 0.1\n",
            "reorder",
        ),
    ] {
        let e = err(&format!("{head}{body}"));
        assert!(e.contains(want), "{body}: {e}");
    }
}
