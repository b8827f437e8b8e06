//! One NVML sampling cycle: every GPU's metrics, XID events, running processes and their
//! utilisation, attributed to containers. Runs on the sampler's worker thread with one `Nvml` handle;
//! it records which call is in flight so a hung driver is noticed from outside, and it never logs
//! (health changes are logged once, by the sampler).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, PcieUtilCounter, RetirementCause, TemperatureSensor,
};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::enums::gpm::GpmMetricId;
use nvml_wrapper::error::{NvmlError, nvml_try};
use nvml_wrapper::{Device, EventSet, GpmSample, Nvml};

use super::cgroup::CgroupResolver;
use super::snapshot::{
    ContainerUsage, Gpu, GpuIdentity, GpuSnapshot, GpuStats, Health, NvmlStatus, ProcessUsage,
};

/// Slow-changing values (ECC, retired pages, remapped rows, MIG, power limit) are read every
/// this many cycles.
const SLOW_EVERY: u64 = 10;

/// XIDs caused by applications rather than the GPU (as NVIDIA's device plugin treats them): they do
/// not make a GPU unhealthy.
const APPLICATION_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];

/// The NVML call in flight, visible to the sampler so it can tell a hung call from a slow cycle.
#[derive(Debug, Clone)]
pub struct InCall {
    pub since: Instant,
    pub call: &'static str,
    pub gpu: Option<usize>,
}

pub type CallTracker = Arc<Mutex<Option<InCall>>>;

/// (GPU index, PID, memory used, [SM, memory, encoder, decoder] utilisation ratios).
type RawProc = (usize, u32, Option<u64>, Option<[f64; 4]>);

/// Timing settings for fault detection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A call slower than this marks its GPU unhealthy ("timeout").
    pub slow_call: Duration,
    /// How long a critical XID keeps a GPU unhealthy after the last one.
    pub xid_hold: Duration,
}

struct GpuState<'n> {
    id: GpuIdentity,
    id_known: bool,
    unsupported: BTreeSet<&'static str>,
    last_seen_util: u64,
    gpm_supported: Option<bool>,
    gpm_prev: Option<GpmSample<'n>>,
    slow: GpuStats,
    xid_errors: u64,
    last_xid: Option<u64>,
    xid_until: Option<(Instant, u64)>,
}

/// Per-GPU bookkeeping for one cycle: the first fault seen and the time spent inside NVML.
struct CallCtx<'a> {
    gpu: usize,
    unsupported: &'a mut BTreeSet<&'static str>,
    fault: Option<String>,
    lost: bool,
    tracker: &'a CallTracker,
    limits: Limits,
    nvml_time: &'a mut Duration,
}

impl CallCtx<'_> {
    /// Runs one NVML call: skips calls known unsupported, times it, and turns its error into
    /// the GPU's fault (GPU lost wins over any other reason).
    fn run<T>(
        &mut self,
        name: &'static str,
        f: impl FnOnce() -> Result<T, NvmlError>,
    ) -> Option<T> {
        if self.lost || self.unsupported.contains(name) {
            return None;
        }
        set_call(self.tracker, Some((Instant::now(), name, Some(self.gpu))));
        // Only the call itself counts as the library's time.
        let t0 = Instant::now();
        let r = f();
        let dt = t0.elapsed();
        set_call(self.tracker, None);
        *self.nvml_time += dt;
        if dt > self.limits.slow_call && self.fault.is_none() {
            self.fault = Some(format!("{name} took {} ms (timeout)", dt.as_millis()));
        }
        match r {
            Ok(v) => Some(v),
            // Not a fault of the GPU: the driver, the wrapper or our permissions cannot answer
            // this call. Remember it and stop asking.
            Err(
                NvmlError::NotSupported
                | NvmlError::FailedToLoadSymbol(_)
                | NvmlError::FunctionNotFound
                | NvmlError::NoPermission
                | NvmlError::UnexpectedVariant(_)
                | NvmlError::IncorrectBits(_)
                | NvmlError::Utf8Error(_)
                | NvmlError::InvalidArg,
            ) => {
                self.unsupported.insert(name);
                None
            }
            Err(NvmlError::GpuLost) => {
                self.lost = true;
                self.fault = Some(format!("GPU_IS_LOST in {name}"));
                None
            }
            Err(e) => {
                if self.fault.is_none() {
                    self.fault = Some(format!("{name} failed: {e}"));
                }
                None
            }
        }
    }
}

fn set_call(tracker: &CallTracker, v: Option<(Instant, &'static str, Option<usize>)>) {
    let mut g = tracker.lock().unwrap_or_else(PoisonError::into_inner);
    *g = v.map(|(since, call, gpu)| InCall { since, call, gpu });
}

/// Samples all GPUs through one initialised `Nvml`.
pub struct Collector<'n> {
    nvml: &'n Nvml,
    driver_version: String,
    resolver: CgroupResolver,
    gpus: Vec<GpuState<'n>>,
    events: Option<EventSet<'n>>,
    cycle: u64,
    tracker: CallTracker,
    limits: Limits,
    /// Wall time spent inside NVML during the last cycle (the library's share of the cycle).
    pub nvml_time: Duration,
}

fn placeholder(index: usize) -> GpuIdentity {
    GpuIdentity {
        index: index as u32,
        uuid: format!("unknown-gpu-{index}"),
        pci_bus_id: String::new(),
        model: String::new(),
    }
}

impl<'n> Collector<'n> {
    /// Counts the GPUs, reads their identities and registers for XID events.
    pub fn new(
        nvml: &'n Nvml,
        proc_root: &Path,
        tracker: CallTracker,
        limits: Limits,
    ) -> Result<Self, NvmlError> {
        let count = nvml.device_count()?;
        let driver_version = nvml
            .sys_driver_version()
            .unwrap_or_else(|e| format!("unknown ({e})"));
        let mut c = Self {
            nvml,
            driver_version,
            resolver: CgroupResolver::new(proc_root),
            gpus: (0..count as usize)
                .map(|i| GpuState {
                    id: placeholder(i),
                    id_known: false,
                    unsupported: BTreeSet::new(),
                    last_seen_util: 0,
                    gpm_supported: None,
                    gpm_prev: None,
                    slow: GpuStats::default(),
                    xid_errors: 0,
                    last_xid: None,
                    xid_until: None,
                })
                .collect(),
            events: None,
            cycle: 0,
            tracker,
            limits,
            nvml_time: Duration::ZERO,
        };
        c.register_events();
        Ok(c)
    }

    pub fn driver_version(&self) -> &str {
        &self.driver_version
    }

    /// Drops cached PID → cgroup lookups so the next cycle reads every one (benchmarks).
    pub fn forget_cgroups(&mut self) {
        self.resolver.retain(|_| false);
    }

    pub fn gpu_count(&self) -> usize {
        self.gpus.len()
    }

    fn register_events(&mut self) {
        let Ok(mut set) = self.nvml.create_event_set() else {
            for g in &mut self.gpus {
                g.unsupported.insert("nvmlEventSetCreate");
            }
            return;
        };
        for (i, g) in self.gpus.iter_mut().enumerate() {
            let Ok(dev) = self.nvml.device_by_index(i as u32) else {
                continue;
            };
            match dev.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                Ok(s) => set = s,
                Err(_) => {
                    // The set is freed on failure; start a new one for the other GPUs.
                    g.unsupported.insert("nvmlDeviceRegisterEvents");
                    match self.nvml.create_event_set() {
                        Ok(s) => set = s,
                        Err(_) => return,
                    }
                }
            }
        }
        self.events = Some(set);
    }

    /// Drains pending XID events without blocking.
    fn read_events(&mut self, now: Instant) {
        let Some(set) = &self.events else { return };
        for _ in 0..256 {
            set_call(
                &self.tracker,
                Some((Instant::now(), "nvmlEventSetWait_v2", None)),
            );
            let t0 = Instant::now();
            let r = set.wait(0);
            self.nvml_time += t0.elapsed();
            set_call(&self.tracker, None);
            let Ok(ev) = r else { break };
            let Some(XidError::Value(xid)) = ev.event_data else {
                continue;
            };
            let Ok(idx) = ev.device.index() else { continue };
            let Some(g) = self.gpus.get_mut(idx as usize) else {
                continue;
            };
            g.xid_errors += 1;
            g.last_xid = Some(xid);
            if !APPLICATION_XIDS.contains(&xid) {
                g.xid_until = Some((now + self.limits.xid_hold, xid));
            }
        }
    }

    /// One full cycle. Health here reflects only what this cycle saw; the sampler adds hangs.
    pub fn cycle(&mut self) -> GpuSnapshot {
        self.nvml_time = Duration::ZERO;
        let now = Instant::now();
        let at = SystemTime::now();
        let slow_due = self.cycle.is_multiple_of(SLOW_EVERY);
        self.cycle += 1;
        self.read_events(now);

        let mut gpus = Vec::with_capacity(self.gpus.len());
        let mut raw_procs: Vec<RawProc> = Vec::new();
        let nvml = self.nvml;
        for (i, g) in self.gpus.iter_mut().enumerate() {
            let mut ctx = CallCtx {
                gpu: i,
                unsupported: &mut g.unsupported,
                fault: None,
                lost: false,
                tracker: &self.tracker,
                limits: self.limits,
                nvml_time: &mut self.nvml_time,
            };
            let mut stats = GpuStats::default();
            if let Some(dev) = ctx.run("nvmlDeviceGetHandleByIndex_v2", || {
                nvml.device_by_index(i as u32)
            }) {
                if !g.id_known {
                    identify(&mut ctx, &dev, i, &mut g.id, &mut g.id_known);
                }
                fast_stats(&mut ctx, &dev, &mut stats);
                if slow_due || g.slow == GpuStats::default() {
                    g.slow = slow_stats(&mut ctx, &dev);
                }
                merge_slow(&mut stats, &g.slow);
                gpm(
                    &mut ctx,
                    nvml,
                    &dev,
                    (&mut g.gpm_supported, &mut g.gpm_prev),
                    &mut stats,
                );
                processes(&mut ctx, &dev, i, &mut g.last_seen_util, &mut raw_procs);
            }
            stats.xid_errors = g.xid_errors;
            stats.last_xid = g.last_xid;
            let health = match (ctx.fault.take(), g.xid_until) {
                (Some(reason), _) => Health {
                    healthy: false,
                    reason: Some(reason),
                },
                (None, Some((until, xid))) if now < until => Health {
                    healthy: false,
                    reason: Some(format!("XID {xid}")),
                },
                _ => Health {
                    healthy: true,
                    reason: None,
                },
            };
            gpus.push(Gpu {
                id: g.id.clone(),
                health,
                stats,
                unsupported: g.unsupported.iter().copied().collect(),
            });
        }

        let (processes, containers) = self.attribute(raw_procs, now);
        GpuSnapshot {
            at,
            status: NvmlStatus::Up {
                driver_version: self.driver_version.clone(),
            },
            gpus,
            processes,
            containers,
            allocations: Vec::new(),
            events: Vec::new(),
        }
    }

    fn attribute(
        &mut self,
        raw: Vec<RawProc>,
        now: Instant,
    ) -> (Vec<ProcessUsage>, Vec<ContainerUsage>) {
        let live: HashMap<u32, ()> = raw.iter().map(|r| (r.1, ())).collect();
        self.resolver.retain(|pid| live.contains_key(&pid));
        let mut containers: BTreeMap<(usize, String), ContainerUsage> = BTreeMap::new();
        let mut processes = Vec::with_capacity(raw.len());
        for (gpu, pid, mem, util) in raw {
            let cgroup = self.resolver.resolve(pid, now);
            if let Some(cg) = &cgroup {
                let c = containers
                    .entry((gpu, cg.clone()))
                    .or_insert_with(|| ContainerUsage {
                        gpu,
                        cgroup: cg.clone(),
                        processes: 0,
                        memory_used_bytes: 0,
                        sm_utilization_ratio: 0.0,
                        memory_utilization_ratio: 0.0,
                    });
                c.processes += 1;
                c.memory_used_bytes += mem.unwrap_or(0);
                if let Some(u) = util {
                    c.sm_utilization_ratio += u[0];
                    c.memory_utilization_ratio += u[1];
                }
            }
            processes.push(ProcessUsage {
                gpu,
                pid,
                cgroup,
                memory_used_bytes: mem,
                sm_utilization_ratio: util.map(|u| u[0]),
                memory_utilization_ratio: util.map(|u| u[1]),
                encoder_utilization_ratio: util.map(|u| u[2]),
                decoder_utilization_ratio: util.map(|u| u[3]),
            });
        }
        (processes, containers.into_values().collect())
    }
}

fn identify(
    ctx: &mut CallCtx<'_>,
    dev: &Device<'_>,
    i: usize,
    id: &mut GpuIdentity,
    known: &mut bool,
) {
    let uuid = ctx.run("nvmlDeviceGetUUID", || dev.uuid());
    let model = ctx.run("nvmlDeviceGetName", || dev.name());
    let pci = ctx.run("nvmlDeviceGetPciInfo_v3", || dev.pci_info());
    if let Some(uuid) = uuid {
        *id = GpuIdentity {
            index: i as u32,
            uuid,
            pci_bus_id: pci.map(|p| p.bus_id).unwrap_or_default(),
            model: model.unwrap_or_default(),
        };
        *known = true;
    }
}

fn fast_stats(ctx: &mut CallCtx<'_>, dev: &Device<'_>, s: &mut GpuStats) {
    if let Some(u) = ctx.run("nvmlDeviceGetUtilizationRates", || dev.utilization_rates()) {
        s.utilization_ratio = Some(f64::from(u.gpu) / 100.0);
        s.memory_utilization_ratio = Some(f64::from(u.memory) / 100.0);
    }
    if let Some(m) = ctx.run("nvmlDeviceGetMemoryInfo_v2", || dev.memory_info()) {
        s.memory_used_bytes = Some(m.used);
        s.memory_free_bytes = Some(m.free);
        s.memory_total_bytes = Some(m.total);
        s.memory_reserved_bytes = Some(m.reserved);
    }
    s.sm_clock_hertz = ctx
        .run("nvmlDeviceGetClockInfo(SM)", || dev.clock_info(Clock::SM))
        .map(|v| f64::from(v) * 1e6);
    s.memory_clock_hertz = ctx
        .run("nvmlDeviceGetClockInfo(MEM)", || {
            dev.clock_info(Clock::Memory)
        })
        .map(|v| f64::from(v) * 1e6);
    s.power_watts = ctx
        .run("nvmlDeviceGetPowerUsage", || dev.power_usage())
        .map(|mw| f64::from(mw) / 1000.0);
    s.energy_joules = ctx
        .run("nvmlDeviceGetTotalEnergyConsumption", || {
            dev.total_energy_consumption()
        })
        .map(|mj| mj as f64 / 1000.0);
    s.temperature_celsius = ctx
        .run("nvmlDeviceGetTemperature", || {
            dev.temperature(TemperatureSensor::Gpu)
        })
        .map(f64::from);
    s.throttle_reasons = ctx
        .run("nvmlDeviceGetCurrentClocksThrottleReasons", || {
            dev.current_throttle_reasons()
        })
        .map(|r| r.bits());
    // NVML reports PCIe throughput in KB/s (1024 bytes).
    s.pcie_tx_bytes_per_second = ctx
        .run("nvmlDeviceGetPcieThroughput(TX)", || {
            dev.pcie_throughput(PcieUtilCounter::Send)
        })
        .map(|k| f64::from(k) * 1024.0);
    s.pcie_rx_bytes_per_second = ctx
        .run("nvmlDeviceGetPcieThroughput(RX)", || {
            dev.pcie_throughput(PcieUtilCounter::Receive)
        })
        .map(|k| f64::from(k) * 1024.0);
}

fn slow_stats(ctx: &mut CallCtx<'_>, dev: &Device<'_>) -> GpuStats {
    let mut s = GpuStats {
        power_limit_watts: ctx
            .run("nvmlDeviceGetEnforcedPowerLimit", || {
                dev.enforced_power_limit()
            })
            .map(|mw| f64::from(mw) / 1000.0),
        ecc_corrected_errors: ctx.run("nvmlDeviceGetTotalEccErrors(corrected)", || {
            dev.total_ecc_errors(MemoryError::Corrected, EccCounter::Aggregate)
        }),
        ecc_uncorrected_errors: ctx.run("nvmlDeviceGetTotalEccErrors(uncorrected)", || {
            dev.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Aggregate)
        }),
        retired_pages_single_bit: ctx
            .run("nvmlDeviceGetRetiredPages_v2(sbe)", || {
                dev.retired_pages(RetirementCause::MultipleSingleBitEccErrors)
            })
            .map(|p| p.len() as u64),
        retired_pages_double_bit: ctx
            .run("nvmlDeviceGetRetiredPages_v2(dbe)", || {
                dev.retired_pages(RetirementCause::DoubleBitEccError)
            })
            .map(|p| p.len() as u64),
        ..GpuStats::default()
    };
    if let Some((corr, unc)) = ctx.run("nvmlDeviceGetRemappedRows", || remapped_rows(dev)) {
        s.remapped_rows_correctable = Some(u64::from(corr));
        s.remapped_rows_uncorrectable = Some(u64::from(unc));
    }
    if let Some(m) = ctx.run("nvmlDeviceGetMigMode", || dev.mig_mode()) {
        let enabled = m.current == 1;
        s.mig_enabled = Some(enabled);
        s.mig_instances = Some(0);
        if enabled {
            let max = ctx
                .run("nvmlDeviceGetMaxMigDeviceCount", || dev.mig_device_count())
                .unwrap_or(0);
            let mut n = 0;
            for k in 0..max {
                let found = ctx.run("nvmlDeviceGetMigDeviceHandleByIndex", || {
                    match dev.mig_device_by_index(k) {
                        Ok(mig) => Ok(Some(mig.uuid())),
                        Err(NvmlError::NotFound) => Ok(None),
                        Err(e) => Err(e),
                    }
                });
                if let Some(Some(uuid)) = found {
                    n += 1;
                    if let Ok(uuid) = uuid {
                        s.mig_uuids.push(uuid);
                    }
                }
            }
            s.mig_instances = Some(n);
        }
    }
    s
}

/// `nvml-wrapper` has no binding for remapped rows; call the symbol directly.
fn remapped_rows(dev: &Device<'_>) -> Result<(u32, u32), NvmlError> {
    let sym = match dev.nvml().lib().nvmlDeviceGetRemappedRows.as_ref() {
        Ok(s) => *s,
        Err(e) => return Err(NvmlError::FailedToLoadSymbol(e.to_string())),
    };
    let (mut corr, mut unc, mut pending, mut failure) = (0u32, 0u32, 0u32, 0u32);
    // SAFETY: the handle comes from this NVML instance; the out-pointers are valid u32s.
    unsafe {
        nvml_try(sym(
            dev.handle(),
            &mut corr,
            &mut unc,
            &mut pending,
            &mut failure,
        ))?;
    }
    Ok((corr, unc))
}

fn merge_slow(s: &mut GpuStats, slow: &GpuStats) {
    s.power_limit_watts = slow.power_limit_watts;
    s.ecc_corrected_errors = slow.ecc_corrected_errors;
    s.ecc_uncorrected_errors = slow.ecc_uncorrected_errors;
    s.retired_pages_single_bit = slow.retired_pages_single_bit;
    s.retired_pages_double_bit = slow.retired_pages_double_bit;
    s.remapped_rows_correctable = slow.remapped_rows_correctable;
    s.remapped_rows_uncorrectable = slow.remapped_rows_uncorrectable;
    s.mig_enabled = slow.mig_enabled;
    s.mig_instances = slow.mig_instances;
    s.mig_uuids.clone_from(&slow.mig_uuids);
}

const GPM_METRICS: [GpmMetricId; 4] = [
    GpmMetricId::SmUtil,
    GpmMetricId::SmOccupancy,
    GpmMetricId::AnyTensorUtil,
    GpmMetricId::DramBwUtil,
];

/// GPM metrics come from two samples; each cycle's sample is the next cycle's baseline.
fn gpm<'n>(
    ctx: &mut CallCtx<'_>,
    nvml: &'n Nvml,
    dev: &Device<'n>,
    (supported, prev_sample): (&mut Option<bool>, &mut Option<GpmSample<'n>>),
    s: &mut GpuStats,
) {
    if supported.is_none() {
        *supported = Some(
            ctx.run("nvmlGpmQueryDeviceSupport", || dev.gpm_support())
                .unwrap_or(false),
        );
    }
    if *supported != Some(true) {
        return;
    }
    let Some(cur) = ctx.run("nvmlGpmSampleGet", || dev.gpm_sample()) else {
        *prev_sample = None;
        return;
    };
    if let Some(prev) = prev_sample.take()
        && let Some(results) = ctx.run("nvmlGpmMetricsGet", || {
            nvml_wrapper::gpm::gpm_metrics_get(nvml, &prev, &cur, &GPM_METRICS)
        })
    {
        for r in results.into_iter().flatten() {
            let v = Some(r.value / 100.0);
            match r.metric_id {
                GpmMetricId::SmUtil => s.gpm_sm_activity_ratio = v,
                GpmMetricId::SmOccupancy => s.gpm_sm_occupancy_ratio = v,
                GpmMetricId::AnyTensorUtil => s.gpm_tensor_activity_ratio = v,
                GpmMetricId::DramBwUtil => s.gpm_dram_bandwidth_ratio = v,
                _ => {}
            }
        }
    }
    *prev_sample = Some(cur);
}

/// Running compute processes and their utilisation since the last sample seen on this GPU.
fn processes(
    ctx: &mut CallCtx<'_>,
    dev: &Device<'_>,
    gpu: usize,
    last_seen: &mut u64,
    out: &mut Vec<RawProc>,
) {
    let procs = ctx.run("nvmlDeviceGetComputeRunningProcesses_v3", || {
        dev.running_compute_processes()
    });
    let since = *last_seen;
    let samples = ctx.run("nvmlDeviceGetProcessUtilization", || {
        match dev.process_utilization_stats(since) {
            // NOT_FOUND: no process ran since `since`.
            Err(NvmlError::NotFound) => Ok(Vec::new()),
            r => r,
        }
    });
    // pid -> (sum of [sm, mem, enc, dec] percent, sample count)
    let mut util: HashMap<u32, ([f64; 4], u32)> = HashMap::new();
    if let Some(samples) = &samples {
        for s in samples {
            *last_seen = (*last_seen).max(s.timestamp);
            let e = util.entry(s.pid).or_insert(([0.0; 4], 0));
            e.0[0] += f64::from(s.sm_util);
            e.0[1] += f64::from(s.mem_util);
            e.0[2] += f64::from(s.enc_util);
            e.0[3] += f64::from(s.dec_util);
            e.1 += 1;
        }
    }
    let ratio = |pid: u32| -> Option<[f64; 4]> {
        samples.as_ref()?;
        Some(match util.get(&pid) {
            Some((sum, n)) => sum.map(|v| v / f64::from(*n) / 100.0),
            None => [0.0; 4],
        })
    };
    let mut seen = BTreeSet::new();
    for p in procs.iter().flatten() {
        let mem = match p.used_gpu_memory {
            UsedGpuMemory::Used(b) => Some(b),
            UsedGpuMemory::Unavailable => None,
        };
        if seen.insert(p.pid) {
            out.push((gpu, p.pid, mem, ratio(p.pid)));
        }
    }
    for pid in util.keys() {
        if seen.insert(*pid) {
            out.push((gpu, *pid, None, ratio(*pid)));
        }
    }
}
