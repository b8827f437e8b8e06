//! One bounded `GET` of an engine's metrics: a fresh HTTP/1.1 connection, the whole exchange
//! (connect, headers, body) under one deadline, the body read frame by frame and cut off at a
//! size limit, so a hanging or flooding endpoint costs at most the timeout and the limit.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScrapeError {
    #[error("http://{addr}{path}: no answer within {timeout_ms} ms")]
    Timeout {
        addr: SocketAddr,
        path: String,
        timeout_ms: u128,
    },
    #[error("http://{addr}{path}: body larger than {limit} bytes; cut off")]
    TooLarge {
        addr: SocketAddr,
        path: String,
        limit: usize,
    },
    #[error("http://{addr}{path}: {message}")]
    Failed {
        addr: SocketAddr,
        path: String,
        message: String,
    },
}

impl ScrapeError {
    /// A short stable name for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            ScrapeError::Timeout { .. } => "timeout",
            ScrapeError::TooLarge { .. } => "too_large",
            ScrapeError::Failed { .. } => "failed",
        }
    }
}

/// Fetches `http://addr{path}`; the body must be UTF-8 text of at most `limit` bytes.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    limit: usize,
) -> Result<String, ScrapeError> {
    let failed = |message: String| ScrapeError::Failed {
        addr,
        path: path.to_string(),
        message,
    };
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| failed(format!("connect: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| failed(format!("handshake: {e}")))?;
        // The connection task ends with the exchange (or with this future, when it times out).
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let _abort = AbortOnDrop(driver);
        let req = Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .header(hyper::header::ACCEPT, "text/plain;version=0.0.4")
            .header(hyper::header::ACCEPT_ENCODING, "identity")
            .header(hyper::header::CONNECTION, "close")
            .header(hyper::header::USER_AGENT, "headroom-agent")
            .body(Empty::<Bytes>::new())
            .map_err(|e| failed(format!("request: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| failed(format!("request: {e}")))?;
        if !resp.status().is_success() {
            return Err(failed(format!("status {}", resp.status())));
        }
        let declared = resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let too_large = || ScrapeError::TooLarge {
            addr,
            path: path.to_string(),
            limit,
        };
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::with_capacity(declared.unwrap_or(16 * 1024) as usize);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| failed(format!("body: {e}")))?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > limit {
                    return Err(too_large());
                }
                buf.extend_from_slice(&data);
            }
        }
        String::from_utf8(buf).map_err(|_| failed("body is not UTF-8 text".into()))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(ScrapeError::Timeout {
            addr,
            path: path.to_string(),
            timeout_ms: timeout.as_millis(),
        }),
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers every connection with `reply` (after reading the request).
    async fn server(reply: Vec<u8>, hang: bool) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let reply = reply.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    if hang {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    let _ = s.write_all(&reply).await;
                    // Flooding replies end when the client hangs up.
                    while !reply.is_empty() && s.write_all(&[b'x'; 65536]).await.is_ok() {}
                });
            }
        });
        addr
    }

    #[tokio::test(flavor = "current_thread")]
    async fn answers_limits_and_timeouts() {
        let ok = server(
            b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\nllamacpp:x 1"
                .to_vec(),
            false,
        )
        .await;
        let t = Duration::from_millis(500);
        assert_eq!(
            get(ok, "/metrics", t, 1024).await.as_deref(),
            Ok("llamacpp:x 1")
        );
        assert_eq!(
            get(ok, "/metrics", t, 4).await.map_err(|e| e.kind()),
            Err("too_large")
        );
        let flood = server(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec(),
            false,
        )
        .await;
        let started = std::time::Instant::now();
        assert_eq!(
            get(flood, "/metrics", t, 1 << 20)
                .await
                .map_err(|e| e.kind()),
            Err("too_large")
        );
        assert!(started.elapsed() < t);
        let hang = server(Vec::new(), true).await;
        let started = std::time::Instant::now();
        assert_eq!(
            get(hang, "/metrics", t, 1024).await.map_err(|e| e.kind()),
            Err("timeout")
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        let garbage = server(b"\x00\x01garbage\r\n\r\n".to_vec(), false).await;
        assert_eq!(
            get(garbage, "/metrics", t, 1024)
                .await
                .map_err(|e| e.kind()),
            Err("failed")
        );
    }
}
