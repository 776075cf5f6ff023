//! Real runs checked like simulated ones. Every agent of a deployment appends its journal
//! (`--journal`: the model's inputs and actions and the frames that left its gate) and the
//! witness its decisions; after the run, the journals are merged and go through the
//! simulator's observer and invariant checkers ([`ftvm_sim::check_journals`]), and each host's
//! inputs are replayed through a fresh model. `ftvm scenario run --real` and `ftvm demo` print
//! the verdict in the simulator's format and fail on a violation.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ftvm_driver::journal::{HostEntry, HostLine, Record, WitnessEntry};
use ftvm_model::{NodeId, VmId, WitnessState};
use ftvm_real::agent::witness_journal_path;
use ftvm_real::journal_file::read_journal;
use ftvm_sim::{check_journals, HostJournal, Invariant, JournalReport};

/// Where a deployment in `work_dir` keeps its journals (outside the hosts' state directories,
/// which a restarted host starts afresh: its journal goes on).
pub fn journal_dir(work_dir: &Path) -> PathBuf {
    work_dir.join("journals")
}

/// Node `node`'s journal.
pub fn node_journal(work_dir: &Path, node: u32) -> PathBuf {
    journal_dir(work_dir).join(format!("node-{node}.jsonl"))
}

/// The witness's journal.
pub fn witness_journal(work_dir: &Path) -> PathBuf {
    journal_dir(work_dir).join("witness.jsonl")
}

/// Reads one host's journal.
pub fn load_host(path: &Path) -> anyhow::Result<HostJournal> {
    let lines: Vec<HostLine> = read_journal(path)?;
    let mut config = None;
    let mut entries: Vec<HostEntry> = Vec::new();
    for line in lines {
        match line {
            HostLine::Config { node, config: c } => match &config {
                None => config = Some((node, c)),
                // Each process draws its own lineage: it is journaled at its start.
                Some((n, first)) if *n == node && same_but_lineage(first, &c) => {}
                Some(_) => bail!(
                    "{}: a restarted process ran another node or configuration; its inputs \
                     cannot be replayed as one host's",
                    path.display()
                ),
            },
            HostLine::Entry(e) => entries.push(e),
        }
    }
    let Some((node, config)) = config else {
        bail!(
            "{}: no configuration line (not an agent's journal)",
            path.display()
        );
    };
    if let Some(e) = entries.iter().find(|e| e.node != node) {
        bail!(
            "{}: a line of {} in {node}'s journal",
            path.display(),
            e.node
        );
    }
    let start = match entries.first().map(|e| e.entry.record) {
        Some(Record::Started(start)) => start,
        _ => bail!(
            "{}: does not begin with its process's start",
            path.display()
        ),
    };
    Ok(HostJournal {
        node,
        config,
        start,
        entries,
    })
}

/// Whether two configurations differ at most in their lineage (`incarnation`).
fn same_but_lineage(a: &ftvm_model::Config, b: &ftvm_model::Config) -> bool {
    let mut b = b.clone();
    b.incarnation = a.incarnation;
    *a == b
}

/// Checks the run of the deployment in `work_dir` whose agents were `nodes` and whose witness
/// register started with `primary` as primary of `vm`.
pub fn check_run(
    work_dir: &Path,
    nodes: &[u32],
    vm: VmId,
    primary: NodeId,
    enabled: &BTreeSet<Invariant>,
) -> anyhow::Result<JournalReport> {
    let hosts = nodes
        .iter()
        .map(|n| load_host(&node_journal(work_dir, *n)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let witness = witness_history(work_dir, nodes)?;
    Ok(check_journals(
        WitnessState::initial(vm, primary),
        &hosts,
        &witness,
        enabled,
    ))
}

/// The register's history: the `ftvm witness` journal, or, with an etcd witness, the writes
/// each agent journaled (`node-N.witness.jsonl`), merged in the order they were made.
fn witness_history(work_dir: &Path, nodes: &[u32]) -> anyhow::Result<Vec<WitnessEntry>> {
    let service = witness_journal(work_dir);
    if service.exists() {
        return read_journal(&service).context("the witness's journal");
    }
    let mut entries: Vec<WitnessEntry> = Vec::new();
    let mut found = false;
    for n in nodes {
        let path = witness_journal_path(&node_journal(work_dir, *n));
        if path.exists() {
            found = true;
            let mine: Vec<WitnessEntry> = read_journal(&path)
                .with_context(|| format!("node {n}'s journal of etcd register writes"))?;
            entries.extend(mine);
        }
    }
    if !found {
        bail!(
            "no witness journal: neither {} (ftvm witness) nor any agent's register writes \
             (etcd witness)",
            service.display()
        );
    }
    entries.sort_by_key(|e| e.wall_us);
    Ok(entries)
}

/// The verdict in the simulator's words: one line, then one per finding.
pub fn verdict_lines(what: &str, r: &JournalReport) -> Vec<String> {
    let s = &r.stats;
    let replayed: Vec<String> = r
        .replays
        .iter()
        .map(|(node, res)| match res {
            Ok(n) => format!("{node} {n} inputs"),
            Err(_) => format!("{node} diverged"),
        })
        .collect();
    let mut out = vec![format!(
        "invariants: {} {what} (from journals: epochs {}, commits {}, failovers {}, generation \
         {}, frames released {}; replayed {})",
        if r.passed() { "pass" } else { "fail" },
        s.epochs,
        s.commits,
        s.failovers,
        s.max_generation,
        s.released,
        replayed.join(", ")
    )];
    out.extend(r.findings().into_iter().map(|f| format!("  {f}")));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ftvm_model::{Generation, WitnessReply, WitnessRequest};
    use ftvm_real::journal_file::JournalWriter;

    fn entry(wall_us: u64, generation: u64) -> WitnessEntry {
        let mut state = WitnessState::initial(VmId(1), NodeId(1));
        state.generation = Generation(generation);
        WitnessEntry {
            wall_us,
            reply: WitnessReply {
                request: WitnessRequest::Query,
                granted: true,
                state,
            },
        }
    }

    fn write(path: &Path, entries: &[WitnessEntry]) {
        JournalWriter::open(path)
            .unwrap()
            .append(entries.iter().copied())
            .unwrap();
    }

    #[test]
    fn etcd_register_writes_of_every_agent_merge_in_the_order_they_were_made() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path();
        std::fs::create_dir_all(journal_dir(w)).unwrap();
        assert!(witness_history(w, &[1, 2]).is_err(), "no journal at all");
        write(
            &witness_journal_path(&node_journal(w, 1)),
            &[entry(10, 1), entry(40, 3)],
        );
        write(&witness_journal_path(&node_journal(w, 2)), &[entry(20, 2)]);
        let h = witness_history(w, &[1, 2]).unwrap();
        let order: Vec<_> = h
            .iter()
            .map(|e| (e.wall_us, e.reply.state.generation.0))
            .collect();
        assert_eq!(order, vec![(10, 1), (20, 2), (40, 3)]);
        // An `ftvm witness` journal is the history when there is one.
        write(&witness_journal(w), &[entry(5, 7)]);
        let h = witness_history(w, &[1, 2]).unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].reply.state.generation, Generation(7));
    }
}
