//! Who a cgroup belongs to: a Kubernetes container, a Docker or Podman container, a runc
//! container, a systemd service, or a cgroup the operator listed. Derived from the cgroup's
//! path (every container runtime and both kubelet cgroup drivers have their own naming), from
//! OCI runtime state files, and from kubelet's log directory for Kubernetes names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Kubernetes,
    Docker,
    Podman,
    Runc,
    SystemdService,
    Configured,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    /// Path relative to the hierarchy root, e.g. `/kubepods.slice/.../cri-containerd-<id>.scope`.
    pub cgroup: String,
    pub kind: Kind,
    /// Runtime that created it (`containerd`, `cri-o`, `docker`, `podman`, `runc`), where known.
    pub runtime: Option<String>,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub container: Option<String>,
    /// The workload above the pod, from the Kubernetes API (`Deployment`, `StatefulSet`, ...).
    pub owner_kind: Option<String>,
    pub owner_name: Option<String>,
    /// The pod's `headroom.dev/manage` annotation, where the API told it.
    pub manage: Option<bool>,
    /// The pod's `headroom.dev/latency-slo` annotation, in microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_slo_us: Option<u64>,
}

impl Identity {
    fn new(cgroup: &str, kind: Kind) -> Identity {
        Identity {
            cgroup: cgroup.to_string(),
            kind,
            runtime: None,
            container_id: None,
            pod_uid: None,
            namespace: None,
            pod: None,
            container: None,
            owner_kind: None,
            owner_name: None,
            manage: None,
            latency_slo_us: None,
        }
    }

    /// Prometheus labels for container-level series: `cgroup` always, the rest where known.
    pub fn labels(&self) -> Vec<(String, String)> {
        let mut labels = vec![("cgroup".to_string(), self.cgroup.clone())];
        for (k, v) in [
            ("container_id", &self.container_id),
            ("namespace", &self.namespace),
            ("pod", &self.pod),
            ("container", &self.container),
        ] {
            if let Some(v) = v {
                labels.push((k.to_string(), v.clone()));
            }
        }
        labels
    }
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Prefixes container runtimes give the systemd scope of a container.
const SCOPE_PREFIXES: &[(&str, &str)] = &[
    ("cri-containerd-", "containerd"),
    ("crio-", "cri-o"),
    ("docker-", "docker"),
    ("libpod-", "podman"),
];

/// Classifies a cgroup by its path alone. `None`: not a container by any naming rule.
pub fn classify(cgroup: &str, systemd_services: bool) -> Option<Identity> {
    let base = cgroup.rsplit('/').next().unwrap_or(cgroup);
    let stem = base.strip_suffix(".scope").unwrap_or(base);
    let mut runtime = None;
    let mut id = None;
    if is_container_id(stem) {
        id = Some(stem.to_string());
    } else {
        for (prefix, rt) in SCOPE_PREFIXES {
            if let Some(rest) = stem.strip_prefix(prefix) {
                if is_container_id(rest) {
                    id = Some(rest.to_string());
                    runtime = Some(rt.to_string());
                }
                break;
            }
        }
    }
    // Also catches the monitor scopes (`crio-conmon-<id>`, `libpod-conmon-<id>`): their stem
    // after the prefix is not a bare id, so they never become containers.
    if let Some(id) = id {
        let pod_uid = pod_uid_of(cgroup);
        let kind = if pod_uid.is_some() {
            Kind::Kubernetes
        } else if runtime.as_deref() == Some("podman") || cgroup.contains("/libpod_parent/") {
            Kind::Podman
        } else {
            Kind::Docker
        };
        if runtime.is_none() && cgroup.contains("/docker/") {
            runtime = Some("docker".into());
        }
        let mut ident = Identity::new(cgroup, kind);
        ident.runtime = runtime;
        ident.container_id = Some(id);
        ident.pod_uid = pod_uid;
        return Some(ident);
    }
    if systemd_services && base.ends_with(".service") && base.len() > ".service".len() {
        let mut ident = Identity::new(cgroup, Kind::SystemdService);
        ident.container = Some(base.trim_end_matches(".service").to_string());
        return Some(ident);
    }
    None
}

/// The pod UID from either kubelet cgroup driver: `pod<uid>` (cgroupfs) or
/// `kubepods-<qos>-pod<uid with '_'>.slice` (systemd).
fn pod_uid_of(cgroup: &str) -> Option<String> {
    if !cgroup.contains("kubepods") {
        return None;
    }
    cgroup.split('/').find_map(|seg| {
        let seg = seg.strip_suffix(".slice").unwrap_or(seg);
        let at = seg.rfind("pod")?;
        if at > 0 && !seg[..at].ends_with('-') {
            return None;
        }
        let uid = seg[at + 3..].replace('_', "-");
        let looks_like_uid = uid.len() == 36
            && uid.bytes().enumerate().all(|(i, b)| {
                if [8, 13, 18, 23].contains(&i) {
                    b == b'-'
                } else {
                    b.is_ascii_hexdigit()
                }
            });
        looks_like_uid.then_some(uid)
    })
}

/// Shell-style match of a cgroup path: `*` matches within one segment, `**` across segments.
pub fn glob_match(pattern: &str, path: &str) -> bool {
    fn go(p: &[u8], s: &[u8]) -> bool {
        match p.first() {
            None => s.is_empty(),
            Some(b'*') if p.get(1) == Some(&b'*') => {
                let rest = &p[2..];
                (0..=s.len()).any(|i| go(rest, &s[i..]))
            }
            Some(b'*') => {
                let rest = &p[1..];
                for i in 0..=s.len() {
                    if go(rest, &s[i..]) {
                        return true;
                    }
                    if i < s.len() && s[i] == b'/' {
                        break;
                    }
                }
                false
            }
            Some(b'?') => !s.is_empty() && s[0] != b'/' && go(&p[1..], &s[1..]),
            Some(&c) => s.first() == Some(&c) && go(&p[1..], &s[1..]),
        }
    }
    go(pattern.as_bytes(), path.as_bytes())
}

pub fn configured(cgroup: &str) -> Identity {
    Identity::new(cgroup, Kind::Configured)
}

/// A container found through an OCI runtime's state file: its id and its cgroup directory in
/// every hierarchy it joined (absolute paths).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeContainer {
    pub id: String,
    pub runtime: String,
    pub cgroup_paths: Vec<PathBuf>,
    /// A pod's sandbox ("pause") container: it holds the pod's namespaces and is never a
    /// workload of its own.
    pub sandbox: bool,
}

/// Annotations (which runc keeps as `config.labels` in its state) that mark a pod sandbox:
/// containerd's CRI, CRI-O, and cri-dockerd.
const SANDBOX_LABELS: &[&str] = &[
    "io.kubernetes.cri.container-type=sandbox",
    "io.kubernetes.cri-o.ContainerType=sandbox",
    "io.kubernetes.docker.type=podsandbox",
];

/// Reads `<dir>/<id>/state.json` (runc, Docker) and `<dir>/<namespace>/<id>/state.json`
/// (containerd), re-parsing a file only when its modification time changes.
#[derive(Debug, Default)]
pub struct RuntimeStates {
    cache: HashMap<PathBuf, (std::time::SystemTime, Option<RuntimeContainer>)>,
}

impl RuntimeStates {
    pub fn scan(&mut self, dirs: &[PathBuf]) -> Vec<RuntimeContainer> {
        let mut seen = Vec::new();
        for dir in dirs {
            let runtime = runtime_name(dir);
            for entry in read_dir_paths(dir) {
                let state = entry.join("state.json");
                if state.is_file() {
                    seen.push((state, runtime.clone()));
                    continue;
                }
                for inner in read_dir_paths(&entry) {
                    let state = inner.join("state.json");
                    if state.is_file() {
                        seen.push((state, runtime.clone()));
                    }
                }
            }
        }
        let mut out = Vec::new();
        let mut keep = HashMap::with_capacity(seen.len());
        for (path, runtime) in seen {
            let Ok(mtime) = std::fs::metadata(&path).and_then(|m| m.modified()) else {
                continue;
            };
            let parsed = match self.cache.remove(&path) {
                Some((t, parsed)) if t == mtime => parsed,
                _ => parse_state(&path, &runtime),
            };
            if let Some(c) = &parsed {
                out.push(c.clone());
            }
            keep.insert(path, (mtime, parsed));
        }
        self.cache = keep;
        out
    }
}

fn runtime_name(dir: &Path) -> String {
    let s = dir.to_string_lossy();
    if s.contains("docker") {
        "docker".into()
    } else if s.contains("containerd") {
        "containerd".into()
    } else {
        "runc".into()
    }
}

fn read_dir_paths(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    }
}

fn parse_state(path: &Path, runtime: &str) -> Option<RuntimeContainer> {
    let text = std::fs::read(path).ok()?;
    let v: serde_json::Value = match serde_json::from_slice(&text) {
        Ok(v) => v,
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "skipping unreadable runtime state file");
            return None;
        }
    };
    let id = v.get("id")?.as_str()?.to_string();
    let mut cgroup_paths: Vec<PathBuf> = v
        .get("cgroup_paths")?
        .as_object()?
        .values()
        .filter_map(|p| p.as_str())
        .map(PathBuf::from)
        .collect();
    cgroup_paths.sort();
    cgroup_paths.dedup();
    let sandbox = v
        .pointer("/config/labels")
        .and_then(|l| l.as_array())
        .is_some_and(|labels| {
            labels
                .iter()
                .filter_map(|l| l.as_str())
                .any(|l| SANDBOX_LABELS.contains(&l))
        });
    Some(RuntimeContainer {
        id,
        runtime: runtime.to_string(),
        cgroup_paths,
        sandbox,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeNames {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

/// Names of Kubernetes containers by container id, from kubelet's `/var/log/containers`
/// symlinks `<pod>_<namespace>_<container>-<id>.log`. Re-read at most every `min_refresh`,
/// and only when an id is missing.
#[derive(Debug)]
pub struct KubeLogDir {
    dir: PathBuf,
    names: HashMap<String, KubeNames>,
    last_read: Option<Instant>,
    min_refresh: Duration,
}

impl KubeLogDir {
    pub fn new(dir: PathBuf) -> KubeLogDir {
        KubeLogDir {
            dir,
            names: HashMap::new(),
            last_read: None,
            min_refresh: Duration::from_secs(10),
        }
    }

    pub fn lookup(&mut self, container_id: &str) -> Option<KubeNames> {
        if let Some(n) = self.names.get(container_id) {
            return Some(n.clone());
        }
        let due = self
            .last_read
            .is_none_or(|t| t.elapsed() >= self.min_refresh);
        if due {
            self.refresh();
        }
        self.names.get(container_id).cloned()
    }

    fn refresh(&mut self) {
        self.last_read = Some(Instant::now());
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        self.names.clear();
        for entry in rd.filter_map(|e| e.ok()) {
            if let Some((id, names)) = parse_log_name(&entry.file_name().to_string_lossy()) {
                self.names.insert(id, names);
            }
        }
    }
}

fn parse_log_name(name: &str) -> Option<(String, KubeNames)> {
    let stem = name.strip_suffix(".log")?;
    let (rest, id) = stem.rsplit_once('-')?;
    if !is_container_id(id) {
        return None;
    }
    // Pod, namespace and container names are DNS labels: none of them contains '_'.
    let mut parts = rest.splitn(3, '_');
    let pod = parts.next()?;
    let namespace = parts.next()?;
    let container = parts.next()?;
    if pod.is_empty() || namespace.is_empty() || container.is_empty() {
        return None;
    }
    Some((
        id.to_string(),
        KubeNames {
            namespace: namespace.into(),
            pod: pod.into(),
            container: container.into(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const UID: &str = "6f1e2d3c-4b5a-4978-8a6b-5c4d3e2f1a0b";

    #[test]
    fn kubernetes_systemd_driver_containerd() {
        let uid_ = UID.replace('-', "_");
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope"
        );
        let i = classify(&p, true).unwrap();
        assert_eq!(i.kind, Kind::Kubernetes);
        assert_eq!(i.runtime.as_deref(), Some("containerd"));
        assert_eq!(i.container_id.as_deref(), Some(ID));
        assert_eq!(i.pod_uid.as_deref(), Some(UID));
    }

    #[test]
    fn kubernetes_systemd_driver_guaranteed_crio() {
        let uid_ = UID.replace('-', "_");
        let p = format!("/kubepods.slice/kubepods-pod{uid_}.slice/crio-{ID}.scope");
        let i = classify(&p, true).unwrap();
        assert_eq!(i.kind, Kind::Kubernetes);
        assert_eq!(i.runtime.as_deref(), Some("cri-o"));
        assert_eq!(i.pod_uid.as_deref(), Some(UID));
        assert!(
            classify(
                &format!("/kubepods.slice/kubepods-pod{uid_}.slice/crio-conmon-{ID}.scope"),
                true
            )
            .is_none()
        );
    }

    #[test]
    fn kubernetes_cgroupfs_driver() {
        let p = format!("/kubepods/besteffort/pod{UID}/{ID}");
        let i = classify(&p, true).unwrap();
        assert_eq!(i.kind, Kind::Kubernetes);
        assert_eq!(i.pod_uid.as_deref(), Some(UID));
        assert_eq!(i.container_id.as_deref(), Some(ID));
        // The pod-level cgroup itself is not a container.
        assert!(classify(&format!("/kubepods/besteffort/pod{UID}"), true).is_none());
    }

    #[test]
    fn docker_and_podman() {
        let i = classify(&format!("/docker/{ID}"), true).unwrap();
        assert_eq!(
            (i.kind, i.runtime.as_deref()),
            (Kind::Docker, Some("docker"))
        );
        let i = classify(&format!("/system.slice/docker-{ID}.scope"), true).unwrap();
        assert_eq!(
            (i.kind, i.runtime.as_deref()),
            (Kind::Docker, Some("docker"))
        );
        let i = classify(&format!("/machine.slice/libpod-{ID}.scope"), true).unwrap();
        assert_eq!(
            (i.kind, i.runtime.as_deref()),
            (Kind::Podman, Some("podman"))
        );
        assert!(classify(&format!("/machine.slice/libpod-conmon-{ID}.scope"), true).is_none());
    }

    #[test]
    fn systemd_services_only_when_enabled() {
        let i = classify("/system.slice/nginx.service", true).unwrap();
        assert_eq!(i.kind, Kind::SystemdService);
        assert_eq!(i.container.as_deref(), Some("nginx"));
        assert!(classify("/system.slice/nginx.service", false).is_none());
        assert!(classify("/system.slice", true).is_none());
        assert!(classify("/user.slice/user-1000.slice", true).is_none());
    }

    #[test]
    fn globs() {
        assert!(glob_match("/batch/*", "/batch/job1"));
        assert!(!glob_match("/batch/*", "/batch/job1/sub"));
        assert!(glob_match("/batch/**", "/batch/job1/sub"));
        assert!(glob_match("/headroom-test-*", "/headroom-test-42"));
        assert!(glob_match("/a/?b", "/a/xb"));
        assert!(!glob_match("/a/?b", "/a//b"));
    }

    #[test]
    fn kubelet_log_names() {
        let (id, n) = parse_log_name(&format!("web-7d9f_prod_nginx-{ID}.log")).unwrap();
        assert_eq!(id, ID);
        assert_eq!(n.namespace, "prod");
        assert_eq!(n.pod, "web-7d9f");
        assert_eq!(n.container, "nginx");
        assert!(parse_log_name("garbage.log").is_none());
        assert!(parse_log_name(&format!("a_b-{ID}.log")).is_none());
    }

    #[test]
    fn kube_log_dir_lookup() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(format!("api-1_team-a_server-{ID}.log")), "").unwrap();
        let mut k = KubeLogDir::new(dir.path().to_path_buf());
        let n = k.lookup(ID).unwrap();
        assert_eq!(
            (n.namespace.as_str(), n.pod.as_str(), n.container.as_str()),
            ("team-a", "api-1", "server")
        );
    }

    #[test]
    fn runtime_state_files() {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("ctr1");
        std::fs::create_dir_all(&c).unwrap();
        std::fs::write(
            c.join("state.json"),
            r#"{"id":"ctr1","cgroup_paths":{"cpu":"/sys/fs/cgroup/cpu/ctr1","memory":"/sys/fs/cgroup/memory/x/ctr1","":"/sys/fs/cgroup/unified/ctr1"}}"#,
        )
        .unwrap();
        let ns = dir.path().join("k8s.io").join("ctr2");
        std::fs::create_dir_all(&ns).unwrap();
        std::fs::write(ns.join("state.json"), "not json").unwrap();
        // A pod sandbox as containerd's CRI starts it (runc keeps annotations as labels).
        let pause = dir.path().join("k8s.io").join("pause1");
        std::fs::create_dir_all(&pause).unwrap();
        std::fs::write(
            pause.join("state.json"),
            r#"{"id":"pause1","cgroup_paths":{"cpu":"/sys/fs/cgroup/cpu/kubepods/podx/pause1"},"config":{"labels":["io.kubernetes.cri.sandbox-id=pause1","io.kubernetes.cri.container-type=sandbox","bundle=/run/x"]}}"#,
        )
        .unwrap();
        let mut s = RuntimeStates::default();
        let mut found = s.scan(&[dir.path().to_path_buf()]);
        found.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].id, "ctr1");
        assert_eq!(found[0].cgroup_paths.len(), 3);
        assert!(!found[0].sandbox);
        assert_eq!(found[1].id, "pause1");
        assert!(found[1].sandbox);
        let mut again = s.scan(&[dir.path().to_path_buf()]);
        again.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(again, found);
    }
}
