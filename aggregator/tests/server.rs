//! The aggregator's HTTP surface over real sockets: merged views, replays, every 4xx path, the
//! OpenAPI document matching what the server serves, and a fuzz of malformed posts.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use headroom_protocol::schema::Resource;
use rand::prelude::*;

#[tokio::test]
async fn merges_three_nodes_and_serves_json_and_metrics() {
    let agg = start(config("127.0.0.1:0".parse().unwrap())).await;
    let http = Http::new();
    let base = agg.base();
    for (i, node) in ["node-a", "node-b", "node-c"].iter().enumerate() {
        let b = batch(
            node,
            1,
            vec![
                hint("ml", "llm", Resource::Gpu, 2.0, 3.0),
                hint("ml", &format!("own-{i}"), Resource::Cpu, 1.0, 0.5),
            ],
        );
        let r = http
            .post_hints(&base, serde_json::to_vec(&b).unwrap())
            .await;
        assert_eq!(r.status, 200, "{:?}", r.json());
        assert_eq!(r.json()["accepted"], 2);
    }
    let list = http.get(&format!("{base}/v1/workloads")).await.json();
    let ids: Vec<&str> = list["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "ml/Deployment/llm",
            "ml/Deployment/own-0",
            "ml/Deployment/own-1",
            "ml/Deployment/own-2"
        ]
    );
    // 3 nodes x 2 GPUs held, p90 demand 3 each: 9 GPUs at 2 per replica -> 5 replicas.
    let w = http
        .get(&format!("{base}/v1/workloads/ml/Deployment/llm"))
        .await;
    assert_eq!(w.status, 200);
    let w = w.json();
    assert_eq!(w["nodes"], 3);
    assert_eq!(w["current_replicas"], 3);
    assert_eq!(w["desired_replicas"], 5);
    assert_eq!(w["active"], true);
    let enc = http
        .get(&format!("{base}/v1/workloads/ml%2FDeployment%2Fllm"))
        .await;
    assert_eq!(enc.json(), w);
    let missing = http
        .get(&format!("{base}/v1/workloads/ml/Deployment/none"))
        .await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"]["code"], "unknown_workload");

    let nodes = http.get(&format!("{base}/v1/nodes")).await.json();
    assert_eq!(nodes["nodes"].as_array().unwrap().len(), 3);
    assert_eq!(nodes["nodes"][0]["node"], "node-a");

    let m = http.get(&format!("{base}/metrics")).await;
    assert_eq!(m.status, 200);
    let text = String::from_utf8(m.body.to_vec()).unwrap();
    assert!(
        text.contains(r#"headroom_workload_desired_replicas{workload="ml/Deployment/llm",namespace="ml",kind="Deployment",name="llm"} 5"#),
        "{text}"
    );
    assert!(text.contains(r#"headroom_workload_demand{workload="ml/Deployment/llm",namespace="ml",kind="Deployment",name="llm",resource="gpu",unit="gpus"} 9"#));
    assert!(text.contains("headroom_aggregator_nodes 3"));
    assert!(text.contains(r#"headroom_aggregator_batches_total{result="accepted"} 3"#));

    // A replay of node-a's batch is acknowledged without changing anything.
    let b = batch(
        "node-a",
        1,
        vec![hint("ml", "llm", Resource::Gpu, 2.0, 30.0)],
    );
    let r = http
        .post_hints(&base, serde_json::to_vec(&b).unwrap())
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["duplicate"], true);
    let w2 = http
        .get(&format!("{base}/v1/workloads/ml/Deployment/llm"))
        .await
        .json();
    assert_eq!(w2["desired_replicas"], 5);

    // The next batch of node-a no longer lists llm: it leaves the merge at once.
    let b = batch(
        "node-a",
        2,
        vec![hint("ml", "own-0", Resource::Cpu, 1.0, 0.5)],
    );
    assert_eq!(
        http.post_hints(&base, serde_json::to_vec(&b).unwrap())
            .await
            .status,
        200
    );
    let w3 = http
        .get(&format!("{base}/v1/workloads/ml/Deployment/llm"))
        .await
        .json();
    assert_eq!(w3["nodes"], 2);

    for p in ["/healthz", "/readyz", "/openapi.json"] {
        assert_eq!(http.get(&format!("{base}{p}")).await.status, 200, "{p}");
    }
    agg.stop().await;
}

#[tokio::test]
async fn silent_nodes_expire_after_the_ttl() {
    let mut cfg = config("127.0.0.1:0".parse().unwrap());
    cfg.policy.node_ttl_s = 0.3;
    let agg = start(cfg).await;
    let http = Http::new();
    let b = batch(
        "node-a",
        1,
        vec![hint("ml", "llm", Resource::Gpu, 2.0, 3.0)],
    );
    assert_eq!(
        http.post_hints(&agg.base(), serde_json::to_vec(&b).unwrap())
            .await
            .status,
        200
    );
    assert_eq!(
        http.get(&format!("{}/v1/nodes", agg.base())).await.json()["nodes"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    assert_eq!(
        http.get(&format!("{}/v1/nodes", agg.base())).await.json()["nodes"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        http.get(&format!("{}/v1/workloads", agg.base()))
            .await
            .json()["workloads"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    agg.stop().await;
}

fn code(r: &Reply) -> String {
    r.json()["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn rejects_bad_posts_with_the_right_4xx() {
    let mut cfg = config("127.0.0.1:0".parse().unwrap());
    cfg.node_rate = 1.0;
    cfg.node_burst = 2.0;
    let agg = start(cfg).await;
    let http = Http::new();
    let url = format!("{}/v1/hints", agg.base());
    let good = serde_json::to_vec(&batch(
        "node-a",
        1,
        vec![hint("ml", "llm", Resource::Gpu, 2.0, 3.0)],
    ))
    .unwrap();
    let json_ct = ("content-type", "application/json");
    let auth = format!("Bearer {TOKEN}");

    let r = http.request("POST", &url, &[json_ct], good.clone()).await;
    assert_eq!((r.status, code(&r).as_str()), (401, "unauthenticated"));
    assert_eq!(r.headers["www-authenticate"], "Bearer realm=\"headroom\"");
    let r = http
        .request(
            "POST",
            &url,
            &[json_ct, ("authorization", "Bearer nope")],
            good.clone(),
        )
        .await;
    assert_eq!(r.status, 401);
    let r = http
        .request(
            "POST",
            &url,
            &[json_ct, ("authorization", TOKEN)],
            good.clone(),
        )
        .await;
    assert_eq!(
        r.status, 401,
        "a token without the Bearer scheme is refused"
    );
    let r = http
        .request(
            "POST",
            &url,
            &[json_ct, ("authorization", "Bearer second-token")],
            good.clone(),
        )
        .await;
    assert_eq!(r.status, 200, "every token in the file is accepted");

    let with_auth = [json_ct, ("authorization", auth.as_str())];
    let r = http
        .request(
            "POST",
            &url,
            &[("authorization", &auth), ("content-type", "text/plain")],
            good.clone(),
        )
        .await;
    assert_eq!(
        (r.status, code(&r).as_str()),
        (415, "unsupported_media_type")
    );
    let r = http
        .request("POST", &url, &with_auth, &b"{not json"[..])
        .await;
    assert_eq!((r.status, code(&r).as_str()), (400, "malformed_json"));
    let r = http
        .request(
            "POST",
            &url,
            &with_auth,
            &br#"{"schema":"headroom.hints/v9"}"#[..],
        )
        .await;
    assert_eq!((r.status, code(&r).as_str()), (422, "unsupported_schema"));
    let mut bad = batch(
        "node-a",
        2,
        vec![hint("ml", "llm", Resource::Gpu, 2.0, 3.0)],
    );
    bad.hints[0].confidence = 1.5;
    let r = http
        .request("POST", &url, &with_auth, serde_json::to_vec(&bad).unwrap())
        .await;
    assert_eq!((r.status, code(&r).as_str()), (422, "invalid_hint"));
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("hints[0].confidence")
    );

    // Oversized: declared by Content-Length, and streamed without one.
    let big = vec![b' '; 70 * 1024];
    let r = http.request("POST", &url, &with_auth, big.clone()).await;
    assert_eq!((r.status, code(&r).as_str()), (413, "payload_too_large"));
    let chunks: Vec<Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>> = (0..70)
        .map(|_| {
            Ok(hyper::body::Frame::data(bytes::Bytes::from(vec![
                b' ';
                1024
            ])))
        })
        .collect();
    let streamed = http_body_util::StreamBody::new(tokio_stream::iter(chunks));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::StreamBody<_>>();
    let req = hyper::Request::post(&url)
        .header("authorization", &auth)
        .header("content-type", "application/json")
        .body(streamed)
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 413);

    let r = http.get(&format!("{}/nope", agg.base())).await;
    assert_eq!((r.status, code(&r).as_str()), (404, "not_found"));
    let r = http.get(&url).await;
    assert_eq!((r.status, code(&r).as_str()), (405, "method_not_allowed"));
    assert_eq!(r.headers["allow"], "POST");
    let r = http
        .request(
            "DELETE",
            &format!("{}/v1/workloads", agg.base()),
            &[],
            bytes::Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 405);

    // Rate limit: burst 2 then 1/s per node, so quick posts from a fresh node hit 429.
    let mut limited = None;
    for seq in 10..15 {
        let b = serde_json::to_vec(&batch("node-r", seq, vec![])).unwrap();
        let r = http.request("POST", &url, &with_auth, b).await;
        if r.status == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status, 200);
    }
    let r = limited.expect("no 429 within five quick posts at burst 2");
    assert_eq!(code(&r), "rate_limited");
    assert!(r.headers.contains_key("retry-after"));

    let m = String::from_utf8(
        http.get(&format!("{}/metrics", agg.base()))
            .await
            .body
            .to_vec(),
    )
    .unwrap();
    for reason in [
        "unauthenticated",
        "malformed_json",
        "payload_too_large",
        "invalid_hint",
        "rate_limited",
    ] {
        assert!(
            m.contains(&format!(
                "headroom_aggregator_rejected_total{{reason=\"{reason}\"}}"
            )),
            "{reason}"
        );
    }
    agg.stop().await;
}

/// Keys the document lists for a schema, and its required keys.
fn schema_keys(doc: &serde_json::Value, name: &str) -> (Vec<String>, Vec<String>) {
    let s = &doc["components"]["schemas"][name];
    let mut props: Vec<String> = s["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    props.sort();
    let mut req: Vec<String> = s["required"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default();
    req.sort();
    (props, req)
}

fn object_keys(v: &serde_json::Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

#[tokio::test]
async fn openapi_document_matches_the_server() {
    let agg = start(config("127.0.0.1:0".parse().unwrap())).await;
    let http = Http::new();
    let base = agg.base();
    let doc = http.get(&format!("{base}/openapi.json")).await.json();
    assert_eq!(doc["openapi"].as_str().unwrap().chars().next(), Some('3'));

    // Wire types: every serialized field is documented and, for inputs, required.
    let b = batch(
        "node-a",
        1,
        vec![hint("ml", "llm", Resource::Gpu, 2.0, 3.0)],
    );
    let v = serde_json::to_value(&b).unwrap();
    for (name, value) in [
        ("HintBatch", &v),
        ("Hint", &v["hints"][0]),
        ("WorkloadRef", &v["hints"][0]["workload"]),
        ("Forecast", &v["hints"][0]["forecast"]),
        ("Quantile", &v["hints"][0]["forecast"]["quantiles"][0]),
    ] {
        let (props, req) = schema_keys(&doc, name);
        assert_eq!(props, object_keys(value), "{name} properties");
        assert_eq!(req, object_keys(value), "{name} required");
    }
    let enum_values: Vec<String> = doc["components"]["schemas"]["Resource"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    for r in [
        Resource::Cpu,
        Resource::Memory,
        Resource::Gpu,
        Resource::GpuMemory,
        Resource::Requests,
    ] {
        assert!(enum_values.contains(&r.as_str().to_owned()));
        assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
    }
    let r = http
        .post_hints(&base, serde_json::to_vec(&b).unwrap())
        .await
        .json();
    let (props, req) = schema_keys(&doc, "IngestResult");
    for k in object_keys(&r) {
        assert!(props.contains(&k), "IngestResult lacks {k}");
    }
    for k in &req {
        assert!(r.get(k).is_some(), "response lacks required {k}");
    }
    // Outputs: the documented required keys are exactly what is served.
    let w = http
        .get(&format!("{base}/v1/workloads/ml/Deployment/llm"))
        .await
        .json();
    assert_eq!(schema_keys(&doc, "WorkloadView").1, object_keys(&w));
    assert_eq!(
        schema_keys(&doc, "ResourceView").1,
        object_keys(&w["resources"][0])
    );
    let n = http.get(&format!("{base}/v1/nodes")).await.json();
    assert_eq!(schema_keys(&doc, "NodeView").1, object_keys(&n["nodes"][0]));

    // Every documented path is routed, with the documented method, and nothing undocumented is.
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete = path.replace("{id}", "ml/Deployment/llm");
        for method in item.as_object().unwrap().keys() {
            let r = match method.as_str() {
                "get" => http.get(&format!("{base}{concrete}")).await,
                "post" => {
                    http.post_hints(
                        &base,
                        serde_json::to_vec(&batch("node-z", 1, vec![])).unwrap(),
                    )
                    .await
                }
                m => panic!("undocumented method {m}"),
            };
            let documented: Vec<&String> = item[method]["responses"]
                .as_object()
                .unwrap()
                .keys()
                .collect();
            assert!(
                documented
                    .iter()
                    .any(|c| c.as_str() == r.status.to_string()),
                "{method} {path} answered {} which the document does not list",
                r.status
            );
        }
    }
    let post_codes: Vec<&str> = doc["paths"]["/v1/hints"]["post"]["responses"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        post_codes,
        ["200", "400", "401", "408", "413", "415", "422", "429"]
    );
    agg.stop().await;
}

/// One malformed input and the status it must get.
fn malformed_case(rng: &mut StdRng, valid: &serde_json::Value) -> (Vec<u8>, u16, &'static str) {
    let valid_bytes = serde_json::to_vec(valid).unwrap();
    match rng.random_range(0..8) {
        0 => {
            // Random bytes that start like JSON but cannot be a complete document.
            let mut b: Vec<u8> = (0..rng.random_range(1..200))
                .map(|_| rng.random())
                .collect();
            b.insert(0, b'{');
            (b, 400, "random bytes")
        }
        1 => {
            let cut = rng.random_range(0..valid_bytes.len() - 1);
            (valid_bytes[..cut].to_vec(), 400, "truncated")
        }
        2 => {
            // A field of the wrong JSON type.
            let mut v = valid.clone();
            let wrong = [
                serde_json::json!("text"),
                serde_json::json!([1, 2]),
                serde_json::json!({"a": 1}),
                serde_json::json!(null),
                serde_json::json!(true),
            ];
            let w = wrong[rng.random_range(0..wrong.len())].clone();
            let field =
                ["node", "epoch", "seq", "time", "interval_s", "hints"][rng.random_range(0..6)];
            let w = if field == "node" && w.is_string() {
                serde_json::json!(12)
            } else {
                w
            };
            v[field] = w;
            (serde_json::to_vec(&v).unwrap(), 400, "wrong type")
        }
        3 => {
            let mut v = valid.clone();
            let field = [
                "workload",
                "resource",
                "replicas",
                "capacity",
                "usage",
                "forecast",
                "local_headroom",
                "desired_capacity",
                "replica_delta",
                "confidence",
                "reason",
            ][rng.random_range(0..11)];
            v["hints"][0].as_object_mut().unwrap().remove(field);
            (serde_json::to_vec(&v).unwrap(), 400, "missing field")
        }
        4 => {
            let mut v = valid.clone();
            let key: String = (0..rng.random_range(1..12))
                .map(|_| rng.random_range(b'a'..=b'z') as char)
                .collect();
            v["hints"][0][format!("x_{key}")] = serde_json::json!(rng.random::<u32>());
            (serde_json::to_vec(&v).unwrap(), 400, "unknown field")
        }
        5 => {
            // In-range JSON types, out-of-range values.
            let mut v = valid.clone();
            let h = &mut v["hints"][0];
            match rng.random_range(0..9) {
                0 => h["capacity"] = serde_json::json!(-rng.random_range(0.001..1e9)),
                1 => h["confidence"] = serde_json::json!(rng.random_range(1.001..100.0)),
                2 => {
                    h["forecast"]["quantiles"][0]["q"] =
                        serde_json::json!(rng.random_range(1.0..5.0))
                }
                3 => h["forecast"]["quantiles"] = serde_json::json!([]),
                4 => {
                    h["workload"]["namespace"] =
                        serde_json::json!(format!("Bad_{}", rng.random::<u16>()))
                }
                5 => h["reason"] = serde_json::json!("x".repeat(300)),
                6 => h["forecast"]["quantiles"][1]["value"] = serde_json::json!(-1.0),
                7 => h["forecast"]["horizon_s"] = serde_json::json!(0),
                _ => {
                    h["workload"]["kind"] =
                        serde_json::json!(format!("{}Kind", rng.random_range(0..9)))
                }
            }
            (serde_json::to_vec(&v).unwrap(), 422, "out of range")
        }
        6 => {
            let mut v = valid.clone();
            match rng.random_range(0..3) {
                0 => v["seq"] = serde_json::json!(0),
                1 => v["node"] = serde_json::json!(format!("-{}", rng.random::<u16>())),
                _ => v["interval_s"] = serde_json::json!(-rng.random_range(0.0..10.0)),
            }
            (serde_json::to_vec(&v).unwrap(), 422, "bad batch field")
        }
        _ => {
            let mut v = valid.clone();
            v["schema"] =
                serde_json::json!(format!("headroom.hints/v{}", rng.random_range(2..1000)));
            (serde_json::to_vec(&v).unwrap(), 422, "unsupported schema")
        }
    }
}

/// At least 10,000 malformed posts, each answered with the status its kind of damage calls for,
/// none of them disturbing the served state; the service answers reads and writes afterwards.
#[tokio::test]
async fn fuzzed_malformed_posts_get_4xx_and_service_keeps_serving() {
    let agg = start(config("127.0.0.1:0".parse().unwrap())).await;
    let http = Http::new();
    let base = agg.base();
    let seed_batch = batch(
        "node-f",
        1,
        vec![
            hint("ml", "llm", Resource::Gpu, 2.0, 3.0),
            hint("ml", "web", Resource::Cpu, 2.0, 1.0),
        ],
    );
    assert_eq!(
        http.post_hints(&base, serde_json::to_vec(&seed_batch).unwrap())
            .await
            .status,
        200
    );
    let before = http.get(&format!("{base}/v1/workloads")).await.json();
    let mut valid = serde_json::to_value(&seed_batch).unwrap();
    valid["seq"] = serde_json::json!(2);
    let seed: u64 = std::env::var("HEADROOM_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let n: usize = std::env::var("HEADROOM_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut by_kind: std::collections::BTreeMap<&str, usize> = Default::default();
    for i in 0..n {
        let (body, want, kind) = malformed_case(&mut rng, &valid);
        let r = http.post_hints(&base, body.clone()).await;
        assert_eq!(
            r.status,
            want,
            "case {i} ({kind}, seed {seed:#x}) got {} {:?} for body {:?}",
            r.status,
            String::from_utf8_lossy(&r.body),
            String::from_utf8_lossy(&body)
        );
        let c = code(&r);
        assert!(!c.is_empty(), "case {i}: 4xx without an error code");
        *by_kind.entry(kind).or_default() += 1;
    }
    eprintln!("fuzz: {n} malformed posts, seed {seed:#x}, by kind {by_kind:?}");
    assert!(by_kind.len() == 8, "every kind of damage was exercised");
    assert_eq!(
        http.get(&format!("{base}/v1/workloads")).await.json(),
        before,
        "state unchanged"
    );
    assert_eq!(http.get(&format!("{base}/healthz")).await.status, 200);
    let r = http
        .post_hints(&base, serde_json::to_vec(&valid).unwrap())
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["accepted"], 2);
    agg.stop().await;
}

/// The exposition passes `promtool check metrics` (skipped without promtool, unless CI requires it).
#[tokio::test]
async fn metrics_pass_promtool() {
    let require = std::env::var("HEADROOM_REQUIRE_PRIVILEGED_TESTS").is_ok_and(|v| v == "1");
    if std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            !require,
            "metrics_pass_promtool cannot run: promtool is not installed"
        );
        eprintln!(
            "SKIP metrics_pass_promtool: promtool is not installed (apt-get install prometheus)"
        );
        return;
    }
    let agg = start(config("127.0.0.1:0".parse().unwrap())).await;
    let http = Http::new();
    let b = batch(
        "node-a",
        1,
        vec![
            hint("ml", "llm", Resource::Gpu, 2.0, 3.0),
            hint("ml", "llm", Resource::Memory, 8e9, 6e9),
        ],
    );
    assert_eq!(
        http.post_hints(&agg.base(), serde_json::to_vec(&b).unwrap())
            .await
            .status,
        200
    );
    assert_eq!(http.post_hints(&agg.base(), &b"{"[..]).await.status, 400);
    let body = http.get(&format!("{}/metrics", agg.base())).await.body;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&body).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool: {report}\n{}",
        String::from_utf8_lossy(&body)
    );
    agg.stop().await;
}

/// A body that never finishes arriving is answered with 408 instead of holding the connection.
#[tokio::test]
async fn a_trickled_body_times_out_with_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let agg = start(config("127.0.0.1:0".parse().unwrap())).await;
    let mut s = tokio::net::TcpStream::connect(agg.http).await.unwrap();
    let head = format!(
        "POST /v1/hints HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"schema\""
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let t0 = std::time::Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(20), s.read(&mut buf))
        .await
        .expect("no answer within 20 s")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("body_timeout"), "{text}");
    assert!(t0.elapsed() >= std::time::Duration::from_secs(9));
    let http = Http::new();
    assert_eq!(
        http.get(&format!("{}/healthz", agg.base())).await.status,
        200
    );
    agg.stop().await;
}
