//! Shared helpers for the aggregator's integration tests: a real aggregator on loopback and a
//! plain HTTP client.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use headroom_aggregator::{Aggregator, AggregatorConfig, MergePolicy};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub const TOKEN: &str = "s3cret-token";

pub struct Running {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    pub fn base(&self) -> String {
        format!("http://{}", self.http)
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

pub fn config(listen: SocketAddr) -> AggregatorConfig {
    AggregatorConfig {
        listen,
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        tokens: vec![TOKEN.to_owned(), "second-token".to_owned()],
        policy: MergePolicy {
            risk: 0.1,
            min_confidence: 0.5,
            node_ttl_s: 30.0,
        },
        max_body_bytes: 64 * 1024,
        node_rate: 0.0,
        node_burst: 1.0,
        tls: None,
        scaler_rt_priority: 0,
        external_metrics: None,
        stale_hold_s: headroom_aggregator::state::DEFAULT_STALE_HOLD_S,
    }
}

pub async fn start(cfg: AggregatorConfig) -> Running {
    // The port may still be held by a stopped aggregator's lingering sockets for a moment.
    let mut last = None;
    for _ in 0..50 {
        match Aggregator::bind(cfg.clone()).await {
            Ok(agg) => {
                let http = agg.http_addr().unwrap();
                let grpc = agg.grpc_addr().unwrap();
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                let task = tokio::spawn(agg.serve(async move {
                    let _ = rx.await;
                }));
                return Running {
                    http,
                    grpc,
                    stop: Some(tx),
                    task: Some(task),
                };
            }
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    panic!("cannot start aggregator: {last:?}");
}

/// The protocol crate's test hints and batches.
#[allow(unused_imports)] // not every test binary uses both
pub use headroom_protocol::fixtures::{batch, hint};

pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

impl Http {
    pub fn new() -> Self {
        Http {
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
    }

    pub async fn request(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let mut b = hyper::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = self
            .client
            .request(b.body(Full::new(body.into())).unwrap())
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, url: &str) -> Reply {
        self.request("GET", url, &[], Bytes::new()).await
    }

    pub async fn post_hints(&self, base: &str, body: impl Into<Bytes>) -> Reply {
        self.request(
            "POST",
            &format!("{base}/v1/hints"),
            &[
                ("authorization", &format!("Bearer {TOKEN}")),
                ("content-type", "application/json"),
            ],
            body,
        )
        .await
    }
}

pub fn tempdir() -> PathBuf {
    tempfile::tempdir().unwrap().keep()
}
