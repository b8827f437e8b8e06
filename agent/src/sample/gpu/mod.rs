//! GPU sampling through NVML: one `Nvml` handle for the agent's life, owned by a worker thread that
//! samples every GPU once per period, so a slow or hung driver call never blocks the agent. The
//! agent reads the latest snapshot with `GpuSampler::sample`, which also judges health (adding hung
//! calls to what the worker saw), raises health events and logs each state change once. A node
//! without a driver gets one "no GPU found" line and a sampler that reports no GPUs; init is retried
//! rarely. This module never writes anything to the node.

mod cgroup;
mod collect;
mod snapshot;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;

pub use cgroup::{CgroupResolver, parse_cgroup_file};
pub use collect::{CallTracker, Collector, InCall, Limits};
pub use snapshot::{
    Allocation, ContainerUsage, Gpu, GpuIdentity, GpuSnapshot, GpuStats, Health, HealthEvent,
    NvmlStatus, ProcessUsage, Series,
};

/// The library loaded when none is configured: the runtime name the driver installs (the bare
/// `libnvidia-ml.so` exists only with development packages).
pub const DEFAULT_NVML_LIBRARY: &str = "libnvidia-ml.so.1";

/// GPU sampler settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuConfig {
    /// NVML library to load; `None` loads `libnvidia-ml.so.1` from the loader's search path.
    pub nvml_library: Option<PathBuf>,
    pub enabled: bool,
    /// Time between NVML cycles.
    pub period: Duration,
    /// How long a critical XID keeps a GPU marked unhealthy after the last one.
    pub xid_unhealthy_hold: Duration,
    /// A single NVML call slower than this marks its GPU unhealthy.
    pub call_timeout: Duration,
    /// How often a failed NVML init is retried.
    pub init_retry: Duration,
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self {
            nvml_library: None,
            enabled: true,
            period: Duration::from_secs(1),
            xid_unhealthy_hold: Duration::from_secs(300),
            call_timeout: Duration::from_secs(2),
            init_retry: Duration::from_secs(300),
        }
    }
}

impl GpuConfig {
    fn library(&self) -> PathBuf {
        self.nvml_library
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_NVML_LIBRARY))
    }
}

/// Loads NVML from `lib`.
pub fn init_nvml(lib: &Path) -> Result<Nvml, NvmlError> {
    Nvml::builder().lib_path(lib.as_os_str()).init()
}

struct Shared {
    latest: Mutex<Option<GpuSnapshot>>,
    tracker: CallTracker,
}

/// Where the sampling loop gets GPU snapshots: NVML on a node ([`GpuSampler`]), a replayed trace
/// in `headroom demo`. Everything downstream of the snapshot is the same either way.
pub trait GpuSource: Send {
    fn sample(&mut self, now: SystemTime) -> GpuSnapshot;
}

impl GpuSource for GpuSampler {
    fn sample(&mut self, now: SystemTime) -> GpuSnapshot {
        GpuSampler::sample(self, now)
    }
}

/// The agent's GPU sampler. Created once; never fails.
pub struct GpuSampler {
    cfg: GpuConfig,
    shared: Arc<Shared>,
    // Dropping the sender tells the worker to stop.
    _stop: Option<mpsc::Sender<()>>,
    reported: HashMap<String, Health>,
}

impl std::fmt::Debug for GpuSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuSampler")
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl GpuSampler {
    /// Starts the worker. Waits briefly for the first cycle so the first `sample` is meaningful and
    /// the start-up log says whether GPUs were found.
    pub fn new(cfg: &GpuConfig, proc_root: &Path) -> GpuSampler {
        let shared = Arc::new(Shared {
            latest: Mutex::new(None),
            tracker: Arc::new(Mutex::new(None)),
        });
        let mut sampler = GpuSampler {
            cfg: cfg.clone(),
            shared: shared.clone(),
            _stop: None,
            reported: HashMap::new(),
        };
        if !cfg.enabled {
            tracing::info!("GPU sampling is disabled by configuration ([gpu] enabled = false)");
            return sampler;
        }
        let (tx, rx) = mpsc::channel();
        let worker_cfg = cfg.clone();
        let root = proc_root.to_path_buf();
        let spawned = std::thread::Builder::new()
            .name("headroom-nvml".into())
            .spawn(move || worker(worker_cfg, root, shared, rx));
        if let Err(e) = spawned {
            tracing::warn!("no GPU found: cannot start the NVML sampling thread: {e}");
            return sampler;
        }
        sampler._stop = Some(tx);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && sampler.latest().is_none() {
            std::thread::sleep(Duration::from_millis(10));
        }
        sampler
    }

    fn latest(&self) -> Option<GpuSnapshot> {
        self.shared
            .latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The latest GPU state, with health changes since the previous call in `events`. Never
    /// blocks on NVML.
    pub fn sample(&mut self, now: SystemTime) -> GpuSnapshot {
        let mut snap = match (&self._stop, self.latest()) {
            (None, _) => GpuSnapshot::empty(now, NvmlStatus::Disabled),
            (Some(_), None) => GpuSnapshot::empty(
                now,
                NvmlStatus::Missing {
                    reason: "NVML initialisation has not finished".into(),
                },
            ),
            (Some(_), Some(s)) => s,
        };
        self.judge_hangs(&mut snap);
        self.raise_events(&mut snap, now);
        snap
    }

    /// A call in flight for longer than the timeout means the driver is not answering: the GPU it
    /// was for (or every GPU, for a call without one) is unhealthy until it returns.
    fn judge_hangs(&self, snap: &mut GpuSnapshot) {
        let in_call = self
            .shared
            .tracker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(c) = in_call else { return };
        let waited = c.since.elapsed();
        if waited <= self.cfg.call_timeout {
            return;
        }
        for (i, g) in snap.gpus.iter_mut().enumerate() {
            if c.gpu.is_none() || c.gpu == Some(i) {
                g.health = Health {
                    healthy: false,
                    reason: Some(format!(
                        "{} not returning after {} ms (timeout)",
                        c.call,
                        waited.as_millis()
                    )),
                };
            }
        }
    }

    fn raise_events(&mut self, snap: &mut GpuSnapshot, now: SystemTime) {
        for g in &snap.gpus {
            let prev = self.reported.get(&g.id.uuid);
            let was_healthy = prev.is_none_or(|h| h.healthy);
            if was_healthy == g.health.healthy {
                if let Some(p) = self.reported.get_mut(&g.id.uuid) {
                    // Keep the latest reason for the recovery message.
                    *p = g.health.clone();
                } else {
                    self.reported.insert(g.id.uuid.clone(), g.health.clone());
                }
                continue;
            }
            let reason = if g.health.healthy {
                let from = prev
                    .and_then(|h| h.reason.clone())
                    .unwrap_or_else(|| "unknown fault".into());
                tracing::info!(
                    gpu = g.id.index,
                    uuid = %g.id.uuid,
                    "GPU {} ({}) is healthy again after: {from}",
                    g.id.index,
                    g.id.uuid
                );
                from
            } else {
                let why = g.health.reason.clone().unwrap_or_else(|| "unknown".into());
                tracing::warn!(
                    gpu = g.id.index,
                    uuid = %g.id.uuid,
                    "GPU {} ({}) is unhealthy: {why}; it stays marked unhealthy until the fault clears",
                    g.id.index,
                    g.id.uuid
                );
                why
            };
            snap.events.push(HealthEvent {
                uuid: g.id.uuid.clone(),
                index: g.id.index,
                at: now,
                healthy: g.health.healthy,
                reason,
            });
            self.reported.insert(g.id.uuid.clone(), g.health.clone());
        }
    }
}

fn publish(shared: &Shared, snap: GpuSnapshot) {
    *shared.latest.lock().unwrap_or_else(PoisonError::into_inner) = Some(snap);
}

/// Waits `d`; false when the sampler was dropped.
fn wait(rx: &mpsc::Receiver<()>, d: Duration) -> bool {
    matches!(rx.recv_timeout(d), Err(RecvTimeoutError::Timeout))
}

fn worker(cfg: GpuConfig, proc_root: PathBuf, shared: Arc<Shared>, rx: mpsc::Receiver<()>) {
    let lib = cfg.library();
    let limits = Limits {
        slow_call: cfg.call_timeout,
        xid_hold: cfg.xid_unhealthy_hold,
    };
    let mut last_missing: Option<String> = None;
    loop {
        let attempt =
            init_nvml(&lib).map_err(|e| format!("cannot load NVML from {}: {e}", lib.display()));
        let outcome: Result<(), String> = match attempt {
            Err(reason) => Err(reason),
            Ok(nvml) => match Collector::new(&nvml, &proc_root, shared.tracker.clone(), limits) {
                Err(e) => Err(format!(
                    "NVML loaded from {} but listing GPUs failed: {e}",
                    lib.display()
                )),
                Ok(mut c) => {
                    if c.gpu_count() == 0 {
                        tracing::warn!(
                            "no GPU found: NVML (driver {}) reports 0 devices",
                            c.driver_version()
                        );
                    } else {
                        tracing::info!(
                            "NVML loaded from {}: driver {}, {} GPU(s)",
                            lib.display(),
                            c.driver_version(),
                            c.gpu_count()
                        );
                    }
                    loop {
                        let t0 = Instant::now();
                        publish(&shared, c.cycle());
                        if !wait(&rx, cfg.period.saturating_sub(t0.elapsed())) {
                            return;
                        }
                    }
                }
            },
        };
        if let Err(reason) = outcome {
            if last_missing.as_ref() != Some(&reason) {
                tracing::warn!(
                    "no GPU found: {reason}; GPU metrics are off, retrying every {} s",
                    cfg.init_retry.as_secs()
                );
            }
            publish(
                &shared,
                GpuSnapshot::empty(
                    SystemTime::now(),
                    NvmlStatus::Missing {
                        reason: reason.clone(),
                    },
                ),
            );
            last_missing = Some(reason);
            if !wait(&rx, cfg.init_retry) {
                return;
            }
        }
    }
}

/// Figures for one NVML cycle, from `measure_cycle_cost`.
#[derive(Debug, Clone)]
pub struct CycleCost {
    pub gpus: usize,
    pub processes: usize,
    pub cycles: u32,
    /// Mean CPU time of the sampling thread per cycle, library included.
    pub cpu_per_cycle: Duration,
    /// Mean time inside NVML calls per cycle (the library's share).
    pub nvml_per_cycle: Duration,
    /// CPU per cycle in the agent's own code: total minus the library's share.
    pub agent_cpu_per_cycle: Duration,
    /// Like `agent_cpu_per_cycle` for a cycle that re-reads every PID's cgroup file: only the
    /// first cycle does; later re-reads are spread so each cycle re-reads about a fifth of them.
    pub agent_cpu_per_cycle_uncached: Duration,
    /// Mean time to encode the snapshot as metrics (scrape time, not per cycle).
    pub encode_per_scrape: Duration,
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_THREAD_CPUTIME_ID is always available on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs `cycles` NVML cycles against `lib` on this thread and reports their cost (benchmarks).
pub fn measure_cycle_cost(
    lib: &Path,
    proc_root: &Path,
    cycles: u32,
) -> Result<CycleCost, NvmlError> {
    let nvml = init_nvml(lib)?;
    let tracker: CallTracker = Arc::new(Mutex::new(None));
    let limits = Limits {
        slow_call: Duration::from_secs(2),
        xid_hold: Duration::from_secs(300),
    };
    let mut c = Collector::new(&nvml, proc_root, tracker, limits)?;
    let mut snap = c.cycle();
    for _ in 0..5 {
        snap = c.cycle();
    }
    let (mut cpu, mut lib_time) = (Duration::ZERO, Duration::ZERO);
    let n = cycles.max(1);
    for _ in 0..n {
        let t0 = thread_cpu();
        snap = c.cycle();
        cpu += thread_cpu() - t0;
        lib_time += c.nvml_time;
    }
    let (mut cpu_u, mut lib_u) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..n {
        c.forget_cgroups();
        let t0 = thread_cpu();
        snap = c.cycle();
        cpu_u += thread_cpu() - t0;
        lib_u += c.nvml_time;
    }
    let t0 = Instant::now();
    let mut out = String::new();
    for _ in 0..n {
        out.clear();
        let _ = encode_to_string(&snap, &mut out);
    }
    let encode = t0.elapsed() / n;
    let (cpu, lib_time) = (cpu / n, lib_time / n);
    Ok(CycleCost {
        gpus: snap.gpus.len(),
        processes: snap.processes.len(),
        cycles: n,
        cpu_per_cycle: cpu,
        nvml_per_cycle: lib_time,
        agent_cpu_per_cycle: cpu.saturating_sub(lib_time),
        agent_cpu_per_cycle_uncached: (cpu_u / n).saturating_sub(lib_u / n),
        encode_per_scrape: encode,
    })
}

/// Encodes a snapshot alone into OpenMetrics text (tests, benchmarks, debugging).
pub fn encode_to_string(snap: &GpuSnapshot, out: &mut String) -> std::fmt::Result {
    use prometheus_client::collector::Collector as PromCollector;
    use prometheus_client::encoding::DescriptorEncoder;
    use prometheus_client::registry::Registry;

    #[derive(Debug)]
    struct One(GpuSnapshot);
    impl PromCollector for One {
        fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
            self.0.encode(&mut enc, "test-host", &|_| Vec::new())
        }
    }
    let mut reg = Registry::default();
    reg.register_collector(Box::new(One(snap.clone())));
    prometheus_client::encoding::text::encode(out, &reg)
}

#[cfg(test)]
mod tests;
