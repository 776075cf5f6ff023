//! The hosts of a local deployment: network namespaces and the links between them.

pub mod topology;
