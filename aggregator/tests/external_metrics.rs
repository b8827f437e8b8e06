//! The external metrics API (`external.metrics.k8s.io/v1beta1`) as the Kubernetes API server
//! calls it: over HTTPS on --external-metrics-listen, with a client certificate signed by the
//! front-proxy CA; discovery, a workload's desired replicas, and clear 4xx `Status` answers for
//! what it cannot serve (never a zero for a workload no node reports).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use headroom_protocol::schema::Resource;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A CA and a client certificate it signed (the API server's front-proxy pair).
fn front_proxy() -> (String, CertificateDer<'static>, PrivateKeyDer<'static>) {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let mut client = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    client
        .distinguished_name
        .push(rcgen::DnType::CommonName, "front-proxy-client");
    client.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let client_key = rcgen::KeyPair::generate().unwrap();
    let client_cert = client.signed_by(&client_key, &issuer).unwrap();
    (
        ca_cert.pem(),
        client_cert.der().clone(),
        PrivateKeyDer::try_from(client_key.serialize_der()).unwrap(),
    )
}

/// Trusts any server certificate, as an APIService with `insecureSkipTLSVerify` does.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn get(
    url: &str,
    client_cert: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> Result<(u16, serde_json::Value), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let tls = match client_cert {
        Some((c, k)) => b.with_client_auth_cert(vec![c], k).unwrap(),
        None => b.with_no_client_auth(),
    };
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let resp = client
        .request(
            hyper::Request::get(url)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Ok((status, serde_json::from_slice(&body).unwrap()))
}

#[tokio::test]
async fn the_api_server_gets_desired_replicas_and_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, cert, key) = front_proxy();
    let ca = dir.path().join("front-proxy-ca.crt");
    std::fs::write(&ca, ca_pem).unwrap();
    let mut cfg = config("127.0.0.1:0".parse().unwrap());
    // Port 0 is picked at bind; find it from a listener of our own first.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    cfg.external_metrics = Some((format!("127.0.0.1:{port}").parse().unwrap(), Some(ca)));
    let agg = start(cfg).await;
    let http = Http::new();
    // Two nodes each hold 2 GPUs of ml/Deployment/llm with p90 demand 3: 5 replicas.
    for node in ["node-a", "node-b"] {
        let b = batch(node, 1, vec![hint("ml", "llm", Resource::Gpu, 2.0, 3.0)]);
        let r = http
            .post_hints(&agg.base(), serde_json::to_vec(&b).unwrap())
            .await;
        assert_eq!(r.status, 200);
    }
    let desired = http
        .get(&format!("{}/v1/workloads/ml/Deployment/llm", agg.base()))
        .await
        .json()["desired_replicas"]
        .as_u64()
        .unwrap();
    assert!(desired > 2, "{desired}");

    let base = format!("https://127.0.0.1:{port}/apis/external.metrics.k8s.io/v1beta1");
    let me = || Some((cert.clone(), key.clone_key()));

    // Without the front-proxy certificate, no answer at all.
    let refused = get(&base, None).await;
    assert!(
        refused.is_err(),
        "served a client without a certificate: {refused:?}"
    );

    let (code, list) = get(&base, me()).await.unwrap();
    assert_eq!(code, 200, "{list}");
    assert_eq!(list["kind"], "APIResourceList");
    assert_eq!(list["resources"][0]["name"], "headroom-desired-replicas");

    let url = |ns: &str, metric: &str, selector: &str| {
        format!("{base}/namespaces/{ns}/{metric}?labelSelector={selector}")
    };
    let (code, v) = get(
        &url(
            "ml",
            "headroom-desired-replicas",
            "kind%3DDeployment%2Cname%3Dllm",
        ),
        me(),
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["kind"], "ExternalMetricValueList");
    let item = &v["items"][0];
    assert_eq!(item["value"], desired.to_string());
    assert_eq!(item["metricLabels"]["name"], "llm");
    assert!(item["timestamp"].as_str().unwrap().ends_with('Z'));

    // A workload no node reports: 404 naming it, not a zero the HPA would scale in to.
    let (code, v) = get(
        &url(
            "ml",
            "headroom-desired-replicas",
            "kind%3DDeployment%2Cname%3Dghost",
        ),
        me(),
    )
    .await
    .unwrap();
    assert_eq!((code, v["reason"].as_str()), (404, Some("NotFound")), "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("ml/Deployment/ghost"),
        "{v}"
    );
    // The workload's namespace is the HPA's: the same name elsewhere is another workload.
    let (code, _) = get(
        &url(
            "other",
            "headroom-desired-replicas",
            "kind%3DDeployment%2Cname%3Dllm",
        ),
        me(),
    )
    .await
    .unwrap();
    assert_eq!(code, 404);
    let (code, v) = get(&url("ml", "headroom-desired-replicas", "name%3Dllm"), me())
        .await
        .unwrap();
    assert_eq!(code, 400, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("kind: Deployment"),
        "{v}"
    );
    let (code, v) = get(
        &url("ml", "cpu-usage", "kind%3DDeployment%2Cname%3Dllm"),
        me(),
    )
    .await
    .unwrap();
    assert_eq!(code, 404, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("headroom-desired-replicas")
    );
    agg.stop().await;
}
