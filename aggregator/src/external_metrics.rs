//! The Kubernetes external metrics API (`external.metrics.k8s.io/v1beta1`), so the HPA consumes
//! headroom's hints directly, without KEDA: register the aggregator with an APIService
//! (`deploy/optional/external-metrics.yaml`) and name the metric in an `autoscaling/v2`
//! HorizontalPodAutoscaler:
//!
//! ```yaml
//! metrics:
//!   - type: External
//!     external:
//!       metric:
//!         name: headroom-desired-replicas
//!         selector: {matchLabels: {kind: Deployment, name: web}}
//!       target: {type: AverageValue, averageValue: "1"}
//! ```
//!
//! The workload is `<the HPA's namespace>/<kind>/<name>`. The value is the merged desired
//! replicas, the same number the KEDA scaler serves (held while its nodes are silent, see
//! `state::Lookup`); with `AverageValue: 1` the HPA's `ceil(value / (target × current))` lands
//! exactly on it. A workload no node has reported since start is a 404 `Status`, never a zero:
//! the HPA then keeps the replicas it has (`ScalingActive` false, reason
//! `FailedGetExternalMetric`, with this message). Reads the published answers only.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::json;

use crate::state::Shared;

pub const GROUP_VERSION: &str = "external.metrics.k8s.io/v1beta1";
/// Path prefix the API server forwards to an APIService of this group and version.
pub const PREFIX: &str = "/apis/external.metrics.k8s.io/v1beta1";
/// The one metric: a workload's desired replicas.
pub const DESIRED_REPLICAS: &str = "headroom-desired-replicas";

type Resp = Response<Full<Bytes>>;

fn respond(status: StatusCode, body: serde_json::Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A `metav1.Status` failure, as the API server relays it to kubectl and the HPA controller.
fn status(code: StatusCode, reason: &str, message: String) -> Resp {
    respond(
        code,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
        }),
    )
}

/// `true` for paths this module answers.
pub fn handles(path: &str) -> bool {
    path == PREFIX || path.starts_with(&format!("{PREFIX}/"))
}

/// Answers a GET under [`PREFIX`]: discovery, or one metric's value.
pub fn get(shared: &Shared, path: &str, query: Option<&str>, now_rfc3339: &str) -> Resp {
    let rest = path.strip_prefix(PREFIX).unwrap_or("");
    if rest.is_empty() || rest == "/" {
        return respond(
            StatusCode::OK,
            json!({
                "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": GROUP_VERSION,
                "resources": [{
                    "name": DESIRED_REPLICAS, "singularName": "", "namespaced": true,
                    "kind": "ExternalMetricValueList", "verbs": ["get"],
                }],
            }),
        );
    }
    let parts: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
    let ["namespaces", namespace, metric] = parts[..] else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!(
                "no route for {path}; metrics are at {PREFIX}/namespaces/<namespace>/{DESIRED_REPLICAS}"
            ),
        );
    };
    if metric != DESIRED_REPLICAS {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no external metric {metric:?}; headroom serves {DESIRED_REPLICAS}"),
        );
    }
    let selector = match label_selector(query) {
        Ok(s) => s,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e),
    };
    let (Some(kind), Some(name)) = (selector.get("kind"), selector.get("name")) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!(
                "{DESIRED_REPLICAS} needs a selector naming the workload, e.g. matchLabels: {{kind: Deployment, name: web}}; got {:?}",
                query.unwrap_or("")
            ),
        );
    };
    let id = format!("{namespace}/{kind}/{name}");
    let Some((_, desired)) = shared.lookup(&id).replicas() else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!(
                "no node has reported workload {id} since the aggregator started; the ids headroom knows are at GET /v1/workloads"
            ),
        );
    };
    respond(
        StatusCode::OK,
        json!({
            "kind": "ExternalMetricValueList", "apiVersion": GROUP_VERSION, "metadata": {},
            "items": [{
                "metricName": DESIRED_REPLICAS,
                "metricLabels": {"kind": kind, "name": name},
                "timestamp": now_rfc3339,
                "value": desired.to_string(),
            }],
        }),
    )
}

/// `labelSelector=kind%3DDeployment%2Cname%3Dweb` → {kind: Deployment, name: web}. Only
/// equality terms (`k=v`, `k==v`) mean anything here; any other term is an error naming it.
fn label_selector(
    query: Option<&str>,
) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut out = std::collections::BTreeMap::new();
    let Some(q) = query else { return Ok(out) };
    for pair in q.split('&') {
        let Some(raw) = pair.strip_prefix("labelSelector=") else {
            continue;
        };
        let sel = crate::uri::percent_decode(raw);
        for term in sel.split(',').filter(|t| !t.is_empty()) {
            let (k, v) = term
                .split_once("==")
                .or_else(|| term.split_once('='))
                .filter(|(k, _)| !k.ends_with('!'))
                .ok_or_else(|| {
                    format!("labelSelector term {term:?}: only key=value terms select a workload")
                })?;
            out.insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    Ok(out)
}

/// TLS for the listener the API server calls: the aggregator's certificate (`cert_key`), or a
/// self-signed one made at start (the APIService then sets `insecureSkipTLSVerify`, as
/// metrics-server's does); with `client_ca` (the API server's `--requestheader-client-ca-file`,
/// the front-proxy CA), only clients with a certificate it signed are served.
pub fn server_tls(
    cert_key: Option<(&Path, &Path)>,
    client_ca: Option<&Path>,
) -> Result<rustls::ServerConfig, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let (chain, key) = match cert_key {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
            (chain, key)
        }
        None => {
            let c = rcgen::generate_simple_self_signed(vec![
                "headroom-aggregator.headroom.svc".to_string(),
                "localhost".to_string(),
            ])
            .map_err(|e| format!("a self-signed certificate: {e}"))?;
            let key = PrivateKeyDer::try_from(c.signing_key.serialize_der())
                .map_err(|e| format!("a self-signed certificate's key: {e}"))?;
            (vec![c.cert.der().clone()], key)
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(ca)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("--external-metrics-client-ca {}: {e}", ca.display()))?;
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("--external-metrics-client-ca {}: {e}", ca.display()))?;
            }
            if roots.is_empty() {
                return Err(format!(
                    "--external-metrics-client-ca {}: no certificate in it",
                    ca.display()
                ));
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| format!("--external-metrics-client-ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("--tls-key does not fit --tls-cert: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_name_the_workload_and_bad_terms_are_named() {
        let s = label_selector(Some("labelSelector=kind%3DDeployment%2Cname%3Dweb")).unwrap();
        assert_eq!(s["kind"], "Deployment");
        assert_eq!(s["name"], "web");
        let s =
            label_selector(Some("x=1&labelSelector=kind%3D%3DStatefulSet%2Cname%3Ddb")).unwrap();
        assert_eq!(
            (s["kind"].as_str(), s["name"].as_str()),
            ("StatefulSet", "db")
        );
        assert!(label_selector(None).unwrap().is_empty());
        let e = label_selector(Some("labelSelector=name%21%3Dweb")).unwrap_err();
        assert!(e.contains("name!=web"), "{e}");
        let e = label_selector(Some("labelSelector=name%20in%20(a)")).unwrap_err();
        assert!(e.contains("only key=value"), "{e}");
    }
}
