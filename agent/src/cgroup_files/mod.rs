//! The cgroup files the agent reads and writes: their names, one parser per format, and
//! [`CgroupDir`], one directory with the hierarchy version its files follow, whose methods read
//! and plan writes of the settings the same way on v1 and v2. Samplers read through it and the
//! actuator plans its writes with it; this module never writes a file.

mod parse;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use parse::{
    CpuLimit, MIN_QUOTA_US, Malformed, Psi, UNLIMITED_BYTES, cfs_period, cfs_quota, cpu_max, keyed,
    limit, number, pressure,
};

/// A cgroup's processes, one PID a line (both versions).
pub const PROCS: &str = "cgroup.procs";
/// Tasks in the cgroup (both versions; the v1 root has none).
pub const PIDS_CURRENT: &str = "pids.current";

/// Files of the unified (v2) hierarchy.
pub mod v2 {
    /// Present in every v2 directory: how a v2 tree is recognised.
    pub const CONTROLLERS: &str = "cgroup.controllers";
    /// Keyed, microseconds: `usage_usec` (in every cgroup), `nr_periods`, `nr_throttled`,
    /// `throttled_usec` (with the cpu controller).
    pub const CPU_STAT: &str = "cpu.stat";
    pub const CPU_MAX: &str = "cpu.max";
    pub const CPU_MAX_BURST: &str = "cpu.max.burst";
    pub const CPU_WEIGHT: &str = "cpu.weight";
    pub const CPU_PRESSURE: &str = "cpu.pressure";
    pub const MEMORY_PRESSURE: &str = "memory.pressure";
    pub const IO_PRESSURE: &str = "io.pressure";
    pub const MEMORY_CURRENT: &str = "memory.current";
    pub const MEMORY_STAT: &str = "memory.stat";
    pub const MEMORY_EVENTS: &str = "memory.events";
    pub const MEMORY_HIGH: &str = "memory.high";
    pub const MEMORY_MAX: &str = "memory.max";
}

/// Files of the v1 controllers' hierarchies.
pub mod v1 {
    pub const CPU_CFS_QUOTA_US: &str = "cpu.cfs_quota_us";
    pub const CPU_CFS_PERIOD_US: &str = "cpu.cfs_period_us";
    pub const CPU_SHARES: &str = "cpu.shares";
    /// Keyed: `nr_periods`, `nr_throttled`, `throttled_time` (nanoseconds).
    pub const CPU_STAT: &str = "cpu.stat";
    /// Nanoseconds.
    pub const CPUACCT_USAGE: &str = "cpuacct.usage";
    pub const MEMORY_USAGE_IN_BYTES: &str = "memory.usage_in_bytes";
    pub const MEMORY_STAT: &str = "memory.stat";
    pub const MEMORY_LIMIT_IN_BYTES: &str = "memory.limit_in_bytes";
    pub const MEMORY_SOFT_LIMIT_IN_BYTES: &str = "memory.soft_limit_in_bytes";
    /// Keyed: `oom_kill` (Linux 4.13+).
    pub const MEMORY_OOM_CONTROL: &str = "memory.oom_control";
}

/// A container's directory in each hierarchy the agent reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ControllerPaths {
    pub v2: Option<PathBuf>,
    pub cpu: Option<PathBuf>,
    pub cpuacct: Option<PathBuf>,
    pub memory: Option<PathBuf>,
    pub pids: Option<PathBuf>,
}

impl ControllerPaths {
    pub fn is_empty(&self) -> bool {
        self.v2.is_none()
            && self.cpu.is_none()
            && self.cpuacct.is_none()
            && self.memory.is_none()
            && self.pids.is_none()
    }

    /// True while at least one of the container's directories still exists.
    pub fn exists(&self) -> bool {
        [&self.v2, &self.cpu, &self.cpuacct, &self.memory]
            .into_iter()
            .flatten()
            .any(|p| p.is_dir())
    }

    /// Where the container's CPU limit is: the v2 directory when it has `cpu.max`, else the v1
    /// `cpu` one when it has `cpu.cfs_quota_us`.
    pub fn cpu_limit_dir(&self) -> Option<CgroupDir<'_>> {
        [
            self.v2.as_deref().map(CgroupDir::v2),
            self.cpu.as_deref().map(CgroupDir::v1),
        ]
        .into_iter()
        .flatten()
        .find(|d| d.cpu_limit_file().is_file())
    }

    /// Where the container's memory limits are: the v2 directory when it has `memory.high`,
    /// else the v1 `memory` one when it has a soft limit.
    pub fn memory_limit_dir(&self) -> Option<CgroupDir<'_>> {
        [
            self.v2.as_deref().map(CgroupDir::v2),
            self.memory.as_deref().map(CgroupDir::v1),
        ]
        .into_iter()
        .flatten()
        .find(|d| d.memory_high_file().is_file())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// One cgroup directory: a v2 one, or a v1 controller's (the CPU settings of a v1 `cpu`
/// directory, the memory settings of a v1 `memory` one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupDir<'a> {
    pub path: &'a Path,
    pub version: Version,
}

/// A value for one cgroup file, planned and not yet written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub path: PathBuf,
    pub value: String,
}

impl<'a> CgroupDir<'a> {
    pub fn v2(path: &'a Path) -> CgroupDir<'a> {
        CgroupDir {
            path,
            version: Version::V2,
        }
    }

    pub fn v1(path: &'a Path) -> CgroupDir<'a> {
        CgroupDir {
            path,
            version: Version::V1,
        }
    }

    /// The parent cgroup, in the same hierarchy.
    pub fn parent(&self) -> Option<CgroupDir<'a>> {
        Some(CgroupDir {
            path: self.path.parent()?,
            version: self.version,
        })
    }

    fn name(&self, v1: &'static str, v2: &'static str) -> &'static str {
        match self.version {
            Version::V1 => v1,
            Version::V2 => v2,
        }
    }

    fn memory_high_name(&self) -> &'static str {
        self.name(v1::MEMORY_SOFT_LIMIT_IN_BYTES, v2::MEMORY_HIGH)
    }

    fn memory_max_name(&self) -> &'static str {
        self.name(v1::MEMORY_LIMIT_IN_BYTES, v2::MEMORY_MAX)
    }

    /// `cpu.max`, or v1's `cpu.cfs_quota_us` (the period beside it is only read).
    pub fn cpu_limit_file(&self) -> PathBuf {
        self.path.join(self.name(v1::CPU_CFS_QUOTA_US, v2::CPU_MAX))
    }

    /// `cpu.max.burst`; v1 has none.
    pub fn cpu_burst_file(&self) -> Option<PathBuf> {
        (self.version == Version::V2).then(|| self.path.join(v2::CPU_MAX_BURST))
    }

    /// `memory.high`, or v1's soft limit.
    pub fn memory_high_file(&self) -> PathBuf {
        self.path.join(self.memory_high_name())
    }

    /// `memory.max`, or v1's hard limit.
    pub fn memory_max_file(&self) -> PathBuf {
        self.path.join(self.memory_max_name())
    }

    pub fn read_cpu_limit(&self, r: &mut FileReader) -> Result<CpuLimit, FileError> {
        match self.version {
            Version::V2 => self.parsed(r, v2::CPU_MAX, cpu_max),
            Version::V1 => Ok(CpuLimit {
                quota_us: self.parsed(r, v1::CPU_CFS_QUOTA_US, cfs_quota)?,
                period_us: self.parsed(r, v1::CPU_CFS_PERIOD_US, cfs_period)?,
            }),
        }
    }

    /// Bytes; `None` when unlimited.
    pub fn read_memory_high(&self, r: &mut FileReader) -> Result<Option<u64>, FileError> {
        let file = self.memory_high_name();
        self.parsed(r, file, |t| limit(file, t))
    }

    /// Bytes; `None` when unlimited.
    pub fn read_memory_max(&self, r: &mut FileReader) -> Result<Option<u64>, FileError> {
        let file = self.memory_max_name();
        self.parsed(r, file, |t| limit(file, t))
    }

    fn parsed<T>(
        &self,
        r: &mut FileReader,
        file: &str,
        parse: impl FnOnce(&str) -> Result<T, Malformed>,
    ) -> Result<T, FileError> {
        parse(r.read(&self.path.join(file))?).map_err(|source| FileError::Malformed {
            dir: self.path.to_path_buf(),
            source,
        })
    }

    /// The write that sets this cgroup's CPU limit (an unlimited quota is written as such).
    pub fn cpu_limit_write(&self, limit: CpuLimit) -> Write {
        let CpuLimit {
            quota_us,
            period_us,
        } = limit;
        let value = match (self.version, quota_us) {
            (Version::V2, Some(q)) => format!("{q} {period_us}"),
            (Version::V2, None) => format!("max {period_us}"),
            (Version::V1, Some(q)) => q.to_string(),
            (Version::V1, None) => "-1".to_string(),
        };
        Write {
            path: self.cpu_limit_file(),
            value,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("in {dir}, {source}")]
    Malformed { dir: PathBuf, source: Malformed },
}

/// Reads cgroup files into one reused buffer. The buffer keeps its full length between reads
/// (only grown), so no read pays for clearing it.
#[derive(Debug, Default)]
pub struct FileReader {
    buf: Vec<u8>,
}

impl FileReader {
    pub fn read(&mut self, path: &Path) -> Result<&str, FileError> {
        let at = |source| FileError::Read {
            path: path.to_path_buf(),
            source,
        };
        let f = File::open(path).map_err(at)?;
        self.read_open(&f).map_err(at)
    }

    /// Reads a whole (small, generated) file from offset 0: an open cgroup file regenerates its
    /// text on every read from the start, so one handle serves every pass.
    pub fn read_open(&mut self, f: &File) -> io::Result<&str> {
        use std::os::unix::fs::FileExt;
        if self.buf.is_empty() {
            self.buf.resize(8192, 0);
        }
        let mut len = 0;
        loop {
            match f.read_at(&mut self.buf[len..], len as u64)? {
                0 => break,
                n => {
                    len += n;
                    if len == self.buf.len() {
                        self.buf.resize(len * 2, 0);
                    }
                }
            }
        }
        std::str::from_utf8(&self.buf[..len])
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))
    }
}

#[cfg(test)]
mod tests;
