//! The KEDA external scaler (`externalscaler.ExternalScaler`, vendored from KEDA's published
//! `externalscaler.proto`) over tonic: a ScaledObject with an `external` or `external-push` trigger
//! names its workload in `scalerMetadata.workload` and scales on the merged hints.
//!
//! The metric is the workload's desired replicas with a target of 1 per replica, so HPA's
//! `ceil(value / target)` lands exactly on the aggregator's answer. This module only translates
//! between gRPC and the shared state; it never mutates that state.

#[allow(clippy::all, clippy::pedantic, clippy::unwrap_used)]
#[rustfmt::skip]
pub mod proto {
    include!("externalscaler.rs");
}

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use proto::external_scaler_server::{ExternalScaler, ExternalScalerServer};
use proto::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};

use crate::state::Shared;

/// Key in `scalerMetadata` naming the workload id.
pub const WORKLOAD_KEY: &str = "workload";

/// Pushes are coalesced to at most one evaluation per this interval per stream, so a flood of
/// hints cannot turn every open stream into a busy loop.
const STREAM_COALESCE: Duration = Duration::from_millis(20);

/// Metric name for a workload id: KEDA and HPA want `[a-z0-9.-]`.
pub fn metric_name(id: &str) -> String {
    let mut s = String::from("headroom-");
    for c in id.chars() {
        match c {
            'a'..='z' | '0'..='9' | '.' | '-' => s.push(c),
            'A'..='Z' => s.push(c.to_ascii_lowercase()),
            _ => s.push('-'),
        }
    }
    s
}

#[derive(Debug, Clone)]
pub struct Scaler {
    shared: Arc<Shared>,
}

impl Scaler {
    pub fn new(shared: Arc<Shared>) -> Self {
        Scaler { shared }
    }

    pub fn into_service(self) -> ExternalScalerServer<Self> {
        ExternalScalerServer::new(self).max_decoding_message_size(64 * 1024)
    }
}

fn workload_id(r: &ScaledObjectRef) -> Result<String, Status> {
    match r.scaler_metadata.get(WORKLOAD_KEY) {
        Some(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
        _ => Err(Status::invalid_argument(format!(
            "ScaledObject {}/{} has no scalerMetadata.{WORKLOAD_KEY}; set it to an id from GET /v1/workloads (namespace/Kind/name)",
            r.namespace, r.name
        ))),
    }
}

/// Active and desired replicas: live, or the last answer while its nodes are silent (the stale
/// hold), then inactive and zero. A workload no node has reported since the aggregator started
/// is `NOT_FOUND`, never a zero that would scale a real workload in. Reads the published
/// answers, never the registry, so a call never waits behind ingest.
fn current(shared: &Shared, id: &str) -> Result<(bool, u64), Status> {
    shared.lookup(id).replicas().ok_or_else(|| {
        Status::not_found(format!(
            "no node has reported workload {id} since the aggregator started; the ids it knows are at GET /v1/workloads (namespace/Kind/name)"
        ))
    })
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ExternalScaler for Scaler {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let id = workload_id(request.get_ref())?;
        Ok(Response::new(IsActiveResponse {
            result: current(&self.shared, &id)?.0,
        }))
    }

    type StreamIsActiveStream = BoxStream<IsActiveResponse>;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let id = workload_id(request.get_ref())?;
        current(&self.shared, &id)?;
        let shared = self.shared.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut changes = shared.subscribe();
            let mut last: Option<bool> = None;
            loop {
                // Known at open; forgotten only after a day of silence, then inactive.
                let active = current(&shared, &id).is_ok_and(|(active, _)| active);
                if last != Some(active) {
                    if tx
                        .send(Ok(IsActiveResponse { result: active }))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    last = Some(active);
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { break },
                    _ = tx.closed() => break,
                }
                tokio::time::sleep(STREAM_COALESCE).await;
                changes.mark_unchanged();
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let id = workload_id(request.get_ref())?;
        Ok(Response::new(spec(&id)))
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let req = request.into_inner();
        let obj = req
            .scaled_object_ref
            .ok_or_else(|| Status::invalid_argument("GetMetricsRequest has no scaledObjectRef"))?;
        let id = workload_id(&obj)?;
        let replicas = current(&self.shared, &id)?.1;
        // KEDA prefixes the name it got from GetMetricSpec (e.g. `s0-`); echo what was asked.
        let name = if req.metric_name.is_empty() {
            metric_name(&id)
        } else {
            req.metric_name
        };
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name: name,
                metric_value: i64::try_from(replicas).unwrap_or(i64::MAX),
                metric_value_float: replicas as f64,
            }],
        }))
    }

    type StreamMetricSpecStream = BoxStream<GetMetricSpecResponse>;

    async fn stream_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamMetricSpecStream>, Status> {
        let id = workload_id(request.get_ref())?;
        // The target never changes (1 per replica): send it once and hold the stream open, as
        // the proto asks of implementers.
        let first = tokio_stream::once(Ok(spec(&id)));
        Ok(Response::new(Box::pin(tokio_stream::StreamExt::chain(
            first,
            tokio_stream::pending(),
        ))))
    }
}

fn spec(id: &str) -> GetMetricSpecResponse {
    GetMetricSpecResponse {
        metric_specs: vec![MetricSpec {
            metric_name: metric_name(id),
            target_size: 1,
            target_size_float: 1.0,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_are_kubernetes_safe() {
        assert_eq!(
            metric_name("ml/Deployment/llm_v2"),
            "headroom-ml-deployment-llm-v2"
        );
    }
}
