//! Hints and batches for tests in any crate that speaks the schema (feature `fixtures`): valid by
//! construction, so a test changes only the field it is about.

use crate::schema::{Forecast, Hint, HintBatch, Quantile, Resource, SCHEMA_V1, WorkloadRef};

pub fn hint(ns: &str, name: &str, resource: Resource, capacity: f64, p90: f64) -> Hint {
    Hint {
        workload: WorkloadRef {
            namespace: ns.into(),
            kind: "Deployment".into(),
            name: name.into(),
        },
        resource,
        replicas: 1,
        capacity,
        usage: capacity / 2.0,
        forecast: Forecast {
            horizon_s: 60.0,
            quantiles: vec![
                Quantile {
                    q: 0.5,
                    value: p90 * 0.8,
                },
                Quantile { q: 0.9, value: p90 },
            ],
        },
        local_headroom: 0.0,
        desired_capacity: p90,
        replica_delta: 0.0,
        confidence: 0.9,
        reason: "test".into(),
    }
}

pub fn batch(node: &str, seq: u64, hints: Vec<Hint>) -> HintBatch {
    HintBatch {
        schema: SCHEMA_V1.into(),
        node: node.into(),
        epoch: 1,
        seq,
        time: 1_700_000_000.0,
        interval_s: 10.0,
        hints,
    }
}
