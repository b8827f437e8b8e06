//! The agent-side hint sender: numbers each batch, posts it to every configured aggregator
//! endpoint over HTTP/1 (hyper; `https://` endpoints over rustls, see `tls`), retries with exponential backoff and jitter, and while an endpoint
//! is unreachable keeps its batches in a bounded on-disk spool that is replayed in order when the
//! endpoint comes back. Sequence numbers make replays idempotent at the aggregator.
//!
//! Each endpoint has its own worker and spool, so one dead aggregator never delays another. This
//! module never interprets hints and never blocks its caller on the network: `submit` only queues.
//! Workers never outlive their client: once it is dropped or shut down they send nothing more and
//! touch their spool only to keep what was still queued, so a new client can take the spool over.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode, header};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::Rng;
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinHandle;

use crate::schema::{Hint, HintBatch, SCHEMA_V1};

/// How the sender behaves; `ClientConfig::new` fills in the defaults.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Node name stamped on every batch.
    pub node: String,
    /// Base URLs of the aggregators, e.g. `http://aggregator:9470` or `https://aggregator:9470`;
    /// every batch goes to each.
    pub endpoints: Vec<String>,
    /// File holding the bearer token; re-read on every attempt so a rotated token takes effect.
    pub token_file: Option<PathBuf>,
    /// PEM bundle of the CAs trusted for `https://` endpoints; unset trusts the Mozilla roots
    /// compiled into the binary.
    pub ca_file: Option<PathBuf>,
    /// Directory for spools and the sequence counter; created if missing.
    pub spool_dir: PathBuf,
    /// Batches kept per endpoint while it is unreachable; the oldest is dropped beyond this.
    pub spool_max_batches: usize,
    /// The reporting interval, sent along so the aggregator can judge staleness.
    pub interval: Duration,
    pub request_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Quick retries of a fresh batch before it goes to the spool.
    pub direct_attempts: u32,
}

impl ClientConfig {
    pub fn new(node: impl Into<String>, endpoints: Vec<String>, spool_dir: PathBuf) -> Self {
        ClientConfig {
            node: node.into(),
            endpoints,
            token_file: None,
            ca_file: None,
            spool_dir,
            spool_max_batches: 1000,
            interval: Duration::from_secs(1),
            request_timeout: Duration::from_secs(5),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            direct_attempts: 3,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("aggregator endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("no aggregator endpoint configured")]
    NoEndpoint,
    #[error("aggregator TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("spool {path}: {source}")]
    Spool {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode hint batch: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("hint client has shut down")]
    Closed,
}

fn spool_err(path: &Path) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
    move |source| ClientError::Spool {
        path: path.to_owned(),
        source,
    }
}

/// Counters of one endpoint, readable while the client runs.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Batches the aggregator applied.
    pub delivered: AtomicU64,
    /// Batches the aggregator had already applied (a replay after a lost response).
    pub duplicates: AtomicU64,
    /// Batches the aggregator refused for good (malformed, too large); not retried.
    pub rejected: AtomicU64,
    /// Failed attempts (connection errors, timeouts, 5xx, 429, 401).
    pub failures: AtomicU64,
    /// Batches written to the spool.
    pub spooled: AtomicU64,
    /// Oldest spooled batches dropped because the spool was full.
    pub dropped_oldest: AtomicU64,
    /// Batches currently in the spool.
    pub spool_len: AtomicU64,
    /// Batches submitted but not yet delivered, rejected, or spooled.
    pub queued: AtomicU64,
    /// Why the last failed attempt failed, naming the endpoint; cleared by a delivery.
    last_error: std::sync::Mutex<Option<String>>,
}

/// A plain copy of [`EndpointStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    pub delivered: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub failures: u64,
    pub spooled: u64,
    pub dropped_oldest: u64,
    pub spool_len: u64,
    pub queued: u64,
}

impl EndpointStats {
    /// Why the latest attempt failed, if it did (e.g. a TLS certificate the client does not trust).
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_last_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            delivered: l(&self.delivered),
            duplicates: l(&self.duplicates),
            rejected: l(&self.rejected),
            failures: l(&self.failures),
            spooled: l(&self.spooled),
            dropped_oldest: l(&self.dropped_oldest),
            spool_len: l(&self.spool_len),
            queued: l(&self.queued),
        }
    }
}

/// A bounded, ordered directory of serialized batches: `<n>.json`, `n` increasing.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max: usize,
    entries: VecDeque<(u64, PathBuf)>,
    next: u64,
}

impl Spool {
    /// Opens (creating if needed) a spool and picks up what an earlier run left there.
    pub fn open(dir: PathBuf, max: usize) -> Result<Self, ClientError> {
        std::fs::create_dir_all(&dir).map_err(spool_err(&dir))?;
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(spool_err(&dir))? {
            let entry = entry.map_err(spool_err(&dir))?;
            let path = entry.path();
            let name = entry.file_name();
            let Some(n) = name
                .to_str()
                .and_then(|s| s.strip_suffix(".json"))
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            entries.push((n, path));
        }
        entries.sort();
        let next = entries.last().map_or(1, |(n, _)| n + 1);
        Ok(Spool {
            dir,
            max: max.max(1),
            entries: entries.into(),
            next,
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends a batch; returns how many old batches were dropped to make room.
    pub fn push(&mut self, body: &[u8]) -> Result<u64, ClientError> {
        let mut dropped = 0;
        while self.entries.len() >= self.max {
            if let Some((_, old)) = self.entries.pop_front() {
                std::fs::remove_file(&old).map_err(spool_err(&old))?;
                dropped += 1;
            }
        }
        let path = self.dir.join(format!("{:020}.json", self.next));
        let tmp = self.dir.join(format!("{:020}.tmp", self.next));
        // Write-then-rename: a crash mid-write leaves a .tmp the next open ignores, never a torn batch.
        std::fs::write(&tmp, body).map_err(spool_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(spool_err(&path))?;
        self.entries.push_back((self.next, path));
        self.next += 1;
        Ok(dropped)
    }

    /// The oldest batch, if any.
    pub fn front(&self) -> Result<Option<Bytes>, ClientError> {
        match self.entries.front() {
            None => Ok(None),
            Some((_, path)) => std::fs::read(path)
                .map(|b| Some(Bytes::from(b)))
                .map_err(spool_err(path)),
        }
    }

    pub fn pop(&mut self) -> Result<(), ClientError> {
        if let Some((_, path)) = self.entries.pop_front() {
            std::fs::remove_file(&path).map_err(spool_err(&path))?;
        }
        Ok(())
    }
}

/// Epoch and last sequence number, persisted so a restarted agent continues its numbering.
#[derive(Debug)]
struct Sequence {
    path: PathBuf,
    epoch: u64,
    seq: u64,
}

impl Sequence {
    fn load(dir: &Path) -> Result<Self, ClientError> {
        let path = dir.join("sequence");
        let parsed = std::fs::read_to_string(&path).ok().and_then(|s| {
            let mut it = s.split_whitespace().map(|x| x.parse::<u64>());
            match (it.next(), it.next()) {
                (Some(Ok(e)), Some(Ok(q))) if e != 0 => Some((e, q)),
                _ => None,
            }
        });
        let (epoch, seq) = match parsed {
            Some(v) => v,
            // A new epoch tells the aggregator that a lower seq than it saw before is fresh.
            None => (rand::rng().random_range(1..u64::MAX >> 11), 0),
        };
        Ok(Sequence { path, epoch, seq })
    }

    fn next(&mut self) -> Result<u64, ClientError> {
        self.seq += 1;
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, format!("{} {}\n", self.epoch, self.seq)).map_err(spool_err(&tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(spool_err(&self.path))?;
        Ok(self.seq)
    }
}

struct Endpoint {
    url: String,
    tx: mpsc::UnboundedSender<Bytes>,
    stats: Arc<EndpointStats>,
}

/// Sends hint batches to one or more aggregators.
pub struct HintClient {
    node: String,
    interval_s: f64,
    sequence: Mutex<Sequence>,
    endpoints: Vec<Endpoint>,
    /// Set to `true` (or dropped with the client) to stop every worker.
    stop: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for HintClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HintClient")
            .field("node", &self.node)
            .field(
                "endpoints",
                &self
                    .endpoints
                    .iter()
                    .map(|e| e.url.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn endpoint_dir_name(url: &str) -> String {
    url.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl HintClient {
    /// Validates the endpoints, opens the spools and starts one worker per endpoint.
    pub fn start(cfg: ClientConfig) -> Result<Self, ClientError> {
        if cfg.endpoints.is_empty() {
            return Err(ClientError::NoEndpoint);
        }
        std::fs::create_dir_all(&cfg.spool_dir).map_err(spool_err(&cfg.spool_dir))?;
        let sequence = Sequence::load(&cfg.spool_dir)?;
        let http = http_client(&cfg)?;
        let (stop, _) = watch::channel(false);
        let mut endpoints = Vec::with_capacity(cfg.endpoints.len());
        let mut workers = Vec::with_capacity(cfg.endpoints.len());
        for raw in &cfg.endpoints {
            let base = raw.trim_end_matches('/');
            let uri: hyper::Uri =
                format!("{base}/v1/hints")
                    .parse()
                    .map_err(|e| ClientError::Endpoint {
                        endpoint: raw.clone(),
                        reason: format!("not a URL: {e}"),
                    })?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) {
                return Err(ClientError::Endpoint {
                    endpoint: raw.clone(),
                    reason: "only http:// and https:// URLs are supported".into(),
                });
            }
            let spool = Spool::open(
                cfg.spool_dir.join(endpoint_dir_name(base)),
                cfg.spool_max_batches,
            )?;
            let stats = Arc::new(EndpointStats::default());
            stats.spool_len.store(spool.len() as u64, Ordering::Relaxed);
            let (tx, rx) = mpsc::unbounded_channel();
            let worker = Worker {
                url: base.to_owned(),
                uri,
                http: http.clone(),
                token_file: cfg.token_file.clone(),
                spool,
                stats: stats.clone(),
                cfg: cfg.clone(),
                failures_in_row: 0,
            };
            workers.push(tokio::spawn(worker.run(rx, stop.subscribe())));
            endpoints.push(Endpoint {
                url: base.to_owned(),
                tx,
                stats,
            });
        }
        Ok(HintClient {
            node: cfg.node,
            interval_s: cfg.interval.as_secs_f64(),
            sequence: Mutex::new(sequence),
            endpoints,
            stop,
            workers,
        })
    }

    /// Stops sending and waits until every worker has stopped. An attempt in flight is abandoned
    /// (its batch stays spooled; a replay is idempotent) and batches still queued are spooled,
    /// so a client started afterwards on the same spool directory picks all of them up without
    /// racing a worker of this one. Dropping the client stops the workers the same way but does
    /// not wait for them.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        for worker in self.workers {
            if let Err(e) = worker.await {
                tracing::error!(error = %e, "hint client worker ended abnormally");
            }
        }
    }

    /// Numbers the hints as the node's next batch and queues it for every endpoint. Returns the
    /// sequence number. Never waits on the network.
    pub async fn submit(&self, hints: Vec<Hint>) -> Result<u64, ClientError> {
        let mut seq = self.sequence.lock().await;
        let n = seq.next()?;
        let batch = HintBatch {
            schema: SCHEMA_V1.to_owned(),
            node: self.node.clone(),
            epoch: seq.epoch,
            seq: n,
            time: unix_now(),
            interval_s: self.interval_s,
            hints,
        };
        let body = Bytes::from(serde_json::to_vec(&batch)?);
        for ep in &self.endpoints {
            ep.stats.queued.fetch_add(1, Ordering::Relaxed);
            if ep.tx.send(body.clone()).is_err() {
                ep.stats.queued.fetch_sub(1, Ordering::Relaxed);
                return Err(ClientError::Closed);
            }
        }
        Ok(n)
    }

    /// Why the latest attempt to each endpoint failed (`None` after a delivery), in
    /// configuration order.
    pub fn last_errors(&self) -> Vec<(String, Option<String>)> {
        self.endpoints
            .iter()
            .map(|e| (e.url.clone(), e.stats.last_error()))
            .collect()
    }

    /// Per-endpoint counters, in configuration order.
    pub fn stats(&self) -> Vec<(String, StatsSnapshot)> {
        self.endpoints
            .iter()
            .map(|e| (e.url.clone(), e.stats.snapshot()))
            .collect()
    }

    /// Waits until every endpoint has nothing queued or spooled, or `timeout` passes. Returns
    /// whether everything was delivered.
    pub async fn wait_drained(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let idle = self.endpoints.iter().all(|e| {
                let s = e.stats.snapshot();
                s.queued == 0 && s.spool_len == 0
            });
            if idle {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

type Http = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Resolves once the client has been shut down or dropped.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the sender, i.e. the client, is gone: that stops the worker too.
    let _ = stop.wait_for(|stopping| *stopping).await;
}

/// One pooled HTTP/1 client for every endpoint; `https://` URLs go through rustls.
fn http_client(cfg: &ClientConfig) -> Result<Http, ClientError> {
    let tls = crate::tls::client_config(cfg.ca_file.as_deref())?;
    let https = crate::tls::https_connector(tls, cfg.request_timeout);
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

/// An error with its causes: hyper's own message ("client error (Connect)") says nothing of the
/// certificate or the refused connection underneath.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = c.source();
    }
    out
}

enum Outcome {
    Delivered {
        duplicate: bool,
    },
    /// The aggregator will never accept this batch; sending it again cannot help.
    Rejected(String),
    /// Worth retrying, after at least this long if the server said so.
    Retry(String, Option<Duration>),
}

struct Worker {
    url: String,
    uri: hyper::Uri,
    http: Http,
    token_file: Option<PathBuf>,
    spool: Spool,
    stats: Arc<EndpointStats>,
    cfg: ClientConfig,
    failures_in_row: u32,
}

impl Worker {
    fn backoff(&self, hint: Option<Duration>) -> Duration {
        let exp = self
            .cfg
            .backoff_base
            .saturating_mul(1u32 << self.failures_in_row.min(16));
        let cap = exp.min(self.cfg.backoff_max);
        // "Equal jitter": never below half the step, so a fleet that failed together spreads out
        // without any node hammering the aggregator.
        let half = cap / 2;
        let jitter = half.mul_f64(rand::rng().random_range(0.0..=1.0));
        (half + jitter).max(hint.unwrap_or_default())
    }

    async fn send(&self, body: &Bytes) -> Outcome {
        let mut req = Request::post(self.uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.clone()));
        if let (Ok(r), Some(path)) = (&mut req, &self.token_file) {
            match tokio::fs::read_to_string(path).await {
                Ok(t) => {
                    let token = t
                        .lines()
                        .map(str::trim)
                        .find(|l| !l.is_empty() && !l.starts_with('#'));
                    if let Some(v) = token
                        .and_then(|t| header::HeaderValue::from_str(&format!("Bearer {t}")).ok())
                    {
                        r.headers_mut().insert(header::AUTHORIZATION, v);
                    }
                }
                Err(e) => {
                    return Outcome::Retry(format!("token file {}: {e}", path.display()), None);
                }
            }
        }
        let req = match req {
            Ok(r) => r,
            Err(e) => return Outcome::Rejected(format!("cannot build request: {e}")),
        };
        let resp =
            match tokio::time::timeout(self.cfg.request_timeout, self.http.request(req)).await {
                Err(_) => return Outcome::Retry("request timed out".into(), None),
                Ok(Err(e)) => {
                    return Outcome::Retry(format!("request failed: {}", error_chain(&e)), None);
                }
                Ok(Ok(r)) => r,
            };
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = match tokio::time::timeout(self.cfg.request_timeout, resp.into_body().collect())
            .await
        {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) => return Outcome::Retry(format!("reading response: {e}"), None),
            Err(_) => return Outcome::Retry("response body timed out".into(), None),
        };
        let text = String::from_utf8_lossy(&body)
            .chars()
            .take(300)
            .collect::<String>();
        if status.is_success() {
            let duplicate = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("duplicate").and_then(|d| d.as_bool()))
                .unwrap_or(false);
            return Outcome::Delivered { duplicate };
        }
        match status {
            // A wrong or rotated token is an operator's fix away: keep the batch.
            StatusCode::UNAUTHORIZED
            | StatusCode::FORBIDDEN
            | StatusCode::REQUEST_TIMEOUT
            | StatusCode::TOO_MANY_REQUESTS => {
                Outcome::Retry(format!("HTTP {status}: {text}"), retry_after)
            }
            s if s.is_client_error() => Outcome::Rejected(format!("HTTP {status}: {text}")),
            _ => Outcome::Retry(format!("HTTP {status}: {text}"), retry_after),
        }
    }

    fn endpoint_error(&self, reason: &str) -> String {
        ClientError::Endpoint {
            endpoint: self.url.clone(),
            reason: reason.to_owned(),
        }
        .to_string()
    }

    fn record_failure(&self, reason: &str) {
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        self.stats.set_last_error(Some(self.endpoint_error(reason)));
    }

    fn record_delivery(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Delivered { duplicate: false } => {
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                self.stats.set_last_error(None);
            }
            Outcome::Delivered { duplicate: true } => {
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                self.stats.set_last_error(None);
            }
            Outcome::Rejected(reason) => {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                self.stats.set_last_error(Some(self.endpoint_error(reason)));
                tracing::warn!(endpoint = %self.url, %reason, "aggregator refused a hint batch; dropping it");
            }
            Outcome::Retry(..) => {}
        }
    }

    fn spool_push(&mut self, body: &[u8]) {
        match self.spool.push(body) {
            Ok(dropped) => {
                self.stats.spooled.fetch_add(1, Ordering::Relaxed);
                if dropped > 0 {
                    self.stats
                        .dropped_oldest
                        .fetch_add(dropped, Ordering::Relaxed);
                    tracing::warn!(endpoint = %self.url, dropped, "spool full; dropped the oldest batches");
                }
            }
            Err(e) => {
                // Without a spool the batch is lost; the next interval re-sends the node's state.
                self.stats.dropped_oldest.fetch_add(1, Ordering::Relaxed);
                tracing::error!(endpoint = %self.url, error = %e, "cannot spool a hint batch; dropping it");
            }
        }
        self.stats
            .spool_len
            .store(self.spool.len() as u64, Ordering::Relaxed);
    }

    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Bytes>,
        mut stop: watch::Receiver<bool>,
    ) {
        // `biased`: once the client is gone no attempt starts, and one in flight is abandoned
        // even when its response is ready in the same poll.
        loop {
            if self.spool.is_empty() {
                let body = tokio::select! {
                    biased;
                    _ = stopped(&mut stop) => break,
                    msg = rx.recv() => match msg {
                        Some(body) => body,
                        None => break,
                    },
                };
                self.deliver_fresh(body, &mut stop).await;
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            // Anything that arrives while a spool exists queues behind it, keeping order.
            while let Ok(body) = rx.try_recv() {
                self.spool_push(&body);
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            }
            let head = match self.spool.front() {
                Ok(Some(b)) => b,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(endpoint = %self.url, error = %e, "unreadable spooled batch; discarding it");
                    let _ = self.spool.pop();
                    continue;
                }
            };
            let outcome = tokio::select! {
                biased;
                _ = stopped(&mut stop) => break,
                outcome = self.send(&head) => outcome,
            };
            match outcome {
                Outcome::Retry(reason, hint) => {
                    self.record_failure(&reason);
                    let wait = self.backoff(hint);
                    self.failures_in_row = self.failures_in_row.saturating_add(1);
                    tracing::debug!(endpoint = %self.url, %reason, wait_ms = wait.as_millis() as u64, spooled = self.spool.len(), "aggregator unreachable; keeping the spool");
                    let deadline = tokio::time::Instant::now() + wait;
                    let stopping = loop {
                        tokio::select! {
                            biased;
                            _ = stopped(&mut stop) => break true,
                            _ = tokio::time::sleep_until(deadline) => break false,
                            msg = rx.recv() => match msg {
                                Some(body) => {
                                    self.spool_push(&body);
                                    self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                                }
                                None => break true,
                            }
                        }
                    };
                    if stopping {
                        break;
                    }
                }
                other => {
                    self.failures_in_row = 0;
                    self.record_delivery(&other);
                    if let Err(e) = self.spool.pop() {
                        tracing::error!(endpoint = %self.url, error = %e, "cannot remove a replayed batch from the spool");
                    }
                    self.stats
                        .spool_len
                        .store(self.spool.len() as u64, Ordering::Relaxed);
                }
            }
        }
        // The client is gone: what it queued is kept for the next client, not sent.
        rx.close();
        while let Ok(body) = rx.try_recv() {
            self.spool_push(&body);
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Sends a batch that was never spooled, retrying a few times; spools it if that fails or
    /// the client stops meanwhile (it may have been applied already: a replay is idempotent).
    async fn deliver_fresh(&mut self, body: Bytes, stop: &mut watch::Receiver<bool>) {
        for attempt in 0..self.cfg.direct_attempts.max(1) {
            let outcome = tokio::select! {
                biased;
                _ = stopped(stop) => break,
                outcome = self.send(&body) => outcome,
            };
            match outcome {
                Outcome::Retry(reason, hint) => {
                    self.record_failure(&reason);
                    if attempt + 1 == self.cfg.direct_attempts.max(1) {
                        tracing::warn!(endpoint = %self.url, %reason, "cannot deliver hints; spooling them until the aggregator takes them");
                        break;
                    }
                    let wait = self.backoff(hint);
                    self.failures_in_row = self.failures_in_row.saturating_add(1);
                    tokio::select! {
                        biased;
                        _ = stopped(stop) => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                other => {
                    self.failures_in_row = 0;
                    self.record_delivery(&other);
                    return;
                }
            }
        }
        self.spool_push(&body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spool_keeps_order_bounds_size_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path().join("ep"), 3).unwrap();
        for i in 0..5u8 {
            let dropped = s.push(&[i]).unwrap();
            assert_eq!(dropped, u64::from(i >= 3));
        }
        assert_eq!(s.len(), 3);
        assert_eq!(s.front().unwrap().unwrap().as_ref(), &[2]);
        drop(s);
        let mut s = Spool::open(dir.path().join("ep"), 3).unwrap();
        let mut seen = Vec::new();
        while let Some(b) = s.front().unwrap() {
            seen.push(b[0]);
            s.pop().unwrap();
        }
        assert_eq!(seen, vec![2, 3, 4]);
        s.push(&[9]).unwrap();
        assert_eq!(s.front().unwrap().unwrap().as_ref(), &[9]);
    }

    #[test]
    fn sequence_persists_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Sequence::load(dir.path()).unwrap();
        assert_eq!(a.next().unwrap(), 1);
        assert_eq!(a.next().unwrap(), 2);
        let mut b = Sequence::load(dir.path()).unwrap();
        assert_eq!(b.epoch, a.epoch);
        assert_eq!(b.next().unwrap(), 3);
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ClientConfig::new("n", vec!["http://127.0.0.1:1".into()], dir.path().into());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let mut w = Worker {
            url: "x".into(),
            uri: "http://127.0.0.1:1/v1/hints".parse().unwrap(),
            http: http_client(&cfg).unwrap(),
            token_file: None,
            spool: Spool::open(dir.path().join("s"), 2).unwrap(),
            stats: Arc::default(),
            cfg,
            failures_in_row: 0,
        };
        let b0 = w.backoff(None);
        assert!(b0 >= Duration::from_millis(50) && b0 <= Duration::from_millis(100));
        w.failures_in_row = 3;
        let b3 = w.backoff(None);
        assert!(b3 >= Duration::from_millis(400) && b3 <= Duration::from_millis(800));
        w.failures_in_row = 30;
        assert!(w.backoff(None) <= Duration::from_secs(5));
        assert_eq!(
            w.backoff(Some(Duration::from_secs(9))),
            Duration::from_secs(9)
        );
    }
}
