//! Which cgroup hierarchies a node has: pure v2, v1, or hybrid (v1 controllers plus a v2 tree
//! at `unified/`). Detected from files under the cgroup root, so a fake tree in a test is
//! detected exactly like the real one.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::cgroup_files::{PIDS_CURRENT, PROCS, v1, v2};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    V2,
    V1,
    Hybrid,
}

/// Mount points of each hierarchy the agent reads. A controller that is absent stays `None`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hierarchy {
    pub mode: Mode,
    /// The v2 tree: the root itself on pure v2, `unified/` on hybrid.
    pub v2: Option<PathBuf>,
    pub cpu: Option<PathBuf>,
    pub cpuacct: Option<PathBuf>,
    pub memory: Option<PathBuf>,
    pub pids: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "no cgroup hierarchy found under {root}: expected cgroup.controllers (v2) or cpu/, memory/ (v1)"
)]
pub struct NoHierarchy {
    pub root: PathBuf,
}

impl Hierarchy {
    pub fn detect(root: &Path) -> Result<Hierarchy, NoHierarchy> {
        if root.join(v2::CONTROLLERS).is_file() {
            return Ok(Hierarchy {
                mode: Mode::V2,
                v2: Some(root.to_path_buf()),
                cpu: None,
                cpuacct: None,
                memory: None,
                pids: None,
            });
        }
        // v1 controllers may be co-mounted (`cpu,cpuacct` with `cpu` and `cpuacct` symlinks) or
        // separate; either way the directory that holds the controller's files is the one to use.
        let controller = |names: &[&str], marker: &str| {
            names
                .iter()
                .map(|n| root.join(n))
                .find(|p| p.join(marker).is_file())
        };
        let cpu = controller(
            &["cpu", "cpu,cpuacct", "cpuacct,cpu"],
            v1::CPU_CFS_PERIOD_US,
        );
        let cpuacct = controller(
            &["cpuacct", "cpu,cpuacct", "cpuacct,cpu"],
            v1::CPUACCT_USAGE,
        );
        let memory = controller(&["memory"], v1::MEMORY_USAGE_IN_BYTES);
        let pids = controller(&["pids"], PIDS_CURRENT).or_else(|| {
            // The root pids cgroup has no pids.current; its presence is shown by cgroup.procs.
            Some(root.join("pids")).filter(|p| p.join(PROCS).is_file())
        });
        let unified = root.join("unified");
        let v2 = Some(unified).filter(|p| p.join(v2::CONTROLLERS).is_file());
        if cpu.is_none() && cpuacct.is_none() && memory.is_none() {
            return Err(NoHierarchy {
                root: root.to_path_buf(),
            });
        }
        let mode = if v2.is_some() { Mode::Hybrid } else { Mode::V1 };
        Ok(Hierarchy {
            mode,
            v2,
            cpu,
            cpuacct,
            memory,
            pids,
        })
    }

    /// The trees walked to discover containers, in the order their paths name a container.
    pub fn walk_roots(&self) -> Vec<&Path> {
        [&self.v2, &self.cpu, &self.cpuacct, &self.memory]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
            .fold(Vec::new(), |mut acc, p| {
                if !acc.contains(&p) {
                    acc.push(p);
                }
                acc
            })
    }
}

/// Joins a cgroup path relative to a hierarchy root (`/a/b`) onto that root.
pub fn join(root: &Path, rel: &str) -> PathBuf {
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    }
}
