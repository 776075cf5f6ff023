//! The agent's start-up errors are typed: a metrics file it may not write is a metrics error
//! carrying the file-safety refusal, not a commit failure or a configuration error.

mod mem_cluster;

use std::collections::BTreeMap;

use ftvm_model::{NodeId, Start};
use ftvm_real::agent::{Agent, AgentError};
use ftvm_real::secure_fs::SecureFsError;

use mem_cluster::*;

#[test]
fn a_metrics_path_that_is_a_directory_is_refused_as_a_metrics_error() {
    let dir = tempfile::tempdir().unwrap();
    let addrs = BTreeMap::from([(NodeId(1), free_addr()), (NodeId(2), free_addr())]);
    let keys = keys();
    let h = host(dir.path(), 1, Start::Primary, &addrs, free_addr(), &keys);
    let metrics = h.cfg.metrics.clone().unwrap();
    // A directory where the metrics file goes: it is not ours to remove.
    std::fs::create_dir(&metrics).unwrap();
    std::fs::write(metrics.join("inside"), b"keep").unwrap();
    let err = match Agent::new(h.cfg.clone(), launcher(&h)) {
        Ok(_) => panic!("an agent started without its metrics file"),
        Err(e) => e,
    };
    match &err {
        AgentError::Metrics(SecureFsError::WrongKind { path, .. }) => assert_eq!(path, &metrics),
        other => panic!("expected a metrics error, got {other:?}"),
    }
    assert!(err.to_string().starts_with("metrics file: "), "{err}");
    assert_eq!(std::fs::read(metrics.join("inside")).unwrap(), b"keep");
}
