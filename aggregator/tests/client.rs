//! The hint client against real aggregators on loopback: spooling across an outage and in-order
//! replay, the bounded spool's oldest-dropped counter, idempotent replays after a lost response,
//! several endpoints, permanent 4xx, a token fixed while the client runs, and a shutdown that
//! leaves the spool to the next client.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use headroom_protocol::client::{ClientConfig, HintClient};
use headroom_protocol::schema::Resource;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;

fn client_config(node: &str, endpoints: Vec<String>) -> ClientConfig {
    let dir = tempdir();
    let token = dir.join("token");
    std::fs::write(&token, format!("# agent token\n{TOKEN}\n")).unwrap();
    let mut cfg = ClientConfig::new(node, endpoints, dir.join("spool"));
    cfg.token_file = Some(token);
    cfg.backoff_base = Duration::from_millis(20);
    cfg.backoff_max = Duration::from_millis(200);
    cfg.request_timeout = Duration::from_secs(2);
    cfg.direct_attempts = 2;
    cfg
}

/// A loopback address for an aggregator that is down for now: connections to it are refused
/// (nothing listens), yet while the returned socket lives no other socket on the machine is
/// given its port, which a port merely found free and released could be. A listener bound with
/// SO_REUSEADDR, as tokio binds the aggregator's, can still take it; drop the reservation then.
fn reserve_addr() -> (TcpSocket, SocketAddr) {
    let s = TcpSocket::new_v4().unwrap();
    s.set_reuseaddr(true).unwrap();
    s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = s.local_addr().unwrap();
    (s, addr)
}

async fn workload(http: &Http, base: &str, id: &str) -> serde_json::Value {
    http.get(&format!("{base}/v1/workloads/{id}")).await.json()
}

#[tokio::test]
async fn spool_fills_during_an_outage_and_drains_in_order() {
    let (reservation, addr) = reserve_addr();
    let alive = start(config("127.0.0.1:0".parse().unwrap())).await;
    let cfg = client_config("node-a", vec![format!("http://{addr}"), alive.base()]);
    let mut cfg = cfg;
    cfg.spool_max_batches = 5;
    let client = HintClient::start(cfg).unwrap();

    // The first endpoint is down for eight intervals: its spool keeps the newest five.
    let mut last_seq = 0;
    for i in 1..=8 {
        last_seq = client
            .submit(vec![hint("ml", "llm", Resource::Gpu, 2.0, i as f64)])
            .await
            .unwrap();
    }
    assert_eq!(last_seq, 8);
    // Each endpoint's worker runs at its own pace: wait until both have dealt with all eight.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (s, s1) = loop {
        let (s, s1) = (client.stats()[0].1, client.stats()[1].1);
        if s.queued == 0 && s.spool_len == 5 && s1.queued == 0 {
            break (s, s1);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spool never filled or live endpoint never caught up: {s:?} {s1:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!((s.dropped_oldest, s.delivered), (3, 0), "{s:?}");
    // The live endpoint was never held up by the dead one.
    assert_eq!((s1.delivered, s1.spool_len), (8, 0), "{s1:?}");
    let http = Http::new();
    let live_view = workload(&http, &alive.base(), "ml/Deployment/llm").await;

    // The aggregator comes back on the same address: the spool drains oldest first, and the view
    // ends where the always-up aggregator's is.
    let back = start(config(addr)).await;
    drop(reservation);
    assert!(
        client.wait_drained(Duration::from_secs(20)).await,
        "{:?}",
        client.stats()
    );
    let s = client.stats()[0].1;
    assert_eq!(
        (s.delivered, s.duplicates, s.spool_len, s.dropped_oldest),
        (5, 0, 0, 3),
        "{s:?}"
    );
    let nodes = http.get(&format!("{}/v1/nodes", back.base())).await.json();
    assert_eq!(
        nodes["nodes"][0]["seq"], 8,
        "last applied batch is the newest"
    );
    assert_eq!(
        workload(&http, &back.base(), "ml/Deployment/llm").await,
        live_view
    );
    let m = String::from_utf8(
        http.get(&format!("{}/metrics", back.base()))
            .await
            .body
            .to_vec(),
    )
    .unwrap();
    assert!(
        m.contains(r#"headroom_aggregator_batches_total{result="accepted"} 5"#),
        "{m}"
    );
    // Replaying out of order would have been refused as duplicates (seq 4 after 8): none were.
    assert!(!m.contains(r#"result="duplicate""#));
    back.stop().await;
    alive.stop().await;
}

#[tokio::test]
async fn spool_survives_a_client_restart() {
    let (reservation, addr) = reserve_addr();
    let cfg = client_config("node-b", vec![format!("http://{addr}")]);
    let client = HintClient::start(cfg.clone()).unwrap();
    for i in 1..=3 {
        client
            .submit(vec![hint("ml", "llm", Resource::Cpu, 1.0, i as f64)])
            .await
            .unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while client.stats()[0].1.spool_len < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            client.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Once shut down, the old client sends nothing more: every batch is left to the new one,
    // even though the aggregator comes back while the old client's worker is mid-retry.
    client.shutdown().await;
    let agg = start(config(addr)).await;
    drop(reservation);
    let client = HintClient::start(cfg).unwrap();
    assert_eq!(
        client
            .submit(vec![hint("ml", "llm", Resource::Cpu, 1.0, 9.0)])
            .await
            .unwrap(),
        4
    );
    assert!(
        client.wait_drained(Duration::from_secs(20)).await,
        "{:?}",
        client.stats()
    );
    let s = client.stats()[0].1;
    assert_eq!(
        (s.delivered, s.duplicates, s.dropped_oldest),
        (4, 0, 0),
        "{s:?}"
    );
    let http = Http::new();
    let w = workload(&http, &agg.base(), "ml/Deployment/llm").await;
    assert_eq!(w["resources"][0]["demand"], 9.0);
    agg.stop().await;
}

/// Reads one full HTTP/1 request (headers and Content-Length body); `None` if the peer closed
/// the connection first.
async fn read_request(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 1 << 16];
    let mut req = Vec::new();
    loop {
        let k = stream.read(&mut buf).await.unwrap();
        if k == 0 {
            return None;
        }
        req.extend_from_slice(&buf[..k]);
        if let Some(end) = req.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&req[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if req.len() >= end + 4 + len {
                return Some(req);
            }
        }
    }
}

/// Forwards connections to `target`; for the first `drop_first` connections it delivers the
/// request but throws the response away, as a network failure after the server acted would.
async fn lossy_proxy(target: SocketAddr, drop_first: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = l.accept().await {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut outbound = TcpStream::connect(target).await.unwrap();
                if n < drop_first {
                    let Some(req) = read_request(&mut inbound).await else {
                        return;
                    };
                    outbound.write_all(&req).await.unwrap();
                    let mut buf = vec![0u8; 1 << 16];
                    let k = outbound.read(&mut buf).await.unwrap();
                    assert!(k > 0, "aggregator answered nothing");
                    // Response read and discarded; the client sees the connection die.
                    drop(inbound);
                } else {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    addr
}

/// An aggregator that hangs: it reads every request, reports it, and never answers.
async fn silent_server() -> (SocketAddr, mpsc::UnboundedReceiver<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                if read_request(&mut conn).await.is_some() {
                    let _ = tx.send(());
                }
                // Hold the connection until the client gives up on it.
                let mut buf = [0u8; 1024];
                while matches!(conn.read(&mut buf).await, Ok(k) if k > 0) {}
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn shutdown_abandons_an_attempt_in_flight_and_keeps_the_batches() {
    let (addr, mut requests) = silent_server().await;
    let mut cfg = client_config("node-e", vec![format!("http://{addr}")]);
    // Far beyond the test's deadlines: only abandoning the attempt lets a shutdown finish.
    cfg.request_timeout = Duration::from_secs(3600);
    let within = Duration::from_secs(20);

    // A fresh batch whose attempt hangs is spooled, not lost.
    let client = HintClient::start(cfg.clone()).unwrap();
    client
        .submit(vec![hint("ml", "llm", Resource::Gpu, 2.0, 1.0)])
        .await
        .unwrap();
    tokio::time::timeout(within, requests.recv())
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(within, client.shutdown())
        .await
        .expect("shutdown waited on a hung attempt");

    // The next client replays it from the spool; that attempt hangs too, and a batch submitted
    // meanwhile waits behind it. Shutting down keeps both.
    let client = HintClient::start(cfg.clone()).unwrap();
    assert_eq!(client.stats()[0].1.spool_len, 1, "{:?}", client.stats());
    tokio::time::timeout(within, requests.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        client
            .submit(vec![hint("ml", "llm", Resource::Gpu, 2.0, 2.0)])
            .await
            .unwrap(),
        2
    );
    tokio::time::timeout(within, client.shutdown())
        .await
        .expect("shutdown waited on a hung replay");

    let client = HintClient::start(cfg).unwrap();
    let s = client.stats()[0].1;
    assert_eq!(
        (s.spool_len, s.delivered, s.dropped_oldest),
        (2, 0, 0),
        "{s:?}"
    );
    tokio::time::timeout(within, client.shutdown())
        .await
        .expect("shutdown waited on a hung replay");
}

#[tokio::test]
async fn a_replay_after_a_lost_response_is_idempotent() {
    let agg = start(config("127.0.0.1:0".parse().unwrap())).await;
    let proxy = lossy_proxy(agg.http, 1).await;
    let client =
        HintClient::start(client_config("node-c", vec![format!("http://{proxy}")])).unwrap();
    client
        .submit(vec![hint("ml", "llm", Resource::Gpu, 2.0, 3.0)])
        .await
        .unwrap();
    assert!(client.wait_drained(Duration::from_secs(20)).await);
    let s = client.stats()[0].1;
    // The aggregator applied the batch once; the resend was recognised as a replay.
    assert_eq!((s.delivered, s.duplicates), (0, 1), "{s:?}");
    assert!(s.failures >= 1);
    let http = Http::new();
    let m = String::from_utf8(
        http.get(&format!("{}/metrics", agg.base()))
            .await
            .body
            .to_vec(),
    )
    .unwrap();
    assert!(
        m.contains(r#"headroom_aggregator_batches_total{result="accepted"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"headroom_aggregator_batches_total{result="duplicate"} 1"#),
        "{m}"
    );
    assert!(m.contains(r#"headroom_aggregator_hints_total 1"#), "{m}");
    agg.stop().await;
}

#[tokio::test]
async fn permanent_rejections_are_dropped_and_auth_failures_are_kept() {
    let agg = start(config("127.0.0.1:0".parse().unwrap())).await;
    // A node name the schema refuses: 422, never retried, never spooled.
    let bad = HintClient::start(client_config("Not_A_Node", vec![agg.base()])).unwrap();
    bad.submit(vec![]).await.unwrap();
    assert!(bad.wait_drained(Duration::from_secs(10)).await);
    let s = bad.stats()[0].1;
    assert_eq!((s.rejected, s.spooled, s.delivered), (1, 0, 0), "{s:?}");

    // A wrong token: kept in the spool until the operator fixes the token file.
    let cfg = client_config("node-d", vec![agg.base()]);
    let token_file = cfg.token_file.clone().unwrap();
    std::fs::write(&token_file, "wrong\n").unwrap();
    let client = HintClient::start(cfg).unwrap();
    client
        .submit(vec![hint("ml", "llm", Resource::Gpu, 2.0, 3.0)])
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while client.stats()[0].1.spool_len == 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    assert!(client.wait_drained(Duration::from_secs(10)).await);
    assert_eq!(client.stats()[0].1.delivered, 1);
    let http = Http::new();
    assert_eq!(
        workload(&http, &agg.base(), "ml/Deployment/llm").await["nodes"],
        1
    );
    agg.stop().await;
}

#[test]
fn refuses_unusable_endpoints() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _g = rt.enter();
    let dir = tempdir();
    let e = HintClient::start(ClientConfig::new("n", vec![], dir.clone()))
        .err()
        .unwrap();
    assert!(e.to_string().contains("no aggregator endpoint"));
    let e = HintClient::start(ClientConfig::new(
        "n",
        vec!["ftp://x:1".into()],
        dir.clone(),
    ))
    .err()
    .unwrap();
    assert!(e.to_string().contains("ftp://x:1"), "{e}");
    assert!(
        HintClient::start(ClientConfig::new(
            "n",
            vec!["https://x:1".into()],
            dir.clone()
        ))
        .is_ok(),
        "https:// is supported"
    );
    let mut cfg = ClientConfig::new("n", vec!["https://x:1".into()], dir.clone());
    cfg.ca_file = Some(dir.join("no-such-ca.pem"));
    let e = HintClient::start(cfg).err().unwrap();
    assert!(e.to_string().contains("no-such-ca.pem"), "{e}");
    let e = HintClient::start(ClientConfig::new("n", vec!["not a url".into()], dir))
        .err()
        .unwrap();
    assert!(e.to_string().contains("not a url"), "{e}");
}
