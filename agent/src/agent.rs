//! The agent's life: restore state, start the HTTP server, sample once per interval on a
//! dedicated thread, save state every `history.save_interval_s` and on shutdown.
//!
//! The sampling thread owns the samplers; everything it produces is published as an immutable
//! [`Snapshot`] behind an `Arc`, so a scrape never waits for a sample and never sees half of one.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use crate::config::Config;
use crate::forecast::Forecasts;
use crate::history::{History, SeriesKey};
use crate::sample::Snapshot;
use crate::sample::cgroup::CgroupSampler;
use crate::sample::ebpf::EbpfSampler;
use crate::sample::engines::EngineSampler;
use crate::sample::gpu::{self, GpuSampler, GpuSource};
use crate::sample::node::NodeSampler;
use crate::shared::{SamplerHealth, Shared};
use crate::state::{self, StateDir, StateError};

/// Returns freed heap memory to the kernel (glibc keeps it otherwise).
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory held by the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into memory we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the sampling thread owns.
pub struct Samplers {
    node: NodeSampler,
    cgroups: Option<CgroupSampler>,
    /// Dropped with the sampling thread, which detaches and unloads the probes.
    ebpf: EbpfSampler,
    gpu: Box<dyn GpuSource>,
    /// Its worker thread scrapes inference engines; stopped when this is dropped.
    engines: EngineSampler,
}

impl Samplers {
    pub fn cgroups(&self) -> Option<&CgroupSampler> {
        self.cgroups.as_ref()
    }

    /// Takes GPU snapshots from `source` instead of NVML (`headroom demo` replays a trace).
    pub fn with_gpu(mut self, source: Box<dyn GpuSource>) -> Samplers {
        self.gpu = source;
        self
    }
}

impl Samplers {
    pub fn new(config: &Config) -> Samplers {
        // A cgroup the policy manages must be sampled to be right-sized.
        let mut cgroup = config.cgroup.clone();
        for g in &config.policy.manage {
            if !cgroup.include.contains(g) {
                cgroup.include.push(g.clone());
            }
        }
        let cgroups = match CgroupSampler::new(&cgroup, &config.kubernetes) {
            Ok(c) => {
                tracing::info!(
                    mode = ?c.hierarchy().mode,
                    root = %config.cgroup.root.display(),
                    "cgroup hierarchy found; sampling containers"
                );
                Some(c)
            }
            Err(e) => {
                tracing::warn!(error = %e, "container sampling disabled; node metrics continue");
                None
            }
        };
        let gpu = GpuSampler::new(
            &gpu::GpuConfig {
                nvml_library: config.gpu.nvml_library.clone(),
                enabled: config.gpu.enabled,
                period: Duration::from_secs_f64(config.sample_interval_s),
                xid_unhealthy_hold: Duration::from_secs_f64(config.gpu.xid_unhealthy_hold_s),
                ..gpu::GpuConfig::default()
            },
            &config.cgroup.proc_root,
        );
        Samplers {
            node: NodeSampler::new(&config.cgroup.proc_root),
            cgroups,
            ebpf: EbpfSampler::new(&config.ebpf),
            gpu: Box::new(gpu),
            engines: EngineSampler::new(
                &config.engines,
                &config.cgroup.proc_root,
                Duration::from_secs_f64(config.sample_interval_s),
            ),
        }
    }

    /// One pass over every sampler, recording health as it goes.
    pub fn sample(&mut self, shared: &Shared) -> Snapshot {
        let at = SystemTime::now();
        let t0 = Instant::now();
        let node = match self.node.sample() {
            Ok(n) => {
                shared.set_health(
                    "node",
                    SamplerHealth {
                        healthy: true,
                        last_duration_seconds: t0.elapsed().as_secs_f64(),
                        ..Default::default()
                    },
                );
                Some(n)
            }
            Err(e) => {
                shared.set_health(
                    "node",
                    SamplerHealth {
                        healthy: false,
                        last_error: Some(e.to_string()),
                        last_duration_seconds: t0.elapsed().as_secs_f64(),
                        detail: None,
                    },
                );
                None
            }
        };
        let t1 = Instant::now();
        let containers = match &mut self.cgroups {
            Some(c) => {
                let v = c.sample();
                shared.set_health(
                    "cgroup",
                    SamplerHealth {
                        healthy: true,
                        last_duration_seconds: t1.elapsed().as_secs_f64(),
                        detail: Some(format!(
                            "{:?} hierarchy, {} containers",
                            c.hierarchy().mode,
                            v.len()
                        )),
                        ..Default::default()
                    },
                );
                v
            }
            None => Vec::new(),
        };
        let gone = self
            .cgroups
            .as_ref()
            .map(|c| c.gone().to_vec())
            .unwrap_or_default();
        let cgroup_ids: std::collections::BTreeMap<u64, _> = self
            .cgroups
            .as_ref()
            .map(|c| c.v2_ids().map(|(ident, id)| (id, ident.clone())).collect())
            .unwrap_or_default();
        let t2 = Instant::now();
        let ebpf = self.ebpf.sample(&|id| cgroup_ids.contains_key(&id));
        let up: Vec<String> = ebpf
            .status
            .programs
            .iter()
            .map(|p| match p.attached {
                Some(how) => format!("{} via {how}", p.program),
                None => format!("{} off", p.program),
            })
            .collect();
        shared.set_health(
            "ebpf",
            SamplerHealth {
                healthy: ebpf.read_error.is_none(),
                last_error: ebpf.read_error.clone(),
                last_duration_seconds: t2.elapsed().as_secs_f64(),
                detail: Some(if ebpf.status.enabled {
                    up.join(", ")
                } else {
                    "disabled by configuration".into()
                }),
            },
        );
        let mut gpu = self.gpu.sample(at);
        if let Some(d) = shared.devices.get() {
            gpu.attach_allocations(&d.by_uuid());
        }
        // A process's cgroup as /proc shows it may be nested in its container's, or relative to
        // the agent's own cgroup namespace: name it by the container's key.
        if let Some(c) = &self.cgroups {
            for u in &mut gpu.containers {
                if let Some(ident) = c.container_by_cgroup(&u.cgroup) {
                    u.cgroup.clone_from(&ident.cgroup);
                }
            }
        }
        shared.set_health(
            "gpu",
            SamplerHealth {
                // No driver is normal on a CPU node (`headroom_gpu_nvml_up` says so); this
                // turns 0 only when a GPU is unhealthy.
                healthy: gpu.gpus.iter().all(|g| g.health.healthy),
                last_error: match &gpu.status {
                    gpu::NvmlStatus::Missing { reason } => Some(format!("no GPU found: {reason}")),
                    _ => gpu.gpus.iter().find_map(|g| {
                        g.health
                            .reason
                            .as_ref()
                            .map(|r| format!("GPU {}: {r}", g.id.index))
                    }),
                },
                last_duration_seconds: 0.0,
                detail: Some(format!("{} GPU(s)", gpu.gpus.len())),
            },
        );
        let t3 = Instant::now();
        let engines = self.engines.sample(containers.iter().map(|c| {
            let dir = self.cgroups.as_ref().and_then(|g| {
                let p = g.paths(&c.ident.cgroup)?;
                p.v2.clone()
                    .or_else(|| p.pids.clone())
                    .or_else(|| p.cpu.clone())
                    .or_else(|| p.memory.clone())
            });
            (&c.ident, dir)
        }));
        if engines.enabled {
            let failing = engines.engines.iter().filter(|e| !e.up).count();
            shared.set_health(
                "engines",
                SamplerHealth {
                    healthy: failing == 0,
                    last_error: engines.engines.iter().find_map(|e| e.last_error.clone()),
                    last_duration_seconds: t3.elapsed().as_secs_f64(),
                    detail: Some(format!(
                        "{} engine(s), {failing} failing; newest round of scrapes {:.1} ms",
                        engines.engines.len(),
                        engines.round_seconds * 1e3
                    )),
                },
            );
        }
        Snapshot {
            at,
            node,
            containers,
            ebpf,
            cgroup_ids,
            gpu,
            gone,
            engines,
            forecasts: Vec::new(),
        }
    }
}

/// Series that go into history from one snapshot.
pub fn history_points(s: &Snapshot) -> Vec<(SeriesKey, f64)> {
    let mut out = Vec::with_capacity(2 + s.containers.len() * 3);
    if let Some(n) = &s.node {
        if let Some(v) = n.cpu_usage_cores {
            out.push((SeriesKey::new("node_cpu_usage_cores", vec![]), v));
        }
        out.push((
            SeriesKey::new("node_memory_used_bytes", vec![]),
            n.memory_total_bytes
                .saturating_sub(n.memory_available_bytes) as f64,
        ));
    }
    for (name, labels, v) in s.gpu.series() {
        out.push((SeriesKey::new(&name, labels), v));
    }
    for c in &s.containers {
        let labels = || vec![("cgroup".to_string(), c.ident.cgroup.clone())];
        if let Some(v) = c.cpu_cores {
            out.push((SeriesKey::new("container_cpu_usage_cores", labels()), v));
        }
        if let Some(v) = c.stats.memory_working_set_bytes {
            out.push((
                SeriesKey::new("container_memory_working_set_bytes", labels()),
                v as f64,
            ));
        }
        if let Some(v) = c.throttled_ratio {
            out.push((SeriesKey::new("container_cpu_throttled_ratio", labels()), v));
        }
        // Capacity in force, for the status page; only where a limit is set. memory.high (the
        // soft limit on v1) is what policies move, so it stands for the limit when both are set.
        if let Some(v) = c.stats.cpu_quota_cores {
            out.push((SeriesKey::new("container_cpu_quota_cores", labels()), v));
        }
        match (c.stats.memory_high_bytes, c.stats.memory_limit_bytes) {
            (Some(v), _) => out.push((
                SeriesKey::new("container_memory_high_bytes", labels()),
                v as f64,
            )),
            (None, Some(v)) => out.push((
                SeriesKey::new("container_memory_limit_bytes", labels()),
                v as f64,
            )),
            (None, None) => {}
        }
    }
    let cgroup_of = |id: u64| {
        s.cgroup_ids
            .get(&id)
            .map(|i| vec![("cgroup".to_string(), i.cgroup.clone())])
    };
    for (name, labels, v) in s.ebpf.series(&cgroup_of) {
        out.push((SeriesKey::new(&name, labels), v));
    }
    for (name, cgroup, v) in crate::sample::engines::series(&s.engines) {
        out.push((
            SeriesKey::new(name, vec![("cgroup".to_string(), cgroup)]),
            v,
        ));
    }
    out
}

/// An empty history sized by the configuration.
pub fn new_history(config: &Config) -> History {
    History::new(
        (config.sample_interval_s * 1000.0).round() as u64,
        config.fine_capacity(),
        config.history.coarse_step_s,
        config.coarse_capacity(),
    )
}

/// Loads saved history into `history`; a bad file is moved aside and logged, never fatal.
pub fn restore_history(dir: &StateDir, history: &mut History) {
    match dir.load(state::HISTORY) {
        Ok(None) => tracing::info!(dir = %dir.path().display(), "no saved history; starting fresh"),
        Ok(Some(bytes)) => match history.decode_into(&bytes) {
            Ok(n) => tracing::info!(series = n, dir = %dir.path().display(), "restored history"),
            Err(e) => {
                let err = dir.move_aside(state::HISTORY, e.to_string());
                tracing::warn!(error = %err, "saved history unreadable; starting fresh");
            }
        },
        Err(e @ StateError::MovedAside { .. }) => {
            tracing::warn!(error = %e, "starting with empty history")
        }
        Err(e) => tracing::warn!(error = %e, "cannot read saved history; starting fresh"),
    }
}

/// Builds the forecasters (when enabled) and restores their saved state.
pub fn restore_forecasts(config: &Config, dir: &StateDir) -> Option<Forecasts> {
    if !config.forecast.enabled {
        return None;
    }
    let mut f = match Forecasts::new(&config.forecast, config.sample_interval_s) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(error = %e, "forecasting disabled: bad [forecast] settings");
            return None;
        }
    };
    match dir.load(state::FORECASTS) {
        Ok(None) => {}
        Ok(Some(bytes)) => match f.restore(&bytes) {
            Ok(n) => tracing::info!(series = n, "restored forecasters"),
            Err(e) => {
                let err = dir.move_aside(state::FORECASTS, e);
                tracing::warn!(error = %err, "saved forecasters unusable; forecasts start fresh");
            }
        },
        Err(e) => tracing::warn!(error = %e, "forecasts start fresh"),
    }
    Some(f)
}

pub fn save_forecasts(dir: &StateDir, forecasts: &Forecasts) {
    if let Err(e) = dir.save_with(state::FORECASTS, |w| forecasts.write_state(w)) {
        tracing::warn!(error = %e, "cannot save forecasters; will retry at the next save");
    }
}

pub fn save_history(dir: &StateDir, shared: &Shared) {
    let h = shared.history();
    match dir.save_with(state::HISTORY, |w| h.write_to(w)) {
        Ok(()) => tracing::debug!(series = h.len(), "history saved"),
        Err(e) => tracing::warn!(error = %e, "cannot save history; will retry at the next save"),
    }
}

/// Feeds one pass to the forecasters (their rows land in `snapshot.forecasts`) and records it,
/// with the forecasts' upper bounds, in the history at `t_ms`.
pub fn record_pass(
    shared: &Shared,
    forecasts: Option<&mut Forecasts>,
    snapshot: &mut Snapshot,
    t_ms: u64,
    stale_ms: u64,
) {
    let points = history_points(snapshot);
    if let Some(f) = forecasts {
        snapshot.forecasts = f.observe(&points);
    }
    let mut h = shared.history();
    for (k, v) in &points {
        h.record(k, t_ms, *v);
    }
    for row in &snapshot.forecasts {
        h.record(&row.upper_key, t_ms, row.upper);
    }
    // A gone container's series end now; series that merely went quiet (no requests, a
    // GPU process that exited) are kept until they are stale.
    h.drop_cgroups(&snapshot.gone);
    h.drop_stale(t_ms, stale_ms);
}

/// The sampling loop; returns when `stop` receives a message or its sender is dropped.
pub fn sampling_loop(
    config: &Config,
    shared: &Shared,
    dir: &StateDir,
    mut samplers: Samplers,
    mut forecasts: Option<Forecasts>,
    mut policy: crate::act::driver::Driver,
    stop: std::sync::mpsc::Receiver<()>,
) {
    let mut pass: u64 = 0;
    let interval = Duration::from_secs_f64(config.sample_interval_s);
    let save_every = Duration::from_secs(config.history.save_interval_s);
    let stale_ms = config.history.stale_after_s * 1000;
    let mut next = Instant::now();
    let mut last_save = Instant::now();
    let mut notifier = crate::notify::Notifier::from_env(interval);
    loop {
        let cpu0 = thread_cpu_seconds();
        let t0 = Instant::now();
        let mut snapshot = samplers.sample(shared);
        let containers = snapshot.containers.len();
        let t_ms = unix_ms(snapshot.at);
        record_pass(shared, forecasts.as_mut(), &mut snapshot, t_ms, stale_ms);
        pass += 1;
        if let Some(tx) = shared.hint_tx.get()
            && pass.is_multiple_of(u64::from(config.aggregator.report_every))
        {
            let batch = crate::report::hints::build_hints(config, &snapshot, &shared.history());
            // The receiver lives as long as the runtime; a send error means shutdown.
            let _ = tx.send(batch);
        }
        policy.tick(&snapshot, samplers.cgroups(), &shared.decisions);
        shared.publish(snapshot);
        let wall = t0.elapsed().as_secs_f64();
        let cpu = thread_cpu_seconds() - cpu0;
        {
            let mut c = shared.cost();
            c.samples += 1;
            c.last_wall_seconds = wall;
            c.last_cpu_seconds = cpu;
            c.total_cpu_seconds += cpu;
        }
        shared.last_sample_ms.store(
            shared.started.elapsed().as_millis().max(1) as u64,
            Ordering::Relaxed,
        );
        if !shared.ready.swap(true, Ordering::Relaxed) {
            tracing::info!(wall_ms = wall * 1e3, "first sample done; ready");
        }
        notifier.sampled(containers);
        if last_save.elapsed() >= save_every {
            save_history(dir, shared);
            if let Some(f) = &forecasts {
                save_forecasts(dir, f);
            }
            // Saving builds the whole history image; give those pages back rather than let
            // the heap keep its high-water mark.
            release_free_memory();
            last_save = Instant::now();
        }
        next += interval;
        let now = Instant::now();
        if next < now {
            // Fell behind (suspended, or a pass took longer than the interval): skip, don't burst.
            next = now + interval;
        }
        match stop.recv_timeout(next - now) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            _ => {
                notifier.stopping();
                policy.restore();
                save_history(dir, shared);
                if let Some(f) = &forecasts {
                    save_forecasts(dir, f);
                }
                return;
            }
        }
    }
}

fn hostname(config: &Config) -> String {
    if !config.hostname.is_empty() {
        return config.hostname.clone();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Hints name their node; the aggregator takes only Kubernetes node names.
fn check_node_name(node: &str) -> Result<(), String> {
    headroom_protocol::schema::check_node(node).map_err(|_| {
        format!(
            "`{node}` is not a Kubernetes node name (lowercase DNS subdomain); set `hostname` in the config to report hints"
        )
    })
}

/// What the configuration alone cannot tell, checked before anything starts (the caller exits
/// with 2): the name this node reports under, and the aggregator endpoints.
pub fn preflight(config: &Config) -> Result<(), String> {
    let a = &config.aggregator;
    if a.endpoints.is_empty() {
        return Ok(());
    }
    check_node_name(&hostname(config)).map_err(|e| format!("hostname: {e}"))?;
    for e in &a.endpoints {
        let ok = e
            .parse::<hyper::Uri>()
            .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
        if !ok {
            return Err(format!(
                "aggregator.endpoints: {e:?} is not an http:// or https:// URL"
            ));
        }
    }
    if let Some(ca) = &a.ca_file
        && let Err(err) = std::fs::metadata(ca)
    {
        return Err(format!("aggregator.ca_file: {}: {err}", ca.display()));
    }
    Ok(())
}

/// `headroom agent --restore`: puts back every cgroup value a previous run changed, then exits.
/// Pods resized through the API go back the same way, when the agent runs in a pod with access.
pub fn restore_only(config: &Config) -> anyhow::Result<()> {
    let dir = StateDir::open(&config.state_dir)?;
    let mut a = crate::act::Actuator::open(dir.clone())?;
    let pending = a.changed().count();
    let (n, errors) = a.restore_all();
    let resized = dir.path().join(crate::act::resize::RESIZES.file);
    if crate::act::resize::recorded(&dir) > 0 {
        match crate::kube::ApiConfig::in_cluster(&config.kubernetes, &hostname(config))
            .map(|api| crate::kube::Api::new(&api))
        {
            Some(Ok(api)) => {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let mut r = crate::act::resize::Resizer::open(
                    api,
                    Arc::new(crate::kube::PodDirectory::new()),
                    runtime.handle().clone(),
                    hostname(config),
                    dir,
                );
                let (_, failed) = r.restore_all();
                for e in &failed {
                    tracing::error!(error = %e, "cannot restore a pod's original CPU limit");
                }
                if !failed.is_empty() {
                    anyhow::bail!("{} pod CPU limit(s) could not be restored", failed.len());
                }
            }
            Some(Err(e)) => {
                anyhow::bail!("pods were resized, but the Kubernetes API is unusable: {e}")
            }
            None => anyhow::bail!(
                "pods were resized through the Kubernetes API (recorded in {}), which is not reachable from here; run --restore in the agent's pod",
                resized.display()
            ),
        }
    }
    for e in &errors {
        tracing::error!(error = %e, "cannot restore an original value");
    }
    tracing::info!(
        pending,
        restored = n,
        failed = errors.len(),
        "restore finished"
    );
    if errors.is_empty() {
        Ok(())
    } else {
        Err(anyhow::anyhow!(
            "{} value(s) could not be restored",
            errors.len()
        ))
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("headroom-io")
        .build()?;
    let running = start(config, &runtime, Samplers::new)?;
    crate::caps::report(&running.config);
    let signal = runtime.block_on(wait_for_signal());
    tracing::info!(signal, "shutting down");
    running.stop(&runtime);
    runtime.shutdown_timeout(Duration::from_millis(200));
    tracing::info!("stopped; state saved");
    Ok(())
}

/// A started agent: its HTTP server on `runtime`, its sampling thread, its hint sender.
pub struct Running {
    pub config: Config,
    pub shared: Arc<Shared>,
    /// Where the HTTP server listens (the port chosen when the configuration said 0).
    pub listen: std::net::SocketAddr,
    dir: StateDir,
    stop_tx: std::sync::mpsc::Sender<()>,
    sampler: std::thread::JoinHandle<()>,
    shutdown_tx: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

/// Restores state, binds the HTTP server and starts sampling. `samplers` builds the samplers
/// on the sampling thread (a node's real ones; `headroom demo` swaps in replayed GPUs).
pub fn start(
    config: Config,
    runtime: &tokio::runtime::Runtime,
    samplers: impl FnOnce(&Config) -> Samplers + Send + 'static,
) -> anyhow::Result<Running> {
    let dir = StateDir::open(&config.state_dir)?;
    let mut history = new_history(&config);
    restore_history(&dir, &mut history);
    // Values a crashed run changed go back before anything else happens.
    let actuator = match crate::act::Actuator::open(dir.clone()) {
        Ok(mut a) => {
            crate::act::driver::restore_logged(&mut a);
            Some(a)
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot use the record of original cgroup values; enforce mode will write nothing");
            None
        }
    };
    let shared = Arc::new(Shared::new(&config, history, hostname(&config)));
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(config.listen))
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let listen = listener
        .local_addr()
        .map_err(|e| anyhow::anyhow!("listener on {}: {e}", config.listen))?;
    tracing::info!(listen = %listen, state_dir = %config.state_dir.display(), "headroom agent starting");
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let server = runtime.spawn(crate::serve::serve(
        listener,
        crate::serve::Routes::agent(shared.clone()),
        shutdown_rx,
    ));

    start_hint_client(&config, &shared, runtime)?;
    let kube_api = match crate::kube::start(&config.kubernetes, &shared.hostname, runtime) {
        Some(k) => {
            let _ = shared.pods.set(k.pods);
            k.api
        }
        None => None,
    };
    let devices = if config.kubernetes.pod_resources {
        crate::kube::pod_resources::start(&config.kubernetes.pod_resources_socket, runtime.handle())
    } else {
        crate::kube::pod_resources::off(&config.kubernetes.pod_resources_socket)
    };
    let _ = shared.devices.set(devices);
    let handle = runtime.handle().clone();

    let (stop_tx, stop_rx) = std::sync::mpsc::channel();
    let sampler = {
        let (config, shared, dir) = (config.clone(), shared.clone(), dir.clone());
        std::thread::Builder::new()
            .name("headroom-sample".into())
            .spawn(move || {
                let mut samplers = samplers(&config);
                if let (Some(c), Some(pods)) = (samplers.cgroups.as_mut(), shared.pods.get()) {
                    c.set_pods(pods.clone());
                }
                if let Some(pods) = shared.pods.get() {
                    samplers.engines.set_pods(pods.clone());
                }
                let mut policy = crate::act::driver::Driver::new(
                    &config.policy,
                    config.sample_interval_s,
                    actuator,
                );
                if let (Some(api), Some(pods)) = (kube_api, shared.pods.get()) {
                    policy.set_resizer(crate::act::resize::Resizer::open(
                        api,
                        pods.clone(),
                        handle,
                        shared.hostname.clone(),
                        dir.clone(),
                    ));
                }
                let forecasts = restore_forecasts(&config, &dir);
                // Loading eBPF parses the kernel's BTF (tens of MiB, freed at once) and restoring
                // state reads whole files; hand that memory back instead of keeping it resident.
                release_free_memory();
                sampling_loop(&config, &shared, &dir, samplers, forecasts, policy, stop_rx);
            })?
    };
    Ok(Running {
        config,
        shared,
        listen,
        dir,
        stop_tx,
        sampler,
        shutdown_tx,
        server,
    })
}

impl Running {
    /// Stops sampling (restoring every cgroup value the policy changed and saving state), then
    /// the HTTP server.
    pub fn stop(self, runtime: &tokio::runtime::Runtime) {
        let _ = self.stop_tx.send(());
        if self.sampler.join().is_err() {
            tracing::error!("sampling thread panicked; saving history only");
            save_history(&self.dir, &self.shared);
        }
        let _ = self.shutdown_tx.send(true);
        let server = self.server;
        runtime.block_on(async {
            let _ = tokio::time::timeout(Duration::from_millis(500), server).await;
        });
    }
}

/// Starts the hint client when aggregators are configured and tells the sampling thread, through
/// `shared`, where to send hints.
fn start_hint_client(
    config: &Config,
    shared: &Shared,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<()> {
    let node = shared.hostname.as_str();
    let a = &config.aggregator;
    if a.endpoints.is_empty() {
        return Ok(());
    }
    check_node_name(node).map_err(|e| anyhow::anyhow!("host name {e}"))?;
    let mut cc = headroom_protocol::client::ClientConfig::new(
        node,
        a.endpoints.clone(),
        a.spool_dir
            .clone()
            .unwrap_or_else(|| config.state_dir.join("hints")),
    );
    cc.token_file = a.token_file.clone();
    cc.ca_file = a.ca_file.clone();
    cc.spool_max_batches = a.spool_max_batches;
    cc.interval = Duration::from_secs_f64(config.sample_interval_s * f64::from(a.report_every));
    let client = {
        let _guard = runtime.enter();
        Arc::new(
            headroom_protocol::client::HintClient::start(cc)
                .map_err(|e| anyhow::anyhow!("aggregator client: {e}"))?,
        )
    };
    let _ = shared.hints.set(client.clone());
    tracing::info!(endpoints = ?a.endpoints, node, "sending scale hints");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<headroom_protocol::Hint>>();
    runtime.spawn(async move {
        while let Some(hints) = rx.recv().await {
            if let Err(e) = client.submit(hints).await {
                tracing::warn!(error = %e, "cannot queue scale hints; the next pass sends fresh ones");
            }
        }
    });
    let _ = shared.hint_tx.set(tx);
    Ok(())
}

/// Waits for SIGTERM or SIGINT; returns which.
pub async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install SIGTERM handler; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}
