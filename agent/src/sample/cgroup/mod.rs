//! Containers on the node, found in the cgroup tree and sampled from their cgroup files.
//!
//! Each sample walks the hierarchies (v2, v1 or hybrid), names every container it recognises
//! ([`identity`]), reads its counters ([`stats`]) and turns counters into rates. A container
//! that vanishes mid-sample simply drops out; one that appears is picked up on the next walk.
//! This module only reads: it never writes a cgroup file.

pub mod hierarchy;
pub mod identity;
pub mod stats;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::cgroup_files::ControllerPaths;
use crate::config::{CgroupConfig, KubernetesConfig};
pub use hierarchy::{Hierarchy, Mode};
pub use identity::Identity;
pub use stats::CgroupStats;

/// Deepest cgroup nesting the walk descends to; kubelet's deepest is 4 below the root.
const MAX_DEPTH: usize = 12;
/// Where the host mounts its cgroup tree; runtime state files name paths under it.
const HOST_CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// How often (in passes) settings and directory layout are re-read.
const FULL_PASS_EVERY: u64 = 10;

#[derive(Debug, Clone, Serialize)]
pub struct ContainerSample {
    pub ident: Arc<Identity>,
    pub stats: CgroupStats,
    /// CPU used since the previous sample, in cores.
    pub cpu_cores: Option<f64>,
    /// Share of CFS periods since the previous sample in which the container was throttled.
    pub throttled_ratio: Option<f64>,
    /// Share of wall time since the previous sample that some task stalled, per resource.
    pub pressure_some_ratio: Vec<(&'static str, f64)>,
}

#[derive(Debug)]
struct Tracked {
    ident: Arc<Identity>,
    paths: ControllerPaths,
    prev: Option<Prev>,
    open: stats::OpenFiles,
    /// The v2 directory's cgroup id (its inode), which eBPF programs report; fixed for the
    /// directory's life, so looked up again only on full passes.
    v2_id: Option<u64>,
}

#[derive(Debug, Clone)]
struct Prev {
    at: Instant,
    stats: CgroupStats,
}

pub struct CgroupSampler {
    hierarchy: Hierarchy,
    /// Canonical forms of the hierarchy roots, to map runtime state paths (which may spell
    /// `cpu,cpuacct` where the agent's root says `cpu`) back onto them.
    canonical_roots: Vec<(PathBuf, Controller)>,
    config: CgroupConfig,
    reader: stats::Reader,
    runtime_states: identity::RuntimeStates,
    kube: identity::KubeLogDir,
    /// This node's pods from the Kubernetes API, when the agent has it.
    pods: Option<Arc<crate::kube::PodDirectory>>,
    tracked: BTreeMap<String, Tracked>,
    passes: u64,
    /// Every cgroup path of a tracked container (its path in each hierarchy) → its key.
    aliases: HashMap<String, String>,
    /// Keys of the containers the newest pass found gone.
    gone: Vec<String>,
    warned_limit: bool,
}

/// A container as one walk found it.
struct Found {
    ident: Identity,
    paths: ControllerPaths,
    aliases: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Controller {
    V2,
    Cpu,
    Cpuacct,
    Memory,
    Pids,
}

impl CgroupSampler {
    pub fn new(
        config: &CgroupConfig,
        kube: &KubernetesConfig,
    ) -> Result<CgroupSampler, hierarchy::NoHierarchy> {
        let hierarchy = Hierarchy::detect(&config.root)?;
        let handles = stats::init_handle_budget();
        tracing::debug!(handles, "cgroup file handles the sampler may keep open");
        let mut canonical_roots = Vec::new();
        for (p, c) in [
            (&hierarchy.v2, Controller::V2),
            (&hierarchy.cpu, Controller::Cpu),
            (&hierarchy.cpuacct, Controller::Cpuacct),
            (&hierarchy.memory, Controller::Memory),
            (&hierarchy.pids, Controller::Pids),
        ] {
            if let Some(p) = p {
                canonical_roots.push((p.clone(), c));
                if let Ok(canon) = p.canonicalize()
                    && &canon != p
                {
                    canonical_roots.push((canon, c));
                }
                // Runtimes write host paths into their state files; in a container the host's
                // tree is mounted elsewhere (the DaemonSet's `/host/sys/fs/cgroup`).
                if let Ok(rest) = p.strip_prefix(&config.root) {
                    let host = Path::new(HOST_CGROUP_ROOT).join(rest);
                    if &host != p {
                        canonical_roots.push((host, c));
                    }
                }
            }
        }
        Ok(CgroupSampler {
            hierarchy,
            canonical_roots,
            config: config.clone(),
            reader: stats::Reader::default(),
            runtime_states: identity::RuntimeStates::default(),
            kube: identity::KubeLogDir::new(kube.log_dir.clone()),
            pods: None,
            tracked: BTreeMap::new(),
            passes: 0,
            aliases: HashMap::new(),
            gone: Vec::new(),
            warned_limit: false,
        })
    }

    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hierarchy
    }

    /// Walks the hierarchies and returns every container found, keyed by cgroup path.
    fn discover(&mut self) -> BTreeMap<String, Found> {
        let mut found: BTreeMap<String, Found> = BTreeMap::new();
        let roots: Vec<PathBuf> = self
            .hierarchy
            .walk_roots()
            .into_iter()
            .map(Path::to_path_buf)
            .collect();
        for root in &roots {
            let mut stack = vec![(root.clone(), String::new(), 0usize)];
            while let Some((dir, rel, depth)) = stack.pop() {
                let Ok(rd) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for entry in rd.filter_map(|e| e.ok()) {
                    // cgroup directories are never symlinks; skipping them avoids loops.
                    if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                        continue;
                    }
                    let name = entry.file_name();
                    let child_rel = format!("{rel}/{}", name.to_string_lossy());
                    if found.contains_key(&child_rel) {
                        continue;
                    }
                    if let Some(ident) = self.identify(&child_rel) {
                        // A container already tracked keeps its directories; looking them up
                        // again in every hierarchy each pass would cost more than reading it.
                        // Directories a runtime adds late are picked up on the next full pass.
                        let paths = match self.tracked.get(&child_rel) {
                            Some(t) if !self.full_pass() => t.paths.clone(),
                            Some(t) => self.paths_for(&child_rel, t.paths.clone()),
                            None => self.paths_for(&child_rel, ControllerPaths::default()),
                        };
                        let aliases = vec![child_rel.clone()];
                        found.insert(
                            child_rel,
                            Found {
                                ident,
                                paths,
                                aliases,
                            },
                        );
                    } else if depth + 1 < MAX_DEPTH {
                        stack.push((entry.path(), child_rel, depth + 1));
                    }
                }
            }
        }
        // Runtime state knows a container's exact directory in every hierarchy, including
        // ones that do not share its path (a runc started inside another cgroup's memory tree).
        let runtime = self.runtime_states.scan(&self.config.runtime_state_dirs);
        for rc in runtime {
            let mut paths = ControllerPaths::default();
            let mut rels: Vec<(Controller, String)> = Vec::new();
            for abs in &rc.cgroup_paths {
                if let Some((c, rel)) = self.relative(abs) {
                    let slot = match c {
                        Controller::V2 => &mut paths.v2,
                        Controller::Cpu => &mut paths.cpu,
                        Controller::Cpuacct => &mut paths.cpuacct,
                        Controller::Memory => &mut paths.memory,
                        Controller::Pids => &mut paths.pids,
                    };
                    *slot = if abs.is_dir() {
                        Some(abs.clone())
                    } else {
                        self.root_of(c)
                            .map(|r| hierarchy::join(r, &rel))
                            .filter(|p| p.is_dir())
                    };
                    rels.push((c, rel));
                }
            }
            let key = [
                Controller::V2,
                Controller::Cpu,
                Controller::Cpuacct,
                Controller::Memory,
            ]
            .iter()
            .find_map(|want| rels.iter().find(|(c, _)| c == want).map(|(_, r)| r.clone()));
            let Some(key) = key else { continue };
            if rc.sandbox {
                // Found by its path too (`/kubepods/.../pod<uid>/<id>`): drop it everywhere.
                for (_, rel) in &rels {
                    found.remove(rel);
                }
                continue;
            }
            if paths.is_empty() {
                continue;
            }
            let mut ident = found
                .remove(&key)
                .map(|f| f.ident)
                .or_else(|| identity::classify(&key, self.config.systemd_services))
                .unwrap_or_else(|| {
                    let mut i = identity::configured(&key);
                    i.kind = identity::Kind::Runc;
                    i
                });
            ident.container_id = Some(rc.id.clone());
            if ident.runtime.is_none() {
                ident.runtime = Some(rc.runtime.clone());
            }
            // The same container may also have been found under a differing path in another
            // hierarchy (its memory cgroup, say); that entry is the same container.
            for (_, rel) in &rels {
                if rel != &key {
                    found.remove(rel);
                }
            }
            let mut aliases: Vec<String> = rels.into_iter().map(|(_, r)| r).collect();
            aliases.sort();
            aliases.dedup();
            found.insert(
                key,
                Found {
                    ident,
                    paths,
                    aliases,
                },
            );
        }
        found
    }

    /// Settings (limits, quotas) and directory layout are re-read on every tenth pass only.
    fn full_pass(&self) -> bool {
        self.passes.is_multiple_of(FULL_PASS_EVERY)
    }

    fn identify(&self, rel: &str) -> Option<Identity> {
        identity::classify(rel, self.config.systemd_services).or_else(|| {
            self.config
                .include
                .iter()
                .any(|g| identity::glob_match(g, rel))
                .then(|| identity::configured(rel))
        })
    }

    /// Fills in the directories `known` lacks (a known one stays until its container goes).
    fn paths_for(&self, rel: &str, known: ControllerPaths) -> ControllerPaths {
        let at = |known: Option<PathBuf>, root: &Option<PathBuf>| {
            known.or_else(|| {
                root.as_ref()
                    .map(|r| hierarchy::join(r, rel))
                    .filter(|p| p.is_dir())
            })
        };
        ControllerPaths {
            v2: at(known.v2, &self.hierarchy.v2),
            cpu: at(known.cpu, &self.hierarchy.cpu),
            cpuacct: at(known.cpuacct, &self.hierarchy.cpuacct),
            memory: at(known.memory, &self.hierarchy.memory),
            pids: at(known.pids, &self.hierarchy.pids),
        }
    }

    /// Uses this node's pods from the Kubernetes API for names and owners.
    pub fn set_pods(&mut self, pods: Arc<crate::kube::PodDirectory>) {
        self.pods = Some(pods);
    }

    /// Names from the API's pod (which also knows the owner), else from kubelet's log names.
    fn name_kubernetes_container(&mut self, ident: &mut Identity) {
        let Some(id) = ident.container_id.as_deref() else {
            return;
        };
        if let Some(dir) = &self.pods
            && let Some(uid) = ident.pod_uid.as_deref()
            && let Some(pod) = dir.pod(uid)
            && let Some(name) = pod.containers.get(id)
        {
            ident.namespace = Some(pod.namespace.clone());
            ident.pod = Some(pod.name.clone());
            ident.container = Some(name.clone());
            ident.owner_kind = Some(pod.owner.kind.clone());
            ident.owner_name = Some(pod.owner.name.clone());
            ident.manage = pod.manage;
            ident.latency_slo_us = pod.latency_slo_us;
            return;
        }
        if let Some(n) = self.kube.lookup(id) {
            ident.namespace = Some(n.namespace);
            ident.pod = Some(n.pod);
            ident.container = Some(n.container);
        }
    }

    fn root_of(&self, c: Controller) -> Option<&PathBuf> {
        match c {
            Controller::V2 => self.hierarchy.v2.as_ref(),
            Controller::Cpu => self.hierarchy.cpu.as_ref(),
            Controller::Cpuacct => self.hierarchy.cpuacct.as_ref(),
            Controller::Memory => self.hierarchy.memory.as_ref(),
            Controller::Pids => self.hierarchy.pids.as_ref(),
        }
    }

    fn relative(&self, abs: &Path) -> Option<(Controller, String)> {
        self.canonical_roots.iter().find_map(|(root, c)| {
            let rest = abs.strip_prefix(root).ok()?;
            Some((*c, format!("/{}", rest.to_string_lossy())))
        })
    }

    /// One sample of every container: discovery, counters, rates.
    pub fn sample(&mut self) -> Vec<ContainerSample> {
        let found = self.discover();
        let v2_native = self.hierarchy.mode == Mode::V2;
        let mut next = BTreeMap::new();
        let mut aliases = HashMap::new();
        let mut out = Vec::with_capacity(found.len());
        for (
            key,
            Found {
                mut ident,
                paths,
                aliases: names,
            },
        ) in found
        {
            if next.len() >= self.config.max_containers {
                if !self.warned_limit {
                    tracing::warn!(
                        limit = self.config.max_containers,
                        "more containers than cgroup.max_containers; ignoring the rest until the key is raised"
                    );
                    self.warned_limit = true;
                }
                break;
            }
            let prev = self.tracked.remove(&key);
            if ident.kind == identity::Kind::Kubernetes {
                self.name_kubernetes_container(&mut ident);
            }
            let ident = match prev.as_ref() {
                Some(p) if *p.ident == ident => p.ident.clone(),
                _ => Arc::new(ident),
            };
            let at = Instant::now();
            let full = self.full_pass();
            // Handles and ids belong to the directories they were taken from. A directory
            // recreated under the same path (a restarted systemd service) has a new id, which
            // a full pass picks up; its old handles fail once and are reopened.
            let (prev_sample, mut open, v2_id) = match prev {
                Some(p) if p.paths == paths => {
                    let id = if full { v2_id_of(&paths) } else { p.v2_id };
                    (p.prev, p.open, id)
                }
                Some(p) => (p.prev, stats::OpenFiles::default(), v2_id_of(&paths)),
                None => (None, stats::OpenFiles::default(), v2_id_of(&paths)),
            };
            let stats = self.reader.read_container(
                &paths,
                v2_native,
                &mut open,
                prev_sample.as_ref().map(|p| &p.stats),
                full,
            );
            if stats == CgroupStats::default() && !paths.exists() {
                // Removed between the walk and the read.
                continue;
            }
            let sample = rates(&ident, &stats, prev_sample.as_ref(), at);
            out.push(sample);
            for name in names {
                aliases.insert(name, key.clone());
            }
            next.insert(
                key,
                Tracked {
                    ident,
                    paths,
                    prev: Some(Prev { at, stats }),
                    open,
                    v2_id,
                },
            );
        }
        // What is left of the previous pass's containers was not found in this one.
        self.gone = std::mem::replace(&mut self.tracked, next)
            .into_keys()
            .collect();
        self.aliases = aliases;
        self.passes += 1;
        out
    }

    /// Cgroup paths of the containers tracked before the newest pass and not found by it.
    pub fn gone(&self) -> &[String] {
        &self.gone
    }

    /// The container a process belongs to, if the agent tracks it (for attributing GPU use).
    pub fn container_of_pid(&self, proc_root: &Path, pid: u32) -> Option<Arc<Identity>> {
        let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
        cgroup_keys_of_process(&text)
            .into_iter()
            .find_map(|k| self.container_by_cgroup(&k))
    }

    /// The tracked container whose cgroup is `cgroup` or one of its ancestors.
    ///
    /// A path relative to a cgroup namespace (`/../../pod<uid>/<id>`, what `/proc/<pid>/cgroup`
    /// of another pod's process reads inside a private cgroup namespace, as containerd gives a
    /// non-privileged pod on cgroup v2) is matched against the end of the host paths.
    pub fn container_by_cgroup(&self, cgroup: &str) -> Option<Arc<Identity>> {
        let mut rel = cgroup;
        let mut namespaced = false;
        while let Some(rest) = rel.strip_prefix("/..") {
            if !(rest.is_empty() || rest.starts_with('/')) {
                break;
            }
            namespaced = true;
            rel = rest;
        }
        if namespaced && rel.is_empty() {
            return None;
        }
        let mut path = rel;
        loop {
            let hit = if namespaced {
                self.aliases
                    .iter()
                    .find(|(alias, _)| alias.ends_with(path))
                    .map(|(_, k)| k)
            } else {
                self.aliases.get(path)
            };
            if let Some(t) = hit.and_then(|k| self.tracked.get(k)) {
                return Some(t.ident.clone());
            }
            match path.rfind('/') {
                Some(0) | None => return None,
                Some(i) => path = &path[..i],
            }
        }
    }

    /// cgroup v2 id of every tracked container that has one, for mapping eBPF cgroup ids.
    pub fn v2_ids(&self) -> impl Iterator<Item = (&Arc<Identity>, u64)> {
        self.tracked
            .values()
            .filter_map(|t| t.v2_id.map(|id| (&t.ident, id)))
    }

    /// Directories of a tracked container, by its key (cgroup path), for the actuators.
    pub fn paths(&self, cgroup: &str) -> Option<&ControllerPaths> {
        self.tracked.get(cgroup).map(|t| &t.paths)
    }

    pub fn containers(&self) -> impl Iterator<Item = &Arc<Identity>> {
        self.tracked.values().map(|t| &t.ident)
    }
}

/// Candidate cgroup paths of a process from `/proc/<pid>/cgroup`, most specific first:
/// the v2 path, then the cpu, cpuacct and memory v1 paths.
pub fn cgroup_keys_of_process(text: &str) -> Vec<String> {
    let mut v2 = None;
    let mut v1: HashMap<&str, &str> = HashMap::new();
    for line in text.lines() {
        let mut it = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if ctrls.is_empty() {
            v2 = Some(path);
        } else {
            for c in ctrls.split(',') {
                v1.insert(c, path);
            }
        }
    }
    let mut keys: Vec<String> = Vec::new();
    for p in v2.into_iter().chain(
        ["cpu", "cpuacct", "memory"]
            .iter()
            .filter_map(|c| v1.get(c).copied()),
    ) {
        if p != "/" && !keys.iter().any(|k| k == p) {
            keys.push(p.to_string());
        }
    }
    keys
}

fn v2_id_of(paths: &ControllerPaths) -> Option<u64> {
    paths
        .v2
        .as_deref()
        .and_then(|dir| headroom_ebpf::cgroup_id_of(dir).ok())
}

fn rates(
    ident: &Arc<Identity>,
    stats: &CgroupStats,
    prev: Option<&Prev>,
    at: Instant,
) -> ContainerSample {
    let mut s = ContainerSample {
        ident: ident.clone(),
        stats: stats.clone(),
        cpu_cores: None,
        throttled_ratio: None,
        pressure_some_ratio: Vec::new(),
    };
    let Some(prev) = prev else { return s };
    let dt = at.duration_since(prev.at).as_secs_f64();
    if dt <= 0.0 {
        return s;
    }
    if let (Some(now), Some(then)) = (stats.cpu_usage_seconds, prev.stats.cpu_usage_seconds)
        && now >= then
    {
        s.cpu_cores = Some((now - then) / dt);
    }
    if let (Some(p), Some(pp), Some(t), Some(pt)) = (
        stats.cpu_periods,
        prev.stats.cpu_periods,
        stats.cpu_throttled_periods,
        prev.stats.cpu_throttled_periods,
    ) && p >= pp
        && t >= pt
    {
        let periods = p - pp;
        s.throttled_ratio = Some(if periods == 0 {
            0.0
        } else {
            (t - pt) as f64 / periods as f64
        });
    }
    for p in &stats.pressure {
        if let Some(q) = prev
            .stats
            .pressure
            .iter()
            .find(|q| q.resource == p.resource)
            && p.some_seconds >= q.some_seconds
        {
            s.pressure_some_ratio.push((
                p.resource,
                ((p.some_seconds - q.some_seconds) / dt).min(1.0),
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests;
