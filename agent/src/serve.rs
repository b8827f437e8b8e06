//! The agent's HTTP server (hyper, HTTP/1.1): the status page at `/`, `/metrics`, `/healthz`,
//! `/readyz`, `/v1/status`, `/v1/history`, `/v1/decisions`. Handlers only read shared state; none
//! of them samples or blocks on I/O.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;

use crate::history::SeriesKey;
use crate::report::metrics::AgentCollector;
use crate::shared::Shared;

pub type Body = Full<Bytes>;

pub struct Routes {
    shared: Arc<Shared>,
    registry: Registry,
}

impl Routes {
    pub fn agent(shared: Arc<Shared>) -> Arc<Routes> {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(AgentCollector {
            shared: shared.clone(),
        }));
        Arc::new(Routes { shared, registry })
    }

    pub fn handle(&self, req: &Request<Incoming>) -> Response<Body> {
        let path = req.uri().path();
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut r = json(
                StatusCode::METHOD_NOT_ALLOWED,
                &serde_json::json!({"error": format!("{} {path}: only GET is served", req.method())}),
            );
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        match path {
            "/" => self.page(req.uri().query().unwrap_or("")),
            "/metrics" => self.metrics(),
            "/healthz" => {
                if self.shared.live() {
                    text(StatusCode::OK, "ok\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "sampling has stalled\n")
                }
            }
            "/readyz" => {
                if self.shared.ready.load(Ordering::Relaxed) {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "waiting for the first sample\n",
                    )
                }
            }
            "/v1/status" => json(StatusCode::OK, &self.shared.status()),
            "/v1/history" => self.history(req.uri().query().unwrap_or("")),
            "/v1/decisions" => {
                let container = req.uri().query().and_then(|q| {
                    q.split('&')
                        .find_map(|p| p.strip_prefix("container="))
                        .map(percent_decode)
                });
                json(
                    StatusCode::OK,
                    &self
                        .shared
                        .decisions
                        .json(self.shared.policy_mode, container.as_deref()),
                )
            }
            _ => json(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"error": format!("no such endpoint: {path}")}),
            ),
        }
    }

    /// The status page: plots from history, decisions marked where the policy records them.
    fn page(&self, query: &str) -> Response<Body> {
        let opts = crate::report::page::Options::from_query(query);
        let header = crate::report::page::Header {
            hostname: self.shared.hostname.clone(),
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: self.shared.started.elapsed().as_secs_f64(),
            samplers: self
                .shared
                .samplers()
                .into_iter()
                .map(|(n, h)| {
                    let detail = h.last_error.or(h.detail);
                    (n.to_string(), h.healthy, detail.unwrap_or_default())
                })
                .collect(),
        };
        let latest = self.shared.latest();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let marks = crate::report::page::marks_from_decisions(
            &self.shared.decisions.json(self.shared.policy_mode, None),
        );
        let history = self.shared.history();
        let html = crate::report::page::render(
            &header,
            &history,
            latest.as_deref(),
            &marks,
            &opts,
            now_ms,
        );
        drop(history);
        let mut r = Response::new(Full::new(Bytes::from(html)));
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        r.headers_mut().insert(
            hyper::header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'",
            ),
        );
        r
    }

    fn metrics(&self) -> Response<Body> {
        let mut out = String::with_capacity(64 * 1024);
        match prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry) {
            Ok(()) => {
                let mut r = Response::new(Full::new(Bytes::from(out)));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n"),
        }
    }

    /// `/v1/history?name=container_cpu_usage_cores&cgroup=/a`: every series with that name whose
    /// labels include the given ones.
    fn history(&self, query: &str) -> Response<Body> {
        let mut name = None;
        let mut want: Vec<(String, String)> = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (k, v) = (percent_decode(k), percent_decode(v));
            if k == "name" {
                name = Some(v);
            } else {
                want.push((k, v));
            }
        }
        let h = self.shared.history();
        let Some(name) = name else {
            let mut names: Vec<&str> = h.keys().map(|k| k.name.as_str()).collect();
            names.sort();
            names.dedup();
            return json(StatusCode::OK, &serde_json::json!({"names": names}));
        };
        let mut keys: Vec<&SeriesKey> = h
            .keys()
            .filter(|k| {
                k.name == name && want.iter().all(|(wk, wv)| k.label(wk) == Some(wv.as_str()))
            })
            .collect();
        keys.sort();
        let series: Vec<_> = keys
            .into_iter()
            .filter_map(|k| {
                h.view(k)
                    .map(|v| serde_json::json!({"key": k, "fine": v.fine, "coarse": v.coarse}))
            })
            .collect();
        json(StatusCode::OK, &serde_json::json!({"series": series}))
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Accepts connections until `shutdown` turns true; each connection is served on its own task.
pub async fn serve(
    listener: tokio::net::TcpListener,
    routes: Arc<Routes>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let routes = routes.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let r = routes.handle(&req);
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { tracing::debug!(error = %e, "connection ended with an error") },
                _ = stop.changed() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn decodes_query_values() {
        assert_eq!(percent_decode("%2Fkubepods%2Fpod"), "/kubepods/pod");
        assert_eq!(percent_decode("a+b"), "a b");
        assert_eq!(percent_decode("bad%zz"), "bad%zz");
        assert_eq!(percent_decode("end%2"), "end%2");
    }
}
