//! What leaves the agent: Prometheus metrics, the status page; scale hints to the aggregator later.

pub mod metrics;
pub mod page;
