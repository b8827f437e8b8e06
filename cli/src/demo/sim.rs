//! The simulated kernel and GPUs under a demo node. Containers are directories of a cgroup v2 tree
//! in a scratch folder, the node is a small procfs tree beside it: the replay writes the counters a
//! kernel would (CPU time used, periods throttled, memory in use, stall time) from the trace's
//! demand, limited by the `cpu.max` and `memory.high` that the agent's real actuator wrote. The
//! agent's real samplers read those files, so everything from sampling on is the production path.
//! GPUs have no files to fake: [`ReplayGpus`] hands the sampling loop a `GpuSnapshot` built from
//! the trace, in place of NVML.
//!
//! This module only ever writes inside the scratch folder it was given.

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::trace::Trace;
use headroom_agent::cgroup_files::{CgroupDir, FileReader, PROCS, v2};
use headroom_agent::sample::gpu::{
    ContainerUsage, Gpu, GpuIdentity, GpuSnapshot, GpuSource, GpuStats, Health, NvmlStatus,
    ProcessUsage,
};

/// Trace time: `speed` trace seconds pass per wall second, from `offset_s` into the traces.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub start: Instant,
    pub speed: f64,
    pub offset_s: f64,
}

impl Clock {
    pub fn trace_s(&self) -> f64 {
        self.offset_s + self.start.elapsed().as_secs_f64() * self.speed
    }

    pub fn source(self) -> TraceTime {
        Arc::new(move || self.trace_s())
    }
}

/// Where a replay reads the current trace time.
pub type TraceTime = Arc<dyn Fn() -> f64 + Send + Sync>;

/// A demand that follows a trace: `base + peak × value / p99`, read `offset_s` into the trace.
#[derive(Debug, Clone)]
pub struct Demand {
    pub trace: Arc<Trace>,
    pub offset_s: f64,
    pub base: f64,
    pub peak: f64,
}

impl Demand {
    pub fn at(&self, t: f64) -> f64 {
        (self.base + self.peak * self.trace.load(t + self.offset_s)).max(0.0)
    }
}

/// A GPU one container runs on.
#[derive(Debug, Clone)]
pub struct GpuSpec {
    /// SM utilisation, 0..1 (clamped).
    pub utilization: Demand,
    /// Memory in use, bytes (model weights plus a KV cache that grows with load).
    pub memory: Demand,
    pub memory_total_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct ContainerSpec {
    /// cgroup path relative to the hierarchy root, e.g. `/demo/llm-chat-a`.
    pub cgroup: String,
    /// Workload the container is a replica of (Deployment `name` in namespace `demo`).
    pub workload: String,
    /// Cores wanted.
    pub cpu: Demand,
    /// Working set wanted, bytes.
    pub memory: Demand,
    /// `cpu.max` and `memory.high` before the agent changes them.
    pub start_cpu_cores: f64,
    pub start_memory_high_bytes: u64,
    pub gpu: Option<GpuSpec>,
}

#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: String,
    pub cpus: usize,
    pub memory_bytes: u64,
    pub containers: Vec<ContainerSpec>,
}

/// CFS period written to `cpu.max`, µs.
const PERIOD_US: u64 = 100_000;
/// Cores the node's own processes use besides the containers.
const SYSTEM_CORES: f64 = 0.25;
const SYSTEM_MEMORY: u64 = 2 << 30;
/// Hot cgroup files are written in place at this fixed length (padded with newlines): the agent
/// keeps them open and re-reads them, so they must never be replaced or seen empty.
const PAD: usize = 512;

#[derive(Debug, Default)]
struct Counters {
    usage_usec: f64,
    periods: f64,
    throttled: f64,
    throttled_usec: f64,
    memory_stall_usec: f64,
    memory_high_events: u64,
    /// Last limits read back, kept when a read races the actuator's write.
    quota: Option<f64>,
    high: Option<f64>,
    max: Option<f64>,
    oom_kills: u64,
}

/// The simulated kernel of one node.
pub struct SimNode {
    pub spec: NodeSpec,
    pub proc_root: PathBuf,
    pub cgroup_root: PathBuf,
    counters: Vec<Counters>,
    /// Per CPU: user and idle ticks (USER_HZ).
    cpu_ticks: Vec<(f64, f64)>,
    boot: u64,
}

fn io_at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn write_new(path: &Path, text: &str) -> io::Result<()> {
    fs::write(path, text).map_err(|e| io_at(path, e))
}

/// Replaces a whole file atomically (procfs files are re-opened on every read).
fn replace(path: &Path, text: &str) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).map_err(|e| io_at(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io_at(path, e))
}

/// Overwrites a file in place at a fixed length.
fn overwrite(path: &Path, text: &str) -> io::Result<()> {
    let mut buf = text.as_bytes().to_vec();
    buf.resize(PAD.max(buf.len()), b'\n');
    let f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| io_at(path, e))?;
    f.write_all_at(&buf, 0).map_err(|e| io_at(path, e))
}

impl SimNode {
    /// Lays out the node's procfs and cgroup trees under `dir` with the starting limits.
    pub fn create(dir: &Path, spec: NodeSpec) -> io::Result<SimNode> {
        let proc_root = dir.join("proc");
        let cgroup_root = dir.join("cgroup");
        fs::create_dir_all(&proc_root).map_err(|e| io_at(&proc_root, e))?;
        fs::create_dir_all(&cgroup_root).map_err(|e| io_at(&cgroup_root, e))?;
        write_new(&cgroup_root.join(v2::CONTROLLERS), "cpu memory pids\n")?;
        for c in &spec.containers {
            let d = cgroup_root.join(c.cgroup.trim_start_matches('/'));
            fs::create_dir_all(&d).map_err(|e| io_at(&d, e))?;
            let quota = (c.start_cpu_cores * PERIOD_US as f64).round() as u64;
            write_new(&d.join(v2::CPU_MAX), &format!("{quota} {PERIOD_US}\n"))?;
            write_new(
                &d.join(v2::MEMORY_HIGH),
                &format!("{}\n", c.start_memory_high_bytes / 4096 * 4096),
            )?;
            // A hard limit above the soft one, so the capacity reported is the container's own.
            write_new(
                &d.join(v2::MEMORY_MAX),
                &format!("{}\n", c.start_memory_high_bytes / 4096 * 5 / 4 * 4096),
            )?;
            write_new(&d.join(PROCS), "")?;
        }
        let boot = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut node = SimNode {
            counters: spec
                .containers
                .iter()
                .map(|_| Counters::default())
                .collect(),
            cpu_ticks: vec![(0.0, 0.0); spec.cpus],
            spec,
            proc_root,
            cgroup_root,
            boot,
        };
        node.tick(0.0, 0.0)?;
        Ok(node)
    }

    fn dir(&self, i: usize) -> PathBuf {
        self.cgroup_root
            .join(self.spec.containers[i].cgroup.trim_start_matches('/'))
    }

    /// Advances the node by `dt` wall seconds at trace time `t`.
    pub fn tick(&mut self, t: f64, dt: f64) -> io::Result<()> {
        self.tick_with(t, dt, dt)
    }

    /// As [`SimNode::tick`], counting CFS periods and procfs ticks over `dt_counts` seconds
    /// instead. The samplers take CPU time and stall time as rates over wall time, but periods
    /// and ticks only as proportions, so a warm-up running many samples per wall second stays
    /// exact with `dt` its real wall time and `dt_counts` the sample interval it stands for.
    pub fn tick_with(&mut self, t: f64, dt: f64, dt_counts: f64) -> io::Result<()> {
        let cpus = self.spec.cpus as f64;
        let mut used_cores = SYSTEM_CORES;
        let mut used_memory = SYSTEM_MEMORY as f64;
        let files = &mut FileReader::default();
        for i in 0..self.spec.containers.len() {
            let d = self.dir(i);
            let c = &mut self.counters[i];
            // What the actuator wrote; a file it is rewriting just now counts next tick.
            let limits = CgroupDir::v2(&d);
            if let Ok(l) = limits.read_cpu_limit(files) {
                c.quota = l.cores();
            }
            if let Ok(h) = limits.read_memory_high(files) {
                c.high = h.map(|b| b as f64);
            }
            if let Ok(m) = limits.read_memory_max(files) {
                c.max = m.map(|b| b as f64);
            }
            let spec = &self.spec.containers[i];
            let want = spec.cpu.at(t).min(cpus);
            let limit = c.quota.unwrap_or(cpus).min(cpus);
            let used = want.min(limit);
            used_cores += used;
            c.usage_usec += used * dt * 1e6;
            let periods = dt_counts * 1e6 / PERIOD_US as f64;
            c.periods += periods;
            if want > limit * 0.999 {
                // Every period ran out of quota before the work did.
                c.throttled += periods;
                c.throttled_usec += (want - limit) * dt_counts * 1e6;
            }
            let wanted_mem = spec.memory.at(t);
            let max = c.max.unwrap_or(f64::INFINITY);
            if wanted_mem > max {
                // The kernel kills the biggest task; the replica restarts with the same demand.
                c.oom_kills += 1;
            }
            let high = c.high.unwrap_or(f64::INFINITY).min(max);
            // Above memory.high the kernel reclaims and stalls the container instead.
            let resident = wanted_mem.min(high);
            if wanted_mem > high {
                let short = ((wanted_mem - high) / high.max(1.0) * 4.0).min(1.0);
                c.memory_stall_usec += short * dt * 1e6;
                c.memory_high_events += 1;
            }
            used_memory += resident;
            let usage = c.usage_usec as u64;
            overwrite(
                &d.join(v2::CPU_STAT),
                &format!(
                    "usage_usec {usage}\nuser_usec {}\nsystem_usec {}\nnr_periods {}\nnr_throttled {}\nthrottled_usec {}\n",
                    usage / 10 * 9,
                    usage - usage / 10 * 9,
                    c.periods as u64,
                    c.throttled as u64,
                    c.throttled_usec as u64
                ),
            )?;
            let resident = resident as u64;
            overwrite(&d.join(v2::MEMORY_CURRENT), &format!("{resident}\n"))?;
            overwrite(
                &d.join(v2::MEMORY_STAT),
                &format!("anon {resident}\nfile 0\ninactive_file 0\nactive_file 0\n"),
            )?;
            overwrite(
                &d.join(v2::MEMORY_EVENTS),
                &format!(
                    "low 0\nhigh {}\nmax {}\noom {}\noom_kill {}\n",
                    c.memory_high_events, c.oom_kills, c.oom_kills, c.oom_kills
                ),
            )?;
            let stall = c.memory_stall_usec as u64;
            overwrite(
                &d.join(v2::MEMORY_PRESSURE),
                &format!(
                    "some avg10=0.00 avg60=0.00 avg300=0.00 total={stall}\nfull avg10=0.00 avg60=0.00 avg300=0.00 total={}\n",
                    stall / 2
                ),
            )?;
        }
        let busy = (used_cores / cpus).min(1.0);
        for (u, i) in &mut self.cpu_ticks {
            *u += busy * dt_counts * 100.0;
            *i += (1.0 - busy) * dt_counts * 100.0;
        }
        self.write_proc(used_cores, used_memory as u64)
    }

    fn write_proc(&self, used_cores: f64, used_memory: u64) -> io::Result<()> {
        let (tu, ti) = self
            .cpu_ticks
            .iter()
            .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        let mut stat = format!("cpu  {} 0 0 {} 0 0 0 0 0 0\n", tu as u64, ti as u64);
        for (n, (u, i)) in self.cpu_ticks.iter().enumerate() {
            stat.push_str(&format!(
                "cpu{n} {} 0 0 {} 0 0 0 0 0 0\n",
                *u as u64, *i as u64
            ));
        }
        stat.push_str(&format!(
            "ctxt 1\nbtime {}\nprocesses 1\nprocs_running {}\nprocs_blocked 0\n",
            self.boot,
            used_cores.ceil() as u64
        ));
        replace(&self.proc_root.join("stat"), &stat)?;
        let kb = |b: u64| b / 1024;
        let total = self.spec.memory_bytes;
        let avail = total.saturating_sub(used_memory);
        let meminfo = [
            ("MemTotal", kb(total)),
            ("MemFree", kb(avail)),
            ("MemAvailable", kb(avail)),
            ("Buffers", 0),
            ("Cached", 0),
            ("SwapCached", 0),
            ("Active", kb(used_memory)),
            ("Inactive", 0),
            ("SwapTotal", 0),
            ("SwapFree", 0),
            ("Dirty", 0),
            ("Writeback", 0),
            ("Mapped", 0),
            ("Slab", 0),
            ("Committed_AS", kb(used_memory)),
            ("VmallocTotal", 0),
            ("VmallocUsed", 0),
            ("VmallocChunk", 0),
        ]
        .iter()
        .map(|(k, v)| format!("{k}: {v} kB\n"))
        .collect::<String>();
        replace(&self.proc_root.join("meminfo"), &meminfo)?;
        replace(
            &self.proc_root.join("loadavg"),
            &format!("{used_cores:.2} {used_cores:.2} {used_cores:.2} 1/100 1\n"),
        )
    }

    /// The GPUs of this node, for the sampling loop; `time` says the trace time of each sample.
    pub fn gpus(&self, time: TraceTime) -> ReplayGpus {
        let gpus = self
            .spec
            .containers
            .iter()
            .filter_map(|c| c.gpu.clone().map(|g| (c.cgroup.clone(), g)))
            .collect();
        ReplayGpus {
            time,
            node: self.spec.name.clone(),
            gpus,
        }
    }
}

/// GPU snapshots from traces: one GPU per container that has one, used by that container alone.
pub struct ReplayGpus {
    time: TraceTime,
    node: String,
    gpus: Vec<(String, GpuSpec)>,
}

impl GpuSource for ReplayGpus {
    fn sample(&mut self, now: SystemTime) -> GpuSnapshot {
        if self.gpus.is_empty() {
            return GpuSnapshot::empty(now, NvmlStatus::Disabled);
        }
        let t = (self.time)();
        let mut snap = GpuSnapshot::empty(
            now,
            NvmlStatus::Up {
                driver_version: "trace replay (headroom demo)".into(),
            },
        );
        for (i, (cgroup, g)) in self.gpus.iter().enumerate() {
            let util = g.utilization.at(t).clamp(0.0, 1.0);
            let total = g.memory_total_bytes;
            let used = (g.memory.at(t) as u64).min(total);
            snap.gpus.push(Gpu {
                id: GpuIdentity {
                    index: i as u32,
                    uuid: format!("GPU-demo-{}-{i}", self.node),
                    pci_bus_id: format!("00000000:{:02X}:00.0", 0x19 + i),
                    model: "simulated H200 (trace replay)".into(),
                },
                health: Health {
                    healthy: true,
                    reason: None,
                },
                stats: GpuStats {
                    utilization_ratio: Some(util),
                    memory_utilization_ratio: Some(util * 0.6),
                    memory_used_bytes: Some(used),
                    memory_free_bytes: Some(total - used),
                    memory_total_bytes: Some(total),
                    power_watts: Some(90.0 + 610.0 * util),
                    power_limit_watts: Some(700.0),
                    temperature_celsius: Some(32.0 + 40.0 * util),
                    ..GpuStats::default()
                },
                unsupported: Vec::new(),
            });
            snap.processes.push(ProcessUsage {
                gpu: i,
                pid: 1000 + i as u32,
                cgroup: Some(cgroup.clone()),
                memory_used_bytes: Some(used),
                sm_utilization_ratio: Some(util),
                memory_utilization_ratio: Some(util * 0.6),
                encoder_utilization_ratio: None,
                decoder_utilization_ratio: None,
            });
            snap.containers.push(ContainerUsage {
                gpu: i,
                cgroup: cgroup.clone(),
                processes: 1,
                memory_used_bytes: used,
                sm_utilization_ratio: util,
                memory_utilization_ratio: util * 0.6,
            });
        }
        snap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(v: f64) -> Demand {
        Demand {
            trace: Arc::new(Trace::parse("f", "f", "0,1\n1,1\n").unwrap()),
            offset_s: 0.0,
            base: v,
            peak: 0.0,
        }
    }

    #[test]
    fn usage_is_capped_by_the_quota_the_actuator_wrote() {
        let t = tempfile::tempdir().unwrap();
        let spec = NodeSpec {
            name: "n".into(),
            cpus: 4,
            memory_bytes: 8 << 30,
            containers: vec![ContainerSpec {
                cgroup: "/demo/a".into(),
                workload: "a".into(),
                cpu: flat(2.0),
                memory: flat((1u64 << 30) as f64),
                start_cpu_cores: 1.0,
                start_memory_high_bytes: 512 << 20,
                gpu: None,
            }],
        };
        let mut n = SimNode::create(t.path(), spec).unwrap();
        n.tick(0.0, 1.0).unwrap();
        let d = t.path().join("cgroup/demo/a");
        let stat = fs::read_to_string(d.join("cpu.stat")).unwrap();
        assert!(stat.starts_with("usage_usec 1000000\n"), "{stat}");
        assert!(stat.contains("nr_throttled 10\n"), "{stat}");
        let mem: u64 = fs::read_to_string(d.join("memory.current"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(mem, 512 << 20, "held at memory.high");
        // The actuator raises the quota: the next second uses the full demand, unthrottled.
        fs::write(d.join("cpu.max"), "300000 100000").unwrap();
        fs::write(d.join("memory.high"), "max").unwrap();
        n.tick(1.0, 1.0).unwrap();
        let stat = fs::read_to_string(d.join("cpu.stat")).unwrap();
        assert!(stat.starts_with("usage_usec 3000000\n"), "{stat}");
        assert!(stat.contains("nr_throttled 10\n"), "{stat}");
        let mut node = headroom_agent::sample::node::NodeSampler::new(&t.path().join("proc"));
        let s = node.sample().unwrap();
        assert_eq!(s.cpus, 4);
        assert_eq!(s.memory_total_bytes, 8 << 30);
    }
}
