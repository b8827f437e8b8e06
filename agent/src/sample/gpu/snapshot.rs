//! What one GPU sample holds, and how it leaves the sampler: `headroom_gpu_*` metrics with
//! DCGM-exporter labels (encoded at scrape time) and the series that go into history. Plain data: no
//! NVML calls, no I/O.

use std::borrow::Cow;
use std::time::SystemTime;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;

/// Whether NVML is usable, as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NvmlStatus {
    /// Turned off in the configuration.
    Disabled,
    /// Not (yet) initialised: library missing, driver not loaded, init failed.
    Missing {
        reason: String,
    },
    Up {
        driver_version: String,
    },
}

/// The fixed identity of one GPU; these become the DCGM-exporter labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuIdentity {
    pub index: u32,
    pub uuid: String,
    pub pci_bus_id: String,
    pub model: String,
}

/// Per-GPU values from the last cycle; `None` where the call is unsupported or failed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuStats {
    pub utilization_ratio: Option<f64>,
    pub memory_utilization_ratio: Option<f64>,
    pub memory_used_bytes: Option<u64>,
    pub memory_free_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub memory_reserved_bytes: Option<u64>,
    pub sm_clock_hertz: Option<f64>,
    pub memory_clock_hertz: Option<f64>,
    pub power_watts: Option<f64>,
    pub power_limit_watts: Option<f64>,
    pub energy_joules: Option<f64>,
    pub temperature_celsius: Option<f64>,
    pub throttle_reasons: Option<u64>,
    pub pcie_tx_bytes_per_second: Option<f64>,
    pub pcie_rx_bytes_per_second: Option<f64>,
    pub ecc_corrected_errors: Option<u64>,
    pub ecc_uncorrected_errors: Option<u64>,
    pub retired_pages_single_bit: Option<u64>,
    pub retired_pages_double_bit: Option<u64>,
    pub remapped_rows_correctable: Option<u64>,
    pub remapped_rows_uncorrectable: Option<u64>,
    pub mig_enabled: Option<bool>,
    pub mig_instances: Option<u32>,
    /// UUIDs of the MIG devices on this GPU (what a MIG device plugin advertises).
    pub mig_uuids: Vec<String>,
    pub gpm_sm_activity_ratio: Option<f64>,
    pub gpm_sm_occupancy_ratio: Option<f64>,
    pub gpm_tensor_activity_ratio: Option<f64>,
    pub gpm_dram_bandwidth_ratio: Option<f64>,
    pub xid_errors: u64,
    pub last_xid: Option<u64>,
}

/// Health of one GPU as the agent judges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub healthy: bool,
    /// Why it is unhealthy (e.g. "XID 79", "GPU_IS_LOST in nvmlDeviceGetUtilizationRates").
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Gpu {
    pub id: GpuIdentity,
    pub health: Health,
    pub stats: GpuStats,
    /// NVML calls this GPU or driver does not support (answered NOT_SUPPORTED or missing symbol).
    pub unsupported: Vec<&'static str>,
}

/// One process's use of one GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessUsage {
    /// Index into `GpuSnapshot::gpus`.
    pub gpu: usize,
    pub pid: u32,
    /// Container key: cgroup path relative to its hierarchy root; `None` when unresolvable.
    pub cgroup: Option<String>,
    pub memory_used_bytes: Option<u64>,
    /// `None` when process utilisation is unsupported on this GPU.
    pub sm_utilization_ratio: Option<f64>,
    pub memory_utilization_ratio: Option<f64>,
    pub encoder_utilization_ratio: Option<f64>,
    pub decoder_utilization_ratio: Option<f64>,
}

/// One container's use of one GPU: the sum over its processes.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerUsage {
    pub gpu: usize,
    pub cgroup: String,
    pub processes: u32,
    pub memory_used_bytes: u64,
    pub sm_utilization_ratio: f64,
    pub memory_utilization_ratio: f64,
}

/// A device the kubelet allocated to a container (pod-resources API): the whole GPU, a MIG
/// device on it, or a time-sliced replica of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// Index into `GpuSnapshot::gpus`.
    pub gpu: usize,
    /// The id its device plugin advertised (`GPU-…`, `MIG-…`, `GPU-…::N`).
    pub device_id: String,
    pub resource: String,
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

/// A GPU's health changed; consumed by the stages that react (policy, reporter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthEvent {
    pub uuid: String,
    pub index: u32,
    pub at: SystemTime,
    pub healthy: bool,
    /// Why it became unhealthy, or what it recovered from.
    pub reason: String,
}

/// Everything the GPU sampler knows at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuSnapshot {
    pub at: SystemTime,
    pub status: NvmlStatus,
    pub gpus: Vec<Gpu>,
    pub processes: Vec<ProcessUsage>,
    pub containers: Vec<ContainerUsage>,
    /// Devices of these GPUs the kubelet allocated to containers; empty off Kubernetes.
    pub allocations: Vec<Allocation>,
    /// Health changes since the previous `sample()`.
    pub events: Vec<HealthEvent>,
}

type Labels = Vec<(Cow<'static, str>, Cow<'static, str>)>;
type Getter = fn(&Gpu) -> Option<f64>;

/// A value for history: metric name, labels, value.
pub type Series = (String, Vec<(String, String)>, f64);

/// Throttle reason bits (nvml.h `nvmlClocksThrottleReason*`) and their label values.
const THROTTLE_REASONS: [(u64, &str); 9] = [
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
];

/// Collects one family's samples before writing them under a single descriptor.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    samples: Vec<(Labels, f64)>,
}

impl Family {
    fn new(name: &'static str, help: &'static str, kind: MetricType) -> Self {
        Self {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    fn push(&mut self, labels: Labels, v: Option<f64>) {
        if let Some(v) = v {
            self.samples.push((labels, v));
        }
    }

    fn encode(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        if self.samples.is_empty() {
            return Ok(());
        }
        let mut m = enc.encode_descriptor(self.name, self.help, None, self.kind)?;
        for (labels, v) in &self.samples {
            let mut fam = m.encode_family(labels)?;
            match self.kind {
                MetricType::Counter => {
                    prometheus_client::metrics::counter::ConstCounter::new(*v).encode(fam)?
                }
                _ => fam.encode_gauge(v)?,
            }
        }
        Ok(())
    }
}

fn gpu_labels(id: &GpuIdentity, hostname: &str) -> Labels {
    vec![
        ("gpu".into(), id.index.to_string().into()),
        ("UUID".into(), id.uuid.clone().into()),
        ("pci_bus_id".into(), id.pci_bus_id.clone().into()),
        ("modelName".into(), id.model.clone().into()),
        ("Hostname".into(), hostname.to_owned().into()),
    ]
}

fn with(mut l: Labels, k: &'static str, v: impl Into<Cow<'static, str>>) -> Labels {
    l.push((k.into(), v.into()));
    l
}

fn f(v: Option<u64>) -> Option<f64> {
    v.map(|v| v as f64)
}

impl GpuSnapshot {
    /// A snapshot with no GPUs.
    pub fn empty(at: SystemTime, status: NvmlStatus) -> Self {
        Self {
            at,
            status,
            gpus: Vec::new(),
            processes: Vec::new(),
            containers: Vec::new(),
            allocations: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Writes the `headroom_gpu_*` families. Register the caller's collector without a prefix:
    /// the names are complete. `ident` maps a cgroup path to namespace/pod/container labels.
    pub fn encode(
        &self,
        enc: &mut DescriptorEncoder,
        hostname: &str,
        ident: &dyn Fn(&str) -> Vec<(String, String)>,
    ) -> std::fmt::Result {
        use MetricType::{Counter, Gauge};
        let mut up = Family::new(
            "headroom_gpu_nvml_up",
            "1 when NVML is initialised and answering, 0 when missing or failed",
            Gauge,
        );
        up.push(
            vec![("Hostname".into(), hostname.to_owned().into())],
            Some(match self.status {
                NvmlStatus::Up { .. } => 1.0,
                _ => 0.0,
            }),
        );
        up.encode(enc)?;
        if self.gpus.is_empty() {
            return Ok(());
        }

        let mut fams: Vec<(Family, Getter)> = vec![
            (
                Family::new(
                    "headroom_gpu_healthy",
                    "1 when the GPU is healthy, 0 when it is lost, has a critical XID or a failing NVML call",
                    Gauge,
                ),
                |g| Some(if g.health.healthy { 1.0 } else { 0.0 }),
            ),
            (
                Family::new(
                    "headroom_gpu_utilization_ratio",
                    "Fraction of the last sample period a kernel was running (nvmlDeviceGetUtilizationRates)",
                    Gauge,
                ),
                |g| g.stats.utilization_ratio,
            ),
            (
                Family::new(
                    "headroom_gpu_memory_utilization_ratio",
                    "Fraction of the last sample period device memory was read or written",
                    Gauge,
                ),
                |g| g.stats.memory_utilization_ratio,
            ),
            (
                Family::new(
                    "headroom_gpu_memory_used_bytes",
                    "Framebuffer memory used",
                    Gauge,
                ),
                |g| f(g.stats.memory_used_bytes),
            ),
            (
                Family::new(
                    "headroom_gpu_memory_free_bytes",
                    "Framebuffer memory free",
                    Gauge,
                ),
                |g| f(g.stats.memory_free_bytes),
            ),
            (
                Family::new(
                    "headroom_gpu_memory_total_bytes",
                    "Framebuffer memory total",
                    Gauge,
                ),
                |g| f(g.stats.memory_total_bytes),
            ),
            (
                Family::new(
                    "headroom_gpu_memory_reserved_bytes",
                    "Framebuffer memory reserved by the driver",
                    Gauge,
                ),
                |g| f(g.stats.memory_reserved_bytes),
            ),
            (
                Family::new("headroom_gpu_sm_clock_hertz", "SM clock", Gauge),
                |g| g.stats.sm_clock_hertz,
            ),
            (
                Family::new("headroom_gpu_memory_clock_hertz", "Memory clock", Gauge),
                |g| g.stats.memory_clock_hertz,
            ),
            (
                Family::new("headroom_gpu_power_watts", "Power draw", Gauge),
                |g| g.stats.power_watts,
            ),
            (
                Family::new(
                    "headroom_gpu_power_limit_watts",
                    "Enforced power limit",
                    Gauge,
                ),
                |g| g.stats.power_limit_watts,
            ),
            (
                Family::new(
                    "headroom_gpu_energy_joules",
                    "Energy used since the driver was loaded",
                    Counter,
                ),
                |g| g.stats.energy_joules,
            ),
            (
                Family::new(
                    "headroom_gpu_temperature_celsius",
                    "GPU core temperature",
                    Gauge,
                ),
                |g| g.stats.temperature_celsius,
            ),
            (
                Family::new(
                    "headroom_gpu_pcie_tx_bytes_per_second",
                    "PCIe transmit throughput",
                    Gauge,
                ),
                |g| g.stats.pcie_tx_bytes_per_second,
            ),
            (
                Family::new(
                    "headroom_gpu_pcie_rx_bytes_per_second",
                    "PCIe receive throughput",
                    Gauge,
                ),
                |g| g.stats.pcie_rx_bytes_per_second,
            ),
            (
                Family::new("headroom_gpu_mig_enabled", "1 when MIG mode is on", Gauge),
                |g| g.stats.mig_enabled.map(|m| if m { 1.0 } else { 0.0 }),
            ),
            (
                Family::new("headroom_gpu_mig_instances", "MIG devices present", Gauge),
                |g| g.stats.mig_instances.map(f64::from),
            ),
            (
                Family::new(
                    "headroom_gpu_gpm_sm_activity_ratio",
                    "GPM SM activity (Hopper+); plain utilisation overstates partial use",
                    Gauge,
                ),
                |g| g.stats.gpm_sm_activity_ratio,
            ),
            (
                Family::new(
                    "headroom_gpu_gpm_sm_occupancy_ratio",
                    "GPM SM occupancy (Hopper+)",
                    Gauge,
                ),
                |g| g.stats.gpm_sm_occupancy_ratio,
            ),
            (
                Family::new(
                    "headroom_gpu_gpm_tensor_activity_ratio",
                    "GPM any tensor pipe activity (Hopper+)",
                    Gauge,
                ),
                |g| g.stats.gpm_tensor_activity_ratio,
            ),
            (
                Family::new(
                    "headroom_gpu_gpm_dram_bandwidth_ratio",
                    "GPM DRAM bandwidth utilisation (Hopper+)",
                    Gauge,
                ),
                |g| g.stats.gpm_dram_bandwidth_ratio,
            ),
            (
                Family::new(
                    "headroom_gpu_xid_errors",
                    "XID critical error events seen since the agent started",
                    Counter,
                ),
                |g| Some(g.stats.xid_errors as f64),
            ),
            (
                Family::new(
                    "headroom_gpu_last_xid",
                    "The most recent XID error code seen",
                    Gauge,
                ),
                |g| f(g.stats.last_xid),
            ),
        ];
        let mut ecc = Family::new(
            "headroom_gpu_ecc_errors",
            "ECC errors over the GPU's lifetime (aggregate counter)",
            Counter,
        );
        let mut retired = Family::new(
            "headroom_gpu_retired_pages",
            "Framebuffer pages retired, by cause",
            Gauge,
        );
        let mut remapped = Family::new(
            "headroom_gpu_remapped_rows",
            "Memory rows remapped, by error kind",
            Gauge,
        );
        let mut throttle = Family::new(
            "headroom_gpu_throttle_reason_active",
            "1 when this reason is holding clocks down",
            Gauge,
        );
        let mut unsupported = Family::new(
            "headroom_gpu_nvml_call_unsupported",
            "1 for each NVML call this GPU or driver does not support",
            Gauge,
        );
        let mut allocation = Family::new(
            "headroom_gpu_allocation",
            "1 for each device of this GPU the kubelet allocated to a container (pod-resources API)",
            Gauge,
        );
        for a in &self.allocations {
            let Some(g) = self.gpus.get(a.gpu) else {
                continue;
            };
            let mut l = gpu_labels(&g.id, hostname);
            for (k, v) in [
                ("namespace", &a.namespace),
                ("pod", &a.pod),
                ("container", &a.container),
                ("resource", &a.resource),
                ("device_id", &a.device_id),
            ] {
                l.push((k.into(), v.clone().into()));
            }
            allocation.push(l, Some(1.0));
        }
        for (i, g) in self.gpus.iter().enumerate() {
            // Like dcgm-exporter: a GPU held by containers is labelled with each of them (a GPU
            // shared by time-slicing or MIG gets one series per container).
            for l in self.owner_labels(i, gpu_labels(&g.id, hostname)) {
                for (fam, get) in &mut fams {
                    fam.push(l.clone(), get(g));
                }
            }
            let l = gpu_labels(&g.id, hostname);
            ecc.push(
                with(l.clone(), "type", "corrected"),
                f(g.stats.ecc_corrected_errors),
            );
            ecc.push(
                with(l.clone(), "type", "uncorrected"),
                f(g.stats.ecc_uncorrected_errors),
            );
            retired.push(
                with(l.clone(), "cause", "multiple_single_bit"),
                f(g.stats.retired_pages_single_bit),
            );
            retired.push(
                with(l.clone(), "cause", "double_bit"),
                f(g.stats.retired_pages_double_bit),
            );
            remapped.push(
                with(l.clone(), "type", "correctable"),
                f(g.stats.remapped_rows_correctable),
            );
            remapped.push(
                with(l.clone(), "type", "uncorrectable"),
                f(g.stats.remapped_rows_uncorrectable),
            );
            if let Some(bits) = g.stats.throttle_reasons {
                for (bit, name) in THROTTLE_REASONS {
                    throttle.push(
                        with(l.clone(), "reason", name),
                        Some(if bits & bit != 0 { 1.0 } else { 0.0 }),
                    );
                }
            }
            for call in &g.unsupported {
                unsupported.push(with(l.clone(), "call", *call), Some(1.0));
            }
        }
        for (fam, _) in &fams {
            fam.encode(enc)?;
        }
        allocation.encode(enc)?;
        for fam in [&ecc, &retired, &remapped, &throttle, &unsupported] {
            fam.encode(enc)?;
        }

        let mut p_mem = Family::new(
            "headroom_gpu_process_memory_used_bytes",
            "GPU memory used by one process",
            Gauge,
        );
        let mut p_sm = Family::new(
            "headroom_gpu_process_sm_utilization_ratio",
            "SM utilisation of one process over the last sample period",
            Gauge,
        );
        let mut p_mu = Family::new(
            "headroom_gpu_process_memory_utilization_ratio",
            "Memory bandwidth utilisation of one process",
            Gauge,
        );
        let mut p_enc = Family::new(
            "headroom_gpu_process_encoder_utilization_ratio",
            "Encoder utilisation of one process",
            Gauge,
        );
        let mut p_dec = Family::new(
            "headroom_gpu_process_decoder_utilization_ratio",
            "Decoder utilisation of one process",
            Gauge,
        );
        for p in &self.processes {
            let Some(g) = self.gpus.get(p.gpu) else {
                continue;
            };
            let l = with(
                with(gpu_labels(&g.id, hostname), "pid", p.pid.to_string()),
                "cgroup",
                p.cgroup.clone().unwrap_or_default(),
            );
            p_mem.push(l.clone(), f(p.memory_used_bytes));
            p_sm.push(l.clone(), p.sm_utilization_ratio);
            p_mu.push(l.clone(), p.memory_utilization_ratio);
            p_enc.push(l.clone(), p.encoder_utilization_ratio);
            p_dec.push(l, p.decoder_utilization_ratio);
        }
        for fam in [&p_mem, &p_sm, &p_mu, &p_enc, &p_dec] {
            fam.encode(enc)?;
        }

        let mut c_mem = Family::new(
            "headroom_gpu_container_memory_used_bytes",
            "GPU memory used by a container's processes on this GPU",
            Gauge,
        );
        let mut c_sm = Family::new(
            "headroom_gpu_container_sm_utilization_ratio",
            "Sum of the SM utilisation of a container's processes on this GPU",
            Gauge,
        );
        let mut c_mu = Family::new(
            "headroom_gpu_container_memory_utilization_ratio",
            "Sum of the memory bandwidth utilisation of a container's processes on this GPU",
            Gauge,
        );
        let mut c_n = Family::new(
            "headroom_gpu_container_processes",
            "Processes of a container running on this GPU",
            Gauge,
        );
        for c in &self.containers {
            let Some(g) = self.gpus.get(c.gpu) else {
                continue;
            };
            let mut l = with(gpu_labels(&g.id, hostname), "cgroup", c.cgroup.clone());
            for (k, v) in ident(&c.cgroup) {
                l.push((k.into(), v.into()));
            }
            c_mem.push(l.clone(), Some(c.memory_used_bytes as f64));
            c_sm.push(l.clone(), Some(c.sm_utilization_ratio));
            c_mu.push(l.clone(), Some(c.memory_utilization_ratio));
            c_n.push(l, Some(f64::from(c.processes)));
        }
        for fam in [&c_mem, &c_sm, &c_mu, &c_n] {
            fam.encode(enc)?;
        }
        Ok(())
    }

    /// `base` with namespace, pod and container added once per distinct container the kubelet
    /// allocated GPU `gpu` (or a device on it) to; `base` alone when none.
    fn owner_labels(&self, gpu: usize, base: Labels) -> Vec<Labels> {
        let mut owners: Vec<(&str, &str, &str)> = self
            .allocations
            .iter()
            .filter(|a| a.gpu == gpu)
            .map(|a| (a.namespace.as_str(), a.pod.as_str(), a.container.as_str()))
            .collect();
        owners.sort_unstable();
        owners.dedup();
        if owners.is_empty() {
            return vec![base];
        }
        owners
            .into_iter()
            .map(|(ns, pod, c)| {
                with(
                    with(
                        with(base.clone(), "namespace", ns.to_owned()),
                        "pod",
                        pod.to_owned(),
                    ),
                    "container",
                    c.to_owned(),
                )
            })
            .collect()
    }

    /// Attaches the kubelet's allocations (device UUID → holders): a device is on a GPU when it
    /// is the GPU, one of its MIG devices, or a time-sliced replica of either.
    pub fn attach_allocations(
        &mut self,
        by_uuid: &std::collections::BTreeMap<String, Vec<crate::kube::pod_resources::DeviceOwner>>,
    ) {
        self.allocations.clear();
        for (i, g) in self.gpus.iter().enumerate() {
            for uuid in std::iter::once(&g.id.uuid).chain(&g.stats.mig_uuids) {
                for o in by_uuid.get(uuid).into_iter().flatten() {
                    self.allocations.push(Allocation {
                        gpu: i,
                        device_id: o.device_id.clone(),
                        resource: o.resource.clone(),
                        namespace: o.namespace.clone(),
                        pod: o.pod.clone(),
                        container: o.container.clone(),
                    });
                }
            }
        }
    }

    /// The values that go into history, named like the agent's other history series:
    /// `gpu_utilization_ratio` and `gpu_memory_used_bytes` by `UUID`, and
    /// `container_gpu_utilization_ratio` (SM) and `container_gpu_memory_used_bytes` by `UUID`
    /// and `cgroup`.
    pub fn series(&self) -> Vec<Series> {
        let mut out = Vec::new();
        for g in &self.gpus {
            let l = vec![("UUID".to_owned(), g.id.uuid.clone())];
            if let Some(u) = g.stats.utilization_ratio {
                out.push(("gpu_utilization_ratio".to_owned(), l.clone(), u));
            }
            if let Some(m) = g.stats.memory_used_bytes {
                out.push(("gpu_memory_used_bytes".to_owned(), l, m as f64));
            }
        }
        for c in &self.containers {
            let Some(g) = self.gpus.get(c.gpu) else {
                continue;
            };
            let l = vec![
                ("UUID".to_owned(), g.id.uuid.clone()),
                ("cgroup".to_owned(), c.cgroup.clone()),
            ];
            out.push((
                "container_gpu_utilization_ratio".to_owned(),
                l.clone(),
                c.sm_utilization_ratio,
            ));
            out.push((
                "container_gpu_memory_used_bytes".to_owned(),
                l,
                c.memory_used_bytes as f64,
            ));
        }
        out
    }
}
