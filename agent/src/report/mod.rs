//! What leaves the agent: Prometheus metrics, the status page, and scale hints for the cluster
//! aggregator.

pub mod hints;
pub mod metrics;
pub mod page;
