//! `headroom-aggregator`: the cluster-wide hint service. Agents post versioned scale hints (the
//! schema, its validation and the agent-side sender live in `headroom-protocol`); the aggregator
//! merges them per workload across nodes, expires silent nodes and computes desired replicas at a
//! configured risk (`merge`), and serves the answer as a JSON API with an OpenAPI document,
//! Prometheus series (`http`, `metrics`) and a KEDA external scaler (`keda`). The agent never
//! depends on this crate: only the `headroom` binary links both.
//!
//! The aggregator holds soft state only: everything it knows is re-sent by agents each interval,
//! so it never writes to disk, never needs a shared store between replicas, and a restart loses
//! nothing the next interval does not bring back.

pub mod external_metrics;
pub mod http;
pub mod keda;
pub mod merge;
pub mod metrics;
pub mod page;
pub mod sched;
pub mod state;
pub mod uri;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

pub use merge::MergePolicy;

/// Time slice the scaler thread asks for: short enough that a waking scaler preempts a busy
/// ingest thread on the same core at once (see `sched`).
const SCALER_SLICE: Duration = Duration::from_micros(100);

/// Command-line flags of `headroom aggregator`.
#[derive(Debug, Clone, clap::Args)]
pub struct AggregatorArgs {
    /// HTTP listen address (hints, JSON API, OpenAPI, metrics, probes).
    #[arg(
        long,
        env = "HEADROOM_AGGREGATOR_LISTEN",
        default_value = "0.0.0.0:9470"
    )]
    pub listen: SocketAddr,
    /// gRPC listen address of the KEDA external scaler.
    #[arg(
        long,
        env = "HEADROOM_AGGREGATOR_GRPC_LISTEN",
        default_value = "0.0.0.0:9471"
    )]
    pub grpc_listen: SocketAddr,
    /// File holding the bearer token(s) agents must present on writes, one per line.
    #[arg(long, env = "HEADROOM_AGGREGATOR_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// Accepted probability that demand exceeds the desired replicas (quantile 1 - risk is used).
    #[arg(long, env = "HEADROOM_AGGREGATOR_RISK", default_value_t = 0.1)]
    pub risk: f64,
    /// Resources whose merged forecast confidence is below this keep their current replicas.
    #[arg(
        long,
        env = "HEADROOM_AGGREGATOR_MIN_CONFIDENCE",
        default_value_t = 0.5
    )]
    pub min_confidence: f64,
    /// Seconds after which a silent node drops out of every view.
    #[arg(long, env = "HEADROOM_AGGREGATOR_NODE_TTL", default_value_t = 30.0)]
    pub node_ttl: f64,
    /// Seconds the scalers keep serving a workload's last answer once no node reports it; then
    /// inactive and 0 replicas.
    #[arg(long, env = "HEADROOM_AGGREGATOR_STALE_HOLD", default_value_t = state::DEFAULT_STALE_HOLD_S)]
    pub stale_hold: f64,
    /// Largest accepted POST body, bytes.
    #[arg(long, env = "HEADROOM_AGGREGATOR_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Batches per second each node may post (0 disables the limit).
    #[arg(long, env = "HEADROOM_AGGREGATOR_NODE_RATE", default_value_t = 20.0)]
    pub node_rate: f64,
    /// Burst of batches a node may post at once, e.g. when replaying its spool.
    #[arg(long, env = "HEADROOM_AGGREGATOR_NODE_BURST", default_value_t = 600.0)]
    pub node_burst: f64,
    /// PEM certificate chain (leaf first): serve the HTTP API over HTTPS. Needs --tls-key.
    #[arg(
        long,
        env = "HEADROOM_AGGREGATOR_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(
        long,
        env = "HEADROOM_AGGREGATOR_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// Also serve the Kubernetes external metrics API (and the rest of the HTTP API) over HTTPS
    /// here, for an APIService (`deploy/optional/external-metrics.yaml`); uses --tls-cert and
    /// --tls-key, or a self-signed certificate made at start.
    #[arg(
        long,
        env = "HEADROOM_AGGREGATOR_EXTERNAL_METRICS_LISTEN",
        value_name = "ADDR"
    )]
    pub external_metrics_listen: Option<SocketAddr>,
    /// PEM CA that signs the API server's front-proxy client certificate
    /// (`--requestheader-client-ca-file`): only its clients are served on
    /// --external-metrics-listen. Unset: any client (the values are replica counts).
    #[arg(
        long,
        env = "HEADROOM_AGGREGATOR_EXTERNAL_METRICS_CLIENT_CA",
        value_name = "FILE",
        requires = "external_metrics_listen"
    )]
    pub external_metrics_client_ca: Option<PathBuf>,
    /// Run the KEDA scaler thread under SCHED_FIFO at this priority (1-99; 0: off). Needs
    /// CAP_SYS_NICE; keeps GetMetrics fast when other processes share the aggregator's cores.
    #[arg(
        long,
        env = "HEADROOM_AGGREGATOR_SCALER_RT_PRIORITY",
        default_value_t = 0
    )]
    pub scaler_rt_priority: u8,
}

/// Certificate and key files of the HTTPS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Validated settings of one aggregator.
#[derive(Debug, Clone)]
pub struct AggregatorConfig {
    pub listen: SocketAddr,
    pub grpc_listen: SocketAddr,
    pub tokens: Vec<String>,
    pub policy: MergePolicy,
    pub max_body_bytes: usize,
    pub node_rate: f64,
    pub node_burst: f64,
    /// Serve the HTTP API over TLS with these files; plain HTTP when unset.
    pub tls: Option<TlsFiles>,
    /// SCHED_FIFO priority of the scaler thread; 0 leaves it a normal thread (see `sched`).
    pub scaler_rt_priority: u8,
    /// HTTPS listener for the external metrics API, and the CA its clients must be signed by.
    pub external_metrics: Option<(SocketAddr, Option<PathBuf>)>,
    /// Seconds a silent workload's last answer stands (see `state::Lookup`).
    pub stale_hold_s: f64,
}

/// A setting that cannot work; names the flag.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--token-file {path}: {source}")]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "--token-file {path}: holds no token (one per line; blank lines and # comments are ignored)"
    )]
    NoToken { path: PathBuf },
    #[error("--{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
    #[error(transparent)]
    Tls(#[from] headroom_protocol::tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Reads bearer tokens, one per line.
pub fn read_tokens(path: &std::path::Path) -> Result<Vec<String>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::TokenFile {
        path: path.to_owned(),
        source,
    })?;
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if tokens.is_empty() {
        return Err(ConfigError::NoToken {
            path: path.to_owned(),
        });
    }
    Ok(tokens)
}

impl AggregatorArgs {
    pub fn into_config(self) -> Result<AggregatorConfig, ConfigError> {
        let bad = |flag, reason: &str| ConfigError::Invalid {
            flag,
            reason: reason.to_owned(),
        };
        if !(self.risk > 0.0 && self.risk < 1.0) {
            return Err(bad("risk", "must be in (0, 1)"));
        }
        if !(0.0..=1.0).contains(&self.min_confidence) {
            return Err(bad("min-confidence", "must be in [0, 1]"));
        }
        if !(self.node_ttl.is_finite() && self.node_ttl > 0.0) {
            return Err(bad("node-ttl", "must be > 0 seconds"));
        }
        if !(self.stale_hold.is_finite() && self.stale_hold >= 0.0) {
            return Err(bad("stale-hold", "must be >= 0 seconds"));
        }
        if self.max_body_bytes < 1024 {
            return Err(bad("max-body-bytes", "must be at least 1024"));
        }
        if !(self.node_rate.is_finite() && self.node_rate >= 0.0) {
            return Err(bad("node-rate", "must be >= 0"));
        }
        if !(self.node_burst.is_finite() && self.node_burst >= 1.0) {
            return Err(bad("node-burst", "must be >= 1"));
        }
        if self.scaler_rt_priority > 99 {
            return Err(bad("scaler-rt-priority", "must be 0 (off) to 99"));
        }
        Ok(AggregatorConfig {
            listen: self.listen,
            grpc_listen: self.grpc_listen,
            tokens: read_tokens(&self.token_file)?,
            policy: MergePolicy {
                risk: self.risk,
                min_confidence: self.min_confidence,
                node_ttl_s: self.node_ttl,
            },
            max_body_bytes: self.max_body_bytes,
            node_rate: self.node_rate,
            node_burst: self.node_burst,
            tls: match (self.tls_cert, self.tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
                (None, None) => None,
                _ => return Err(bad("tls-cert", "--tls-cert and --tls-key go together")),
            },
            scaler_rt_priority: self.scaler_rt_priority,
            external_metrics: self
                .external_metrics_listen
                .map(|a| (a, self.external_metrics_client_ca)),
            stale_hold_s: self.stale_hold,
        })
    }
}

/// An aggregator whose listeners are bound but not yet serving.
pub struct Aggregator {
    shared: Arc<state::Shared>,
    scaler_rt_priority: u8,
    http: Arc<http::HttpServer>,
    http_tls: Option<tokio_rustls::TlsAcceptor>,
    http_listener: TcpListener,
    grpc_listener: TcpListener,
    /// The external metrics API's HTTPS listener, when asked for.
    external_metrics: Option<(TcpListener, tokio_rustls::TlsAcceptor)>,
}

impl Aggregator {
    /// Loads the TLS files, if any, and binds both listeners (port 0 picks a free port).
    pub async fn bind(cfg: AggregatorConfig) -> Result<Self, ConfigError> {
        let http_tls = match &cfg.tls {
            Some(f) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
                headroom_protocol::tls::server_config(&f.cert, &f.key)?,
            ))),
            None => None,
        };
        let shared = state::Shared::new(cfg.policy, cfg.node_rate, cfg.node_burst);
        shared.set_stale_hold(Duration::from_secs_f64(cfg.stale_hold_s));
        let http = Arc::new(http::HttpServer::new(
            shared.clone(),
            http::HttpSettings {
                tokens: cfg.tokens,
                max_body_bytes: cfg.max_body_bytes,
            },
        ));
        let bind = |addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ConfigError::Bind { addr, source })
        };
        let external_metrics = match &cfg.external_metrics {
            Some((addr, client_ca)) => {
                let files = cfg
                    .tls
                    .as_ref()
                    .map(|f| (f.cert.as_path(), f.key.as_path()));
                let tls = external_metrics::server_tls(files, client_ca.as_deref()).map_err(
                    |reason| ConfigError::Invalid {
                        flag: "external-metrics-listen",
                        reason,
                    },
                )?;
                Some((
                    bind(*addr).await?,
                    tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
                ))
            }
            None => None,
        };
        Ok(Aggregator {
            external_metrics,
            http_listener: bind(cfg.listen).await?,
            grpc_listener: bind(cfg.grpc_listen).await?,
            shared,
            http,
            http_tls,
            scaler_rt_priority: cfg.scaler_rt_priority,
        })
    }

    pub fn http_addr(&self) -> std::io::Result<SocketAddr> {
        self.http_listener.local_addr()
    }

    pub fn grpc_addr(&self) -> std::io::Result<SocketAddr> {
        self.grpc_listener.local_addr()
    }

    /// Serves HTTP and gRPC until `shutdown` resolves.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let shared = self.shared.clone();
        let ttl = shared.policy.node_ttl_s;
        let sweeper = {
            let rx = stop_rx.clone();
            tokio::spawn(async move {
                // Sweeping four times per TTL bounds how long a dead node lingers to 1.25 TTL.
                let period = Duration::from_secs_f64((ttl / 4.0).clamp(0.05, 1.0));
                let mut tick = tokio::time::interval(period);
                let stop = wait(rx);
                tokio::pin!(stop);
                loop {
                    tokio::select! {
                        _ = &mut stop => break,
                        _ = tick.tick() => {
                            let n = shared.expire();
                            if n > 0 {
                                tracing::info!(expired = n, ttl_s = ttl, "dropped nodes that stopped reporting");
                            }
                        }
                    }
                }
            })
        };
        let http_addr = self.http_listener.local_addr()?;
        let grpc_addr = self.grpc_listener.local_addr()?;
        let http_task = tokio::spawn(http::serve(
            self.http_listener,
            self.http.clone(),
            self.http_tls.clone(),
            wait(stop_rx.clone()),
        ));
        if let Some((listener, tls)) = self.external_metrics {
            tracing::info!(listen = %listener.local_addr()?, "serving the external metrics API ({}) over HTTPS", external_metrics::GROUP_VERSION);
            tokio::spawn(http::serve(
                listener,
                self.http.clone(),
                Some(tls),
                wait(stop_rx.clone()),
            ));
        }
        // The scaler gets its own thread and runtime, so KEDA's few calls never queue behind a
        // flood of hint posts on the ingest runtime; with a short time slice (`sched`) the kernel
        // also switches to it at once when it wakes on a core where ingest is running.
        let grpc_std = self.grpc_listener.into_std()?;
        let grpc_shared = self.shared.clone();
        let grpc_stop = wait(stop_rx.clone());
        let rt_priority = self.scaler_rt_priority;
        let grpc_task = std::thread::Builder::new()
            .name("headroom-grpc".into())
            .spawn(move || -> anyhow::Result<()> {
                if rt_priority > 0 {
                    match sched::request_realtime(rt_priority) {
                        Ok(()) => tracing::info!(priority = rt_priority, "scaler thread runs under SCHED_FIFO"),
                        Err(e) => tracing::warn!(error = %e, priority = rt_priority, "--scaler-rt-priority: cannot use SCHED_FIFO (needs CAP_SYS_NICE); using a short time slice instead"),
                    }
                }
                if rt_priority == 0 || !sched::is_realtime() {
                match sched::request_short_slice(SCALER_SLICE) {
                    Ok(sched::SliceOutcome::Applied(s)) => {
                        tracing::debug!(slice_us = s.as_micros() as u64, "scaler thread runs with a short time slice");
                    }
                    Ok(sched::SliceOutcome::Unsupported) => {
                        tracing::info!("this kernel has no per-thread time slices (Linux 6.12+); GetMetrics may queue behind ingest for up to a scheduler tick");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot shorten the scaler thread's time slice; GetMetrics may queue behind ingest for up to a scheduler tick");
                    }
                }
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| anyhow::anyhow!("gRPC runtime: {e}"))?;
                rt.block_on(async move {
                    let listener = TcpListener::from_std(grpc_std)
                        .map_err(|e| anyhow::anyhow!("gRPC listener on {grpc_addr}: {e}"))?;
                    // tonic ignores its nodelay setting for a caller-provided listener; without
                    // it small unary replies can wait on Nagle's algorithm.
                    let incoming = tokio_stream::StreamExt::map(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        |s| {
                            if let Ok(s) = &s {
                                let _ = s.set_nodelay(true);
                            }
                            s
                        },
                    );
                    tonic::transport::Server::builder()
                        .http2_keepalive_interval(Some(Duration::from_secs(30)))
                        .serve_with_incoming_shutdown(
                            keda::Scaler::new(grpc_shared).into_service(),
                            incoming,
                            grpc_stop,
                        )
                        .await
                        .map_err(|e| anyhow::anyhow!("gRPC server on {grpc_addr}: {e}"))
                })
            })
            .map_err(|e| anyhow::anyhow!("cannot start the gRPC thread: {e}"))?;
        self.shared.set_ready();
        tracing::info!(%http_addr, %grpc_addr, https = self.http_tls.is_some(), "aggregator serving");
        shutdown.await;
        tracing::info!("aggregator shutting down");
        let _ = stop_tx.send(true);
        let _ = sweeper.await;
        let _ = http_task.await;
        let joined = tokio::task::spawn_blocking(move || grpc_task.join()).await;
        match joined {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(anyhow::anyhow!("gRPC thread on {grpc_addr} panicked")),
            Err(e) => Err(anyhow::anyhow!(
                "joining the gRPC thread on {grpc_addr}: {e}"
            )),
        }
    }
}

/// Runs an aggregator until SIGINT or SIGTERM.
pub async fn run(cfg: AggregatorConfig) -> anyhow::Result<()> {
    let agg = Aggregator::bind(cfg).await?;
    agg.serve(async {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => {},
                        _ = term.recv() => {},
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on Ctrl-C only");
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
    })
    .await
}
