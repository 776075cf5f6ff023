//! Real scenario runs on the etcd witness (`ftvm scenario run --real --witness etcd`): which of a
//! scenario's faults have a meaning there, and the witness's crash and restart.
//!
//! The agents talk to etcd directly, not through the link relays, so faults that the relays
//! produce on witness exchanges (holds, latency, loss, disorder, damaged replies on a link to the
//! witness) cannot be produced; a scenario that uses one is refused before anything starts,
//! rather than run without it and reported as passing. Faults made with routes and links (a
//! partition from the witness host, an isolated node) act on etcd as on `ftvm witness`: its
//! members listen on the witness host. A crash of the witness is the loss of a majority of the
//! cluster (the register can then be neither read nor written, as with the process down); its
//! restart brings those members back on their data.

use ftvm_sim::{FaultAction, HostRef, Scenario, Trigger};

use crate::deploy::Deployment;

/// Why scenario `s` cannot run on the etcd witness, if it cannot.
pub fn unsupported(s: &Scenario) -> Option<String> {
    if s.network.witness.active() {
        return Some("its [network] witness disorder acts on witness exchanges".into());
    }
    let witness_link = |a: &HostRef, b: &HostRef| *a == HostRef::Witness || *b == HostRef::Witness;
    for f in &s.faults {
        if f.when == Trigger::Registering {
            return Some(format!(
                "fault `{}` holds the first witness exchange",
                f.action
            ));
        }
        let on_witness_link = match &f.action {
            FaultAction::Hold { a, b }
            | FaultAction::Release { a, b }
            | FaultAction::Latency { a, b, .. }
            | FaultAction::Bandwidth { a, b, .. } => witness_link(a, b),
            FaultAction::Loss {
                link: Some((a, b)), ..
            } => witness_link(a, b),
            FaultAction::WitnessDisorder(_) | FaultAction::ForgeWitnessReply { .. } => true,
            _ => false,
        };
        if on_witness_link {
            return Some(format!("fault `{}` acts on witness exchanges", f.action));
        }
    }
    None
}

/// Members of an `n`-member cluster whose loss takes its quorum: a majority.
fn majority(n: usize) -> usize {
    n / 2 + 1
}

/// The witness crashes: a majority of the members get SIGKILL (the lowest-numbered ones).
pub fn crash(d: &mut Deployment) -> anyhow::Result<String> {
    let etcd = d.etcd_mut()?;
    let down = majority(etcd.len());
    for i in 0..down {
        etcd.kill(i)?;
    }
    Ok(format!(
        "SIGKILL to {down} of the {} etcd members (no quorum)",
        etcd.len()
    ))
}

/// Whether the witness is up: every member runs.
pub fn running(d: &mut Deployment) -> anyhow::Result<bool> {
    let etcd = d.etcd_mut()?;
    Ok((0..etcd.len()).all(|i| etcd.is_running(i)))
}

/// The witness restarts: every killed member starts again on its data.
pub fn restart(d: &mut Deployment) -> anyhow::Result<String> {
    let etcd = d.etcd_mut()?;
    let mut started = 0;
    for i in 0..etcd.len() {
        if !etcd.is_running(i) {
            etcd.restart(i)?;
            started += 1;
        }
    }
    Ok(format!(
        "{started} etcd members started again on their data"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(faults: &str) -> Scenario {
        Scenario::from_toml(
            &format!("name = \"t\"\nduration_ms = 1000\n{faults}"),
            "test",
        )
        .unwrap()
    }

    #[test]
    fn witness_crashes_and_partitions_run_but_witness_link_faults_are_refused() {
        let ok = scenario(
            "[[fault]]\nkind = \"crash\"\nhost = \"witness\"\nat_ms = 100\n\
             [[fault]]\nkind = \"partition\"\na = \"n1\"\nb = \"witness\"\nat_ms = 200\n",
        );
        assert_eq!(unsupported(&ok), None);
        let held =
            scenario("[[fault]]\nkind = \"hold\"\na = \"n1\"\nb = \"witness\"\nat_ms = 100\n");
        let why = unsupported(&held).expect("a hold on the witness link is refused");
        assert!(why.contains("witness exchanges"), "{why}");
        let between_nodes =
            scenario("[[fault]]\nkind = \"hold\"\na = \"n1\"\nb = \"n2\"\nat_ms = 100\n");
        assert_eq!(unsupported(&between_nodes), None);
    }

    #[test]
    fn a_majority_is_more_than_half() {
        assert_eq!((majority(1), majority(3), majority(5)), (1, 2, 3));
    }
}
