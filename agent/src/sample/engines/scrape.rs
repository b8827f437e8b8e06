//! Bounded `GET`s of one engine's metrics over a kept-alive HTTP/1.1 connection: the whole
//! exchange (connect when needed, headers, body) under one deadline, the body read frame by
//! frame into a buffer reused from scrape to scrape and cut off at a size limit, so a hanging or
//! flooding endpoint costs at most the timeout and the limit, and a healthy one costs neither a
//! new connection nor fresh memory each interval.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
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

/// One endpoint's connection and body buffer. A connection is kept only after an exchange
/// that completed; a timeout, an error or a cut-off body drops it, and the next scrape dials
/// again.
#[derive(Default)]
pub struct Client {
    conn: Option<Conn>,
    body: String,
}

struct Conn {
    sender: SendRequest<Empty<Bytes>>,
    _driver: AbortOnDrop,
}

const READ_BUFFER_BYTES: usize = 32 * 1024;

/// A buffer this much larger than the last body (and than 64 KiB) is given back.
const SHRINK_FACTOR: usize = 4;

impl Client {
    /// Fetches `http://addr{path}` into [`Client::text`]; the body must be UTF-8 text of at most
    /// `limit` bytes.
    pub async fn get(
        &mut self,
        addr: SocketAddr,
        path: &str,
        timeout: Duration,
        limit: usize,
    ) -> Result<(), ScrapeError> {
        let mut buf = std::mem::take(&mut self.body).into_bytes();
        buf.clear();
        let kept = self.conn.take();
        let work = async {
            let reused = kept.is_some();
            let mut conn = match kept {
                Some(c) => c,
                None => connect(addr, path).await?,
            };
            match exchange(&mut conn, &mut buf, addr, path, limit).await {
                Ok(keep) => Ok(keep.then_some(conn)),
                // The engine closed an idle kept-alive connection as the request went out.
                Err(Exchange::Unsent(_)) if reused => {
                    let mut conn = connect(addr, path).await?;
                    exchange(&mut conn, &mut buf, addr, path, limit)
                        .await
                        .map(|keep| keep.then_some(conn))
                        .map_err(Exchange::into_error)
                }
                Err(e) => Err(e.into_error()),
            }
        };
        let result = match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(ScrapeError::Timeout {
                addr,
                path: path.to_string(),
                timeout_ms: timeout.as_millis(),
            }),
        };
        let floor = 64 * 1024;
        if buf.capacity() > SHRINK_FACTOR * buf.len().max(floor) {
            buf.shrink_to(buf.len().max(floor));
        }
        let kept = match result {
            Ok(kept) => kept,
            Err(e) => {
                buf.clear();
                self.body = String::from_utf8(buf).unwrap_or_default();
                return Err(e);
            }
        };
        match String::from_utf8(buf) {
            Ok(text) => {
                self.body = text;
                self.conn = kept;
                Ok(())
            }
            Err(e) => {
                let mut buf = e.into_bytes();
                buf.clear();
                self.body = String::from_utf8(buf).unwrap_or_default();
                Err(failed(addr, path, "body is not UTF-8 text".into()))
            }
        }
    }

    /// The body of the last successful [`Client::get`] (empty after a failed one).
    pub fn text(&self) -> &str {
        &self.body
    }

    /// Whether a connection is kept for the next scrape.
    pub fn connected(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| !c.sender.is_closed())
    }
}

fn failed(addr: SocketAddr, path: &str, message: String) -> ScrapeError {
    ScrapeError::Failed {
        addr,
        path: path.to_string(),
        message,
    }
}

async fn connect(addr: SocketAddr, path: &str) -> Result<Conn, ScrapeError> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| failed(addr, path, format!("connect: {e}")))?;
    let _ = stream.set_nodelay(true);
    // A small read buffer is reused in place; hyper's adaptive one grows past the allocator's
    // mmap threshold on an 80 KB body and costs fresh pages on every scrape.
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(READ_BUFFER_BYTES)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| failed(addr, path, format!("handshake: {e}")))?;
    // The connection task lives as long as the connection is kept.
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Conn {
        sender,
        _driver: AbortOnDrop(driver),
    })
}

enum Exchange {
    /// The request never reached the engine (its connection was closed): safe to retry.
    Unsent(ScrapeError),
    Failed(ScrapeError),
}

impl Exchange {
    fn into_error(self) -> ScrapeError {
        match self {
            Exchange::Unsent(e) | Exchange::Failed(e) => e,
        }
    }
}

/// One request and its body into `buf`; `Ok(true)` when the connection may be reused.
async fn exchange(
    conn: &mut Conn,
    buf: &mut Vec<u8>,
    addr: SocketAddr,
    path: &str,
    limit: usize,
) -> Result<bool, Exchange> {
    let fail = |m: String| Exchange::Failed(failed(addr, path, m));
    if conn.sender.ready().await.is_err() {
        return Err(Exchange::Unsent(failed(
            addr,
            path,
            "connection closed".into(),
        )));
    }
    let req = Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::ACCEPT, "text/plain;version=0.0.4")
        .header(hyper::header::ACCEPT_ENCODING, "identity")
        .header(hyper::header::USER_AGENT, "headroom-agent")
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail(format!("request: {e}")))?;
    let resp = match conn.sender.send_request(req).await {
        Ok(r) => r,
        Err(e) if e.is_canceled() || e.is_closed() => {
            return Err(Exchange::Unsent(failed(
                addr,
                path,
                format!("request: {e}"),
            )));
        }
        Err(e) => return Err(fail(format!("request: {e}"))),
    };
    if !resp.status().is_success() {
        return Err(fail(format!("status {}", resp.status())));
    }
    let declared = resp
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || {
        Exchange::Failed(ScrapeError::TooLarge {
            addr,
            path: path.to_string(),
            limit,
        })
    };
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    buf.reserve(declared.unwrap_or(16 * 1024) as usize);
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| fail(format!("body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(too_large());
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(!conn.sender.is_closed())
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
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
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

    async fn get(
        addr: SocketAddr,
        path: &str,
        timeout: Duration,
        limit: usize,
    ) -> Result<String, ScrapeError> {
        let mut c = Client::default();
        c.get(addr, path, timeout, limit).await?;
        Ok(c.text().to_string())
    }

    /// A keep-alive server answering each request on a connection with `body`, closing the
    /// connection after `per_conn` answers (silently, as an idle timeout would); counts accepts.
    async fn keep_alive_server(
        body: &'static str,
        per_conn: usize,
    ) -> (SocketAddr, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let accepts = Arc::new(AtomicUsize::new(0));
        let counted = accepts.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    for _ in 0..per_conn {
                        let mut req = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => req.extend_from_slice(&buf[..n]),
                            }
                        }
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepts)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn keeps_the_connection_and_redials_a_closed_one() {
        let t = Duration::from_millis(500);
        let (addr, accepts) = keep_alive_server("llamacpp:x 1", usize::MAX).await;
        let mut c = Client::default();
        for _ in 0..5 {
            c.get(addr, "/metrics", t, 1024).await.expect("scrape");
            assert_eq!(c.text(), "llamacpp:x 1");
        }
        assert_eq!(
            accepts.load(Ordering::SeqCst),
            1,
            "one connection for five scrapes"
        );
        assert!(c.connected());

        // An engine that drops the connection after every answer still answers every scrape.
        let (addr, accepts) = keep_alive_server("vllm:y 2", 1).await;
        let mut c = Client::default();
        for _ in 0..3 {
            c.get(addr, "/metrics", t, 1024).await.expect("scrape");
            assert_eq!(c.text(), "vllm:y 2");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepts.load(Ordering::SeqCst), 3);

        // A body over the limit drops the connection and leaves no text behind.
        let (addr, accepts) = keep_alive_server("vllm:y 2", usize::MAX).await;
        let mut c = Client::default();
        c.get(addr, "/metrics", t, 1024).await.expect("scrape");
        assert_eq!(
            c.get(addr, "/metrics", t, 4).await.map_err(|e| e.kind()),
            Err("too_large")
        );
        assert_eq!(c.text(), "");
        assert!(!c.connected());
        c.get(addr, "/metrics", t, 1024).await.expect("scrape");
        assert_eq!(accepts.load(Ordering::SeqCst), 2);
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
