//! The hosts of a local deployment: network namespaces, the links between them, and the faults
//! injected on those links (loss rules, a relay for latency, bandwidth, holds and corruption).

pub mod etcd_certs;
pub mod etcd_cluster;
pub mod fault_net;
pub mod loss;
pub mod relay;
pub mod topology;
