//! Discovery on fake v1, v2 and hybrid trees laid out like real nodes' (kubelet with either
//! driver, containerd, CRI-O, Docker, Podman, systemd services, runc state files).

use std::fs;
use std::path::Path;

use super::*;
use crate::config::{CgroupConfig, KubernetesConfig};

const ID1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const ID2: &str = "2222222222222222222222222222222222222222222222222222222222222222";
const UID: &str = "6f1e2d3c-4b5a-4978-8a6b-5c4d3e2f1a0b";

fn v2_cgroup(root: &Path, rel: &str, usage_usec: u64) {
    let d = hierarchy::join(root, rel);
    fs::create_dir_all(&d).unwrap();
    fs::write(
        d.join("cpu.stat"),
        format!("usage_usec {usage_usec}\nnr_periods 0\nnr_throttled 0\nthrottled_usec 0\n"),
    )
    .unwrap();
    fs::write(d.join("cpu.max"), "max 100000\n").unwrap();
    fs::write(d.join("memory.current"), "1000\n").unwrap();
    fs::write(d.join("memory.stat"), "inactive_file 100\n").unwrap();
    fs::write(d.join("memory.max"), "max\n").unwrap();
}

fn v2_root(root: &Path) {
    fs::create_dir_all(root).unwrap();
    fs::write(root.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
}

fn config(root: &Path, include: &[&str]) -> (CgroupConfig, KubernetesConfig) {
    (
        CgroupConfig {
            root: root.to_path_buf(),
            include: include.iter().map(|s| s.to_string()).collect(),
            runtime_state_dirs: vec![root.join("run-runc")],
            ..CgroupConfig::default()
        },
        KubernetesConfig {
            log_dir: root.join("var-log-containers"),
            ..KubernetesConfig::default()
        },
    )
}

#[test]
fn pure_v2_kubernetes_systemd_driver_with_names() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("cg");
    v2_root(&root);
    let uid_ = UID.replace('-', "_");
    let pod =
        format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice");
    v2_cgroup(&root, &pod, 5);
    v2_cgroup(
        &root,
        &format!("{pod}/cri-containerd-{ID1}.scope"),
        1_000_000,
    );
    v2_cgroup(
        &root,
        &format!("{pod}/cri-containerd-{ID2}.scope"),
        2_000_000,
    );
    v2_cgroup(&root, "/system.slice/containerd.service", 7);
    v2_cgroup(&root, "/user.slice", 1);
    let (c, k) = config(&root, &[]);
    fs::create_dir_all(&k.log_dir).unwrap();
    fs::write(k.log_dir.join(format!("web-0_shop_app-{ID1}.log")), "").unwrap();
    let mut s = CgroupSampler::new(&c, &k).unwrap();
    assert_eq!(s.hierarchy().mode, Mode::V2);
    let got = s.sample();
    let mut names: Vec<(&str, Option<&str>, Option<&str>)> = got
        .iter()
        .map(|c| {
            (
                c.ident.cgroup.as_str(),
                c.ident.pod.as_deref(),
                c.ident.container.as_deref(),
            )
        })
        .collect();
    names.sort();
    assert_eq!(got.len(), 3, "{names:?}");
    let app = got
        .iter()
        .find(|c| c.ident.container_id.as_deref() == Some(ID1))
        .unwrap();
    assert_eq!(app.ident.namespace.as_deref(), Some("shop"));
    assert_eq!(app.ident.pod.as_deref(), Some("web-0"));
    assert_eq!(app.ident.container.as_deref(), Some("app"));
    assert_eq!(app.ident.pod_uid.as_deref(), Some(UID));
    assert_eq!(app.stats.cpu_usage_seconds, Some(1.0));
    assert_eq!(app.stats.memory_working_set_bytes, Some(900));
    let other = got
        .iter()
        .find(|c| c.ident.container_id.as_deref() == Some(ID2))
        .unwrap();
    assert_eq!(other.ident.namespace, None);
    assert!(
        got.iter()
            .any(|c| c.ident.kind == identity::Kind::SystemdService)
    );
    // Attribution of a process by its /proc/<pid>/cgroup line, including a nested cgroup.
    let line = format!("0::{pod}/cri-containerd-{ID1}.scope/inner\n");
    let key = cgroup_keys_of_process(&line).remove(0);
    assert_eq!(
        s.container_by_cgroup(&key).unwrap().container_id.as_deref(),
        Some(ID1)
    );
    assert!(s.container_by_cgroup("/user.slice/x").is_none());
    // Inside a private cgroup namespace rooted two levels below another pod, the same process
    // reads a path relative to the agent's own cgroup.
    let rel = format!("/../../kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID1}.scope/inner");
    assert_eq!(
        s.container_by_cgroup(&rel).unwrap().container_id.as_deref(),
        Some(ID1)
    );
    assert!(s.container_by_cgroup("/../..").is_none());
    assert!(s.container_by_cgroup("/../../elsewhere").is_none());
}

#[test]
fn rates_and_churn() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("cg");
    v2_root(&root);
    v2_cgroup(&root, "/batch/a", 0);
    let (c, k) = config(&root, &["/batch/*"]);
    let mut s = CgroupSampler::new(&c, &k).unwrap();
    let first = s.sample();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].cpu_cores, None);
    std::thread::sleep(std::time::Duration::from_millis(100));
    v2_cgroup(&root, "/batch/a", 50_000);
    v2_cgroup(&root, "/batch/b", 0);
    let second = s.sample();
    assert_eq!(second.len(), 2);
    let a = second
        .iter()
        .find(|c| c.ident.cgroup == "/batch/a")
        .unwrap();
    let cores = a.cpu_cores.unwrap();
    // 50 ms of CPU over ~100 ms of wall time.
    assert!(cores > 0.2 && cores <= 0.5, "{cores}");
    fs::remove_dir_all(root.join("batch/a")).unwrap();
    assert!(s.gone().is_empty());
    let third = s.sample();
    assert_eq!(third.len(), 1);
    assert_eq!(third[0].ident.cgroup, "/batch/b");
    assert_eq!(s.gone(), ["/batch/a"]);
    // A container that comes back under the same path starts its rates afresh.
    v2_cgroup(&root, "/batch/a", 0);
    let fourth = s.sample();
    assert_eq!(
        fourth
            .iter()
            .find(|c| c.ident.cgroup == "/batch/a")
            .unwrap()
            .cpu_cores,
        None
    );
}

fn v1_dir(root: &Path, ctrl: &str, rel: &str, files: &[(&str, &str)]) {
    let d = hierarchy::join(&root.join(ctrl), rel);
    fs::create_dir_all(&d).unwrap();
    for (f, v) in files {
        fs::write(d.join(f), v).unwrap();
    }
}

fn v1_root(root: &Path) {
    v1_dir(root, "cpu", "/", &[("cpu.cfs_period_us", "100000\n")]);
    v1_dir(root, "cpuacct", "/", &[("cpuacct.usage", "0\n")]);
    v1_dir(root, "memory", "/", &[("memory.usage_in_bytes", "0\n")]);
}

fn v1_container(root: &Path, rel: &str) {
    v1_dir(
        root,
        "cpu",
        rel,
        &[
            ("cpu.cfs_period_us", "100000\n"),
            ("cpu.cfs_quota_us", "50000\n"),
            (
                "cpu.stat",
                "nr_periods 3\nnr_throttled 1\nthrottled_time 5\n",
            ),
        ],
    );
    v1_dir(root, "cpuacct", rel, &[("cpuacct.usage", "2000000000\n")]);
    v1_dir(
        root,
        "memory",
        rel,
        &[
            ("memory.usage_in_bytes", "4096\n"),
            ("memory.stat", "total_inactive_file 96\n"),
            ("memory.limit_in_bytes", "8192\n"),
        ],
    );
}

#[test]
fn v1_kubernetes_cgroupfs_driver_and_docker() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("cg");
    v1_root(&root);
    v1_container(&root, &format!("/kubepods/burstable/pod{UID}/{ID1}"));
    v1_container(&root, &format!("/docker/{ID2}"));
    let (c, k) = config(&root, &[]);
    let mut s = CgroupSampler::new(&c, &k).unwrap();
    assert_eq!(s.hierarchy().mode, Mode::V1);
    let got = s.sample();
    assert_eq!(got.len(), 2);
    let kube = got
        .iter()
        .find(|c| c.ident.container_id.as_deref() == Some(ID1))
        .unwrap();
    assert_eq!(kube.ident.kind, identity::Kind::Kubernetes);
    assert_eq!(kube.ident.pod_uid.as_deref(), Some(UID));
    assert_eq!(kube.stats.cpu_quota_cores, Some(0.5));
    assert_eq!(kube.stats.cpu_usage_seconds, Some(2.0));
    assert_eq!(kube.stats.memory_working_set_bytes, Some(4000));
    assert_eq!(kube.stats.memory_limit_bytes, Some(8192));
    let docker = got
        .iter()
        .find(|c| c.ident.container_id.as_deref() == Some(ID2))
        .unwrap();
    assert_eq!(docker.ident.kind, identity::Kind::Docker);
    assert_eq!(docker.ident.runtime.as_deref(), Some("docker"));
}

#[test]
fn hybrid_with_runtime_state_and_split_memory_path() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("cg");
    v1_root(&root);
    v2_root(&root.join("unified"));
    // runc placed the container's memory cgroup below another cgroup, as it does when started
    // from inside one; only its state file ties the two paths together.
    v1_dir(
        &root,
        "cpu",
        "/ctr1",
        &[
            ("cpu.cfs_period_us", "100000\n"),
            ("cpu.cfs_quota_us", "-1\n"),
        ],
    );
    v1_dir(
        &root,
        "cpuacct",
        "/ctr1",
        &[("cpuacct.usage", "1000000000\n")],
    );
    v1_dir(
        &root,
        "memory",
        "/outer/ctr1",
        &[("memory.usage_in_bytes", "2048\n")],
    );
    v2_cgroup(&root.join("unified"), "/ctr1", 999);
    let state = root.join("run-runc/ctr1");
    fs::create_dir_all(&state).unwrap();
    let r = root.display();
    fs::write(
        state.join("state.json"),
        format!(r#"{{"id":"ctr1","cgroup_paths":{{"":"{r}/unified/ctr1","cpu":"{r}/cpu/ctr1","cpuacct":"{r}/cpuacct/ctr1","memory":"{r}/memory/outer/ctr1"}}}}"#),
    )
    .unwrap();
    let (c, k) = config(&root, &[]);
    let mut s = CgroupSampler::new(&c, &k).unwrap();
    assert_eq!(s.hierarchy().mode, Mode::Hybrid);
    let got = s.sample();
    assert_eq!(got.len(), 1, "{got:?}");
    let g = &got[0];
    assert_eq!(g.ident.cgroup, "/ctr1");
    assert_eq!(g.ident.container_id.as_deref(), Some("ctr1"));
    assert_eq!(g.ident.kind, identity::Kind::Runc);
    // v1 cpuacct wins over v2's core cpu.stat on hybrid; memory comes from the split path.
    assert_eq!(g.stats.cpu_usage_seconds, Some(1.0));
    assert_eq!(g.stats.memory_usage_bytes, Some(2048));
    let proc_line = "4:memory:/outer/ctr1\n1:cpu:/ctr1\n0::/ctr1\n";
    for key in cgroup_keys_of_process(proc_line) {
        assert_eq!(s.container_by_cgroup(&key).unwrap().cgroup, "/ctr1");
    }
    assert_eq!(
        cgroup_keys_of_process("4:memory:/outer/ctr1\n2:cpu,cpuacct:/ctr1\n0::/\n"),
        vec!["/ctr1".to_string(), "/outer/ctr1".to_string()]
    );
}

#[test]
fn no_hierarchy_is_an_error_naming_the_root() {
    let t = tempfile::tempdir().unwrap();
    let (c, k) = config(t.path(), &[]);
    let e = CgroupSampler::new(&c, &k).err().unwrap();
    assert!(e.to_string().contains(&t.path().display().to_string()));
}

#[test]
fn pod_sandboxes_are_dropped_with_the_host_tree_mounted_elsewhere() {
    // As in the DaemonSet: the host's /sys/fs/cgroup is mounted at <tmp>/host/sys/fs/cgroup,
    // while runc's state files name host paths.
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("host/sys/fs/cgroup");
    v2_root(&root);
    let pod = format!("/kubepods/burstable/pod{UID}");
    v2_cgroup(&root, &pod, 5);
    v2_cgroup(&root, &format!("{pod}/{ID1}"), 1_000_000);
    v2_cgroup(&root, &format!("{pod}/{ID2}"), 10);
    let (mut c, k) = config(&root, &[]);
    c.runtime_state_dirs = vec![t.path().join("run/containerd/runc")];
    for (id, kind) in [(ID1, "container"), (ID2, "sandbox")] {
        let dir = c.runtime_state_dirs[0].join("k8s.io").join(id);
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("state.json"),
            format!(
                r#"{{"id":"{id}","cgroup_paths":{{"":"/sys/fs/cgroup{pod}/{id}"}},"config":{{"labels":["io.kubernetes.cri.container-type={kind}"]}}}}"#
            ),
        )
        .unwrap();
    }
    let mut s = CgroupSampler::new(&c, &k).unwrap();
    let got = s.sample();
    let ids: Vec<_> = got
        .iter()
        .map(|c| c.ident.container_id.as_deref())
        .collect();
    assert_eq!(ids, vec![Some(ID1)], "{got:?}");
    assert_eq!(got[0].ident.cgroup, format!("{pod}/{ID1}"));
    assert_eq!(got[0].ident.kind, identity::Kind::Kubernetes);
    assert_eq!(got[0].ident.runtime.as_deref(), Some("containerd"));
}
