//! What leaves the agent: Prometheus metrics now; scale hints to the aggregator later.

pub mod metrics;
