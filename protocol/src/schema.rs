//! The versioned wire schema of scale hints (`headroom.hints/v1`) and its validation.
//!
//! This module owns what a node may say to the aggregator and the exact rules a report must pass
//! before it touches any state. It never does I/O and never decides anything about scaling: it only
//! turns bytes into a [`HintBatch`] or a [`SchemaError`] that names the offending field.

use serde::{Deserialize, Serialize};

/// Schema identifier of version 1. A batch names its schema so a newer agent talking to an older
/// aggregator fails loudly instead of being half-understood.
pub const SCHEMA_V1: &str = "headroom.hints/v1";

/// Bounds that keep one report from costing the aggregator more than a node's fair share.
pub const MAX_HINTS_PER_BATCH: usize = 4096;
pub const MAX_QUANTILES: usize = 32;
pub const MAX_REASON_CHARS: usize = 256;

/// Everything one node knows about its workloads at one reporting instant. A batch replaces the
/// node's previous batch as a whole (soft state): a workload missing from it is no longer on the node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HintBatch {
    /// Always [`SCHEMA_V1`] for this version.
    pub schema: String,
    /// Kubernetes node name (DNS subdomain).
    pub node: String,
    /// Names the sequence space `seq` counts in; an agent picks a new one when it loses its spool,
    /// so a restarted counter is not mistaken for a replay.
    pub epoch: u64,
    /// Strictly increasing per (node, epoch); a batch with `seq` not above the last one accepted is a
    /// replay and is acknowledged without being applied again.
    pub seq: u64,
    /// Unix time in seconds at which the agent built the batch.
    pub time: f64,
    /// The agent's reporting interval in seconds.
    pub interval_s: f64,
    pub hints: Vec<Hint>,
}

/// Identity of a workload across nodes: the owning controller, or a pod label the operator chose
/// (`kind: "Label"`, `name` = the label's value).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadRef {
    pub namespace: String,
    pub kind: String,
    pub name: String,
}

impl WorkloadRef {
    /// The id the JSON API lists and a KEDA ScaledObject names in `scalerMetadata.workload`.
    pub fn id(&self) -> String {
        format!("{}/{}/{}", self.namespace, self.kind, self.name)
    }
}

/// The resource a hint speaks about; the unit is fixed per resource so sums across nodes mean
/// something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    /// CPU cores.
    Cpu,
    /// Memory bytes.
    Memory,
    /// GPUs (fractions allowed: a share of one device's time).
    Gpu,
    /// GPU memory bytes.
    GpuMemory,
    /// Requests per second.
    Requests,
    // Inference-engine signals (docs/engines.md). Capacity is what the replicas are sized for
    // (replicas × the workload's per-replica target), so desired replicas come out as
    // demand / target; GPU utilisation stops driving replicas where any of these is reported.
    /// Requests waiting in the engines' queues.
    EngineQueue,
    /// KV-cache usage, summed over replicas (each in [0, 1]).
    EngineKvCache,
    /// Generated tokens per second.
    EngineTokens,
    /// Requests in flight in the engines (running + waiting).
    EngineConcurrency,
}

impl Resource {
    /// Signals of an inference engine, which take over replica advice from GPU utilisation.
    pub fn is_engine(self) -> bool {
        matches!(
            self,
            Resource::EngineQueue
                | Resource::EngineKvCache
                | Resource::EngineTokens
                | Resource::EngineConcurrency
        )
    }
}

impl Resource {
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Cpu => "cpu",
            Resource::Memory => "memory",
            Resource::Gpu => "gpu",
            Resource::GpuMemory => "gpu_memory",
            Resource::Requests => "requests",
            Resource::EngineQueue => "engine_queue",
            Resource::EngineKvCache => "engine_kv_cache",
            Resource::EngineTokens => "engine_tokens",
            Resource::EngineConcurrency => "engine_concurrency",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Resource::Cpu => "cores",
            Resource::Memory | Resource::GpuMemory => "bytes",
            Resource::Gpu => "gpus",
            Resource::Requests => "requests_per_second",
            Resource::EngineQueue | Resource::EngineConcurrency => "requests",
            Resource::EngineKvCache => "kv_cache_ratio",
            Resource::EngineTokens => "tokens_per_second",
        }
    }
}

/// One point of the forecast distribution of demand over the lead time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quantile {
    /// Probability level in (0, 1).
    pub q: f64,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forecast {
    /// Lead time the quantiles cover, seconds.
    pub horizon_s: f64,
    /// Strictly increasing in `q`, non-decreasing in `value`.
    pub quantiles: Vec<Quantile>,
}

/// What one node says about one (workload, resource) pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hint {
    pub workload: WorkloadRef,
    pub resource: Resource,
    /// Replicas of the workload running on this node.
    pub replicas: u32,
    /// Capacity those replicas hold now (limits), in the resource's unit.
    pub capacity: f64,
    /// Current usage, in the resource's unit.
    pub usage: f64,
    pub forecast: Forecast,
    /// How much more the node itself could give these replicas (right-sizing), in the unit.
    pub local_headroom: f64,
    /// The capacity the node would want these replicas to hold over the lead time.
    pub desired_capacity: f64,
    /// The node's own estimate of replicas to add (positive) or remove (negative).
    pub replica_delta: f64,
    /// Confidence in the forecast, 0..=1.
    pub confidence: f64,
    /// Short human-readable cause.
    pub reason: String,
}

/// A report that parsed but is not acceptable, or did not parse. `field` is a JSON path.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SchemaError {
    #[error("body is not valid hint JSON: {0}")]
    Malformed(String),
    #[error("unsupported schema {found:?}; this aggregator accepts {SCHEMA_V1:?}")]
    UnsupportedSchema { found: String },
    #[error("invalid value at {field}: {reason}")]
    Invalid { field: String, reason: String },
}

impl SchemaError {
    /// Stable machine-readable code for the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            SchemaError::Malformed(_) => "malformed_json",
            SchemaError::UnsupportedSchema { .. } => "unsupported_schema",
            SchemaError::Invalid { .. } => "invalid_hint",
        }
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> SchemaError {
    SchemaError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Parses and validates a POST body.
pub fn decode_batch(body: &[u8]) -> Result<HintBatch, SchemaError> {
    // Checking the version before the full shape lets a future agent get "unsupported schema"
    // rather than a confusing unknown-field error.
    #[derive(Deserialize)]
    struct Probe {
        schema: Option<serde_json::Value>,
    }
    if let Ok(Probe {
        schema: Some(schema),
    }) = serde_json::from_slice::<Probe>(body)
        && schema.as_str() != Some(SCHEMA_V1)
    {
        return Err(SchemaError::UnsupportedSchema {
            found: match schema {
                serde_json::Value::String(s) => s.chars().take(64).collect(),
                other => other.to_string().chars().take(64).collect(),
            },
        });
    }
    let batch: HintBatch =
        serde_json::from_slice(body).map_err(|e| SchemaError::Malformed(e.to_string()))?;
    validate(&batch)?;
    Ok(batch)
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn is_dns_label(s: &str) -> bool {
    is_dns_subdomain(s) && !s.contains('.')
}

fn is_kind(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.as_bytes()[0].is_ascii_alphabetic()
        && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Object names and label values: what Kubernetes allows in either, so both identities fit.
fn is_object_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

fn non_negative(field: &str, v: f64) -> Result<(), SchemaError> {
    if !v.is_finite() || v < 0.0 {
        return Err(invalid(
            field,
            format!("must be a finite number >= 0, got {v}"),
        ));
    }
    Ok(())
}

/// Checks a node name as [`validate`] does: batches name their node, and the aggregator takes
/// only Kubernetes node names. The error's field is `node`.
pub fn check_node(node: &str) -> Result<(), SchemaError> {
    if !is_dns_subdomain(node) {
        return Err(invalid(
            "node",
            "must be a Kubernetes node name (lowercase DNS subdomain, <= 253 chars)",
        ));
    }
    Ok(())
}

/// The first rule a workload identity breaks: (field within the workload, reason).
fn workload_rule(w: &WorkloadRef) -> Result<(), (&'static str, &'static str)> {
    if !is_dns_label(&w.namespace) {
        return Err(("namespace", "must be a DNS label (lowercase, <= 63 chars)"));
    }
    if !is_kind(&w.kind) {
        return Err((
            "kind",
            "must be alphanumeric starting with a letter, <= 63 chars",
        ));
    }
    if !is_object_name(&w.name) {
        return Err((
            "name",
            "must be an object name or label value ([A-Za-z0-9._-], <= 253 chars)",
        ));
    }
    Ok(())
}

/// Checks a workload identity as [`validate`] checks each hint's; the error's field is relative
/// to the workload (`namespace`, `kind` or `name`).
pub fn check_workload(w: &WorkloadRef) -> Result<(), SchemaError> {
    workload_rule(w).map_err(|(field, reason)| invalid(field, reason))
}

/// Checks every rule a batch must satisfy beyond its JSON shape.
pub fn validate(batch: &HintBatch) -> Result<(), SchemaError> {
    if batch.schema != SCHEMA_V1 {
        return Err(SchemaError::UnsupportedSchema {
            found: batch.schema.chars().take(64).collect(),
        });
    }
    check_node(&batch.node)?;
    if batch.seq == 0 {
        return Err(invalid("seq", "must be >= 1"));
    }
    if !batch.time.is_finite() || batch.time <= 0.0 {
        return Err(invalid("time", "must be a positive Unix time in seconds"));
    }
    if !batch.interval_s.is_finite() || batch.interval_s <= 0.0 || batch.interval_s > 3600.0 {
        return Err(invalid("interval_s", "must be in (0, 3600] seconds"));
    }
    if batch.hints.len() > MAX_HINTS_PER_BATCH {
        return Err(invalid(
            "hints",
            format!("at most {MAX_HINTS_PER_BATCH} hints per batch"),
        ));
    }
    let mut seen = std::collections::HashSet::with_capacity(batch.hints.len());
    for (i, h) in batch.hints.iter().enumerate() {
        let p = |f: &str| format!("hints[{i}].{f}");
        if let Err((field, reason)) = workload_rule(&h.workload) {
            return Err(invalid(p(&format!("workload.{field}")), reason));
        }
        if !seen.insert((&h.workload, h.resource)) {
            return Err(invalid(
                p("resource"),
                "duplicate (workload, resource) pair in one batch",
            ));
        }
        non_negative(&p("capacity"), h.capacity)?;
        non_negative(&p("usage"), h.usage)?;
        non_negative(&p("local_headroom"), h.local_headroom)?;
        non_negative(&p("desired_capacity"), h.desired_capacity)?;
        if h.capacity > 0.0 && h.replicas == 0 {
            return Err(invalid(p("replicas"), "must be >= 1 when capacity > 0"));
        }
        if !h.replica_delta.is_finite() {
            return Err(invalid(p("replica_delta"), "must be finite"));
        }
        if !h.confidence.is_finite() || !(0.0..=1.0).contains(&h.confidence) {
            return Err(invalid(p("confidence"), "must be in [0, 1]"));
        }
        if h.reason.chars().count() > MAX_REASON_CHARS {
            return Err(invalid(
                p("reason"),
                format!("at most {MAX_REASON_CHARS} characters"),
            ));
        }
        let f = &h.forecast;
        if !f.horizon_s.is_finite() || f.horizon_s <= 0.0 {
            return Err(invalid(p("forecast.horizon_s"), "must be > 0 seconds"));
        }
        if f.quantiles.is_empty() || f.quantiles.len() > MAX_QUANTILES {
            return Err(invalid(
                p("forecast.quantiles"),
                format!("must hold 1..={MAX_QUANTILES} quantiles"),
            ));
        }
        let mut prev: Option<Quantile> = None;
        for (j, qv) in f.quantiles.iter().enumerate() {
            let qp = p(&format!("forecast.quantiles[{j}]"));
            if !qv.q.is_finite() || qv.q <= 0.0 || qv.q >= 1.0 {
                return Err(invalid(format!("{qp}.q"), "must be in (0, 1)"));
            }
            non_negative(&format!("{qp}.value"), qv.value)?;
            if let Some(prev) = prev {
                if qv.q <= prev.q {
                    return Err(invalid(format!("{qp}.q"), "quantiles must increase in q"));
                }
                if qv.value < prev.value {
                    return Err(invalid(
                        format!("{qp}.value"),
                        "quantile values must not decrease",
                    ));
                }
            }
            prev = Some(*qv);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{batch, hint};

    #[test]
    fn round_trips_and_validates() {
        let b = batch(
            "node-a",
            1,
            vec![hint("ml", "llm", Resource::Gpu, 2.0, 3.0)],
        );
        let bytes = serde_json::to_vec(&b).unwrap();
        assert_eq!(decode_batch(&bytes).unwrap(), b);
    }

    #[test]
    fn rejects_other_schema_versions_by_name() {
        let err = decode_batch(br#"{"schema":"headroom.hints/v2","node":"x"}"#).unwrap_err();
        assert_eq!(err.code(), "unsupported_schema");
        assert!(err.to_string().contains("headroom.hints/v2"));
    }

    #[test]
    fn names_the_bad_field() {
        let mut b = batch(
            "node-a",
            1,
            vec![hint("ml", "llm", Resource::Gpu, 2.0, 3.0)],
        );
        b.hints[0].forecast.quantiles[1].value = 1.0;
        match validate(&b).unwrap_err() {
            SchemaError::Invalid { field, .. } => {
                assert_eq!(field, "hints[0].forecast.quantiles[1].value")
            }
            other => panic!("unexpected {other:?}"),
        }
        let mut b = batch("Node_A", 1, vec![]);
        assert!(matches!(validate(&b), Err(SchemaError::Invalid { field, .. }) if field == "node"));
        b.node = "node-a".into();
        b.seq = 0;
        assert!(matches!(validate(&b), Err(SchemaError::Invalid { field, .. }) if field == "seq"));
    }

    #[test]
    fn rejects_unknown_fields_and_duplicates() {
        let b = batch(
            "node-a",
            1,
            vec![hint("ml", "llm", Resource::Gpu, 2.0, 3.0)],
        );
        let mut v = serde_json::to_value(&b).unwrap();
        v["hints"][0]["extra"] = serde_json::json!(1);
        let err = decode_batch(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert_eq!(err.code(), "malformed_json");
        let dup = batch(
            "node-a",
            1,
            vec![
                hint("ml", "llm", Resource::Gpu, 2.0, 3.0),
                hint("ml", "llm", Resource::Gpu, 1.0, 3.0),
            ],
        );
        assert!(validate(&dup).is_err());
    }

    #[test]
    fn workload_id_is_namespace_kind_name() {
        let h = hint("ml", "llm", Resource::Cpu, 1.0, 1.0);
        assert_eq!(h.workload.id(), "ml/Deployment/llm");
    }

    #[test]
    fn direct_checks_agree_with_batch_validation() {
        assert!(check_node("node-a.example").is_ok());
        let e = check_node("Node_A").unwrap_err();
        assert!(
            matches!(&e, SchemaError::Invalid { field, .. } if field == "node"),
            "{e}"
        );
        let good = hint("ml", "llm", Resource::Cpu, 1.0, 1.0).workload;
        assert!(check_workload(&good).is_ok());
        for (field, w) in [
            (
                "namespace",
                WorkloadRef {
                    namespace: "Bad_NS".into(),
                    ..good.clone()
                },
            ),
            (
                "kind",
                WorkloadRef {
                    kind: "1x".into(),
                    ..good.clone()
                },
            ),
            (
                "name",
                WorkloadRef {
                    name: "-x".into(),
                    ..good.clone()
                },
            ),
        ] {
            let direct = check_workload(&w).unwrap_err();
            assert!(
                matches!(&direct, SchemaError::Invalid { field: f, .. } if f == field),
                "{direct}"
            );
            let mut h = hint("ml", "llm", Resource::Cpu, 1.0, 1.0);
            h.workload = w;
            match validate(&batch("node-a", 1, vec![h])).unwrap_err() {
                SchemaError::Invalid { field: f, reason } => {
                    assert_eq!(f, format!("hints[0].workload.{field}"));
                    assert!(direct.to_string().ends_with(&reason), "{direct} / {reason}");
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}
