//! What leaves the agent: Prometheus metrics, and scale hints for the cluster aggregator.

pub mod hints;
pub mod metrics;
