//! Inference engines in tracked containers (llama.cpp, vLLM, SGLang, TGI, Triton), found
//! without configuration and read in one vocabulary: requests waiting and running, KV-cache
//! usage, prompt and generated tokens per second, preemptions, and time-to-first-token and
//! inter-token latency quantiles over each interval.
//!
//! A worker thread owns every network exchange, so the sampling loop never waits on an engine:
//! each pass hands the worker the tracked containers and takes the newest results. The worker
//! re-discovers listening ports ([`discover`]) every `engines.rediscover_interval_s` (and when
//! containers come or go), probes each new port's `/metrics` once, keeps the ports whose body
//! holds an engine's families ([`vocab::detect`]), and scrapes those once per sample interval
//! under a timeout and a size limit ([`scrape`]); an endpoint that fails is logged once and
//! retried with exponential backoff. Nothing outside a tracked container is ever contacted.

pub mod discover;
pub mod prom;
pub mod scrape;
pub mod vocab;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::config::{EngineTargets, EnginesConfig};
pub use crate::kube::PodScrape;
use crate::sample::cgroup::identity::{Identity, glob_match};
use vocab::{EngineKind, Reading, Signals};

/// A container the worker may look into.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub ident: Arc<Identity>,
    /// A directory of the container's cgroup holding `cgroup.procs`.
    pub dir: PathBuf,
    pub pod: PodScrape,
}

/// The per-replica targets of a container: configured defaults, then the first matching
/// `engines.workload_targets` rule, then the pod's annotations (valid values only).
pub fn targets_of(config: &EnginesConfig, cgroup: &str, pod: &PodScrape) -> EngineTargets {
    let mut t = config.targets;
    if let Some(w) = config
        .workload_targets
        .iter()
        .find(|w| glob_match(&w.cgroup, cgroup))
    {
        t.waiting_per_replica = w.waiting_per_replica.unwrap_or(t.waiting_per_replica);
        t.kv_cache_ratio = w.kv_cache_ratio.unwrap_or(t.kv_cache_ratio);
        t.tokens_per_second = w.tokens_per_second.unwrap_or(t.tokens_per_second);
        t.concurrency_per_replica = w
            .concurrency_per_replica
            .unwrap_or(t.concurrency_per_replica);
    }
    let read = |v: &Option<String>, max: f64| {
        v.as_deref()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0 && *v <= max)
    };
    if let Some(v) = read(&pod.target_waiting_per_replica, f64::MAX) {
        t.waiting_per_replica = v;
    }
    if let Some(v) = read(&pod.target_kv_cache_ratio, 1.0) {
        t.kv_cache_ratio = v;
    }
    if let Some(v) = read(&pod.target_tokens_per_second, f64::MAX) {
        t.tokens_per_second = v;
    }
    if let Some(v) = read(&pod.target_concurrency_per_replica, f64::MAX) {
        t.concurrency_per_replica = v;
    }
    t
}

/// How an endpoint was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Discovered,
    Annotation,
    Config,
}

/// One engine endpoint as the newest scrape left it.
#[derive(Debug, Clone, Serialize)]
pub struct EngineSample {
    pub cgroup: String,
    #[serde(skip)]
    pub ident: Arc<Identity>,
    pub engine: Option<EngineKind>,
    pub port: u16,
    pub address: String,
    pub path: String,
    pub source: Source,
    /// The newest scrape succeeded.
    pub up: bool,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    pub scrapes: u64,
    pub failures: u64,
    pub last_scrape_duration_seconds: f64,
    #[serde(with = "crate::sample::unix_seconds::option")]
    pub last_success_at: Option<SystemTime>,
    /// The newest interval between two successful scrapes.
    pub signals: Option<Signals>,
    /// What one replica should carry, for the hints.
    pub targets: EngineTargets,
}

/// A listening port the agent cannot reach, for the status API.
#[derive(Debug, Clone, Serialize)]
pub struct Unreachable {
    pub cgroup: String,
    pub port: u16,
    pub reason: String,
}

/// Everything the worker knows, published after each round.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EngineSnapshot {
    pub enabled: bool,
    pub engines: Vec<EngineSample>,
    pub unreachable: Vec<Unreachable>,
    /// Ports probed since start that held no engine's metrics.
    pub probed_not_engines: u64,
    #[serde(with = "crate::sample::unix_seconds::option")]
    pub discovered_at: Option<SystemTime>,
    /// Wall time of the newest round of scrapes.
    pub round_seconds: f64,
}

impl EngineSnapshot {
    /// Engines with a fresh reading, for history and `/metrics`.
    pub fn up(&self) -> impl Iterator<Item = (&EngineSample, EngineKind, &Signals)> {
        self.engines
            .iter()
            .filter(|e| e.up)
            .filter_map(|e| Some((e, e.engine?, e.signals.as_ref()?)))
    }
}

#[derive(Debug, Default)]
struct Exchange {
    targets: Option<Arc<Vec<Target>>>,
    generation: u64,
    latest: Arc<EngineSnapshot>,
}

/// The sampling thread's handle on the worker; dropping it stops the worker.
pub struct EngineSampler {
    exchange: Arc<Mutex<Exchange>>,
    stop: Option<std::sync::mpsc::Sender<()>>,
    worker: Option<std::thread::JoinHandle<()>>,
    pods: Option<Arc<crate::kube::PodDirectory>>,
    last_targets: Vec<Target>,
    enabled: bool,
}

impl EngineSampler {
    pub fn new(config: &EnginesConfig, proc_root: &Path, interval: Duration) -> EngineSampler {
        let exchange = Arc::new(Mutex::new(Exchange::default()));
        let mut s = EngineSampler {
            exchange: exchange.clone(),
            stop: None,
            worker: None,
            pods: None,
            last_targets: Vec::new(),
            enabled: config.enabled,
        };
        if !config.enabled {
            return s;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = Worker::new(config.clone(), proc_root.to_path_buf(), interval, exchange);
        match std::thread::Builder::new()
            .name("headroom-engines".into())
            .spawn(move || worker.run(rx))
        {
            Ok(h) => {
                s.stop = Some(tx);
                s.worker = Some(h);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the inference-engine worker; engines are not scraped");
                s.enabled = false;
            }
        }
        s
    }

    pub fn set_pods(&mut self, pods: Arc<crate::kube::PodDirectory>) {
        self.pods = Some(pods);
    }

    /// Hands the worker the containers of this pass (when they changed) and returns its newest
    /// results. Never waits for the network.
    pub fn sample<'a>(
        &mut self,
        containers: impl Iterator<Item = (&'a Arc<Identity>, Option<PathBuf>)>,
    ) -> Arc<EngineSnapshot> {
        if !self.enabled {
            return Arc::new(EngineSnapshot::default());
        }
        let targets: Vec<Target> = containers
            .filter_map(|(ident, dir)| {
                Some(Target {
                    ident: ident.clone(),
                    dir: dir?,
                    pod: self.pod_scrape(ident),
                })
            })
            .collect();
        let mut ex = self.exchange.lock().unwrap_or_else(|p| p.into_inner());
        if targets != self.last_targets {
            ex.targets = Some(Arc::new(targets.clone()));
            ex.generation += 1;
            self.last_targets = targets;
        }
        ex.latest.clone()
    }

    fn pod_scrape(&self, ident: &Identity) -> PodScrape {
        let Some(pod) = ident
            .pod_uid
            .as_deref()
            .and_then(|uid| self.pods.as_ref()?.pod(uid))
        else {
            return PodScrape::default();
        };
        pod.scrape.clone()
    }
}

impl Drop for EngineSampler {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(h) = self.worker.take() {
            let _ = h.join();
        }
    }
}

/// Where one endpoint stands between rounds.
struct Endpoint {
    sample: EngineSample,
    addr: SocketAddr,
    inode: u64,
    prev: Option<(Instant, Reading)>,
    next_try: Instant,
    client: scrape::Client,
}

struct Worker {
    config: EnginesConfig,
    proc_root: PathBuf,
    interval: Duration,
    exchange: Arc<Mutex<Exchange>>,
    targets: Arc<Vec<Target>>,
    generation: u64,
    endpoints: Vec<Endpoint>,
    /// (cgroup, port, socket inode) probed and found not to be an engine: not probed again
    /// while that socket lives.
    not_engines: HashSet<(String, u16, u64)>,
    probed_not_engines: u64,
    unreachable: Vec<Unreachable>,
    discovered: Option<Instant>,
    /// Containers whose ports were read (by a full or an incremental discovery).
    scanned: HashSet<String>,
    discovered_at: Option<SystemTime>,
}

impl Worker {
    fn new(
        config: EnginesConfig,
        proc_root: PathBuf,
        interval: Duration,
        exchange: Arc<Mutex<Exchange>>,
    ) -> Worker {
        Worker {
            config,
            proc_root,
            interval,
            exchange,
            targets: Arc::new(Vec::new()),
            generation: 0,
            endpoints: Vec::new(),
            not_engines: HashSet::new(),
            probed_not_engines: 0,
            unreachable: Vec::new(),
            discovered: None,
            scanned: HashSet::new(),
            discovered_at: None,
        }
    }

    fn run(mut self, stop: std::sync::mpsc::Receiver<()>) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "inference-engine worker has no runtime; engines are not scraped");
                return;
            }
        };
        let mut next = Instant::now();
        loop {
            let t0 = Instant::now();
            self.round(&runtime);
            let round_seconds = t0.elapsed().as_secs_f64();
            self.publish(round_seconds);
            next += self.interval;
            let now = Instant::now();
            if next < now {
                next = now + self.interval;
            }
            match stop.recv_timeout(next - now) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                _ => return,
            }
        }
    }

    fn round(&mut self, runtime: &tokio::runtime::Runtime) {
        let (targets, generation) = {
            let ex = self.exchange.lock().unwrap_or_else(|p| p.into_inner());
            (ex.targets.clone(), ex.generation)
        };
        if let Some(t) = targets {
            self.targets = t;
        }
        let rediscover = Duration::from_secs_f64(self.config.rediscover_interval_s);
        if self.discovered.is_none_or(|d| d.elapsed() >= rediscover) {
            self.generation = generation;
            self.discover(true);
        } else if generation != self.generation {
            // Containers came or went: look at the new ones only, so churn costs no full rescan.
            self.generation = generation;
            self.discover(false);
        }
        let now = Instant::now();
        let due: Vec<usize> = (0..self.endpoints.len())
            .filter(|&i| self.endpoints[i].next_try <= now)
            .collect();
        if due.is_empty() {
            return;
        }
        // A round ends before the next is due, so one hanging endpoint cannot delay the others'
        // next scrape.
        let timeout =
            Duration::from_secs_f64(self.config.timeout_s).min(self.interval.mul_f64(0.9));
        let limit = self.config.max_body_bytes;
        let jobs: Vec<(SocketAddr, String, scrape::Client)> = due
            .iter()
            .map(|&i| {
                let e = &mut self.endpoints[i];
                (e.addr, e.sample.path.clone(), std::mem::take(&mut e.client))
            })
            .collect();
        type Outcome = (
            scrape::Client,
            Result<(), scrape::ScrapeError>,
            Instant,
            f64,
        );
        let results: Vec<Option<Outcome>> = runtime.block_on(async move {
            let mut set = tokio::task::JoinSet::new();
            for (n, (addr, path, mut client)) in jobs.into_iter().enumerate() {
                set.spawn(async move {
                    let t = Instant::now();
                    let r = client.get(addr, &path, timeout, limit).await;
                    (n, (client, r, Instant::now(), t.elapsed().as_secs_f64()))
                });
            }
            let mut out: Vec<Option<Outcome>> = Vec::new();
            out.resize_with(set.len(), || None);
            while let Some(Ok((n, o))) = set.join_next().await {
                out[n] = Some(o);
            }
            out
        });
        let mut drop_idx = Vec::new();
        for (&i, outcome) in due.iter().zip(results) {
            let (client, result, at, took) = outcome.unwrap_or_else(|| {
                let failed = scrape::ScrapeError::Failed {
                    addr: self.endpoints[i].addr,
                    path: self.endpoints[i].sample.path.clone(),
                    message: "scrape task failed".into(),
                };
                (scrape::Client::default(), Err(failed), Instant::now(), 0.0)
            });
            self.endpoints[i].client = client;
            if self.settle(i, result, at, took) {
                drop_idx.push(i);
            }
        }
        for i in drop_idx.into_iter().rev() {
            self.endpoints.swap_remove(i);
        }
    }

    /// Records one scrape's outcome; `true` when the endpoint is a probed port that turned out
    /// not to be an engine and should go.
    fn settle(
        &mut self,
        i: usize,
        result: Result<(), scrape::ScrapeError>,
        at: Instant,
        took: f64,
    ) -> bool {
        let backoff_max = Duration::from_secs_f64(self.config.backoff_max_s);
        let interval = self.interval;
        let e = &mut self.endpoints[i];
        let s = &mut e.sample;
        let body = e.client.text();
        s.scrapes += 1;
        s.last_scrape_duration_seconds = took;
        let outcome = match result {
            Ok(()) => match (vocab::detect(body), s.engine) {
                (Some(kind), None) => Ok((body, kind)),
                (Some(kind), Some(known)) if kind == known => Ok((body, kind)),
                (_, Some(known)) => Err(format!(
                    "http://{}{}: the body no longer holds {} metrics",
                    e.addr,
                    s.path,
                    known.as_str()
                )),
                (None, None) => Err(format!(
                    "http://{}{}: no inference-engine metrics (vllm:, llamacpp:, sglang:, tgi_, nv_inference_)",
                    e.addr, s.path
                )),
            },
            Err(err) => Err(err.to_string()),
        };
        match outcome {
            Ok((body, kind)) => {
                if s.engine.is_none() {
                    tracing::info!(cgroup = %s.cgroup, address = %e.addr, path = %s.path, engine = kind.as_str(), "inference engine found; scraping it every sample interval");
                } else if s.consecutive_failures > 0 {
                    tracing::info!(cgroup = %s.cgroup, address = %e.addr, engine = kind.as_str(), failures = s.consecutive_failures, "inference engine answers again");
                }
                s.engine = Some(kind);
                let reading = Reading::parse(kind, body);
                let before = e.prev.as_ref().map(|(t, r)| (at.duration_since(*t), r));
                s.signals = Some(vocab::signals(
                    &reading,
                    before.map(|(_, r)| r),
                    before.map_or(0.0, |(d, _)| d.as_secs_f64()),
                ));
                e.prev = Some((at, reading));
                s.up = true;
                s.last_error = None;
                s.consecutive_failures = 0;
                s.last_success_at = Some(SystemTime::now());
                e.next_try = at;
                false
            }
            Err(message) => {
                // A discovered port that never showed an engine is simply not one.
                if s.engine.is_none() && s.source == Source::Discovered {
                    tracing::debug!(cgroup = %s.cgroup, port = s.port, error = %message, "port holds no inference engine");
                    self.not_engines.insert((s.cgroup.clone(), s.port, e.inode));
                    self.probed_not_engines += 1;
                    return true;
                }
                s.failures += 1;
                s.consecutive_failures += 1;
                if s.consecutive_failures == 1 {
                    tracing::warn!(cgroup = %s.cgroup, port = s.port, error = %message, "inference-engine scrape failed; retrying with backoff (logged once until it answers)");
                } else {
                    tracing::debug!(cgroup = %s.cgroup, port = s.port, error = %message, failures = s.consecutive_failures, "inference-engine scrape failed again");
                }
                s.up = false;
                s.last_error = Some(message);
                // The previous reading stays: rates resume across the gap.
                let exp = s.consecutive_failures.min(16);
                let wait = interval
                    .saturating_mul(1 << exp)
                    .min(backoff_max.max(interval));
                e.next_try = at + wait;
                false
            }
        }
    }

    /// Re-reads the containers' listening ports and reconciles the endpoint list.
    /// `full`: every container; otherwise only containers not scanned yet (and gone ones are
    /// forgotten).
    fn discover(&mut self, full: bool) {
        let own = discover::own_listeners(&self.proc_root);
        let mut wanted: Vec<(Arc<Identity>, u16, String, SocketAddr, u64, Source)> = Vec::new();
        let mut unreachable = Vec::new();
        let targets = self.targets.clone();
        let present: HashSet<&str> = targets.iter().map(|t| t.ident.cgroup.as_str()).collect();
        let scan: Vec<&Target> = targets
            .iter()
            .filter(|t| full || !self.scanned.contains(&t.ident.cgroup))
            .collect();
        let scanned_now: HashSet<&str> = scan.iter().map(|t| t.ident.cgroup.as_str()).collect();
        for t in scan {
            let cg = &t.ident.cgroup;
            if self.config.exclude.iter().any(|g| glob_match(g, cg)) || t.pod.scrape == Some(false)
            {
                continue;
            }
            let pinned: Vec<&crate::config::EngineEndpoint> = self
                .config
                .endpoints
                .iter()
                .filter(|p| glob_match(&p.cgroup, cg))
                .collect();
            if !self.config.discover && pinned.is_empty() && t.pod.port.is_none() {
                continue;
            }
            let pids = read_pids(&t.dir);
            if pids.is_empty() {
                continue;
            }
            let ctx = discover::Context {
                proc_root: &self.proc_root,
                own: &own,
                pod_ip: t.pod.ip,
            };
            let listeners = discover::listeners(&ctx, &pids);
            let reach = |port: u16| -> Option<Result<(SocketAddr, u64), String>> {
                let l = listeners.iter().find(|l| l.port == port)?;
                Some(l.connect.clone().map(|a| (a, l.inode)))
            };
            let mut push = |port: u16,
                            path: &str,
                            source: Source,
                            found: Result<(SocketAddr, u64), String>| {
                match found {
                    Ok((addr, inode)) => {
                        wanted.push((t.ident.clone(), port, path.to_string(), addr, inode, source))
                    }
                    Err(reason) => unreachable.push(Unreachable {
                        cgroup: cg.clone(),
                        port,
                        reason,
                    }),
                }
            };
            if let Some(port) = t.pod.port {
                // The annotation names the endpoint; reach it where the pod listens, else at
                // the pod IP.
                let path = t.pod.path.as_deref().unwrap_or("/metrics");
                let found =
                    reach(port).or_else(|| t.pod.ip.map(|ip| Ok((SocketAddr::new(ip, port), 0))));
                match found {
                    Some(f) => push(port, path, Source::Annotation, f),
                    None => push(
                        port,
                        path,
                        Source::Annotation,
                        Err(format!("annotated port {port} is not listening")),
                    ),
                }
                continue;
            }
            for p in &pinned {
                match reach(p.port) {
                    Some(f) => push(p.port, &p.path, Source::Config, f),
                    None => push(
                        p.port,
                        &p.path,
                        Source::Config,
                        Err(format!("configured port {} is not listening", p.port)),
                    ),
                }
            }
            if self.config.discover {
                let path = t.pod.path.as_deref().unwrap_or("/metrics");
                for l in listeners
                    .iter()
                    .filter(|l| !pinned.iter().any(|p| p.port == l.port))
                    .take(self.config.max_ports_per_container)
                {
                    match &l.connect {
                        Ok(addr) => {
                            if !self.not_engines.contains(&(cg.clone(), l.port, l.inode)) {
                                push(l.port, path, Source::Discovered, Ok((*addr, l.inode)));
                            }
                        }
                        Err(reason) => push(l.port, path, Source::Discovered, Err(reason.clone())),
                    }
                }
            }
        }
        let targets_by_cgroup: HashMap<&str, EngineTargets> = targets
            .iter()
            .map(|t| {
                (
                    t.ident.cgroup.as_str(),
                    targets_of(&self.config, &t.ident.cgroup, &t.pod),
                )
            })
            .collect();
        // Keep endpoints (and their previous readings) that are still wanted; add new ones.
        let mut kept: HashMap<(String, u16), Endpoint> = self
            .endpoints
            .drain(..)
            .map(|e| ((e.sample.cgroup.clone(), e.sample.port), e))
            .collect();
        let now = Instant::now();
        for (ident, port, path, addr, inode, source) in wanted {
            let key = (ident.cgroup.clone(), port);
            let goals = targets_by_cgroup
                .get(ident.cgroup.as_str())
                .copied()
                .unwrap_or(self.config.targets);
            let e = match kept.remove(&key) {
                Some(mut e) if e.inode == inode || inode == 0 => {
                    e.sample.targets = goals;
                    e.addr = addr;
                    e.sample.address = addr.to_string();
                    e.sample.ident = ident;
                    e
                }
                _ => Endpoint {
                    sample: EngineSample {
                        cgroup: ident.cgroup.clone(),
                        ident,
                        engine: None,
                        port,
                        address: addr.to_string(),
                        path,
                        source,
                        up: false,
                        last_error: None,
                        consecutive_failures: 0,
                        scrapes: 0,
                        failures: 0,
                        last_scrape_duration_seconds: 0.0,
                        last_success_at: None,
                        signals: None,
                        targets: goals,
                    },
                    addr,
                    inode,
                    prev: None,
                    next_try: now,
                    client: scrape::Client::default(),
                },
            };
            self.endpoints.push(e);
        }
        // Endpoints of containers that were not rescanned stay as they were.
        for (_, e) in kept {
            let cg = e.sample.cgroup.as_str();
            if present.contains(cg) && !scanned_now.contains(cg) {
                self.endpoints.push(e);
            }
        }
        // Forget negative results of sockets that went.
        let live: HashSet<(String, u16)> = self
            .endpoints
            .iter()
            .map(|e| (e.sample.cgroup.clone(), e.sample.port))
            .collect();
        let cgroups: HashSet<&str> = targets.iter().map(|t| t.ident.cgroup.as_str()).collect();
        self.not_engines.retain(|(cg, port, _)| {
            cgroups.contains(cg.as_str()) && !live.contains(&(cg.clone(), *port))
        });
        self.unreachable.retain(|u| {
            present.contains(u.cgroup.as_str()) && !scanned_now.contains(u.cgroup.as_str())
        });
        self.unreachable.extend(unreachable);
        self.scanned = present.iter().map(|s| s.to_string()).collect();
        if full {
            self.discovered = Some(Instant::now());
        }
        self.discovered_at = Some(SystemTime::now());
    }

    fn publish(&self, round_seconds: f64) {
        let mut engines: Vec<EngineSample> = self
            .endpoints
            .iter()
            .filter(|e| e.sample.engine.is_some() || e.sample.source != Source::Discovered)
            .map(|e| e.sample.clone())
            .collect();
        engines.sort_by(|a, b| (&a.cgroup, a.port).cmp(&(&b.cgroup, b.port)));
        let snap = EngineSnapshot {
            enabled: true,
            engines,
            unreachable: self.unreachable.clone(),
            probed_not_engines: self.probed_not_engines,
            discovered_at: self.discovered_at,
            round_seconds,
        };
        let mut ex = self.exchange.lock().unwrap_or_else(|p| p.into_inner());
        ex.latest = Arc::new(snap);
    }
}

/// PIDs in `dir/cgroup.procs` (empty when unreadable: the container went).
fn read_pids(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join(crate::cgroup_files::PROCS))
        .map(|s| {
            s.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// History series of the engines, per container: `requests_waiting`, `requests_running`, token
/// and preemption rates summed over the container's engines; the KV-cache ratio and latency
/// quantiles are the largest of them.
pub const SERIES: [&str; 12] = [
    "container_engine_requests_waiting",
    "container_engine_requests_running",
    "container_engine_kv_cache_usage_ratio",
    "container_engine_prompt_tokens_per_second",
    "container_engine_generated_tokens_per_second",
    "container_engine_preemptions_per_second",
    "container_engine_ttft_p50_seconds",
    "container_engine_ttft_p90_seconds",
    "container_engine_ttft_p99_seconds",
    "container_engine_itl_p50_seconds",
    "container_engine_itl_p90_seconds",
    "container_engine_itl_p99_seconds",
];

/// `(series, cgroup, value)` for the history, from engines with a fresh reading.
pub fn series(s: &EngineSnapshot) -> Vec<(&'static str, String, f64)> {
    let mut per: std::collections::BTreeMap<&str, [Option<f64>; 12]> = Default::default();
    for (e, _, sig) in s.up() {
        let row = per.entry(e.cgroup.as_str()).or_insert([None; 12]);
        let add = |slot: &mut Option<f64>, v: Option<f64>| {
            if let Some(v) = v {
                *slot = Some(slot.unwrap_or(0.0) + v);
            }
        };
        let max = |slot: &mut Option<f64>, v: Option<f64>| {
            if let Some(v) = v {
                *slot = Some(slot.map_or(v, |s| s.max(v)));
            }
        };
        add(&mut row[0], sig.requests_waiting);
        add(&mut row[1], sig.requests_running);
        max(&mut row[2], sig.kv_cache_usage_ratio);
        add(&mut row[3], sig.prompt_tokens_per_second);
        add(&mut row[4], sig.generated_tokens_per_second);
        add(&mut row[5], sig.preemptions_per_second);
        for k in 0..3 {
            max(&mut row[6 + k], sig.ttft_seconds.map(|q| q[k]));
            max(&mut row[9 + k], sig.itl_seconds.map(|q| q[k]));
        }
    }
    let mut out = Vec::new();
    for (cg, row) in per {
        for (name, v) in SERIES.iter().zip(row) {
            if let Some(v) = v.filter(|v| v.is_finite()) {
                out.push((*name, cg.to_string(), v));
            }
        }
    }
    out
}
