//! The policy's place in the sampling loop: once per pass it turns the snapshot of each managed
//! container into an observation, asks the engine ([`crate::policy`]) for decisions, writes them
//! through the [`Actuator`] in `enforce` mode, and logs, counts and lists every decision for
//! `/v1/decisions` and `headroom_decisions_total`.
//!
//! Only containers matched by `policy.manage` globs or `policy.kubernetes_namespaces`, or whose
//! pod is annotated `headroom.dev/manage: "true"`, are ever considered (`"false"` keeps a pod
//! out); the rest cost one cached lookup per pass.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use serde::Serialize;

use super::{ActError, Actuator, Allow, mps::Mps};
use crate::cgroup_files::{ControllerPaths, FileReader, number, v1, v2};
use crate::config::{PolicyConfig, PolicyMode, WorkloadOverride};
use crate::policy::{
    Bounds, Decision, DemandForecast, Engine, Envelope, Observation, Params, Resource,
    WindowForecast,
};
use crate::sample::Snapshot;
use crate::sample::cgroup::CgroupSampler;
use crate::sample::cgroup::identity::{Kind, glob_match};

/// Decisions kept for `/v1/decisions`.
const KEEP: usize = 512;

#[derive(Debug, Clone, Serialize)]
pub struct Logged {
    /// Seconds since the epoch.
    pub at: f64,
    pub mode: PolicyMode,
    #[serde(flatten)]
    pub decision: Decision,
}

/// What the HTTP server reads: recent decisions and counters.
#[derive(Debug, Default)]
pub struct DecisionLog {
    inner: Mutex<LogInner>,
}

#[derive(Debug, Default)]
struct LogInner {
    recent: VecDeque<Logged>,
    counts: BTreeMap<(&'static str, &'static str, bool), u64>,
    managed: usize,
}

impl DecisionLog {
    fn push(&self, l: Logged) {
        if let Ok(mut g) = self.inner.lock() {
            *g.counts
                .entry((
                    l.decision.resource.as_str(),
                    l.decision.reason.as_str(),
                    l.decision.applied,
                ))
                .or_default() += 1;
            if g.recent.len() == KEEP {
                g.recent.pop_front();
            }
            g.recent.push_back(l);
        }
    }

    /// JSON for `/v1/decisions`: newest first; `container` filters by cgroup path.
    pub fn json(&self, mode: PolicyMode, container: Option<&str>) -> serde_json::Value {
        let Ok(g) = self.inner.lock() else {
            return serde_json::json!({"error": "decision log unavailable"});
        };
        let items: Vec<&Logged> = g
            .recent
            .iter()
            .rev()
            .filter(|l| container.is_none_or(|c| l.decision.container == c))
            .collect();
        serde_json::json!({
            "mode": mode,
            "managed_containers": g.managed,
            "decisions": items,
        })
    }

    pub fn counts(&self) -> Vec<((&'static str, &'static str, bool), u64)> {
        self.inner
            .lock()
            .map(|g| g.counts.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    }
}

/// What the driver knows of a container from the first pass that saw it.
#[derive(Debug, Clone)]
struct Managed {
    mode: PolicyMode,
    /// A Kubernetes container: a raise stopped at kubelet's limit becomes a resize hint.
    kube: bool,
    params: Params,
    cpu: Envelope,
    memory: Envelope,
    allow: Allow,
}

/// What a container's classification rests on: its pod's `headroom.dev/manage` annotation and
/// whether its Kubernetes names are known.
type Basis = (Option<bool>, bool);

pub struct Driver {
    config: PolicyConfig,
    engine: Engine,
    forecast: WindowForecast,
    actuator: Option<Actuator>,
    mps: Option<Mps>,
    /// `None`: seen and not managed. With what the decision was made on (the pod's annotation
    /// and whether its names were known), so that names arriving later from the API count.
    seen: HashMap<String, (Option<Managed>, Basis)>,
    t0: Instant,
    base: Params,
    /// Kubernetes containers' CPU limits through `pods/resize`, when the agent has the API.
    resizer: Option<super::resize::Resizer>,
}

/// Signals of one pass, gathered once from the snapshot: the forecaster's upper bounds, request
/// latency from eBPF and containers on a faulted GPU, keyed by cgroup path.
#[derive(Default)]
struct Signals<'a> {
    upper: HashMap<(&'a str, Resource), f64>,
    latency: HashMap<&'a str, f64>,
    gpu_fault: std::collections::HashSet<&'a str>,
}

impl<'a> Signals<'a> {
    fn gather(s: &'a Snapshot) -> Signals<'a> {
        let mut g = Signals::default();
        for row in &s.forecasts {
            let r = match row.key.name.as_str() {
                "container_cpu_usage_cores" => Resource::Cpu,
                "container_memory_working_set_bytes" => Resource::Memory,
                _ => continue,
            };
            if let Some(c) = row.key.label("cgroup")
                && row.upper.is_finite()
            {
                g.upper.insert((c, r), row.upper);
            }
        }
        for row in &s.ebpf.requests {
            if let (Some(id), Some(p99)) = (
                s.cgroup_ids.get(&row.cgroup_id),
                row.window.as_ref().and_then(|w| w.p99_seconds),
            ) {
                let e = g.latency.entry(id.cgroup.as_str()).or_insert(p99);
                *e = e.max(p99);
            }
        }
        for p in &s.gpu.processes {
            if let (Some(c), Some(gpu)) = (p.cgroup.as_deref(), s.gpu.gpus.get(p.gpu))
                && !gpu.health.healthy
            {
                g.gpu_fault.insert(c);
            }
        }
        g
    }
}

impl DemandForecast for Signals<'_> {
    fn upper(&self, c: &str, r: Resource) -> Option<f64> {
        self.upper.get(&(c, r)).copied()
    }
}

/// A forecast source tried first, with the built-in one as fallback.
struct Chain<'a>(Option<&'a dyn DemandForecast>, &'a WindowForecast);

impl DemandForecast for Chain<'_> {
    fn upper(&self, c: &str, r: Resource) -> Option<f64> {
        self.0
            .and_then(|f| f.upper(c, r))
            .or_else(|| self.1.upper(c, r))
    }
}

impl Driver {
    /// `actuator` is `None` only when the state directory cannot hold originals; enforce mode
    /// then writes nothing (and says so in every decision's note).
    pub fn new(
        config: &PolicyConfig,
        sample_interval_s: f64,
        actuator: Option<Actuator>,
    ) -> Driver {
        let base = Params {
            strategies: config.strategies.clone(),
            margin_ratio: config.margin_ratio,
            max_step_ratio: config.max_step_ratio,
            cooldown_s: config.cooldown_s,
            scale_in_window_s: config.scale_in_window_s,
            rollback_window_s: config.rollback_window_s,
            throttle_high: config.throttle_high_ratio,
            util_high: config.util_high_ratio,
            util_low: config.util_low_ratio,
            util_target: (config.util_low_ratio + config.util_high_ratio) / 2.0,
            pressure_spike: config.memory_pressure_spike_ratio,
            latency_slo_s: (config.latency_slo_s > 0.0).then_some(config.latency_slo_s),
            ..Params::default()
        };
        let mps = Mps::detect();
        if let Some(m) = &mps {
            tracing::info!(pipe = %m.pipe_dir().display(), "CUDA MPS daemon found; GPU share decisions will be applied through it");
        }
        Driver {
            config: config.clone(),
            engine: Engine::new(config.max_writes_per_s),
            forecast: WindowForecast::new(
                config.forecast_window,
                config.lead_time_s / sample_interval_s.max(1e-3),
            ),
            actuator,
            mps,
            seen: HashMap::new(),
            t0: Instant::now(),
            base,
            resizer: None,
        }
    }

    /// Changes Kubernetes containers' CPU limits through the API from now on; first puts back
    /// what a previous run resized and did not restore (a crash).
    pub fn set_resizer(&mut self, mut r: super::resize::Resizer) {
        r.restore_logged();
        self.resizer = Some(r);
    }

    fn classify(
        &self,
        c: &crate::sample::cgroup::ContainerSample,
        paths: Option<&ControllerPaths>,
        node_cpus: f64,
        node_mem: f64,
    ) -> Option<Managed> {
        let id = &c.ident;
        let by_glob = self.config.manage.iter().any(|g| glob_match(g, &id.cgroup));
        let kube = id.kind == Kind::Kubernetes;
        let by_ns = kube
            && id.namespace.as_deref().is_some_and(|ns| {
                self.config
                    .kubernetes_namespaces
                    .iter()
                    .any(|g| glob_match(g, ns))
            });
        // A pod's `headroom.dev/manage` annotation overrides both, either way.
        if !id.manage.unwrap_or(by_glob || by_ns) {
            return None;
        }
        let o: WorkloadOverride = self
            .config
            .workload
            .iter()
            .find(|w| glob_match(&w.pattern, &id.cgroup))
            .cloned()
            .unwrap_or_default();
        let mut params = self.base.clone();
        if let Some(s) = &o.strategies {
            params.strategies = s.clone();
        }
        if let Some(m) = o.margin_ratio {
            params.margin_ratio = m;
        }
        if let Some(l) = o.latency_slo_s {
            params.latency_slo_s = (l > 0.0).then_some(l);
        }
        // The pod's own `headroom.dev/latency-slo` annotation overrides the configuration.
        if let Some(us) = id.latency_slo_us {
            params.latency_slo_s = Some(us as f64 / 1e6);
        }
        let cap = |v: f64, node: f64| if v > 0.0 { v.min(node) } else { node };
        let mut cpu = Envelope {
            floor: o.cpu_floor_cores.unwrap_or(self.config.cpu_floor_cores),
            ceiling: cap(
                o.cpu_ceiling_cores.unwrap_or(self.config.cpu_ceiling_cores),
                node_cpus,
            ),
        };
        let mut memory = Envelope {
            floor: o
                .memory_floor_bytes
                .unwrap_or(self.config.memory_floor_bytes) as f64,
            ceiling: cap(
                o.memory_ceiling_bytes
                    .unwrap_or(self.config.memory_ceiling_bytes) as f64,
                node_mem,
            ),
        };
        let mut allow = Allow {
            memory_max: self.config.allow_memory_max,
            memory_max_ratio: self.config.memory_max_ratio,
            cpu_burst_ratio: 0.0,
            raise_parents: false,
        };
        if kube {
            // kubelet's own settings as first seen: request from the CPU weight, limit from
            // the quota and the hard memory limit.
            if let Some(req) = paths.and_then(cpu_request_cores) {
                cpu.floor = cpu.floor.max(req);
            }
            if let Some(limit) = c.stats.cpu_quota_cores
                && self.resizer.is_none()
            {
                let burst = self.config.cpu_burst_ratio;
                cpu.ceiling = (limit * (1.0 + burst)).min(node_cpus);
                if burst > 0.0 {
                    allow.cpu_burst_ratio = burst;
                    allow.raise_parents = true;
                }
            }
            if let Some(limit) = c.stats.memory_limit_bytes {
                memory.ceiling = memory.ceiling.min(limit as f64);
            }
        }
        cpu.floor = cpu.floor.min(cpu.ceiling);
        memory.floor = memory.floor.min(memory.ceiling);
        Some(Managed {
            mode: o.mode.unwrap_or(self.config.mode),
            kube,
            params,
            cpu,
            memory,
            allow,
        })
    }

    /// One pass. The agent's forecaster (its upper bounds in `snapshot.forecasts`) is asked
    /// first; the built-in window forecast covers series it does not forecast.
    pub fn tick(
        &mut self,
        snapshot: &Snapshot,
        cgroups: Option<&CgroupSampler>,
        log: &DecisionLog,
    ) {
        let signals = Signals::gather(snapshot);
        let external: Option<&dyn DemandForecast> =
            (!signals.upper.is_empty()).then_some(&signals as &dyn DemandForecast);
        let now = self.t0.elapsed().as_secs_f64();
        let (node_cpus, node_mem) = snapshot
            .node
            .as_ref()
            .map(|n| (n.cpus as f64, n.memory_total_bytes as f64))
            .unwrap_or((1.0, 1e12));
        if let Some(r) = self.resizer.as_mut() {
            r.check(&|cg: &str| {
                let paths = cgroups.and_then(|s| s.paths(cg))?;
                let dir = paths.cpu_limit_dir()?;
                dir.read_cpu_limit(&mut FileReader::default()).ok()?.cores()
            });
        }
        let mut managed_n = 0;
        for c in &snapshot.containers {
            let key = c.ident.cgroup.as_str();
            let paths = cgroups.and_then(|s| s.paths(key));
            let basis = (c.ident.manage, c.ident.pod.is_some());
            if self.seen.get(key).is_none_or(|(_, b)| *b != basis) {
                let m = self.classify(c, paths, node_cpus, node_mem);
                if let Some(m) = &m {
                    tracing::info!(container = key, mode = ?m.mode, cpu = ?m.cpu, memory = ?m.memory, "managing container");
                }
                self.seen.insert(key.to_string(), (m, basis));
            }
            let Some((Some(m), _)) = self.seen.get(key) else {
                continue;
            };
            let m = m.clone();
            managed_n += 1;
            let obs = Observation {
                cpu_usage: c.cpu_cores,
                cpu_quota: c.stats.cpu_quota_cores,
                throttled_ratio: c.throttled_ratio,
                memory_working_set: c.stats.memory_working_set_bytes.map(|v| v as f64),
                memory_high: c.stats.memory_high_bytes.map(|v| v as f64),
                memory_pressure_ratio: c
                    .pressure_some_ratio
                    .iter()
                    .find(|(r, _)| *r == "memory")
                    .map(|(_, v)| *v),
                oom_kills: c.stats.oom_kills,
                latency_seconds: signals.latency.get(key).copied(),
                gpu_fault: signals.gpu_fault.contains(key),
            };
            if let Some(u) = obs.cpu_usage {
                self.forecast.observe(key, Resource::Cpu, u);
            }
            if let Some(u) = obs.memory_working_set {
                self.forecast.observe(key, Resource::Memory, u);
            }
            let fc = Chain(external, &self.forecast);
            let decisions = self.engine.evaluate(
                key,
                now,
                &obs,
                &m.params,
                Bounds {
                    cpu: Some(m.cpu),
                    memory: Some(m.memory),
                },
                &fc,
            );
            for mut d in decisions {
                self.carry_out(&mut d, &m, &c.ident, paths);
                if d.applied || m.mode == PolicyMode::Observe {
                    // In observe mode the engine follows what enforce would have done, so the
                    // decisions listed are the ones enforce would have made.
                    let mut as_if = d.clone();
                    as_if.applied = true;
                    self.engine
                        .record(&as_if, &obs, now, m.params.rollback_window_s);
                }
                tracing::info!(
                    container = %d.container,
                    resource = d.resource.as_str(),
                    from = ?d.from,
                    to = d.to,
                    reason = d.reason.as_str(),
                    applied = d.applied,
                    note = d.note.as_deref().unwrap_or(""),
                    "policy decision"
                );
                log.push(Logged {
                    at: crate::sample::unix_seconds::to_f64(SystemTime::now()),
                    mode: m.mode,
                    decision: d,
                });
            }
        }
        if let Ok(mut g) = log.inner.lock() {
            g.managed = managed_n;
        }
        self.forecast.sweep();
        let alive: std::collections::HashSet<&str> = snapshot
            .containers
            .iter()
            .map(|c| c.ident.cgroup.as_str())
            .collect();
        self.seen.retain(|k, _| alive.contains(k.as_str()));
        self.engine.retain(|k| alive.contains(k));
    }

    fn carry_out(
        &mut self,
        d: &mut Decision,
        m: &Managed,
        ident: &crate::sample::cgroup::Identity,
        paths: Option<&ControllerPaths>,
    ) {
        if m.kube && d.resource == Resource::Cpu && self.resizer.is_some() {
            self.resize(d, m, ident);
            return;
        }
        self.write(d, m, paths);
        // The pod's request and limit are kubelet's: the agent does not fight for more through
        // cgroups, it recommends an in-place resize instead.
        if m.kube && d.to >= d.inputs.ceiling * (1.0 - 1e-9) && d.from.is_some_and(|f| d.to > f) {
            let hint = "hint: at the pod's limit; recommend an in-place resize";
            d.note = Some(match d.note.take() {
                Some(n) => format!("{n}; {hint}"),
                None => hint.to_string(),
            });
        }
    }

    /// A Kubernetes container's CPU limit is the kubelet's: it changes through `pods/resize`.
    fn resize(&mut self, d: &mut Decision, m: &Managed, ident: &crate::sample::cgroup::Identity) {
        if m.mode == PolicyMode::Observe {
            d.note = Some("observe mode: no resize requested".into());
            return;
        }
        let (Some(r), Some(uid), Some(container)) = (
            self.resizer.as_mut(),
            ident.pod_uid.as_deref(),
            ident.container.as_deref(),
        ) else {
            d.note = Some("pod or container name not known yet".into());
            return;
        };
        match r.resize_cpu(uid, container, &ident.cgroup, d.to, d.reason.as_str()) {
            Ok(note) => {
                d.applied = true;
                d.note = Some(note);
            }
            Err(e) => {
                if matches!(e, super::resize::NotNow::Drift(_)) {
                    self.engine.resync(&d.container, d.resource, d.from);
                }
                d.note = Some(e.to_string());
            }
        }
    }

    fn write(&mut self, d: &mut Decision, m: &Managed, paths: Option<&ControllerPaths>) {
        if d.resource == Resource::Gpu {
            match (&self.mps, d.reason) {
                (Some(mps), r)
                    if r != crate::policy::Reason::GpuFault && m.mode == PolicyMode::Enforce =>
                {
                    match mps.set_default_active_thread_percentage(d.to) {
                        Ok(_) => d.applied = true,
                        Err(e) => d.note = Some(e.to_string()),
                    }
                }
                (None, r) if r != crate::policy::Reason::GpuFault => {
                    d.note = Some("hint only: no CUDA MPS daemon".into())
                }
                _ => {}
            }
            return;
        }
        if m.mode == PolicyMode::Observe {
            d.note = Some("observe mode: not written".into());
            return;
        }
        let (Some(act), Some(paths)) = (self.actuator.as_mut(), paths) else {
            d.note = Some("no actuator (state directory unusable) or cgroup gone".into());
            return;
        };
        match act.apply(paths, d.resource, d.from, d.to, m.allow) {
            Ok(_) => d.applied = true,
            Err(ActError::Drifted { actual, .. }) => {
                d.note = Some("value changed by someone else; resynced".into());
                self.engine.resync(&d.container, d.resource, actual);
            }
            Err(e) => {
                tracing::warn!(error = %e, container = %d.container, "cannot apply decision");
                d.note = Some(e.to_string());
            }
        }
    }

    /// Puts back every value this agent changed (on shutdown).
    pub fn restore(&mut self) {
        if let Some(a) = self.actuator.as_mut() {
            restore_logged(a);
        }
        if let Some(r) = self.resizer.as_mut() {
            r.restore_logged();
        }
    }
}

/// Restores and logs the outcome; returns whether everything was restored.
pub fn restore_logged(a: &mut Actuator) -> bool {
    let pending = a.changed().count();
    if pending == 0 {
        return true;
    }
    let (n, errors) = a.restore_all();
    for e in &errors {
        tracing::error!(error = %e, "cannot restore an original value");
    }
    tracing::info!(
        restored = n,
        failed = errors.len(),
        "restored original cgroup values"
    );
    errors.is_empty()
}

/// A Kubernetes container's CPU request, from the weight kubelet derived from it.
fn cpu_request_cores(paths: &ControllerPaths) -> Option<f64> {
    let files = &mut FileReader::default();
    if let Some(d) = &paths.cpu
        && let Ok(t) = files.read(&d.join(v1::CPU_SHARES))
    {
        let shares = number(v1::CPU_SHARES, t).ok()? as f64;
        // kubelet writes 2 shares for a zero request.
        return (shares > 2.0).then_some(shares / 1024.0);
    }
    if let Some(d) = &paths.v2
        && let Ok(t) = files.read(&d.join(v2::CPU_WEIGHT))
    {
        let w = number(v2::CPU_WEIGHT, t).ok()? as f64;
        // Inverse of the runtimes' shares → weight mapping (1 + (shares − 2) × 9999 / 262142).
        let shares = 2.0 + (w - 1.0) * 262142.0 / 9999.0;
        return (shares > 2.5).then_some(shares / 1024.0);
    }
    None
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;

    use super::*;
    use crate::config::{CgroupConfig, KubernetesConfig};
    use crate::sample::gpu::{GpuSnapshot, NvmlStatus};
    use crate::state::StateDir;

    /// A pure v2 tree with one configured cgroup `/job`: 0.5 core quota, throttled.
    fn tree(root: &Path, usage_usec: u64, periods: u64, throttled: u64) {
        let d = root.join("job");
        fs::create_dir_all(&d).unwrap();
        fs::write(root.join("cgroup.controllers"), "cpu memory\n").unwrap();
        fs::write(
            d.join("cpu.stat"),
            format!("usage_usec {usage_usec}\nnr_periods {periods}\nnr_throttled {throttled}\nthrottled_usec 0\n"),
        )
        .unwrap();
        if !d.join("cpu.max").exists() {
            fs::write(d.join("cpu.max"), "50000 100000\n").unwrap();
            fs::write(d.join("memory.high"), "max\n").unwrap();
            fs::write(d.join("memory.max"), "max\n").unwrap();
        }
        fs::write(d.join("memory.current"), "104857600\n").unwrap();
        fs::write(d.join("memory.stat"), "inactive_file 0\n").unwrap();
        fs::write(d.join("memory.events"), "oom_kill 0\n").unwrap();
    }

    fn snapshot(containers: Vec<crate::sample::cgroup::ContainerSample>) -> Snapshot {
        Snapshot {
            at: SystemTime::now(),
            node: None,
            containers,
            ebpf: Default::default(),
            cgroup_ids: Default::default(),
            engines: Default::default(),
            gpu: GpuSnapshot::empty(SystemTime::now(), NvmlStatus::Disabled),
            gone: Vec::new(),
            forecasts: Vec::new(),
        }
    }

    /// Two passes over a throttled container; returns cpu.max afterwards and the log.
    fn run(mode: PolicyMode) -> (String, DecisionLog, tempfile::TempDir, Driver) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("cg");
        tree(&root, 1_000_000, 10, 0);
        let cfg = CgroupConfig {
            root: root.clone(),
            include: vec!["/job".into()],
            runtime_state_dirs: Vec::new(),
            ..CgroupConfig::default()
        };
        let mut sampler = CgroupSampler::new(&cfg, &KubernetesConfig::default()).unwrap();
        let policy = PolicyConfig {
            mode,
            manage: vec!["/job".into()],
            ..PolicyConfig::default()
        };
        let act = Actuator::open(StateDir::open(&t.path().join("state")).unwrap()).unwrap();
        let mut d = Driver::new(&policy, 1.0, Some(act));
        let log = DecisionLog::default();
        d.tick(&snapshot(sampler.sample()), Some(&sampler), &log);
        std::thread::sleep(std::time::Duration::from_millis(50));
        // Every period since the first pass was throttled.
        tree(&root, 1_025_000, 20, 10);
        d.tick(&snapshot(sampler.sample()), Some(&sampler), &log);
        let max = fs::read_to_string(root.join("job/cpu.max")).unwrap();
        (max, log, t, d)
    }

    #[test]
    fn enforce_writes_and_restores_observe_only_lists() {
        let (max, log, t, mut d) = run(PolicyMode::Enforce);
        assert_eq!(max, "75000 100000", "one 50 % step up");
        let v = log.json(PolicyMode::Enforce, Some("/job"));
        assert_eq!(v["decisions"][0]["applied"], true, "{v}");
        assert_eq!(v["decisions"][0]["reason"], "rule_high", "{v}");
        assert_eq!(v["managed_containers"], 1);
        d.restore();
        assert_eq!(
            fs::read_to_string(t.path().join("cg/job/cpu.max")).unwrap(),
            "50000 100000"
        );

        let (max, log, t, _) = run(PolicyMode::Observe);
        assert_eq!(max, "50000 100000\n", "observe mode wrote cpu.max");
        let v = log.json(PolicyMode::Observe, None);
        assert_eq!(v["decisions"][0]["applied"], false, "{v}");
        assert!((v["decisions"][0]["to"].as_f64().unwrap() - 0.75).abs() < 1e-9);
        assert!(!t.path().join("state/originals.json").exists());
        assert_eq!(
            log.counts(),
            vec![(("cpu", "rule_high", false), 1)],
            "counted by resource, reason, applied"
        );
    }
}
