//! The status page at `/` of a real server: empty before any hint, then the merged workload's
//! charts with one point per timeline step, served as HTML. (Names are validated on ingest;
//! escaping is tested where the page is rendered.)

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use headroom_protocol::schema::Resource;

#[tokio::test]
async fn status_page_charts_merged_workloads_over_time() {
    let agg = start(config("127.0.0.1:0".parse().unwrap())).await;
    let http = Http::new();
    let base = agg.base();
    let page = http.get(&format!("{base}/")).await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.headers["content-type"].to_str().unwrap(),
        "text/html; charset=utf-8"
    );
    let html = String::from_utf8_lossy(&page.body).into_owned();
    assert!(html.contains("No node is reporting"), "{html}");
    assert!(!html.contains("<polyline"));

    // Two nodes report the same workload for a few timeline steps; the sweeper samples it.
    for seq in 1..=4 {
        for node in ["node-a", "node-b"] {
            let b = batch(
                node,
                seq,
                vec![hint("ml", "llm", Resource::Gpu, 2.0, 1.0 + seq as f64)],
            );
            let r = http
                .post_hints(&base, serde_json::to_vec(&b).unwrap())
                .await;
            assert_eq!(r.status, 200, "{:?}", r.json());
        }
        tokio::time::sleep(std::time::Duration::from_millis(
            (headroom_aggregator::page::STEP_S * 1000.0) as u64 + 300,
        ))
        .await;
    }
    let html = String::from_utf8_lossy(&http.get(&format!("{base}/")).await.body).into_owned();
    assert!(html.contains("<h3>ml/Deployment llm</h3>"), "{html}");
    assert!(html.contains("2 node(s) reporting"));
    assert!(html.contains("<td>node-b</td>"));
    let points = |class: &str| -> usize {
        let needle = format!("class=\"{class}\" data-points=\"");
        html.match_indices(&needle)
            .map(|(i, _)| {
                let rest = &html[i + needle.len()..];
                rest[..rest.find('"').unwrap()].parse::<usize>().unwrap()
            })
            .sum()
    };
    assert!(points("demand") >= 3, "usage line: {}", points("demand"));
    assert!(points("forecast") >= 3);
    // Rising demand raises desired replicas: the change is marked.
    assert!(html.contains("desired replicas "), "{html}");
    assert_eq!(http.get(&format!("{base}/nope")).await.status, 404);
    agg.stop().await;
}
