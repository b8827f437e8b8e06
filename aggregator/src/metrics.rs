//! Per-workload Prometheus series, computed from the live registry at scrape time so a workload
//! that disappears takes its series with it (what prometheus-adapter and HPA read).
//!
//! It only reads shared state; it never changes it and never keeps series of its own.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::merge::{ResourceView, WorkloadView};
use crate::state::Shared;

#[derive(Debug)]
pub struct WorkloadCollector {
    shared: Arc<Shared>,
}

impl WorkloadCollector {
    pub fn new(shared: Arc<Shared>) -> Self {
        WorkloadCollector { shared }
    }
}

type Labels<'a> = Vec<(&'static str, &'a str)>;
/// (metric name, help, value getter) of one gauge family.
type Series<T> = (&'static str, &'static str, fn(&T) -> f64);

fn workload_labels(w: &WorkloadView) -> Labels<'_> {
    vec![
        ("workload", w.id.as_str()),
        ("namespace", w.namespace.as_str()),
        ("kind", w.kind.as_str()),
        ("name", w.name.as_str()),
    ]
}

fn gauge_family<'w>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl Iterator<Item = (Labels<'w>, f64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in rows {
        ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for WorkloadCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let workloads = self.shared.workloads();
        let (nodes, _) = self.shared.counts();
        gauge_family(
            &mut encoder,
            "headroom_aggregator_nodes",
            "Nodes whose last report is within the TTL",
            std::iter::once((Vec::new(), nodes as f64)),
        )?;
        let per_workload: [Series<WorkloadView>; 4] = [
            (
                "headroom_workload_desired_replicas",
                "Replicas needed at the configured risk, merged across nodes",
                |w| w.desired_replicas as f64,
            ),
            (
                "headroom_workload_current_replicas",
                "Replicas the reporting nodes run",
                |w| w.current_replicas as f64,
            ),
            (
                "headroom_workload_nodes",
                "Nodes reporting the workload",
                |w| w.nodes as f64,
            ),
            (
                "headroom_workload_active",
                "1 when any demand is foreseen (the KEDA scaler's IsActive)",
                |w| if w.active { 1.0 } else { 0.0 },
            ),
        ];
        for (name, help, get) in per_workload {
            gauge_family(
                &mut encoder,
                name,
                help,
                workloads.iter().map(|w| (workload_labels(w), get(w))),
            )?;
        }
        let per_resource: [Series<ResourceView>; 6] = [
            (
                "headroom_workload_capacity",
                "Capacity held by the workload's replicas, in the unit label's unit",
                |r| r.capacity,
            ),
            (
                "headroom_workload_usage",
                "Current usage, in the unit label's unit",
                |r| r.usage,
            ),
            (
                "headroom_workload_demand",
                "Forecast demand at probability 1 - risk over the lead time, in the unit label's unit",
                |r| r.demand,
            ),
            (
                "headroom_workload_local_headroom",
                "What the nodes can still give the workload locally, in the unit label's unit",
                |r| r.local_headroom,
            ),
            (
                "headroom_workload_confidence_ratio",
                "Capacity-weighted confidence of the nodes' forecasts",
                |r| r.confidence,
            ),
            (
                "headroom_workload_resource_desired_replicas",
                "Replicas needed for this resource alone",
                |r| r.desired_replicas as f64,
            ),
        ];
        for (name, help, get) in per_resource {
            let rows = workloads.iter().flat_map(|w| {
                w.resources.iter().map(move |r| {
                    let mut l = workload_labels(w);
                    l.push(("resource", r.resource.as_str()));
                    l.push(("unit", r.unit));
                    (l, get(r))
                })
            });
            gauge_family(&mut encoder, name, help, rows)?;
        }
        Ok(())
    }
}
