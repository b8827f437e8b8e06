//! The node itself, from procfs: CPU time in total and per core, memory, load and pressure
//! stall information (where the kernel has it). Reads only under the configured proc root.

use std::path::{Path, PathBuf};
use std::time::Instant;

use procfs::{FromRead, FromReadSI};
use serde::Serialize;

use super::cgroup::stats::{PressureTotals, parse_pressure};

#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}: {message}")]
pub struct NodeError {
    pub path: PathBuf,
    pub message: String,
}

/// Seconds each CPU mode has accumulated since boot, summed over all CPUs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CpuModes {
    pub user: f64,
    pub nice: f64,
    pub system: f64,
    pub idle: f64,
    pub iowait: f64,
    pub irq: f64,
    pub softirq: f64,
    pub steal: f64,
}

impl CpuModes {
    fn from(t: &procfs::CpuTime, tps: f64) -> CpuModes {
        let s = |ticks: u64| ticks as f64 / tps;
        CpuModes {
            user: s(t.user),
            nice: s(t.nice),
            system: s(t.system),
            idle: s(t.idle),
            iowait: s(t.iowait.unwrap_or(0)),
            irq: s(t.irq.unwrap_or(0)),
            softirq: s(t.softirq.unwrap_or(0)),
            steal: s(t.steal.unwrap_or(0)),
        }
    }

    fn busy(&self) -> f64 {
        self.user + self.nice + self.system + self.irq + self.softirq + self.steal
    }

    fn total(&self) -> f64 {
        self.busy() + self.idle + self.iowait
    }

    pub fn pairs(&self) -> [(&'static str, f64); 8] {
        [
            ("user", self.user),
            ("nice", self.nice),
            ("system", self.system),
            ("idle", self.idle),
            ("iowait", self.iowait),
            ("irq", self.irq),
            ("softirq", self.softirq),
            ("steal", self.steal),
        ]
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeSample {
    pub cpus: usize,
    pub cpu_seconds: CpuModes,
    /// Cores busy since the previous sample.
    pub cpu_usage_cores: Option<f64>,
    /// Busy share of each core since the previous sample.
    pub core_busy_ratio: Vec<f64>,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub memory_free_bytes: u64,
    pub swap_total_bytes: u64,
    pub swap_free_bytes: u64,
    pub load: [f64; 3],
    pub procs_running: u32,
    pub procs_blocked: u32,
    pub pressure: Vec<PressureTotals>,
    pub pressure_some_ratio: Vec<(&'static str, f64)>,
}

pub struct NodeSampler {
    proc_root: PathBuf,
    system_info: procfs::ExplicitSystemInfo,
    prev: Option<(Instant, CpuModes, Vec<CpuModes>, Vec<PressureTotals>)>,
}

impl NodeSampler {
    pub fn new(proc_root: &Path) -> NodeSampler {
        let system_info = procfs::ExplicitSystemInfo {
            boot_time_secs: 0,
            ticks_per_second: procfs::ticks_per_second(),
            page_size: procfs::page_size(),
            is_little_endian: cfg!(target_endian = "little"),
        };
        NodeSampler {
            proc_root: proc_root.to_path_buf(),
            system_info,
            prev: None,
        }
    }

    fn err(&self, file: &str, e: impl std::fmt::Display) -> NodeError {
        NodeError {
            path: self.proc_root.join(file),
            message: e.to_string(),
        }
    }

    pub fn sample(&mut self) -> Result<NodeSample, NodeError> {
        let at = Instant::now();
        let stat = procfs::KernelStats::from_file(self.proc_root.join("stat"), &self.system_info)
            .map_err(|e| self.err("stat", e))?;
        let mem = procfs::Meminfo::from_file(self.proc_root.join("meminfo"))
            .map_err(|e| self.err("meminfo", e))?;
        let load = procfs::LoadAverage::from_file(self.proc_root.join("loadavg"))
            .map_err(|e| self.err("loadavg", e))?;
        let tps = self.system_info.ticks_per_second as f64;
        let total = CpuModes::from(&stat.total, tps);
        let cores: Vec<CpuModes> = stat
            .cpu_time
            .iter()
            .map(|t| CpuModes::from(t, tps))
            .collect();
        let mut pressure = Vec::new();
        for r in ["cpu", "memory", "io"] {
            let path = self.proc_root.join("pressure").join(r);
            if let Some(p) = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| parse_pressure(r, &t))
            {
                pressure.push(p);
            }
        }
        let mut s = NodeSample {
            cpus: cores.len(),
            cpu_seconds: total.clone(),
            cpu_usage_cores: None,
            core_busy_ratio: Vec::new(),
            memory_total_bytes: mem.mem_total,
            memory_available_bytes: mem.mem_available.unwrap_or(mem.mem_free),
            memory_free_bytes: mem.mem_free,
            swap_total_bytes: mem.swap_total,
            swap_free_bytes: mem.swap_free,
            load: [load.one as f64, load.five as f64, load.fifteen as f64],
            procs_running: stat.procs_running.unwrap_or(0),
            procs_blocked: stat.procs_blocked.unwrap_or(0),
            pressure: pressure.clone(),
            pressure_some_ratio: Vec::new(),
        };
        if let Some((then, ptotal, pcores, ppressure)) = &self.prev {
            let wall = at.duration_since(*then).as_secs_f64();
            let dbusy = total.busy() - ptotal.busy();
            let dall = total.total() - ptotal.total();
            if dall > 0.0 && dbusy >= 0.0 {
                // Scale the busy share of CPU time by the core count rather than dividing by
                // wall time: /proc/stat ticks at 100 Hz, so short intervals are noisy in time
                // but exact in proportion.
                s.cpu_usage_cores =
                    Some((dbusy / dall * cores.len() as f64).min(cores.len() as f64));
            }
            s.core_busy_ratio = cores
                .iter()
                .zip(pcores)
                .map(|(c, p)| {
                    let all = c.total() - p.total();
                    if all > 0.0 {
                        ((c.busy() - p.busy()) / all).clamp(0.0, 1.0)
                    } else {
                        0.0
                    }
                })
                .collect();
            if wall > 0.0 {
                for p in &pressure {
                    if let Some(q) = ppressure.iter().find(|q| q.resource == p.resource) {
                        s.pressure_some_ratio.push((
                            p.resource,
                            ((p.some_seconds - q.some_seconds) / wall).clamp(0.0, 1.0),
                        ));
                    }
                }
            }
        }
        self.prev = Some((at, total, cores, pressure));
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_the_real_proc() {
        let mut n = NodeSampler::new(Path::new("/proc"));
        let a = n.sample().unwrap();
        assert!(a.cpus >= 1);
        assert!(a.memory_total_bytes > 0);
        assert!(a.cpu_usage_cores.is_none());
        std::thread::sleep(std::time::Duration::from_millis(50));
        let b = n.sample().unwrap();
        let used = b.cpu_usage_cores.unwrap_or(0.0);
        assert!((0.0..=b.cpus as f64).contains(&used), "{used}");
        assert_eq!(b.core_busy_ratio.len(), b.cpus);
    }

    #[test]
    fn fake_proc_tree() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path();
        std::fs::write(
            p.join("stat"),
            "cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 50 0 50 400 0 0 0 0 0 0\ncpu1 50 0 50 400 0 0 0 0 0 0\nctxt 1\nbtime 1\nprocesses 1\nprocs_running 3\nprocs_blocked 0\n",
        )
        .unwrap();
        std::fs::write(
            p.join("meminfo"),
            [
                "MemTotal: 1000 kB",
                "MemFree: 200 kB",
                "MemAvailable: 500 kB",
                "Buffers: 0 kB",
                "Cached: 0 kB",
                "SwapCached: 0 kB",
                "Active: 0 kB",
                "Inactive: 0 kB",
                "SwapTotal: 0 kB",
                "SwapFree: 0 kB",
                "Dirty: 0 kB",
                "Writeback: 0 kB",
                "Mapped: 0 kB",
                "Slab: 0 kB",
                "Committed_AS: 0 kB",
                "VmallocTotal: 0 kB",
                "VmallocUsed: 0 kB",
                "VmallocChunk: 0 kB",
                "",
            ]
            .join("\n"),
        )
        .unwrap();
        std::fs::write(p.join("loadavg"), "1.50 0.75 0.25 3/100 42\n").unwrap();
        let mut n = NodeSampler::new(p);
        let a = n.sample().unwrap();
        assert_eq!(a.cpus, 2);
        assert_eq!(a.memory_total_bytes, 1000 * 1024);
        assert_eq!(a.memory_available_bytes, 500 * 1024);
        assert_eq!(a.load, [1.5, 0.75, 0.25]);
        assert!(a.pressure.is_empty());
        std::fs::write(
            p.join("stat"),
            "cpu  200 0 100 900 0 0 0 0 0 0\ncpu0 100 0 50 450 0 0 0 0 0 0\ncpu1 100 0 50 450 0 0 0 0 0 0\nctxt 1\nbtime 1\nprocesses 1\n",
        )
        .unwrap();
        let b = n.sample().unwrap();
        // 100 busy ticks out of 200 on 2 cores: one core busy.
        assert!((b.cpu_usage_cores.unwrap() - 1.0).abs() < 1e-9);
        assert_eq!(b.core_busy_ratio, vec![0.5, 0.5]);
        std::fs::remove_file(p.join("meminfo")).unwrap();
        let e = n.sample().unwrap_err();
        assert!(e.to_string().contains("meminfo"), "{e}");
    }
}
