//! The agent's configuration: one TOML file, every default written here, overridden by
//! `HEADROOM_*` environment variables and command-line flags (in that order).
//!
//! Loading never half-starts anything: a bad file, key or value is one [`ConfigError`] that
//! names it, and the binary exits with code 2.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the HTTP server (`/metrics`, `/healthz`, `/readyz`, `/v1/status`).
    pub listen: SocketAddr,
    /// Where history and other state survive restarts.
    pub state_dir: PathBuf,
    pub log_format: LogFormat,
    /// Seconds between two samples of the node and its containers.
    pub sample_interval_s: f64,
    /// Value of the `Hostname` label; empty means the kernel's host name.
    pub hostname: String,
    pub history: HistoryConfig,
    pub cgroup: CgroupConfig,
    pub kubernetes: KubernetesConfig,
    pub gpu: GpuConfig,
    pub ebpf: EbpfConfig,
    pub aggregator: AggregatorConfig,
    pub policy: PolicyConfig,
    pub forecast: ForecastSettings,
    pub engines: EnginesConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Fine tier: one point per sample, kept this many seconds.
    pub fine_retention_s: u64,
    /// Coarse tier: max and mean per `coarse_step_s`, kept this many seconds.
    pub coarse_step_s: u64,
    pub coarse_retention_s: u64,
    /// Seconds between two saves of the history to `state_dir` (it is also saved on shutdown).
    pub save_interval_s: u64,
    /// A series not updated for this long is dropped (one of a gone container goes at once).
    pub stale_after_s: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CgroupConfig {
    /// Mount point of the cgroup hierarchies (v2, v1 or hybrid are detected below it).
    pub root: PathBuf,
    /// procfs mount, for the node's own counters and for attributing PIDs to containers.
    pub proc_root: PathBuf,
    /// Extra cgroups to treat as containers: globs over paths relative to the hierarchy root
    /// (`*` stays inside one path segment, `**` crosses segments), e.g. `/batch/*`.
    pub include: Vec<String>,
    /// Report systemd services (`*.service` cgroups) as containers.
    pub systemd_services: bool,
    /// Directories holding OCI runtime state (`<id>/state.json`), used to name containers
    /// started by runc, containerd or Docker whatever their cgroup is called.
    pub runtime_state_dirs: Vec<PathBuf>,
    /// Upper bound on tracked containers; more are ignored with a warning.
    pub max_containers: usize,
}

/// Where the kubelet serves its pod-resources API (`--root-dir` `/var/lib/kubelet`).
pub const DEFAULT_POD_RESOURCES_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// kubelet's `/var/log/containers`: its `<pod>_<namespace>_<container>-<id>.log` names give
    /// namespace, pod and container for a container id without asking the API server.
    pub log_dir: PathBuf,
    /// Watch this node's pods through the Kubernetes API (in a pod with a service account
    /// token): names, owners (Deployment, StatefulSet, DaemonSet, Job, ...) and annotations.
    /// Without the API, names come from `log_dir` and owners from pod names.
    pub api: bool,
    /// API server URL; unset means the in-cluster address (`KUBERNETES_SERVICE_HOST`).
    pub api_server: Option<String>,
    /// Ask the kubelet's pod-resources API which devices (GPUs, MIG devices, time-sliced
    /// replicas) it allocated to which container, and label GPU series with them.
    pub pod_resources: bool,
    /// The kubelet's pod-resources socket. In a pod, mount its folder (not the socket: the
    /// kubelet recreates it when it restarts).
    pub pod_resources_socket: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    pub enabled: bool,
    /// Path to `libnvidia-ml.so.1`; empty means the system's default search path.
    pub nvml_library: Option<PathBuf>,
    /// Seconds a critical XID error keeps a GPU marked unhealthy after the last one.
    pub xid_unhealthy_hold_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForecastSettings {
    pub enabled: bool,
    /// Seconds a scale-up takes: forecasts cover demand this far ahead.
    pub lead_time_s: f64,
    /// Seconds per forecaster step: each step feeds the forecasters the peak of its samples
    /// (never less than one sample interval). The history keeps every sample regardless.
    pub step_s: f64,
    /// Accepted share of steps with demand above the forecast upper bound.
    pub target_violation: f64,
    /// Upper bound on series with a forecaster (each holds at most 64 KiB of state).
    pub max_series: usize,
    /// History series that get a forecaster.
    pub series: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EbpfConfig {
    pub enabled: bool,
    /// Executable that loads the probes in a short-lived child process (`<exe> ebpf-loader`),
    /// so the agent never holds the memory CO-RE loading takes. Set by the `headroom` binary
    /// (not a configuration key); unset, the probes load in-process.
    #[serde(skip)]
    pub loader: Option<PathBuf>,
}

/// Inference engines in tracked containers: discovery, pinned endpoints and scrape bounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnginesConfig {
    /// Scrape inference engines at all.
    pub enabled: bool,
    /// Find engines by probing the listening ports of tracked containers; off, only
    /// `endpoints` and pod annotations are scraped.
    pub discover: bool,
    /// Seconds one scrape (connect, headers, body) may take.
    pub timeout_s: f64,
    /// Largest `/metrics` body read; a larger one is cut off and counts as a failure.
    pub max_body_bytes: usize,
    /// Seconds between two reads of all containers' listening ports (new ones are read at once).
    pub rediscover_interval_s: f64,
    /// Longest wait between two attempts at a failing endpoint (the wait doubles per failure).
    pub backoff_max_s: f64,
    /// Most listening ports of one container probed.
    pub max_ports_per_container: usize,
    /// Cgroup globs never scraped.
    pub exclude: Vec<String>,
    /// Endpoints named explicitly (scraped even with `discover = false`).
    pub endpoints: Vec<EngineEndpoint>,
    /// Per-replica targets the aggregator sizes replicas against (hints `engine_queue`,
    /// `engine_kv_cache`, `engine_tokens`); overridden per workload by `workload_targets` and
    /// by pod annotations `headroom.dev/target-{waiting-per-replica,kv-cache-ratio,tokens-per-second}`.
    pub targets: EngineTargets,
    /// Per-workload targets, first matching `cgroup` glob wins.
    pub workload_targets: Vec<WorkloadTargets>,
}

/// What one replica of an inference workload should carry; 0 leaves a signal out of the hints.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineTargets {
    /// Requests waiting per replica.
    pub waiting_per_replica: f64,
    /// KV-cache usage per replica (0–1).
    pub kv_cache_ratio: f64,
    /// Generated tokens per second per replica (model- and hardware-specific: off by default).
    pub tokens_per_second: f64,
    /// Requests in flight (running + waiting) per replica, e.g. the engine's batch slots (off
    /// by default: the right number depends on how the engine is started).
    pub concurrency_per_replica: f64,
}

impl Default for EngineTargets {
    fn default() -> Self {
        EngineTargets {
            waiting_per_replica: 4.0,
            kv_cache_ratio: 0.8,
            tokens_per_second: 0.0,
            concurrency_per_replica: 0.0,
        }
    }
}

/// Targets for the containers whose cgroup matches `cgroup`; unset keys keep the defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadTargets {
    pub cgroup: String,
    pub waiting_per_replica: Option<f64>,
    pub kv_cache_ratio: Option<f64>,
    pub tokens_per_second: Option<f64>,
    pub concurrency_per_replica: Option<f64>,
}

/// An engine endpoint pinned by configuration: `port` (and `path`) of the containers whose
/// cgroup matches `cgroup`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineEndpoint {
    pub cgroup: String,
    pub port: u16,
    #[serde(default = "default_metrics_path")]
    pub path: String,
}

fn default_metrics_path() -> String {
    "/metrics".into()
}

impl Default for EnginesConfig {
    fn default() -> Self {
        EnginesConfig {
            enabled: true,
            discover: true,
            timeout_s: 0.8,
            max_body_bytes: 4 << 20,
            rediscover_interval_s: 60.0,
            backoff_max_s: 300.0,
            max_ports_per_container: 16,
            exclude: Vec::new(),
            endpoints: Vec::new(),
            targets: EngineTargets::default(),
            workload_targets: Vec::new(),
        }
    }
}

/// Where scale hints go and how they are built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregatorConfig {
    /// Aggregator base URLs (`http://host:port` or `https://host:port`); every batch goes to
    /// each. Empty: no hints.
    pub endpoints: Vec<String>,
    /// File holding the bearer token; re-read on every attempt.
    pub token_file: Option<PathBuf>,
    /// PEM bundle of the CAs trusted for `https://` endpoints (replacing the compiled-in Mozilla
    /// roots); unset trusts those roots.
    pub ca_file: Option<PathBuf>,
    /// Where batches wait while an aggregator is unreachable; unset means `<state_dir>/hints`.
    pub spool_dir: Option<PathBuf>,
    /// Batches kept per endpoint while it is unreachable; the oldest are dropped beyond this.
    pub spool_max_batches: usize,
    /// Samples between two reports.
    pub report_every: u32,
    /// Seconds of recent history the demand quantiles are taken from where a series has no
    /// forecaster; also the history that earns a hint full confidence.
    pub window_s: u64,
    /// Cgroups mapped to workloads explicitly, first match wins (for cgroups outside Kubernetes).
    pub workloads: Vec<WorkloadRule>,
}

/// `cgroup` is a glob like `cgroup.include`; matching containers report as this workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadRule {
    pub cgroup: String,
    pub namespace: String,
    pub kind: String,
    pub name: String,
}

/// Whether the policy writes what it decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    /// Decisions are computed, exported and logged; nothing is written.
    Observe,
    /// Decisions are written to the managed cgroups.
    Enforce,
}

/// Right-sizing: which cgroups may be changed, how, and within which bounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    pub mode: PolicyMode,
    /// Cgroup path globs (relative to the hierarchy root) the agent may change; nothing else is
    /// ever written.
    pub manage: Vec<String>,
    /// Kubernetes containers in these namespaces (globs) may be changed too.
    pub kubernetes_namespaces: Vec<String>,
    /// `rule`, `predictive`, `event`, combined.
    pub strategies: Vec<crate::policy::Strategy>,
    /// Lead time of the policy's built-in window forecast, used for series the agent's
    /// forecaster (`[forecast]`, which has its own `lead_time_s`) does not cover.
    pub lead_time_s: f64,
    /// Samples in the built-in forecaster's window.
    pub forecast_window: usize,
    /// Capacity = forecast upper bound × (1 + margin).
    pub margin_ratio: f64,
    pub max_step_ratio: f64,
    pub cooldown_s: f64,
    pub scale_in_window_s: f64,
    pub rollback_window_s: f64,
    /// Global limit on cgroup writes per second, all containers together.
    pub max_writes_per_s: f64,
    pub throttle_high_ratio: f64,
    pub util_high_ratio: f64,
    pub util_low_ratio: f64,
    pub memory_pressure_spike_ratio: f64,
    /// Latency SLO for the event reaction (needs a latency signal); 0 disables it.
    pub latency_slo_s: f64,
    /// Floor of a managed non-Kubernetes cgroup.
    pub cpu_floor_cores: f64,
    pub memory_floor_bytes: u64,
    /// Ceiling of a managed non-Kubernetes cgroup; 0 means the node's capacity.
    pub cpu_ceiling_cores: f64,
    pub memory_ceiling_bytes: u64,
    /// Move `memory.max` / `memory.limit_in_bytes` along with the soft limit (never below its
    /// original, never where none was set).
    pub allow_memory_max: bool,
    /// memory.max = memory.high × this, when allowed.
    pub memory_max_ratio: f64,
    /// Kubernetes: allow a burst this share above the container's limit (0 = never above it);
    /// on v2 also sets `cpu.max.burst`.
    pub cpu_burst_ratio: f64,
    pub workload: Vec<WorkloadOverride>,
}

/// Settings for the managed cgroups matching `match` (first match wins).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadOverride {
    #[serde(rename = "match")]
    pub pattern: String,
    pub mode: Option<PolicyMode>,
    pub strategies: Option<Vec<crate::policy::Strategy>>,
    pub margin_ratio: Option<f64>,
    pub cpu_floor_cores: Option<f64>,
    pub cpu_ceiling_cores: Option<f64>,
    pub memory_floor_bytes: Option<u64>,
    pub memory_ceiling_bytes: Option<u64>,
    pub latency_slo_s: Option<f64>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        use crate::policy::Strategy;
        PolicyConfig {
            mode: PolicyMode::Observe,
            manage: Vec::new(),
            kubernetes_namespaces: Vec::new(),
            strategies: vec![Strategy::Rule, Strategy::Predictive, Strategy::Event],
            lead_time_s: 30.0,
            forecast_window: 60,
            margin_ratio: 0.15,
            max_step_ratio: 0.5,
            cooldown_s: 10.0,
            scale_in_window_s: 300.0,
            rollback_window_s: 60.0,
            max_writes_per_s: 20.0,
            throttle_high_ratio: 0.05,
            util_high_ratio: 0.9,
            util_low_ratio: 0.5,
            memory_pressure_spike_ratio: 0.2,
            latency_slo_s: 0.0,
            cpu_floor_cores: 0.1,
            memory_floor_bytes: 64 << 20,
            cpu_ceiling_cores: 0.0,
            memory_ceiling_bytes: 0,
            allow_memory_max: false,
            memory_max_ratio: 1.25,
            cpu_burst_ratio: 0.0,
            workload: Vec::new(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 9810)),
            state_dir: PathBuf::from("/var/lib/headroom"),
            log_format: LogFormat::Text,
            sample_interval_s: 1.0,
            hostname: String::new(),
            history: HistoryConfig::default(),
            cgroup: CgroupConfig::default(),
            kubernetes: KubernetesConfig::default(),
            gpu: GpuConfig::default(),
            ebpf: EbpfConfig::default(),
            aggregator: AggregatorConfig::default(),
            policy: PolicyConfig::default(),
            forecast: ForecastSettings::default(),
            engines: EnginesConfig::default(),
        }
    }
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        AggregatorConfig {
            endpoints: Vec::new(),
            token_file: None,
            ca_file: None,
            spool_dir: None,
            spool_max_batches: 1000,
            report_every: 1,
            window_s: 300,
            workloads: Vec::new(),
        }
    }
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            fine_retention_s: 600,
            coarse_step_s: 60,
            coarse_retention_s: 86400,
            save_interval_s: 60,
            stale_after_s: 30,
        }
    }
}

impl Default for CgroupConfig {
    fn default() -> Self {
        CgroupConfig {
            root: PathBuf::from("/sys/fs/cgroup"),
            proc_root: PathBuf::from("/proc"),
            include: Vec::new(),
            systemd_services: true,
            runtime_state_dirs: vec![
                PathBuf::from("/run/runc"),
                PathBuf::from("/run/containerd/runc"),
                PathBuf::from("/run/docker/runtime-runc"),
            ],
            max_containers: 4096,
        }
    }
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            log_dir: PathBuf::from("/var/log/containers"),
            api: true,
            api_server: None,
            pod_resources: true,
            pod_resources_socket: PathBuf::from(DEFAULT_POD_RESOURCES_SOCKET),
        }
    }
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            enabled: true,
            nvml_library: None,
            xid_unhealthy_hold_s: 300.0,
        }
    }
}

impl Default for ForecastSettings {
    fn default() -> Self {
        ForecastSettings {
            enabled: true,
            lead_time_s: 60.0,
            step_s: 10.0,
            target_violation: 0.05,
            max_series: 2000,
            series: [
                "node_cpu_usage_cores",
                "node_memory_used_bytes",
                "container_cpu_usage_cores",
                "container_memory_working_set_bytes",
                "gpu_utilization_ratio",
                "gpu_memory_used_bytes",
                "container_gpu_utilization_ratio",
                "container_gpu_memory_used_bytes",
                "container_request_rate_per_second",
                "container_request_latency_p99_seconds",
                "container_engine_requests_waiting",
                "container_engine_requests_running",
                "container_engine_kv_cache_usage_ratio",
                "container_engine_generated_tokens_per_second",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

impl Default for EbpfConfig {
    fn default() -> Self {
        EbpfConfig {
            enabled: true,
            loader: None,
        }
    }
}

impl Config {
    /// Parses a TOML document; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text, path)
    }

    /// Checks what serde cannot: ranges and relations between keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_string(),
            })
        };
        if !(self.sample_interval_s.is_finite()
            && self.sample_interval_s >= 0.05
            && self.sample_interval_s <= 3600.0)
        {
            return invalid(
                "sample_interval_s",
                &format!("{} is outside 0.05..=3600", self.sample_interval_s),
            );
        }
        if let Some(url) = &self.kubernetes.api_server
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            return invalid(
                "kubernetes.api_server",
                &format!("{url:?} is not an http:// or https:// URL"),
            );
        }
        let h = &self.history;
        if (h.fine_retention_s as f64) < self.sample_interval_s {
            return invalid(
                "history.fine_retention_s",
                "must hold at least one sample interval",
            );
        }
        if h.coarse_step_s == 0 {
            return invalid("history.coarse_step_s", "must be at least 1");
        }
        if h.coarse_retention_s < h.coarse_step_s {
            return invalid(
                "history.coarse_retention_s",
                "must be at least history.coarse_step_s",
            );
        }
        if h.save_interval_s == 0 {
            return invalid("history.save_interval_s", "must be at least 1");
        }
        if self.cgroup.max_containers == 0 {
            return invalid("cgroup.max_containers", "must be at least 1");
        }
        for glob in &self.cgroup.include {
            if !glob.starts_with('/') {
                return invalid(
                    "cgroup.include",
                    &format!(
                        "`{glob}` must be a path relative to the hierarchy root, starting with `/`"
                    ),
                );
            }
        }
        let p = &self.policy;
        for (key, v, lo, hi) in [
            ("policy.lead_time_s", p.lead_time_s, 0.0, 86400.0),
            ("policy.margin_ratio", p.margin_ratio, 0.0, 10.0),
            ("policy.max_step_ratio", p.max_step_ratio, 0.01, 10.0),
            ("policy.cooldown_s", p.cooldown_s, 0.0, 86400.0),
            (
                "policy.scale_in_window_s",
                p.scale_in_window_s,
                0.0,
                7.0 * 86400.0,
            ),
            (
                "policy.rollback_window_s",
                p.rollback_window_s,
                0.0,
                86400.0,
            ),
            ("policy.max_writes_per_s", p.max_writes_per_s, 0.01, 10000.0),
            (
                "policy.throttle_high_ratio",
                p.throttle_high_ratio,
                0.0,
                1.0,
            ),
            ("policy.util_high_ratio", p.util_high_ratio, 0.05, 1.0),
            ("policy.util_low_ratio", p.util_low_ratio, 0.0, 1.0),
            (
                "policy.memory_pressure_spike_ratio",
                p.memory_pressure_spike_ratio,
                0.0,
                1.0,
            ),
            ("policy.latency_slo_s", p.latency_slo_s, 0.0, 3600.0),
            ("policy.cpu_floor_cores", p.cpu_floor_cores, 0.001, 100000.0),
            (
                "policy.cpu_ceiling_cores",
                p.cpu_ceiling_cores,
                0.0,
                100000.0,
            ),
            ("policy.memory_max_ratio", p.memory_max_ratio, 1.0, 100.0),
            ("policy.cpu_burst_ratio", p.cpu_burst_ratio, 0.0, 10.0),
        ] {
            if !(v.is_finite() && v >= lo && v <= hi) {
                return invalid(key, &format!("{v} is outside {lo}..={hi}"));
            }
        }
        if p.util_low_ratio >= p.util_high_ratio {
            return invalid(
                "policy.util_low_ratio",
                "must be below policy.util_high_ratio (the hysteresis band)",
            );
        }
        if p.forecast_window < 3 {
            return invalid("policy.forecast_window", "must be at least 3");
        }
        for glob in p.manage.iter().chain(p.workload.iter().map(|w| &w.pattern)) {
            if !glob.starts_with('/') {
                return invalid(
                    "policy.manage",
                    &format!(
                        "`{glob}` must be a path relative to the hierarchy root, starting with `/`"
                    ),
                );
            }
        }
        let f = &self.forecast;
        if !(f.lead_time_s.is_finite() && f.lead_time_s > 0.0) {
            return invalid(
                "forecast.lead_time_s",
                &format!("{} must be a positive number of seconds", f.lead_time_s),
            );
        }
        if !(f.step_s.is_finite() && f.step_s > 0.0 && f.step_s <= 3600.0) {
            return invalid(
                "forecast.step_s",
                &format!("{} must be a number of seconds in (0, 3600]", f.step_s),
            );
        }
        if f.lead_time_s / f.step_s.max(self.sample_interval_s) > 1024.0 {
            return invalid(
                "forecast.lead_time_s",
                &format!("{} s is more than 1024 forecast steps", f.lead_time_s),
            );
        }
        if !(f.target_violation > 0.0 && f.target_violation <= 0.5) {
            return invalid(
                "forecast.target_violation",
                &format!("{} is outside (0, 0.5]", f.target_violation),
            );
        }
        if self.state_dir.as_os_str().is_empty() {
            return invalid("state_dir", "must not be empty");
        }
        let e = &self.engines;
        if !(e.timeout_s.is_finite() && e.timeout_s > 0.0 && e.timeout_s <= 60.0) {
            return invalid(
                "engines.timeout_s",
                &format!("{} is outside (0, 60]", e.timeout_s),
            );
        }
        if e.max_body_bytes < 1024 {
            return invalid("engines.max_body_bytes", "must be at least 1024");
        }
        if !(e.rediscover_interval_s.is_finite() && e.rediscover_interval_s >= 1.0) {
            return invalid("engines.rediscover_interval_s", "must be at least 1");
        }
        if !(e.backoff_max_s.is_finite() && e.backoff_max_s >= 1.0) {
            return invalid("engines.backoff_max_s", "must be at least 1");
        }
        for glob in e
            .exclude
            .iter()
            .chain(e.endpoints.iter().map(|p| &p.cgroup))
        {
            if !glob.starts_with('/') {
                return invalid(
                    "engines.exclude",
                    &format!("`{glob}` must be a cgroup path glob starting with `/`"),
                );
            }
        }
        let t = &e.targets;
        for (key, v) in [
            (
                "engines.targets.waiting_per_replica",
                Some(t.waiting_per_replica),
            ),
            ("engines.targets.kv_cache_ratio", Some(t.kv_cache_ratio)),
            (
                "engines.targets.tokens_per_second",
                Some(t.tokens_per_second),
            ),
            (
                "engines.targets.concurrency_per_replica",
                Some(t.concurrency_per_replica),
            ),
        ]
        .into_iter()
        .chain(e.workload_targets.iter().flat_map(|w| {
            [
                (
                    "engines.workload_targets.waiting_per_replica",
                    w.waiting_per_replica,
                ),
                ("engines.workload_targets.kv_cache_ratio", w.kv_cache_ratio),
                (
                    "engines.workload_targets.tokens_per_second",
                    w.tokens_per_second,
                ),
                (
                    "engines.workload_targets.concurrency_per_replica",
                    w.concurrency_per_replica,
                ),
            ]
        })) {
            if let Some(v) = v
                && !(v.is_finite() && v >= 0.0 && (!key.ends_with("kv_cache_ratio") || v <= 1.0))
            {
                return invalid(
                    key,
                    &format!("{v} must be 0 (off) or positive (a ratio at most 1)"),
                );
            }
        }
        for w in &e.workload_targets {
            if !w.cgroup.starts_with('/') {
                return invalid(
                    "engines.workload_targets.cgroup",
                    &format!("`{}` must start with `/`", w.cgroup),
                );
            }
        }
        for p in &e.endpoints {
            if p.port == 0 || !p.path.starts_with('/') {
                return invalid(
                    "engines.endpoints",
                    &format!(
                        "port {} path {:?}: need a port above 0 and a path starting with `/`",
                        p.port, p.path
                    ),
                );
            }
        }
        let a = &self.aggregator;
        for e in &a.endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return invalid(
                    "aggregator.endpoints",
                    &format!("`{e}` must be an http:// or https:// URL"),
                );
            }
        }
        if a.report_every == 0 {
            return invalid("aggregator.report_every", "must be at least 1");
        }
        if a.spool_max_batches == 0 {
            return invalid("aggregator.spool_max_batches", "must be at least 1");
        }
        if (a.window_s as f64) < self.sample_interval_s {
            return invalid(
                "aggregator.window_s",
                "must hold at least one sample interval",
            );
        }
        for r in &a.workloads {
            if !r.cgroup.starts_with('/') {
                return invalid(
                    "aggregator.workloads.cgroup",
                    &format!("`{}` must start with `/`", r.cgroup),
                );
            }
            let w = headroom_protocol::schema::WorkloadRef {
                namespace: r.namespace.clone(),
                kind: r.kind.clone(),
                name: r.name.clone(),
            };
            // Checked as the aggregator will check each hint, so a bad rule fails at start-up.
            if let Err(e) = headroom_protocol::schema::check_workload(&w) {
                return invalid("aggregator.workloads", &e.to_string());
            }
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        // Serialising plain data structures to TOML cannot fail; fall back to Debug if it ever does.
        toml::to_string_pretty(self)
            .unwrap_or_else(|e| format!("# cannot print config: {e}\n{self:#?}"))
    }

    /// Samples kept in the fine history tier.
    pub fn fine_capacity(&self) -> usize {
        ((self.history.fine_retention_s as f64 / self.sample_interval_s).ceil() as usize).max(1)
    }

    pub fn coarse_capacity(&self) -> usize {
        (self.history.coarse_retention_s / self.history.coarse_step_s).max(1) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_through_toml() {
        let c = Config::default();
        let back = Config::from_toml(&c.to_toml(), Path::new("x.toml")).unwrap();
        assert_eq!(c, back);
        c.validate().unwrap();
    }

    #[test]
    fn unknown_key_is_named() {
        let e =
            Config::from_toml("[history]\nfine_retention = 3\n", Path::new("a.toml")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("fine_retention"), "{msg}");
        assert!(msg.contains("a.toml"), "{msg}");
    }

    #[test]
    fn bad_value_is_named() {
        let e =
            Config::from_toml("sample_interval_s = \"fast\"\n", Path::new("a.toml")).unwrap_err();
        assert!(e.to_string().contains("sample_interval_s"), "{e}");
        let mut c = Config {
            sample_interval_s: 0.0,
            ..Config::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("sample_interval_s")
        );
        c = Config::default();
        c.cgroup.include = vec!["batch/*".into()];
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("cgroup.include")
        );
    }

    #[test]
    fn policy_section_parses_and_is_checked() {
        let c = Config::from_toml(
            "[policy]\nmode = \"enforce\"\nmanage = [\"/batch/*\"]\n[[policy.workload]]\nmatch = \"/batch/a\"\nstrategies = [\"rule\"]\n",
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(c.policy.mode, PolicyMode::Enforce);
        assert_eq!(c.policy.workload[0].pattern, "/batch/a");
        c.validate().unwrap();
        assert_eq!(Config::default().policy.mode, PolicyMode::Observe);
        let mut bad = c.clone();
        bad.policy.util_low_ratio = 0.95;
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("policy.util_low_ratio")
        );
        let mut bad = c;
        bad.policy.manage = vec!["batch".into()];
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("policy.manage")
        );
        let e = Config::from_toml("[policy]\nmode = \"yolo\"\n", Path::new("a.toml")).unwrap_err();
        assert!(e.to_string().contains("mode"), "{e}");
    }

    #[test]
    fn aggregator_endpoints_may_use_tls() {
        let c = Config::from_toml(
            "[aggregator]\nendpoints = [\"https://agg:9470\", \"http://agg2:9470\"]\nca_file = \"/etc/headroom/ca.pem\"\n",
            Path::new("a.toml"),
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.aggregator.ca_file.as_deref(),
            Some(Path::new("/etc/headroom/ca.pem"))
        );
        let mut bad = c;
        bad.aggregator.endpoints = vec!["ftp://agg:21".into()];
        let e = bad.validate().unwrap_err().to_string();
        assert!(
            e.contains("aggregator.endpoints") && e.contains("ftp://agg:21"),
            "{e}"
        );
    }

    #[test]
    fn a_workload_rule_the_aggregator_would_refuse_is_named() {
        let mut c = Config::default();
        c.aggregator.workloads.push(WorkloadRule {
            cgroup: "/batch/*".into(),
            namespace: "Bad_NS".into(),
            kind: "Deployment".into(),
            name: "web".into(),
        });
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("aggregator.workloads") && e.contains("namespace"),
            "{e}"
        );
        c.aggregator.workloads[0].namespace = "shop".into();
        c.validate().unwrap();
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let c =
            Config::from_toml("[cgroup]\ninclude = [\"/batch/*\"]\n", Path::new("a.toml")).unwrap();
        assert_eq!(c.cgroup.include, vec!["/batch/*".to_string()]);
        assert_eq!(c.history, HistoryConfig::default());
        assert_eq!(c.listen, Config::default().listen);
    }
}
