//! Reading one container's counters from its cgroup files, v1 and v2. Every value is
//! optional: a controller that is not enabled, or a file the kernel does not have, leaves it
//! unset rather than failing the whole sample.

use std::path::Path;

use serde::Serialize;

use crate::cgroup_files::{
    CgroupDir, ControllerPaths, FileReader, PIDS_CURRENT, keyed, number, pressure, v1, v2,
};

/// Cumulative counters and current settings, as the kernel reports them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CgroupStats {
    pub cpu_usage_seconds: Option<f64>,
    pub cpu_periods: Option<u64>,
    pub cpu_throttled_periods: Option<u64>,
    pub cpu_throttled_seconds: Option<f64>,
    /// CPU quota in cores; `None` when unlimited or unknown.
    pub cpu_quota_cores: Option<f64>,
    pub cpu_period_seconds: Option<f64>,
    pub memory_usage_bytes: Option<u64>,
    pub memory_working_set_bytes: Option<u64>,
    /// Hard limit (`memory.max` / `memory.limit_in_bytes`); `None` when unlimited.
    pub memory_limit_bytes: Option<u64>,
    /// `memory.high` on v2, the soft limit on v1; `None` when unlimited.
    pub memory_high_bytes: Option<u64>,
    pub oom_kills: Option<u64>,
    pub pids: Option<u64>,
    pub pressure: Vec<PressureTotals>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PressureTotals {
    pub resource: &'static str,
    pub some_seconds: f64,
    pub full_seconds: Option<f64>,
}

/// The files read on every pass, each with a handle slot in [`OpenFiles`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hot {
    V2CpuStat,
    V2CpuPressure,
    V2MemoryPressure,
    V2IoPressure,
    V2MemoryCurrent,
    V2MemoryStat,
    V2MemoryEvents,
    V1CpuacctUsage,
    V1CpuStat,
    V1MemoryUsage,
    V1MemoryStat,
    V1OomControl,
}

const HOT_FILES: usize = 12;

impl Hot {
    fn file_name(self) -> &'static str {
        match self {
            Hot::V2CpuStat => v2::CPU_STAT,
            Hot::V2CpuPressure => v2::CPU_PRESSURE,
            Hot::V2MemoryPressure => v2::MEMORY_PRESSURE,
            Hot::V2IoPressure => v2::IO_PRESSURE,
            Hot::V2MemoryCurrent => v2::MEMORY_CURRENT,
            Hot::V2MemoryStat => v2::MEMORY_STAT,
            Hot::V2MemoryEvents => v2::MEMORY_EVENTS,
            Hot::V1CpuacctUsage => v1::CPUACCT_USAGE,
            Hot::V1CpuStat => v1::CPU_STAT,
            Hot::V1MemoryUsage => v1::MEMORY_USAGE_IN_BYTES,
            Hot::V1MemoryStat => v1::MEMORY_STAT,
            Hot::V1OomControl => v1::MEMORY_OOM_CONTROL,
        }
    }
}

#[derive(Debug, Default)]
enum Slot {
    #[default]
    Closed,
    /// The kernel has no such file here (PSI off, a controller not enabled); tried again on
    /// the next full pass rather than on every pass.
    Missing,
    Open(std::fs::File),
}

/// Open handles to one container's hot files, re-read in place with `pread` at offset 0
/// (cgroup files regenerate their content on every read from the start). Opening a cgroup file
/// costs more than reading it, and the agent reads thousands per second. Settings, read on
/// full passes only, are opened each time: every open handle also holds a kernel buffer.
#[derive(Debug, Default)]
pub struct OpenFiles {
    slots: [Slot; HOT_FILES],
}

/// File handles the agent may keep open across all containers, set from RLIMIT_NOFILE.
static HANDLE_BUDGET: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);

/// Raises the soft open-file limit to the hard one and sets how many cgroup file handles may
/// stay open (half the limit, the rest is left for sockets and the like).
pub fn init_handle_budget() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    let budget = (lim.rlim_cur / 2).min(1 << 20);
    HANDLE_BUDGET.store(budget as isize, std::sync::atomic::Ordering::Relaxed);
    budget
}

impl Drop for OpenFiles {
    fn drop(&mut self) {
        let open = self
            .slots
            .iter()
            .filter(|s| matches!(s, Slot::Open(_)))
            .count();
        HANDLE_BUDGET.fetch_add(open as isize, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Reads containers' cgroup files into one reused buffer.
#[derive(Debug, Default)]
pub struct Reader {
    files: FileReader,
    /// Handles of the container being read; swapped in and out by [`Reader::stats`].
    open: OpenFiles,
    /// Read settings (limits, quota) in this pass, or carry them over from the previous one.
    full: bool,
    /// The previous pass's memory usage and working set, when this pass may reuse the working
    /// set: `memory.stat`, the costliest file the agent reads (the kernel formats dozens of
    /// counters), is skipped while usage has not moved, and re-read on every full pass.
    prev_memory: Option<(u64, u64)>,
}

impl Reader {
    /// A file read on every pass: kept open when the handle budget allows.
    fn read_hot(&mut self, dir: &Path, file: Hot) -> Option<&str> {
        let slot = &mut self.open.slots[file as usize];
        if let Slot::Missing = slot {
            if !self.full {
                return None;
            }
            *slot = Slot::Closed;
        }
        if let Slot::Closed = slot {
            let f = match std::fs::File::open(dir.join(file.file_name())) {
                Ok(f) => f,
                Err(e) => {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        *slot = Slot::Missing;
                    }
                    return None;
                }
            };
            let budget = HANDLE_BUDGET.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            if budget <= 0 {
                HANDLE_BUDGET.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return self.files.read_open(&f).ok();
            }
            *slot = Slot::Open(f);
        }
        let Slot::Open(f) = slot else { return None };
        let text = self.files.read_open(f).ok();
        if text.is_none() {
            // The cgroup went away under the handle.
            *slot = Slot::Closed;
            HANDLE_BUDGET.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        text
    }

    fn read_u64(&mut self, dir: &Path, file: Hot) -> Option<u64> {
        number(file.file_name(), self.read_hot(dir, file)?).ok()
    }

    /// Quota and period; settings are read on full passes only, without keeping a handle.
    fn cpu_limit(&mut self, dir: CgroupDir, s: &mut CgroupStats) {
        if let Ok(l) = dir.read_cpu_limit(&mut self.files) {
            s.cpu_period_seconds = Some(l.period_us as f64 / 1e6);
            s.cpu_quota_cores = l.cores();
        }
    }

    fn memory_limits(&mut self, dir: CgroupDir, s: &mut CgroupStats) {
        s.memory_limit_bytes = dir.read_memory_max(&mut self.files).ok().flatten();
        s.memory_high_bytes = dir.read_memory_high(&mut self.files).ok().flatten();
    }

    fn pids(&mut self, dir: &Path) -> Option<u64> {
        number(PIDS_CURRENT, self.files.read(&dir.join(PIDS_CURRENT)).ok()?).ok()
    }

    /// Working set = usage − inactive file pages, reusing the previous pass's figure while
    /// usage is unchanged (see [`Reader::prev_memory`]).
    fn working_set(&mut self, dir: &Path, usage: u64, stat: Hot, key: &str) -> u64 {
        if let Some((u, ws)) = self.prev_memory
            && u == usage
        {
            return ws;
        }
        let mut v = [None; 1];
        self.read_keyed(dir, stat, &[key], &mut v);
        usage.saturating_sub(v[0].unwrap_or(0))
    }

    /// A malformed line costs only its own value: every value is optional.
    fn read_keyed(&mut self, dir: &Path, file: Hot, keys: &[&str], out: &mut [Option<u64>]) {
        if let Some(text) = self.read_hot(dir, file) {
            let _ = keyed(file.file_name(), text, keys, out);
        }
    }

    /// Reads one container. `prev` is its previous reading: settings (quota, limits) are read
    /// afresh only when `full`, and carried over otherwise.
    pub fn read_container(
        &mut self,
        paths: &ControllerPaths,
        v2_native: bool,
        open: &mut OpenFiles,
        prev: Option<&CgroupStats>,
        full: bool,
    ) -> CgroupStats {
        std::mem::swap(&mut self.open, open);
        self.full = full || prev.is_none();
        self.prev_memory = prev
            .filter(|_| !self.full)
            .and_then(|p| Some((p.memory_usage_bytes?, p.memory_working_set_bytes?)));
        let mut s = self.stats(paths, v2_native);
        if !self.full
            && let Some(p) = prev
        {
            s.cpu_quota_cores = p.cpu_quota_cores;
            s.cpu_period_seconds = p.cpu_period_seconds;
            s.memory_limit_bytes = p.memory_limit_bytes;
            s.memory_high_bytes = p.memory_high_bytes;
            s.pids = p.pids;
        }
        std::mem::swap(&mut self.open, open);
        s
    }

    /// Reads everything, settings included, without keeping handles (for one-off reads).
    pub fn stats_once(&mut self, paths: &ControllerPaths, v2_native: bool) -> CgroupStats {
        let mut open = OpenFiles::default();
        self.read_container(paths, v2_native, &mut open, None, true)
    }

    fn stats(&mut self, paths: &ControllerPaths, v2_native: bool) -> CgroupStats {
        let mut s = CgroupStats::default();
        if let Some(dir) = &paths.v2 {
            self.v2(dir, v2_native, &mut s);
        }
        self.v1(paths, &mut s);
        s
    }

    fn v2(&mut self, dir: &Path, native: bool, s: &mut CgroupStats) {
        // cpu.stat's usage is a core file in every v2 cgroup, even where the cpu controller is
        // not enabled (as on hybrid nodes), so it is read whenever the directory exists.
        let mut v = [None; 4];
        self.read_keyed(
            dir,
            Hot::V2CpuStat,
            &["usage_usec", "nr_periods", "nr_throttled", "throttled_usec"],
            &mut v,
        );
        s.cpu_usage_seconds = v[0].map(|u| u as f64 / 1e6);
        s.cpu_periods = v[1];
        s.cpu_throttled_periods = v[2];
        s.cpu_throttled_seconds = v[3].map(|u| u as f64 / 1e6);
        if self.full {
            self.cpu_limit(CgroupDir::v2(dir), s);
        }
        for (resource, file) in [
            ("cpu", Hot::V2CpuPressure),
            ("memory", Hot::V2MemoryPressure),
            ("io", Hot::V2IoPressure),
        ] {
            if let Some(p) = self
                .read_hot(dir, file)
                .and_then(|t| parse_pressure(resource, t))
            {
                s.pressure.push(p);
            }
        }
        if !native {
            return;
        }
        s.memory_usage_bytes = self.read_u64(dir, Hot::V2MemoryCurrent);
        if let Some(usage) = s.memory_usage_bytes {
            s.memory_working_set_bytes =
                Some(self.working_set(dir, usage, Hot::V2MemoryStat, "inactive_file"));
        }
        if self.full {
            self.memory_limits(CgroupDir::v2(dir), s);
        }
        let mut v = [None; 1];
        self.read_keyed(dir, Hot::V2MemoryEvents, &["oom_kill"], &mut v);
        s.oom_kills = v[0];
        if self.full {
            s.pids = self.pids(dir);
        }
    }

    fn v1(&mut self, paths: &ControllerPaths, s: &mut CgroupStats) {
        if let Some(dir) = &paths.cpuacct
            && let Some(ns) = self.read_u64(dir, Hot::V1CpuacctUsage)
        {
            s.cpu_usage_seconds = Some(ns as f64 / 1e9);
        }
        if let Some(dir) = &paths.cpu {
            let mut v = [None; 3];
            self.read_keyed(
                dir,
                Hot::V1CpuStat,
                &["nr_periods", "nr_throttled", "throttled_time"],
                &mut v,
            );
            if v[0].is_some() {
                s.cpu_periods = v[0];
                s.cpu_throttled_periods = v[1];
                s.cpu_throttled_seconds = v[2].map(|ns| ns as f64 / 1e9);
            }
            if self.full {
                self.cpu_limit(CgroupDir::v1(dir), s);
            }
        }
        if let Some(dir) = &paths.memory {
            s.memory_usage_bytes = self.read_u64(dir, Hot::V1MemoryUsage);
            if let Some(usage) = s.memory_usage_bytes {
                s.memory_working_set_bytes =
                    Some(self.working_set(dir, usage, Hot::V1MemoryStat, "total_inactive_file"));
            }
            if self.full {
                self.memory_limits(CgroupDir::v1(dir), s);
            }
            let mut v = [None; 1];
            self.read_keyed(dir, Hot::V1OomControl, &["oom_kill"], &mut v);
            s.oom_kills = v[0];
        }
        if self.full
            && let Some(dir) = &paths.pids
            && s.pids.is_none()
        {
            s.pids = self.pids(dir);
        }
    }
}

/// A PSI file's totals (`None` when malformed), named by the resource it is about.
pub fn parse_pressure(resource: &'static str, text: &str) -> Option<PressureTotals> {
    let p = pressure(resource, text).ok()?;
    Some(PressureTotals {
        resource,
        some_seconds: p.some_us as f64 / 1e6,
        full_seconds: p.full_us.map(|us| us as f64 / 1e6),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::PathBuf;

    fn write(dir: &Path, file: &str, text: &str) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join(file), text).unwrap();
    }

    #[test]
    fn v2_files() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("c");
        write(
            &d,
            "cpu.stat",
            "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\nnr_periods 10\nnr_throttled 4\nthrottled_usec 300000\n",
        );
        write(&d, "cpu.max", "50000 100000\n");
        write(&d, "memory.current", "1048576\n");
        write(
            &d,
            "memory.stat",
            "anon 700000\nfile 348576\ninactive_file 48576\n",
        );
        write(&d, "memory.max", "max\n");
        write(&d, "memory.high", "2097152\n");
        write(
            &d,
            "memory.events",
            "low 0\nhigh 3\nmax 0\noom 1\noom_kill 1\n",
        );
        write(&d, "pids.current", "7\n");
        write(
            &d,
            "cpu.pressure",
            "some avg10=1.00 avg60=0.50 avg300=0.10 total=1500000\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=250000\n",
        );
        let paths = ControllerPaths {
            v2: Some(d),
            ..Default::default()
        };
        let s = Reader::default().stats_once(&paths, true);
        assert_eq!(s.cpu_usage_seconds, Some(2.5));
        assert_eq!(s.cpu_periods, Some(10));
        assert_eq!(s.cpu_throttled_periods, Some(4));
        assert_eq!(s.cpu_throttled_seconds, Some(0.3));
        assert_eq!(s.cpu_quota_cores, Some(0.5));
        assert_eq!(s.cpu_period_seconds, Some(0.1));
        assert_eq!(s.memory_usage_bytes, Some(1_048_576));
        assert_eq!(s.memory_working_set_bytes, Some(1_000_000));
        assert_eq!(s.memory_limit_bytes, None);
        assert_eq!(s.memory_high_bytes, Some(2_097_152));
        assert_eq!(s.oom_kills, Some(1));
        assert_eq!(s.pids, Some(7));
        assert_eq!(s.pressure.len(), 1);
        assert_eq!(s.pressure[0].some_seconds, 1.5);
        assert_eq!(s.pressure[0].full_seconds, Some(0.25));
    }

    #[test]
    fn v1_files_and_unlimited() {
        let t = tempfile::tempdir().unwrap();
        let cpu = t.path().join("cpu/c");
        let acct = t.path().join("cpuacct/c");
        let mem = t.path().join("memory/c");
        write(
            &cpu,
            "cpu.stat",
            "nr_periods 20\nnr_throttled 5\nthrottled_time 1500000000\n",
        );
        write(&cpu, "cpu.cfs_period_us", "100000\n");
        write(&cpu, "cpu.cfs_quota_us", "-1\n");
        write(&acct, "cpuacct.usage", "3000000000\n");
        write(&mem, "memory.usage_in_bytes", "4096000\n");
        write(
            &mem,
            "memory.stat",
            "cache 0\ninactive_file 1\ntotal_inactive_file 96000\n",
        );
        write(&mem, "memory.limit_in_bytes", "9223372036854771712\n");
        write(&mem, "memory.soft_limit_in_bytes", "9223372036854771712\n");
        write(
            &mem,
            "memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        );
        let paths = ControllerPaths {
            cpu: Some(cpu.clone()),
            cpuacct: Some(acct),
            memory: Some(mem.clone()),
            ..Default::default()
        };
        let s = Reader::default().stats_once(&paths, false);
        assert_eq!(s.cpu_usage_seconds, Some(3.0));
        assert_eq!(s.cpu_throttled_seconds, Some(1.5));
        assert_eq!(s.cpu_quota_cores, None);
        assert_eq!(s.memory_working_set_bytes, Some(4_000_000));
        assert_eq!(s.memory_limit_bytes, None);
        assert_eq!(s.oom_kills, Some(2));
        write(&cpu, "cpu.cfs_quota_us", "30000\n");
        write(&mem, "memory.limit_in_bytes", "67108864\n");
        let s = Reader::default().stats_once(&paths, false);
        assert_eq!(s.cpu_quota_cores, Some(0.3));
        assert_eq!(s.memory_limit_bytes, Some(64 << 20));
    }

    #[test]
    fn memory_stat_is_reread_when_usage_moves_and_on_full_passes() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("c");
        write(&d, "memory.current", "1000000\n");
        write(&d, "memory.stat", "inactive_file 100000\n");
        let paths = ControllerPaths {
            v2: Some(d.clone()),
            ..Default::default()
        };
        let mut reader = Reader::default();
        let mut open = OpenFiles::default();
        let first = reader.read_container(&paths, true, &mut open, None, false);
        assert_eq!(first.memory_working_set_bytes, Some(900_000));
        // Usage unchanged: the previous working set stands, memory.stat is not read.
        write(&d, "memory.stat", "inactive_file 300000\n");
        let same = reader.read_container(&paths, true, &mut open, Some(&first), false);
        assert_eq!(same.memory_working_set_bytes, Some(900_000));
        // A full pass reads it whatever usage did.
        let full = reader.read_container(&paths, true, &mut open, Some(&same), true);
        assert_eq!(full.memory_working_set_bytes, Some(700_000));
        // Usage moved: read again.
        write(&d, "memory.current", "2000000\n");
        write(&d, "memory.stat", "inactive_file 500000\n");
        let moved = reader.read_container(&paths, true, &mut open, Some(&full), false);
        assert_eq!(moved.memory_working_set_bytes, Some(1_500_000));
    }

    #[test]
    fn vanished_directory_reads_nothing() {
        let paths = ControllerPaths {
            v2: Some(PathBuf::from("/nonexistent/headroom/c")),
            ..Default::default()
        };
        assert_eq!(
            Reader::default().stats_once(&paths, true),
            CgroupStats::default()
        );
        assert!(!paths.exists());
    }
}
