//! State shared between the sampling thread and the HTTP server: the newest snapshot, the
//! history, sampler health and cost, readiness and liveness, and the hint sender's handles. The
//! sampling loop (`agent`) writes it; the server (`serve`) and the reporters (`report`) read it.
//! It holds data and answers questions about it; it starts nothing and encodes no metric.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::config::Config;
use crate::history::History;
use crate::sample::{Snapshot, unix_seconds};

/// Hints of one reporting pass, on their way to the aggregator client.
pub type HintSender = tokio::sync::mpsc::UnboundedSender<Vec<headroom_protocol::Hint>>;

#[derive(Debug, Clone, Default, Serialize)]
pub struct SamplerHealth {
    pub healthy: bool,
    pub last_error: Option<String>,
    pub last_duration_seconds: f64,
    pub detail: Option<String>,
}

/// Cost of sampling, for `/v1/status` and self-metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SampleCost {
    pub samples: u64,
    pub last_wall_seconds: f64,
    pub last_cpu_seconds: f64,
    pub total_cpu_seconds: f64,
}

/// State shared between the sampling thread and the HTTP server.
#[derive(Debug)]
pub struct Shared {
    pub started: Instant,
    pub started_at: SystemTime,
    pub hostname: String,
    latest: RwLock<Option<Arc<Snapshot>>>,
    pub history: Mutex<History>,
    pub samplers: RwLock<BTreeMap<&'static str, SamplerHealth>>,
    pub cost: Mutex<SampleCost>,
    pub ready: AtomicBool,
    /// Milliseconds since `started` at the end of the newest sample, for liveness.
    pub last_sample_ms: AtomicU64,
    pub sample_interval: Duration,
    /// The sender of scale hints, when aggregators are configured; read for its counters.
    pub hints: std::sync::OnceLock<Arc<headroom_protocol::client::HintClient>>,
    /// Where the sampling thread hands each pass's hints to that sender.
    pub hint_tx: std::sync::OnceLock<HintSender>,
    /// Policy decisions, for `/v1/decisions` and `headroom_decisions_total`.
    pub decisions: crate::act::driver::DecisionLog,
    pub policy_mode: crate::config::PolicyMode,
    /// This node's pods from the Kubernetes API, when the agent watches it.
    pub pods: std::sync::OnceLock<Arc<crate::kube::PodDirectory>>,
}

impl Shared {
    pub fn new(config: &Config, history: History, hostname: String) -> Shared {
        Shared {
            started: Instant::now(),
            started_at: SystemTime::now(),
            hostname,
            latest: RwLock::new(None),
            history: Mutex::new(history),
            samplers: RwLock::new(BTreeMap::new()),
            cost: Mutex::new(SampleCost::default()),
            ready: AtomicBool::new(false),
            last_sample_ms: AtomicU64::new(0),
            sample_interval: Duration::from_secs_f64(config.sample_interval_s),
            hints: std::sync::OnceLock::new(),
            hint_tx: std::sync::OnceLock::new(),
            decisions: Default::default(),
            policy_mode: config.policy.mode,
            pods: std::sync::OnceLock::new(),
        }
    }

    pub fn latest(&self) -> Option<Arc<Snapshot>> {
        self.latest
            .read()
            .map(|g| g.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Makes `s` the snapshot every reader sees next.
    pub fn publish(&self, s: Snapshot) {
        let s = Arc::new(s);
        match self.latest.write() {
            Ok(mut g) => *g = Some(s),
            Err(p) => *p.into_inner() = Some(s),
        }
    }

    pub fn set_health(&self, name: &'static str, h: SamplerHealth) {
        if let Ok(mut m) = self.samplers.write() {
            m.insert(name, h);
        }
    }

    /// Healthy while the sampling thread has produced a sample within ten intervals.
    pub fn live(&self) -> bool {
        let last = self.last_sample_ms.load(Ordering::Relaxed);
        let now = self.started.elapsed().as_millis() as u64;
        let budget = (self.sample_interval.as_millis() as u64 * 10).max(10_000);
        last == 0 && now < 60_000 + budget || now.saturating_sub(last) <= budget
    }

    pub fn status(&self) -> serde_json::Value {
        let snapshot = self.latest();
        let containers: Vec<_> = snapshot
            .as_ref()
            .map(|s| s.containers.iter().map(|c| c.ident.clone()).collect())
            .unwrap_or_default();
        let (series, points) = self
            .history
            .lock()
            .map(|h| (h.len(), h.points()))
            .unwrap_or((0, 0));
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "hostname": self.hostname,
            "uptime_seconds": self.started.elapsed().as_secs_f64(),
            "started_at": unix_seconds::to_f64(self.started_at),
            "ready": self.ready.load(Ordering::Relaxed),
            "last_sample_at": snapshot.as_ref().map(|s| unix_seconds::to_f64(s.at)),
            "samplers": self.samplers.read().map(|g| g.clone()).unwrap_or_default(),
            "sample_cost": self.cost.lock().map(|g| g.clone()).unwrap_or_default(),
            "containers": { "count": containers.len(), "items": containers },
            "ebpf": snapshot.as_ref().map(|s| &s.ebpf.status),
            "kubernetes_api": self.pods.get().map(|p| p.status()),
            "history": { "series": series, "points": points },
        })
    }
}
