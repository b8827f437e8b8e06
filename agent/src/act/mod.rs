//! Actuators: the only place where the agent writes a cgroup file. A decision becomes an
//! ordered list of writes (parent before child when raising, child before parent when lowering;
//! within one cgroup the hard limit before the soft one when raising and after it when
//! lowering). Before the first write of any file its original content is recorded in the state
//! directory (write-ahead), so every value the agent changed is restored on `SIGTERM`, by
//! `headroom agent --restore`, and on the next start after a crash.
//!
//! This module never decides anything and never writes a file outside the container
//! directories the caller names (and, only when asked, their ancestors' CPU quota).

pub mod driver;
pub mod mps;
pub mod resize;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

pub use crate::cgroup_files::Write;
use crate::cgroup_files::{ControllerPaths, CpuLimit, FileError, FileReader};
use crate::policy::Resource;
use crate::state::{Kind, StateDir, StateError};

/// Original values of every file the agent wrote, as JSON `{path: content}`.
pub const ORIGINALS: Kind = Kind {
    tag: b"ORIGINAL",
    version: 1,
    file: "originals.json",
};

#[derive(Debug, thiserror::Error)]
pub enum ActError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: std::io::Error,
    },
    #[error("no {resource} file to write for this container (none of its directories has one)")]
    NoFile { resource: &'static str },
    /// The file no longer holds what the policy believed: someone else changed it.
    #[error("{path} was changed by someone else (now {actual:?}); not overwriting it this pass")]
    Drifted { path: PathBuf, actual: Option<f64> },
    #[error("recording originals: {0}")]
    State(#[from] StateError),
    #[error("originals file is unreadable: {0}")]
    Journal(String),
}

/// What `headroom_*` knobs the actuator may touch beyond the soft ones.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Allow {
    /// `memory.max` / `memory.limit_in_bytes` follow `memory.high` (× `memory_max_ratio`).
    pub memory_max: bool,
    pub memory_max_ratio: f64,
    /// `cpu.max.burst` = quota × ratio on v2 (0 = leave it).
    pub cpu_burst_ratio: f64,
    /// Raise ancestors' CPU quota (a Kubernetes pod's) when the target exceeds it; otherwise
    /// the target is capped at the lowest ancestor quota.
    pub raise_parents: bool,
}

pub struct Actuator {
    dir: StateDir,
    originals: BTreeMap<PathBuf, String>,
}

/// The journal of original values (file path to the text it held before the first write), as
/// [`ORIGINALS`] stores it.
pub fn decode_originals(bytes: &[u8]) -> Result<BTreeMap<PathBuf, String>, serde_json::Error> {
    serde_json::from_slice(bytes)
}

impl Actuator {
    /// Opens the journal of originals; leftovers from a crashed run are kept so that
    /// [`Actuator::restore_all`] puts them back.
    pub fn open(dir: StateDir) -> Result<Actuator, ActError> {
        let originals = match dir.load(ORIGINALS) {
            Ok(None) => BTreeMap::new(),
            Ok(Some(bytes)) => decode_originals(&bytes)
                .map_err(|e| ActError::Journal(format!("{}: {e}", dir.path().display())))?,
            Err(e) => return Err(e.into()),
        };
        Ok(Actuator { dir, originals })
    }

    /// Files whose originals are recorded (and so were, or were about to be, changed).
    pub fn changed(&self) -> impl Iterator<Item = (&PathBuf, &String)> {
        self.originals.iter()
    }

    fn save(&self) -> Result<(), ActError> {
        let bytes =
            serde_json::to_vec(&self.originals).map_err(|e| ActError::Journal(e.to_string()))?;
        self.dir.save(ORIGINALS, &bytes)?;
        Ok(())
    }

    /// Writes every original back: children first, then a second pass for any that the kernel
    /// refused in that order (a parent's limit). Files whose cgroup is gone are dropped.
    /// Returns how many were restored and the errors of those that could not be.
    pub fn restore_all(&mut self) -> (usize, Vec<ActError>) {
        let mut todo: Vec<(PathBuf, String)> = self
            .originals
            .iter()
            .map(|(p, v)| (p.clone(), v.clone()))
            .collect();
        todo.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        let mut restored = 0;
        let mut errors = Vec::new();
        for pass in 0..2 {
            let mut failed = Vec::new();
            for (path, value) in todo {
                if !path.parent().is_some_and(Path::is_dir) {
                    self.originals.remove(&path);
                    continue;
                }
                match write(&path, &value) {
                    Ok(()) => {
                        restored += 1;
                        self.originals.remove(&path);
                    }
                    Err(e) if pass == 1 => errors.push(e),
                    Err(_) => failed.push((path, value)),
                }
            }
            todo = failed;
            todo.reverse();
        }
        if let Err(e) = self.save() {
            errors.push(e);
        }
        (restored, errors)
    }

    /// Carries out one decision. `from` is what the policy believed the current value was; the
    /// file is read first, and a value that differs (beyond rounding) is not overwritten.
    pub fn apply(
        &mut self,
        paths: &ControllerPaths,
        resource: Resource,
        from: Option<f64>,
        to: f64,
        allow: Allow,
    ) -> Result<Vec<Write>, ActError> {
        let writes = match resource {
            Resource::Cpu => self.plan_cpu(paths, from, to, allow)?,
            Resource::Memory => self.plan_memory(paths, from, to, allow)?,
            Resource::Gpu => return Err(ActError::NoFile { resource: "gpu" }),
        };
        let mut files = FileReader::default();
        for w in &writes {
            if !self.originals.contains_key(&w.path) {
                let original = files.read(&w.path)?.trim().to_string();
                self.originals.insert(w.path.clone(), original);
                self.save()?;
            }
        }
        for w in &writes {
            write(&w.path, &w.value)?;
        }
        Ok(writes)
    }

    fn plan_cpu(
        &self,
        paths: &ControllerPaths,
        from: Option<f64>,
        to: f64,
        allow: Allow,
    ) -> Result<Vec<Write>, ActError> {
        let dir = paths
            .cpu_limit_dir()
            .ok_or(ActError::NoFile { resource: "cpu" })?;
        let files = &mut FileReader::default();
        let now = dir.read_cpu_limit(files)?;
        let actual = now.cores();
        check_drift(&dir.cpu_limit_file(), from, actual)?;
        let raising = actual.is_none_or(|a| to > a);
        let mut target = to;
        // Ancestors with a lower quota: v1 refuses a child above its parent, v2 silently caps.
        let mut parents = Vec::new();
        let mut up = dir.parent();
        while let Some(p) = up {
            if !p.cpu_limit_file().is_file() {
                break;
            }
            let limit = p.read_cpu_limit(files)?;
            if let Some(q) = limit.cores()
                && q < target
            {
                if allow.raise_parents && raising {
                    parents.push(p.cpu_limit_write(CpuLimit::from_cores(target, limit.period_us)));
                } else {
                    target = q;
                }
            }
            up = p.parent();
        }
        let mut own = vec![dir.cpu_limit_write(CpuLimit::from_cores(target, now.period_us))];
        if allow.cpu_burst_ratio > 0.0
            && let Some(path) = dir.cpu_burst_file().filter(|f| f.is_file())
        {
            let burst = (target * allow.cpu_burst_ratio * now.period_us as f64).round() as u64;
            own.push(Write {
                path,
                value: burst.to_string(),
            });
        }
        // Parents were collected nearest first; the outermost is written first when raising.
        parents.reverse();
        Ok(if raising {
            parents.into_iter().chain(own).collect()
        } else {
            own.into_iter().collect()
        })
    }

    fn plan_memory(
        &self,
        paths: &ControllerPaths,
        from: Option<f64>,
        to: f64,
        allow: Allow,
    ) -> Result<Vec<Write>, ActError> {
        let dir = paths
            .memory_limit_dir()
            .ok_or(ActError::NoFile { resource: "memory" })?;
        let files = &mut FileReader::default();
        let soft_path = dir.memory_high_file();
        let actual = dir.read_memory_high(files)?.map(|v| v as f64);
        check_drift(&soft_path, from, actual)?;
        let bytes = page_round(to);
        let soft_w = Write {
            path: soft_path,
            value: bytes.to_string(),
        };
        let raising = actual.is_none_or(|a| to > a);
        let hard_path = dir.memory_max_file();
        let hard_now = dir.read_memory_max(files)?.map(|v| v as f64);
        let mut writes = Vec::new();
        // The hard limit is moved only when allowed and only when one is set: the agent never
        // imposes a hard limit on a cgroup that had none.
        if allow.memory_max
            && let Some(h) = hard_now
        {
            let floor = self
                .originals
                .get(&hard_path)
                .and_then(|o| o.parse::<f64>().ok())
                .unwrap_or(h);
            let want = page_round((to * allow.memory_max_ratio.max(1.0)).max(floor.min(h)));
            if want != h as u64 {
                writes.push(Write {
                    path: hard_path,
                    value: want.to_string(),
                });
            }
        }
        if raising {
            writes.push(soft_w);
        } else {
            writes.insert(0, soft_w);
        }
        Ok(writes)
    }
}

fn page_round(v: f64) -> u64 {
    let b = v.max(0.0) as u64;
    b / 4096 * 4096
}

fn check_drift(path: &Path, believed: Option<f64>, actual: Option<f64>) -> Result<(), ActError> {
    let same = match (believed, actual) {
        (None, None) => true,
        (Some(b), Some(a)) => (a - b).abs() <= 0.01 * b.abs().max(1e-9) + 1e-6,
        _ => false,
    };
    if same {
        Ok(())
    } else {
        Err(ActError::Drifted {
            path: path.to_path_buf(),
            actual,
        })
    }
}

fn write(path: &Path, value: &str) -> Result<(), ActError> {
    fs::write(path, value).map_err(|source| ActError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests;
