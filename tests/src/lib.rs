//! Shared helpers for the scenario, property and mutant suites: where the scenario files are,
//! how many cases to run, and assertions that print the evidence when a run fails.

use std::path::{Path, PathBuf};

use ftvm_sim::{run_scenario, RunOptions, RunReport, Scenario, Verdict};

/// The repository's `scenarios/` directory.
pub fn scenarios_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("scenarios"), |root| root.join("scenarios"))
}

/// Load `scenarios/<name>.toml`; panics with the parse error (tests only).
pub fn load(name: &str) -> Scenario {
    let path = scenarios_dir().join(format!("{name}.toml"));
    Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// Every scenario file's name (without `.toml`), sorted.
pub fn scenario_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(scenarios_dir())
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let p = e.path();
                    (p.extension()? == "toml").then(|| p.file_stem()?.to_str().map(String::from))?
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Property-test cases: `PROPTEST_CASES` if set, 256 when `CI` is set, else `local`.
pub fn proptest_cases(local: u32) -> u32 {
    if let Some(n) = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return n;
    }
    if std::env::var_os("CI").is_some() {
        256
    } else {
        local
    }
}

/// Render a failed run: summary, violation, unmet expectations and the trace (replayed in
/// full when the report only kept its tail).
pub fn explain(s: &Scenario, r: &RunReport) -> String {
    let mut out = format!("{}\n", r.summary());
    for u in &r.unmet {
        out.push_str(&format!("unmet: {u}\n"));
    }
    let full = run_scenario(s, r.seed, &RunOptions::default().traced(true));
    let trace = if full.trace.len() > 4000 {
        &full.trace[full.trace.len() - 4000..]
    } else {
        &full.trace[..]
    };
    out.push_str(&format!("last {} trace events:\n", trace.len()));
    for e in trace {
        out.push_str(&format!("  {e}\n"));
    }
    out
}

/// Run `s` with `seed` and require a pass (invariants and expectations).
pub fn assert_pass(s: &Scenario, seed: u64) -> RunReport {
    let r = run_scenario(s, seed, &RunOptions::default());
    assert_eq!(r.verdict, Verdict::Pass, "\n{}", explain(s, &r));
    r
}

/// Run `s` with `seed` and require that no invariant broke (expectations not judged).
pub fn assert_safe(s: &Scenario, seed: u64) -> RunReport {
    let r = run_scenario(s, seed, &RunOptions::default());
    assert!(
        r.violation.is_none() && r.verdict != Verdict::Crashed,
        "\n{}",
        explain(s, &r)
    );
    r
}

pub mod schedule;

/// The proptest configuration of the property suites: `cases` as [`proptest_cases`] says, no
/// failure files written into the source tree, and a fixed RNG seed (so CI is reproducible)
/// unless `PROPTEST_RNG_SEED` asks for another.
pub fn proptest_config(local_cases: u32) -> proptest::test_runner::Config {
    use proptest::test_runner::{Config, RngSeed};
    let mut c = Config {
        cases: proptest_cases(local_cases),
        failure_persistence: None,
        ..Config::default()
    };
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        c.rng_seed = RngSeed::Fixed(0x0f7f_5eed);
    }
    c
}

/// `s` under the other epoch policy: `output` (default bounds) for a fixed-epoch file, `fixed`
/// for an output-driven one.
pub fn under_other_policy(s: &Scenario) -> Scenario {
    let other = match s.timing.epoch_policy {
        ftvm_model::EpochPolicy::Fixed => {
            ftvm_model::EpochPolicy::Output(ftvm_model::OutputDriven::default())
        }
        ftvm_model::EpochPolicy::Output(_) => ftvm_model::EpochPolicy::Fixed,
    };
    s.with_epoch_policy(other)
}
