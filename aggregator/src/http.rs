//! The aggregator's HTTP/1 surface (hyper 1): hint ingestion at `POST /v1/hints`, the JSON read
//! API, the OpenAPI document, Prometheus metrics and health probes.
//!
//! This module owns request parsing, authentication of writes, body-size limits and the mapping of
//! every failure to a 4xx JSON error; it never computes a scaling answer itself (that is `merge`)
//! and never lets a bad request disturb the shared state.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry as PromRegistry;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::merge::Applied;
use crate::metrics::WorkloadCollector;
use crate::state::{Ingest, Shared};
use crate::uri::percent_decode;
use headroom_protocol::schema::decode_batch;

/// A client trickling its body this slowly is holding a connection, not sending hints.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// The hand-written OpenAPI 3 document, served verbatim at `/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

/// Read-only settings of the HTTP server.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Accepted bearer tokens; any one of them authorises a write (rotation without downtime).
    pub tokens: Vec<String>,
    pub max_body_bytes: usize,
}

pub struct HttpServer {
    shared: Arc<Shared>,
    settings: HttpSettings,
    prom: PromRegistry,
}

type Resp = Response<Full<Bytes>>;

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: String,
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Resp {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = status;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encode_failed",
            format!("could not encode response: {e}"),
        ),
    }
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Resp {
    let body = ErrorBody {
        error: ErrorDetail {
            code,
            message: message.into(),
        },
    };
    let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Compares without an early exit so response time does not reveal how much of a token matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl HttpServer {
    pub fn new(shared: Arc<Shared>, settings: HttpSettings) -> Self {
        let mut prom = PromRegistry::default();
        prom.register(
            "headroom_aggregator_batches",
            "Hint batches received, by result",
            shared.metrics.batches.clone(),
        );
        prom.register(
            "headroom_aggregator_rejected",
            "Requests to POST /v1/hints rejected, by reason",
            shared.metrics.rejected.clone(),
        );
        prom.register(
            "headroom_aggregator_hints",
            "Hints accepted",
            shared.metrics.hints.clone(),
        );
        prom.register(
            "headroom_aggregator_expired_nodes",
            "Nodes dropped after staying silent past the TTL",
            shared.metrics.expired_nodes.clone(),
        );
        prom.register_collector(Box::new(WorkloadCollector::new(shared.clone())));
        HttpServer {
            shared,
            settings,
            prom,
        }
    }

    fn reject(&self, status: StatusCode, code: &'static str, msg: impl Into<String>) -> Resp {
        self.shared
            .metrics
            .rejected
            .get_or_create(&[("reason", code)])
            .inc();
        error(status, code, msg)
    }

    fn authorised(&self, req: &Request<Incoming>) -> bool {
        let Some(value) = req.headers().get(header::AUTHORIZATION) else {
            return false;
        };
        let Some(token) = value
            .as_bytes()
            .strip_prefix(b"Bearer ")
            .or_else(|| value.as_bytes().strip_prefix(b"bearer "))
        else {
            return false;
        };
        // Every configured token is compared, so timing does not reveal which one nearly matched.
        self.settings
            .tokens
            .iter()
            .fold(false, |ok, t| constant_time_eq(t.as_bytes(), token) | ok)
    }

    async fn post_hints(&self, req: Request<Incoming>) -> Resp {
        if !self.authorised(&req) {
            let mut r = self.reject(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "POST /v1/hints needs `Authorization: Bearer <token>` with a token from the aggregator's token file",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"headroom\""),
            );
            return r;
        }
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let ok = ct
                .to_str()
                .ok()
                .and_then(|s| s.split(';').next())
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
            if !ok {
                return self.reject(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    format!("Content-Type must be application/json, got {ct:?}"),
                );
            }
        }
        let max = self.settings.max_body_bytes;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max as u64) {
            return self.reject(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "body of {} bytes exceeds the limit of {max} bytes",
                    declared.unwrap_or(0)
                ),
            );
        }
        let collected =
            tokio::time::timeout(BODY_TIMEOUT, Limited::new(req.into_body(), max).collect()).await;
        let Ok(collected) = collected else {
            return self.reject(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "request body not received within {} s",
                    BODY_TIMEOUT.as_secs()
                ),
            );
        };
        let body = match collected {
            Ok(c) => c.to_bytes(),
            Err(e) => {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    return self.reject(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "payload_too_large",
                        format!("body exceeds the limit of {max} bytes"),
                    );
                }
                return self.reject(
                    StatusCode::BAD_REQUEST,
                    "body_read_failed",
                    format!("could not read request body: {e}"),
                );
            }
        };
        let batch = match decode_batch(&body) {
            Ok(b) => b,
            Err(e) => {
                let status = match e {
                    headroom_protocol::schema::SchemaError::Malformed(_) => StatusCode::BAD_REQUEST,
                    _ => StatusCode::UNPROCESSABLE_ENTITY,
                };
                return self.reject(status, e.code(), e.to_string());
            }
        };
        let (node, seq) = (batch.node.clone(), batch.seq);
        match self.shared.ingest(batch) {
            Ingest::RateLimited(wait) => {
                let mut r = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!("node {node:?} exceeds its batch rate; retry in {wait:.2} s"),
                );
                let secs = wait.ceil().max(1.0) as u64;
                if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                    r.headers_mut().insert(header::RETRY_AFTER, v);
                }
                r
            }
            Ingest::Applied(Applied::Accepted { hints }) => json(
                StatusCode::OK,
                &serde_json::json!({"accepted": hints, "duplicate": false, "node": node, "seq": seq}),
            ),
            Ingest::Applied(Applied::Duplicate { last_seq }) => json(
                StatusCode::OK,
                &serde_json::json!({"accepted": 0, "duplicate": true, "node": node, "seq": seq, "last_seq": last_seq}),
            ),
        }
    }

    fn metrics(&self) -> Resp {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.prom) {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "encode_failed",
                format!("could not encode metrics: {e}"),
            );
        }
        let mut r = Response::new(Full::new(Bytes::from(out)));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        r
    }

    /// Routes one request. Public so tests and embedders can drive it without a socket.
    pub async fn handle(&self, req: Request<Incoming>) -> Resp {
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        let allowed: &str = match path.as_str() {
            p if crate::external_metrics::handles(p) => "GET",
            "/v1/hints" => "POST",
            "/" | "/v1/workloads" | "/v1/nodes" | "/openapi.json" | "/metrics" | "/healthz"
            | "/readyz" => "GET",
            p if p.starts_with("/v1/workloads/") => "GET",
            _ => {
                return error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no route for {path}; see /openapi.json"),
                );
            }
        };
        let method_ok = method.as_str() == allowed || (allowed == "GET" && method == Method::HEAD);
        if !method_ok {
            let mut r = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed on {path}; use {allowed}"),
            );
            r.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static(if allowed == "POST" {
                    "POST"
                } else {
                    "GET, HEAD"
                }),
            );
            return r;
        }
        match path.as_str() {
            p if crate::external_metrics::handles(p) => crate::external_metrics::get(
                &self.shared,
                p,
                req.uri().query(),
                &headroom_protocol::rfc3339(std::time::SystemTime::now()),
            ),
            "/" => {
                let page = self.shared.page(req.uri().query().unwrap_or(""));
                let mut r = Response::new(Full::new(Bytes::from(page)));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=utf-8"),
                );
                r
            }
            "/v1/hints" => self.post_hints(req).await,
            "/v1/workloads" => json(
                StatusCode::OK,
                &serde_json::json!({"workloads": self.shared.workloads()}),
            ),
            "/v1/nodes" => json(
                StatusCode::OK,
                &serde_json::json!({"nodes": self.shared.nodes()}),
            ),
            "/openapi.json" => {
                let mut r = Response::new(Full::new(Bytes::from_static(OPENAPI_JSON.as_bytes())));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r
            }
            "/metrics" => self.metrics(),
            "/healthz" => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
            "/readyz" => {
                if self.shared.is_ready() {
                    let (nodes, workloads) = self.shared.counts();
                    json(
                        StatusCode::OK,
                        &serde_json::json!({"status": "ready", "nodes": nodes, "workloads": workloads}),
                    )
                } else {
                    error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not_ready",
                        "listeners are still starting",
                    )
                }
            }
            p => {
                let raw = &p["/v1/workloads/".len()..];
                let id = percent_decode(raw);
                match self.shared.workload(&id) {
                    Some(v) => json(StatusCode::OK, &v),
                    None => error(
                        StatusCode::NOT_FOUND,
                        "unknown_workload",
                        format!(
                            "no node reports workload {id:?} (ids look like namespace/Kind/name; see /v1/workloads)"
                        ),
                    ),
                }
            }
        }
    }
}

/// A TLS handshake that has not finished by then is a stalled or confused client.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves HTTP/1 on `listener` until `shutdown` resolves; over TLS when `tls` is given.
pub async fn serve(
    listener: TcpListener,
    server: Arc<HttpServer>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Usually EMFILE: back off briefly instead of spinning on the error.
                    tracing::warn!(error = %e, "accept failed on the HTTP listener; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let server = server.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let Some(acceptor) = tls else {
                return serve_connection(stream, server, peer).await;
            };
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => serve_connection(tls_stream, server, peer).await,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                }
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

async fn serve_connection<S>(stream: S, server: Arc<HttpServer>, peer: SocketAddr)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let server = server.clone();
        async move { Ok::<_, Infallible>(server.handle(req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        // Slow clients must not hold connections open forever.
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(stream), svc);
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_percent_escapes() {
        assert_eq!(percent_decode("ml%2FDeployment%2Fllm"), "ml/Deployment/llm");
        assert_eq!(percent_decode("ml/Deployment/llm"), "ml/Deployment/llm");
        assert_eq!(percent_decode("bad%zz%2"), "bad%zz%2");
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
