//! State shared between the sampling thread and the HTTP server: the newest snapshot, the
//! history, sampler health and cost, readiness and liveness, and the hint sender's handles. The
//! sampling loop (`agent`) writes it; the server (`serve`) and the reporters (`report`) read it.
//! It holds data and answers questions about it; it starts nothing and encodes no metric.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
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
    /// Read and written through [`Shared::history`], which recovers it from a poisoned lock.
    history: Mutex<History>,
    samplers: Mutex<BTreeMap<&'static str, SamplerHealth>>,
    cost: Mutex<SampleCost>,
    /// Locks taken back after a thread panicked while holding them, by lock.
    recovered: Mutex<BTreeMap<&'static str, u64>>,
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
    /// Which devices the kubelet allocated to which container (pod-resources API).
    pub devices: std::sync::OnceLock<Arc<crate::kube::pod_resources::DeviceAllocations>>,
}

impl Shared {
    pub fn new(config: &Config, history: History, hostname: String) -> Shared {
        Shared {
            started: Instant::now(),
            started_at: SystemTime::now(),
            hostname,
            latest: RwLock::new(None),
            history: Mutex::new(history),
            samplers: Mutex::new(BTreeMap::new()),
            cost: Mutex::new(SampleCost::default()),
            recovered: Mutex::new(BTreeMap::new()),
            ready: AtomicBool::new(false),
            last_sample_ms: AtomicU64::new(0),
            sample_interval: Duration::from_secs_f64(config.sample_interval_s),
            hints: std::sync::OnceLock::new(),
            hint_tx: std::sync::OnceLock::new(),
            decisions: Default::default(),
            policy_mode: config.policy.mode,
            pods: std::sync::OnceLock::new(),
            devices: std::sync::OnceLock::new(),
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

    /// The history, for reading or recording.
    pub fn history(&self) -> MutexGuard<'_, History> {
        self.recover("history", &self.history)
    }

    /// Sampling cost, for the sampling thread to update and the reporters to read.
    pub fn cost(&self) -> MutexGuard<'_, SampleCost> {
        self.recover("cost", &self.cost)
    }

    /// Health of each sampler, as of its newest pass.
    pub fn samplers(&self) -> BTreeMap<&'static str, SamplerHealth> {
        self.recover("samplers", &self.samplers).clone()
    }

    pub fn set_health(&self, name: &'static str, h: SamplerHealth) {
        self.recover("samplers", &self.samplers).insert(name, h);
    }

    /// How often each lock was taken back from a panicked thread (`headroom_agent_lock_recoveries_total`).
    pub fn recovered(&self) -> BTreeMap<&'static str, u64> {
        match self.recovered.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Locks `m`, taking it back if a thread panicked while holding it. What these locks guard
    /// is plain data that every writer leaves whole between statements, so the agent goes on
    /// recording, saving and serving: ignoring the poison instead would stop all three without
    /// a word while `/healthz` said ok. A recovery is a bug somewhere; it is logged and counted.
    fn recover<'a, T>(&self, name: &'static str, m: &'a Mutex<T>) -> MutexGuard<'a, T> {
        match m.lock() {
            Ok(g) => g,
            Err(poisoned) => {
                m.clear_poison();
                let n = {
                    let mut r = match self.recovered.lock() {
                        Ok(g) => g,
                        Err(p) => p.into_inner(),
                    };
                    let n = r.entry(name).or_insert(0);
                    *n += 1;
                    *n
                };
                tracing::error!(
                    lock = name,
                    recoveries = n,
                    "a thread panicked while holding the {name} lock; took it back and carry on with the data as it was left"
                );
                poisoned.into_inner()
            }
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
        let (series, points) = {
            let h = self.history();
            (h.len(), h.points())
        };
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "hostname": self.hostname,
            "uptime_seconds": self.started.elapsed().as_secs_f64(),
            "started_at": unix_seconds::to_f64(self.started_at),
            "ready": self.ready.load(Ordering::Relaxed),
            "last_sample_at": snapshot.as_ref().map(|s| unix_seconds::to_f64(s.at)),
            "samplers": self.samplers(),
            "sample_cost": self.cost().clone(),
            "lock_recoveries": self.recovered(),
            "containers": { "count": containers.len(), "items": containers },
            "ebpf": snapshot.as_ref().map(|s| &s.ebpf.status),
            "engines": snapshot.as_ref().map(|s| &*s.engines),
            "kubernetes_api": self.pods.get().map(|p| p.status()),
            "gpu_attribution": snapshot.as_ref().map(|s| gpu_attribution(&s.gpu, self.devices.get())),
            "history": { "series": series, "points": points },
        })
    }
}

/// Who GPU use was attributed to, and by which source, for `/v1/status`: devices the kubelet
/// allocated (pod-resources) and NVML processes resolved to a container through their cgroup.
fn gpu_attribution(
    gpu: &crate::sample::gpu::GpuSnapshot,
    devices: Option<&Arc<crate::kube::pod_resources::DeviceAllocations>>,
) -> serde_json::Value {
    let uuid = |i: usize| gpu.gpus.get(i).map(|g| g.id.uuid.as_str());
    let allocations: Vec<_> = gpu
        .allocations
        .iter()
        .map(|a| {
            serde_json::json!({
                "gpu": uuid(a.gpu), "device_id": a.device_id, "resource": a.resource,
                "namespace": a.namespace, "pod": a.pod, "container": a.container,
            })
        })
        .collect();
    let resolved = gpu.processes.iter().filter(|p| p.cgroup.is_some()).count();
    serde_json::json!({
        "pod_resources": devices.map(|d| d.status()),
        "allocations": allocations,
        "nvml_processes": {
            "attributed": resolved,
            "unattributed": gpu.processes.len() - resolved,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::SeriesKey;

    #[test]
    fn a_poisoned_history_is_taken_back_logged_and_counted() {
        let config = Config::default();
        let shared = Arc::new(Shared::new(
            &config,
            History::new(1000, 10, 60, 10),
            "node-a".into(),
        ));
        let s = shared.clone();
        let panicked = std::thread::spawn(move || {
            let _held = s.history();
            panic!("a bug while holding the history (expected by this test)");
        })
        .join();
        assert!(panicked.is_err());
        assert!(shared.history.is_poisoned());
        // Recording goes on, and so does everything else that reads the history.
        shared
            .history()
            .record(&SeriesKey::new("x", Vec::new()), 1_000, 1.0);
        assert_eq!(shared.history().len(), 1);
        assert!(!shared.history.is_poisoned());
        assert_eq!(shared.recovered().get("history"), Some(&1));
        assert_eq!(shared.status()["lock_recoveries"]["history"], 1);
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(crate::report::metrics::AgentCollector {
            shared: shared.clone(),
        }));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"headroom_agent_lock_recoveries_total{lock="history"} 1"#),
            "{text}"
        );
    }
}
