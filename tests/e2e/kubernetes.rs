//! headroom on a real single-node Kubernetes cluster. `scripts/kube-up.sh` builds it from real
//! components (etcd; kube-apiserver, controller-manager, scheduler, kubelet and kube-proxy from
//! Kubernetes' Go modules; containerd, runc, the CNI bridge; CoreDNS), imports headroom's image
//! assembled from this build's binary, and applies `deploy/` through `tests/kube/overlay`. The
//! test then checks what a user would see, and `scripts/kube-down.sh` must leave no trace.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use headroom_tests::*;

const CONTAINERD_SOCK: &str = "/run/headroom-kube/containerd/containerd.sock";

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn kube_up() -> Command {
    let mut c = Command::new(workspace_root().join("scripts/kube-up.sh"));
    c.env("HEADROOM_BIN", agent_binary());
    c
}

fn kube_down() {
    let out = Command::new(workspace_root().join("scripts/kube-down.sh"))
        .output()
        .expect("run scripts/kube-down.sh");
    assert!(out.status.success(), "kube-down failed:\n{}", text(&out));
}

/// A running cluster; dropping it runs kube-down, so a failed test leaves nothing behind.
struct Cluster {
    kubeconfig: String,
    down: bool,
}

impl Cluster {
    fn up() -> Cluster {
        let t0 = Instant::now();
        let out = kube_up().output().expect("run scripts/kube-up.sh");
        let all = text(&out);
        let last = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .to_string();
        if !out.status.success() {
            kube_down();
            panic!("kube-up failed:\n{all}");
        }
        let kubeconfig = last
            .strip_prefix("export KUBECONFIG=")
            .unwrap_or_else(|| panic!("kube-up's last line is not `export KUBECONFIG=`: {last:?}"))
            .to_string();
        eprintln!("kube-up took {:.0} s", t0.elapsed().as_secs_f64());
        Cluster {
            kubeconfig,
            down: false,
        }
    }

    fn kubectl_output(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut c = Command::new(workspace_root().join("scripts/kubectl"));
        c.args(args).env("KUBECONFIG", &self.kubeconfig);
        if let Some(input) = stdin {
            c.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = c.spawn().expect("run kubectl");
            std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), input.as_bytes())
                .expect("write to kubectl");
            drop(child.stdin.take());
            child.wait_with_output().expect("wait for kubectl")
        } else {
            c.output().expect("run kubectl")
        }
    }

    fn kubectl(&self, args: &[&str]) -> String {
        let out = self.kubectl_output(args, None);
        assert!(out.status.success(), "kubectl {args:?}:\n{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn apply(&self, yaml: &str) {
        let out = self.kubectl_output(&["apply", "-f", "-"], Some(yaml));
        assert!(out.status.success(), "kubectl apply:\n{}", text(&out));
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let s = self.kubectl(&all);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("kubectl {args:?}: {e}: {s}"))
    }

    /// The pods matching `selector` in `ns`, once all of them are Ready.
    fn ready_pods(&self, ns: &str, selector: &str, count: usize) -> Vec<serde_json::Value> {
        let got = wait_for(Duration::from_secs(180), || {
            let v = self.json(&["-n", ns, "get", "pods", "-l", selector]);
            let pods = v["items"].as_array()?.clone();
            let ready = pods.iter().all(|p| {
                p["status"]["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
            });
            (pods.len() == count && ready).then_some(pods)
        });
        got.unwrap_or_else(|| {
            panic!(
                "{ns}/{selector}: not {count} Ready pods:\n{}",
                self.kubectl(&["-n", ns, "describe", "pods", "-l", selector])
            )
        })
    }

    fn down(mut self) {
        self.down = true;
        kube_down();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.down {
            let _ = Command::new(workspace_root().join("scripts/kube-down.sh")).status();
        }
    }
}

fn pod_ip(pod: &serde_json::Value) -> String {
    pod["status"]["podIP"]
        .as_str()
        .expect("a Ready pod has an IP")
        .to_string()
}

fn pod_name(pod: &serde_json::Value) -> String {
    pod["metadata"]["name"]
        .as_str()
        .expect("pod name")
        .to_string()
}

fn agent_metrics(ip: &str) -> Vec<Sample> {
    let (code, body) = http_get_at(ip, 9810, "/metrics").expect("GET the agent's /metrics");
    assert_eq!(code, 200, "{body}");
    parse_metrics(&body)
}

/// Mean of the agent's fine history points of `name` for `cgroup` within `[from, to]` ms.
fn history_mean(ip: &str, name: &str, cgroup: &str, from: u64, to: u64) -> Option<f64> {
    let (code, body) = http_get_at(
        ip,
        9810,
        &format!("/v1/history?name={name}&cgroup={cgroup}"),
    )
    .ok()?;
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let pts: Vec<f64> = v["series"].as_array()?.first()?["fine"]
        .as_array()?
        .iter()
        .filter_map(|p| {
            let t = p[0].as_u64()?;
            (t >= from && t <= to).then_some(p[1].as_f64()?)
        })
        .collect();
    (!pts.is_empty()).then(|| pts.iter().sum::<f64>() / pts.len() as f64)
}

fn cpuacct_seconds(cgroup: &str) -> f64 {
    let path = format!("/sys/fs/cgroup/cpuacct{cgroup}/cpuacct.usage");
    let raw = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    raw.trim().parse::<f64>().expect("cpuacct.usage") / 1e9
}

/// Ids of the pod sandbox ("pause") containers, from containerd itself.
fn sandbox_ids() -> BTreeSet<String> {
    let out = Command::new("ctr")
        .args([
            "--address",
            CONTAINERD_SOCK,
            "-n",
            "k8s.io",
            "containers",
            "ls",
            "-q",
            r#"labels."io.cri-containerd.kind"==sandbox"#,
        ])
        .output()
        .expect("run ctr");
    assert!(out.status.success(), "ctr containers ls: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// `kube-up` with `tool` missing from PATH: it must name it and change nothing.
fn kube_up_without(tool: &str) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = std::env::var_os("PATH").unwrap_or_default();
    for d in std::env::split_paths(&path) {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let link = dir.path().join(&name);
            if name != tool && !link.exists() {
                let _ = std::os::unix::fs::symlink(e.path(), link);
            }
        }
    }
    kube_up()
        .env("PATH", dir.path())
        .output()
        .expect("run scripts/kube-up.sh")
}

/// The host's firewall rules and chains, without counters.
fn firewall_rules() -> BTreeSet<String> {
    let out = Command::new("iptables-save")
        .output()
        .expect("run iptables-save");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("-A") || l.starts_with(':'))
        .map(|l| l.split(" [").next().unwrap_or(l).to_string())
        .collect()
}

fn kubepods_cgroups() -> Vec<PathBuf> {
    let mut left = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        for e in entries.flatten() {
            for p in [e.path().join("kubepods"), e.path()] {
                if p.ends_with("kubepods") && p.is_dir() {
                    left.push(p);
                }
            }
        }
    }
    left
}

/// A throttled pod that opts in to management.
const SQUEEZED: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: NAME
  namespace: hr-test
  annotations: {headroom.dev/manage: "true"}
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: burn
      image: localhost/headroom-tools:test
      imagePullPolicy: Never
      command: [sh, -c, "yes > /dev/null"]
      resources: {requests: {cpu: 100m}, limits: {cpu: 200m}}
"#;

/// A pod holding `COUNT` of the test device plugin's GPUs, with no GPU process yet.
const GPU_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: NAME, namespace: hr-test}
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: cuda
      image: localhost/headroom-tools:test
      imagePullPolicy: Never
      command: [sleep, "3600"]
      resources: {limits: {nvidia.com/gpu: COUNT}}
"#;

const GPU_UUIDS: [&str; 2] = [
    "GPU-6b1d3e00-0000-4000-8000-00000000000a",
    "GPU-6b1d3e00-0000-4000-8000-00000000000b",
];
/// Where the DaemonSet's agent finds the driver's NVML (`LD_LIBRARY_PATH`, under the GPU
/// Operator's driver root it mounts).
const DRIVER_LIB_DIR: &str = "/run/nvidia/driver/usr/lib/x86_64-linux-gnu";

/// Two fake GPUs on the node: the fake NVML where the agent's pod loads the driver's library,
/// and the test's device plugin advertising them to the real kubelet as `nvidia.com/gpu` (the
/// second GPU time-sliced into two replicas, `UUID::0` and `UUID::1`). Dropping it stops the
/// plugin and removes the library.
struct FakeGpus {
    plugin: std::process::Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl FakeGpus {
    fn install() -> FakeGpus {
        std::fs::create_dir_all(DRIVER_LIB_DIR).expect("driver library folder");
        std::fs::copy(
            fake_nvml_lib(),
            Path::new(DRIVER_LIB_DIR).join("libnvidia-ml.so.1"),
        )
        .expect("install the fake NVML");
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("allocations.jsonl");
        let plugin = Command::new("python3")
            .arg(workspace_root().join("tests/kube/device-plugin/fake_gpu_plugin.py"))
            .arg("--log")
            .arg(&log)
            .args([
                GPU_UUIDS[0].to_string(),
                format!("{}::0", GPU_UUIDS[1]),
                format!("{}::1", GPU_UUIDS[1]),
            ])
            .spawn()
            .expect("start the device plugin");
        let g = FakeGpus {
            plugin,
            log,
            _dir: dir,
        };
        g.processes(&[]);
        g
    }

    /// The fake NVML's script: both GPUs, with `(gpu index, host pid)` as GPU processes.
    fn processes(&self, procs: &[(usize, u32)]) {
        let gpus: Vec<serde_json::Value> = GPU_UUIDS
            .iter()
            .enumerate()
            .map(|(i, uuid)| {
                let p: Vec<serde_json::Value> = procs
                    .iter()
                    .filter(|(g, _)| *g == i)
                    .map(|(_, pid)| serde_json::json!({"pid": pid, "memory_used": 3_000_000_000u64, "sm_util": 40}))
                    .collect();
                serde_json::json!({
                    "uuid": uuid, "name": "NVIDIA H200", "pci_bus_id": format!("00000000:{:02X}:00.0", 0x19 + i),
                    "memory_total": 150_754_820_096u64, "memory_used": 3_000_000_000u64 * p.len() as u64,
                    "utilization": 40 * p.len(), "processes": p,
                })
            })
            .collect();
        let tmp = Path::new(DRIVER_LIB_DIR).join("fake-nvml.json.tmp");
        std::fs::write(
            &tmp,
            serde_json::json!({"driver_version": "550.54.15", "gpus": gpus}).to_string(),
        )
        .expect("write the fake NVML script");
        std::fs::rename(&tmp, Path::new(DRIVER_LIB_DIR).join("fake-nvml.json")).expect("rename");
    }

    /// Device ids of each Allocate the kubelet made, in order.
    fn allocations(&self) -> Vec<Vec<String>> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| {
                v["devices"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|d| d.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .collect()
    }
}

impl Drop for FakeGpus {
    fn drop(&mut self) {
        // SAFETY: a signal to the child this struct started.
        unsafe { libc::kill(self.plugin.id() as i32, libc::SIGTERM) };
        let _ = self.plugin.wait();
        let _ = std::fs::remove_dir_all("/run/nvidia/driver/usr");
    }
}

/// The first process in a container's cgroup (v1 `cpu` controller), as the host sees it.
fn container_pid(container_id: &str) -> Option<u32> {
    let dir = container_cgroup(container_id)?;
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

fn cpu_millis(q: &str) -> u64 {
    match q.strip_suffix('m') {
        Some(m) => m.parse().expect("millicores"),
        None => (q.parse::<f64>().expect("cores") * 1000.0).round() as u64,
    }
}

/// A container's cgroup (v1 `cpu` controller), found by its id under `kubepods`.
fn container_cgroup(container_id: &str) -> Option<PathBuf> {
    let mut stack = vec![PathBuf::from("/sys/fs/cgroup/cpu/kubepods")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            let p = e.path();
            if !p.is_dir() {
                continue;
            }
            if p.file_name().is_some_and(|n| n == container_id) {
                return Some(p);
            }
            stack.push(p);
        }
    }
    None
}

/// The CFS quota of a container's cgroup, in millicores.
fn cfs_quota_millis(container_id: &str) -> Option<u64> {
    let dir = container_cgroup(container_id)?;
    let read = |f: &str| -> Option<i64> {
        std::fs::read_to_string(dir.join(f))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let (q, period) = (read("cpu.cfs_quota_us")?, read("cpu.cfs_period_us")?);
    (q > 0).then(|| (q * 1000 / period) as u64)
}

const WORKLOADS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: hr-test}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: burner, namespace: hr-test}
spec:
  replicas: 1
  selector: {matchLabels: {app: burner}}
  template:
    metadata: {labels: {app: burner}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
        - name: burn
          image: localhost/headroom-tools:test
          imagePullPolicy: Never
          command: [sh, -c, "yes > /dev/null"]
          resources: {requests: {cpu: 100m}, limits: {cpu: 300m}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: hr-test}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    # Not an inference engine: the agent's engine discovery leaves its port alone, so the
    # request count below is the test's requests only.
    metadata: {labels: {app: web}, annotations: {prometheus.io/scrape: "false"}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
        - name: httpd
          image: localhost/headroom-tools:test
          imagePullPolicy: Never
          command: [sh, -c, "mkdir -p /tmp/www && echo ok > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"]
          ports: [{containerPort: 8080}]
          resources: {requests: {cpu: 50m, memory: 16Mi}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: pair, namespace: hr-test}
spec:
  replicas: 2
  selector: {matchLabels: {app: pair}}
  template:
    metadata: {labels: {app: pair}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
        - {name: main, image: localhost/headroom-tools:test, imagePullPolicy: Never, command: [sleep, "3600"]}
        - {name: sidecar, image: localhost/headroom-tools:test, imagePullPolicy: Never, command: [sleep, "3600"]}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: hr-test}
spec:
  replicas: 1
  serviceName: db
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
        - {name: db, image: localhost/headroom-tools:test, imagePullPolicy: Never, command: [sleep, "3600"]}
---
apiVersion: v1
kind: Pod
metadata: {name: solo, namespace: hr-test}
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - {name: solo, image: localhost/headroom-tools:test, imagePullPolicy: Never, command: [sleep, "3600"]}
"#;

#[test]
fn deploy_runs_on_a_real_kubernetes_node() {
    let test = "deploy_runs_on_a_real_kubernetes_node";
    if !require_root(test) || !require_tool(test, "ctr") || !require_tool(test, "iptables-save") {
        return;
    }

    // Bad input first: a missing piece is named, and nothing starts.
    let out = kube_up_without("etcd");
    assert!(!out.status.success(), "kube-up without etcd succeeded");
    assert!(
        text(&out).contains("etcd (Debian package etcd-server)"),
        "kube-up without etcd did not name it:\n{}",
        text(&out)
    );
    assert!(!Path::new("/var/lib/headroom-kube/pids").exists());

    let firewall_before = firewall_rules();
    let cluster = Cluster::up();
    // Two GPUs for the agent pods started from here on (the first one found no driver).
    let gpus = FakeGpus::install();

    // The DaemonSet as shipped: not privileged, only the capabilities it lists.
    let agent = cluster
        .ready_pods("headroom", "app.kubernetes.io/name=headroom-agent", 1)
        .remove(0);
    let sc = &agent["spec"]["containers"][0]["securityContext"];
    assert_eq!(sc["privileged"], false, "{sc}");
    assert_eq!(
        sc["capabilities"]["add"],
        serde_json::json!(["BPF", "PERFMON"])
    );
    let agent_ip = pod_ip(&agent);
    let aggregator = cluster
        .ready_pods("headroom", "app.kubernetes.io/name=headroom-aggregator", 1)
        .remove(0);
    let aggregator_ip = pod_ip(&aggregator);
    // The agent process itself holds exactly CAP_BPF (39) and CAP_PERFMON (38).
    let agent_pid = wait_for(Duration::from_secs(10), || {
        let out = Command::new("pgrep")
            .args(["-f", "headroom agent --config /etc/headroom/headroom.toml"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<u32>().ok())
    })
    .expect("the agent's process on the host");
    let status = std::fs::read_to_string(format!("/proc/{agent_pid}/status")).expect("status");
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).expect("hex"))
        .expect("CapEff");
    assert_eq!(cap_eff, (1 << 38) | (1 << 39), "agent CapEff {cap_eff:#x}");

    cluster.apply(WORKLOADS);
    let burner = cluster.ready_pods("hr-test", "app=burner", 1).remove(0);
    let web = cluster.ready_pods("hr-test", "app=web", 1).remove(0);
    let (burner_pod, web_pod) = (pod_name(&burner), pod_name(&web));
    cluster.ready_pods("hr-test", "app=pair", 2);
    cluster.ready_pods("hr-test", "app=db", 1);
    wait_for(Duration::from_secs(120), || {
        let p = cluster.json(&["-n", "hr-test", "get", "pod", "solo"]);
        (p["status"]["phase"] == "Running").then_some(())
    })
    .expect("the bare pod runs");

    // The agent names pods from the API server, as its RBAC allows.
    let (code, body) = http_get_at(&agent_ip, 9810, "/v1/status").expect("agent /v1/status");
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
    assert_eq!(
        status["kubernetes_api"]["state"], "synced",
        "agent's API watch: {}",
        status["kubernetes_api"]
    );

    // Both Deployments' containers, with their Kubernetes names.
    let cgroup_of = |pod: &str, container: &str| {
        wait_for(Duration::from_secs(90), || {
            let s = agent_metrics(&agent_ip);
            let hit = find(
                &s,
                "headroom_container_cpu_seconds_total",
                &[
                    ("namespace", "hr-test"),
                    ("pod", pod),
                    ("container", container),
                ],
            );
            hit.first().map(|x| x.labels["cgroup"].clone())
        })
        .unwrap_or_else(|| panic!("no CPU series for hr-test/{pod}/{container} in the agent"))
    };
    let burn_cg = cgroup_of(&burner_pod, "burn");
    let web_cg = cgroup_of(&web_pod, "httpd");
    eprintln!("burner {burn_cg}, web {web_cg}");

    // CPU within ±10 % of the cgroup's own counter over the same window.
    std::thread::sleep(Duration::from_secs(2));
    let (t1, c1, i1) = (now_ms(), cpuacct_seconds(&burn_cg), Instant::now());
    std::thread::sleep(Duration::from_secs(12));
    let (t2, c2, wall) = (
        now_ms(),
        cpuacct_seconds(&burn_cg),
        i1.elapsed().as_secs_f64(),
    );
    std::thread::sleep(Duration::from_secs(2));
    let kernel = (c2 - c1) / wall;
    let agent_cores = history_mean(&agent_ip, "container_cpu_usage_cores", &burn_cg, t1, t2)
        .expect("CPU history of the burner");
    let err = (agent_cores - kernel).abs() / kernel;
    eprintln!(
        "burner CPU: agent {agent_cores:.3} cores, cpuacct {kernel:.3} cores, error {:.1} %",
        err * 100.0
    );
    assert!(err <= 0.10, "agent {agent_cores} vs cgroup {kernel}");

    // No series for the pods' sandbox containers.
    let sandboxes = sandbox_ids();
    assert!(sandboxes.len() >= 8, "sandboxes: {sandboxes:?}");
    let samples = agent_metrics(&agent_ip);
    for s in &samples {
        for (k, v) in &s.labels {
            if k == "cgroup" || k == "container_id" {
                assert!(
                    !sandboxes.iter().any(|id| v.contains(id.as_str())),
                    "sandbox container reported: {} {:?}",
                    s.name,
                    s.labels
                );
            }
        }
    }

    // eBPF request latency for the HTTP Deployment: one observation per request, counted over
    // the test's own requests (any other client of the pod falls outside the window).
    let web_ip = pod_ip(&web);
    let requests = 50;
    let want = [
        ("namespace", "hr-test"),
        ("pod", web_pod.as_str()),
        ("port", "8080"),
    ];
    let count = || {
        let s = agent_metrics(&agent_ip);
        find(&s, "headroom_request_latency_seconds_count", &want)
            .first()
            .map_or(0.0, |x| x.value)
    };
    let before = count();
    for i in 0..requests {
        let (code, body) = http_get_at(&web_ip, 8080, "/index.html")
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(code, 200, "{body}");
    }
    let counted = wait_for(Duration::from_secs(20), || {
        let c = count() - before;
        (c >= f64::from(requests)).then_some(c)
    });
    assert_eq!(
        counted,
        Some(f64::from(requests)),
        "request latency count for {web_pod} ({before} before the test's requests)"
    );

    // The aggregator's view: workloads named by their owners from the API, replicas counted
    // per pod (a sidecar is no extra replica), and no sandbox anywhere.
    let expected = [
        ("hr-test/Deployment/burner", 1),
        ("hr-test/Deployment/web", 1),
        ("hr-test/Deployment/pair", 2),
        ("hr-test/StatefulSet/db", 1),
        ("hr-test/Pod/solo", 1),
        ("headroom/DaemonSet/headroom-agent", 1),
        ("headroom/Deployment/headroom-aggregator", 1),
    ];
    let mut last = String::new();
    let workloads = wait_for(Duration::from_secs(120), || {
        let (code, body) = http_get_at(&aggregator_ip, 9470, "/v1/workloads").ok()?;
        last = body.clone();
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let replicas: std::collections::BTreeMap<String, u64> = v["workloads"]
            .as_array()?
            .iter()
            .filter_map(|w| {
                Some((
                    w["id"].as_str()?.to_string(),
                    w["current_replicas"].as_u64()?,
                ))
            })
            .collect();
        (code == 200 && expected.iter().all(|(id, n)| replicas.get(*id) == Some(n)))
            .then(|| replicas.into_keys().collect::<BTreeSet<String>>())
    })
    .unwrap_or_else(|| panic!("aggregator /v1/workloads, want {expected:?}: {last}"));
    for id in &workloads {
        assert!(
            !sandboxes.iter().any(|s| id.contains(s.as_str())),
            "sandbox as a workload: {id}"
        );
    }

    // The HPA on headroom's hints without KEDA: the aggregator registered as the external
    // metrics API. Each HPA must settle on the aggregator's desired replicas (within its
    // bounds); a workload no node reports is an error the HPA shows, not a zero.
    cluster.kubectl(&[
        "apply",
        "-f",
        &workspace_root()
            .join("deploy/optional/external-metrics.yaml")
            .display()
            .to_string(),
    ]);
    wait_for(Duration::from_secs(90), || {
        let a = cluster.json(&["get", "apiservice", "v1beta1.external.metrics.k8s.io"]);
        a["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Available" && c["status"] == "True")
            .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the external metrics APIService never became Available: {}",
            cluster.kubectl(&[
                "get",
                "apiservice",
                "v1beta1.external.metrics.k8s.io",
                "-o",
                "yaml"
            ])
        )
    });
    let desired = |name: &str| -> Option<u64> {
        let (code, body) = http_get_at(
            &aggregator_ip,
            9470,
            &format!("/v1/workloads/hr-test/Deployment/{name}"),
        )
        .ok()?;
        (code == 200).then_some(())?;
        serde_json::from_str::<serde_json::Value>(&body).ok()?["desired_replicas"].as_u64()
    };
    let raw = |selector: &str| {
        cluster.kubectl_output(
            &[
                "get",
                "--raw",
                &format!("/apis/external.metrics.k8s.io/v1beta1/namespaces/hr-test/headroom-desired-replicas?labelSelector={selector}"),
            ],
            None,
        )
    };
    let through_api = wait_for(Duration::from_secs(30), || {
        let out = raw("kind%3DDeployment%2Cname%3Dburner");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let got: u64 = v["items"][0]["value"].as_str()?.parse().ok()?;
        (Some(got) == desired("burner")).then_some(got)
    });
    assert!(
        through_api.is_some(),
        "the API server's external metric for burner never matched the aggregator's {:?}: {}",
        desired("burner"),
        text(&raw("kind%3DDeployment%2Cname%3Dburner"))
    );
    let ghost = raw("kind%3DDeployment%2Cname%3Dghost");
    assert!(
        !ghost.status.success() && text(&ghost).contains("hr-test/Deployment/ghost"),
        "a workload no node reports: {}",
        text(&ghost)
    );
    const HPA: &str = r#"
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: NAME, namespace: hr-test}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: TARGET}
  minReplicas: 1
  maxReplicas: 3
  metrics:
    - type: External
      external:
        metric:
          name: headroom-desired-replicas
          selector: {matchLabels: {kind: Deployment, name: NAME}}
        target: {type: AverageValue, averageValue: "1"}
"#;
    // ghost's HPA scales web (which exists) on a workload no node reports.
    for (name, target) in [("burner", "burner"), ("pair", "pair"), ("ghost", "web")] {
        cluster.apply(&HPA.replace("NAME", name).replace("TARGET", target));
    }
    for name in ["burner", "pair"] {
        let mut seen = (None, None, None);
        let settled = wait_for(Duration::from_secs(150), || {
            let hpa = cluster.json(&["-n", "hr-test", "get", "hpa", name]);
            let want = desired(name)?.clamp(1, 3);
            let dep = cluster.json(&["-n", "hr-test", "get", "deployment", name]);
            seen = (
                Some(want),
                hpa["status"]["desiredReplicas"].as_u64(),
                dep["spec"]["replicas"].as_u64(),
            );
            (seen.1 == Some(want) && seen.2 == Some(want)).then_some(want)
        });
        let replicas = settled.unwrap_or_else(|| {
            panic!(
                "HPA {name} never followed the aggregator (aggregator, HPA, Deployment): {seen:?}\n{}",
                cluster.kubectl(&["-n", "hr-test", "describe", "hpa", name])
            )
        });
        eprintln!("HPA {name}: follows headroom-desired-replicas to {replicas} replica(s)");
    }
    let ghost_active = wait_for(Duration::from_secs(90), || {
        let hpa = cluster.json(&["-n", "hr-test", "get", "hpa", "ghost"]);
        hpa["status"]["conditions"]
            .as_array()?
            .iter()
            .find_map(|c| {
                (c["type"] == "ScalingActive" && c["status"] == "False")
                    .then(|| c["message"].as_str().unwrap_or_default().to_string())
            })
    })
    .expect("the HPA of a workload no node reports never said why it is not scaling");
    assert!(
        ghost_active.contains("hr-test/Deployment/ghost"),
        "ScalingActive message: {ghost_active}"
    );
    for name in ["burner", "pair", "ghost"] {
        cluster.kubectl(&["-n", "hr-test", "delete", "hpa", name]);
    }
    cluster.kubectl(&[
        "-n",
        "hr-test",
        "scale",
        "deployment",
        "burner",
        "--replicas=1",
    ]);
    cluster.kubectl(&[
        "-n",
        "hr-test",
        "scale",
        "deployment",
        "pair",
        "--replicas=2",
    ]);

    // In-place resize (enforce mode in the overlay): pods annotated headroom.dev/manage get
    // their CPU limit raised through pods/resize while throttled.
    // First with the verb denied (an operator's RBAC without pods/resize): the refusal is
    // reported on /v1/status, sampling goes on, and the resize happens once the verb is back.
    let rules = cluster.json(&["get", "clusterrole", "headroom-agent"])["rules"].clone();
    let resize_rule = rules
        .as_array()
        .and_then(|r| {
            r.iter()
                .position(|r| r["resources"] == serde_json::json!(["pods/resize"]))
        })
        .expect("the agent's ClusterRole grants pods/resize");
    cluster.kubectl(&[
        "patch",
        "clusterrole",
        "headroom-agent",
        "--type=json",
        "-p",
        &format!(r#"[{{"op":"remove","path":"/rules/{resize_rule}"}}]"#),
    ]);
    for name in ["squeezed", "squeezed2"] {
        cluster.apply(&SQUEEZED.replace("NAME", name));
    }
    let first_status = || -> Option<serde_json::Value> {
        let (code, body) = http_get_at(&agent_ip, 9810, "/v1/status").ok()?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    };
    let denied = wait_for(Duration::from_secs(120), || {
        let s = first_status()?;
        let e = s["kubernetes_api"]["write_error"].as_str()?.to_string();
        (e.contains("403") && e.contains("pods/resize")).then_some((e, s))
    });
    let (denied, at) = denied
        .unwrap_or_else(|| panic!("a denied resize is not on /v1/status: {:?}", first_status()));
    eprintln!("resize denied, agent says: {denied}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        first_status().and_then(|s| s["last_sample_at"].as_f64()) > at["last_sample_at"].as_f64(),
        "sampling stopped after a denied resize"
    );
    cluster.kubectl(&[
        "patch",
        "clusterrole",
        "headroom-agent",
        "--type=json",
        "-p",
        &format!(
            r#"[{{"op":"add","path":"/rules/{resize_rule}","value":{}}}]"#,
            rules[resize_rule]
        ),
    ]);
    let limit_of = |pod: &str| {
        let p = cluster.json(&["-n", "hr-test", "get", "pod", pod]);
        let spec = p["spec"]["containers"][0]["resources"]["limits"]["cpu"]
            .as_str()
            .map(cpu_millis);
        let applied = p["status"]["containerStatuses"][0]["resources"]["limits"]["cpu"]
            .as_str()
            .map(cpu_millis);
        let id = p["status"]["containerStatuses"][0]["containerID"]
            .as_str()
            .and_then(|s| s.split_once("://"))
            .map(|(_, id)| id.to_string());
        (spec, applied, id)
    };
    for pod in ["squeezed", "squeezed2"] {
        let raised = wait_for(Duration::from_secs(120), || {
            let (spec, applied, id) = limit_of(pod);
            let (spec, id) = (spec?, id?);
            (spec > 200 && applied == Some(spec)).then_some((spec, id))
        });
        let (limit, id) = raised.unwrap_or_else(|| {
            panic!(
                "{pod}: CPU limit not raised through pods/resize: {:?}",
                limit_of(pod)
            )
        });
        // The kubelet applied it: the container's cgroup holds the matching quota.
        let quota = wait_for(Duration::from_secs(10), || {
            let (spec, _, _) = limit_of(pod);
            let q = cfs_quota_millis(&id)?;
            (Some(q) == spec).then_some(q)
        });
        assert!(
            quota.is_some(),
            "{pod}: cgroup quota {:?} vs limit {limit}m",
            cfs_quota_millis(&id)
        );
        eprintln!("{pod}: limit 200m raised to {limit}m through pods/resize; cgroup agrees");
    }
    let events = |pod: &str| {
        cluster.kubectl(&[
            "-n",
            "hr-test",
            "get",
            "events",
            "--field-selector",
            &format!("involvedObject.name={pod}"),
            "-o",
            "custom-columns=REASON:.reason,MESSAGE:.message",
        ])
    };
    assert!(
        events("squeezed").contains("HeadroomResize"),
        "{}",
        events("squeezed")
    );
    // Someone else resizes: drift, recorded and not overwritten.
    cluster.kubectl(&[
        "-n",
        "hr-test",
        "patch",
        "pod",
        "squeezed",
        "--subresource",
        "resize",
        "-p",
        r#"{"spec":{"containers":[{"name":"burn","resources":{"limits":{"cpu":"700m"}}}]}}"#,
    ]);
    let drift = wait_for(Duration::from_secs(60), || {
        events("squeezed").contains("HeadroomDrift").then_some(())
    });
    assert!(drift.is_some(), "no drift event: {}", events("squeezed"));
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(
        limit_of("squeezed").0,
        Some(700),
        "the manual resize was overwritten"
    );
    // A resize the kubelet refuses: an operator asked for more CPU than the node has, so the
    // pod sits in PodResizePending (Infeasible). Once the pod opts in, the agent (wanting more
    // for it, throttled as it is) reports the refusal and asks nothing.
    cluster.apply(&SQUEEZED.replace("NAME", "refused").replace(
        "headroom.dev/manage: \"true\"",
        "headroom.dev/manage: \"false\"",
    ));
    wait_for(Duration::from_secs(120), || {
        let p = cluster.json(&["-n", "hr-test", "get", "pod", "refused"]);
        (p["status"]["phase"] == "Running").then_some(())
    })
    .expect("the refused pod runs");
    cluster.kubectl(&[
        "-n", "hr-test", "patch", "pod", "refused", "--subresource", "resize", "-p",
        r#"{"spec":{"containers":[{"name":"burn","resources":{"requests":{"cpu":"500"},"limits":{"cpu":"500"}}}]}}"#,
    ]);
    wait_for(Duration::from_secs(60), || {
        let p = cluster.json(&["-n", "hr-test", "get", "pod", "refused"]);
        p["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "PodResizePending" && c["reason"] == "Infeasible")
            .then_some(())
    })
    .expect("the kubelet marks the resize Infeasible");
    cluster.kubectl(&[
        "-n",
        "hr-test",
        "annotate",
        "--overwrite",
        "pod",
        "refused",
        "headroom.dev/manage=true",
    ]);
    let refused = wait_for(Duration::from_secs(90), || {
        let e = first_status()?["kubernetes_api"]["write_error"]
            .as_str()?
            .to_string();
        (e.contains("hr-test/refused") && e.contains("Infeasible")).then_some(e)
    })
    .unwrap_or_else(|| {
        panic!(
            "an Infeasible resize is not on /v1/status: {:?}",
            first_status()
        )
    });
    eprintln!("resize refused, agent says: {refused}");
    assert!(
        wait_for(Duration::from_secs(30), || events("refused")
            .contains("HeadroomResizeRefused")
            .then_some(()))
        .is_some(),
        "no event for the refused resize: {}",
        events("refused")
    );
    cluster.kubectl(&["-n", "hr-test", "delete", "pod", "refused", "--wait=false"]);

    // SIGTERM (the pod deleted): the agent puts back what it changed, through the same path.
    cluster.kubectl(&[
        "-n",
        "headroom",
        "delete",
        "pod",
        "-l",
        "app.kubernetes.io/name=headroom-agent",
        "--wait=true",
    ]);
    let restored = wait_for(Duration::from_secs(30), || {
        (limit_of("squeezed2").0 == Some(200)).then_some(())
    });
    assert!(
        restored.is_some(),
        "squeezed2 not restored: {:?}",
        limit_of("squeezed2")
    );
    assert_eq!(
        limit_of("squeezed").0,
        Some(700),
        "a limit someone else set was restored over"
    );
    // The DaemonSet's new agent pod, at its own address.
    let agent_ip = pod_ip(
        &cluster
            .ready_pods("headroom", "app.kubernetes.io/name=headroom-agent", 1)
            .remove(0),
    );
    wait_for(Duration::from_secs(60), || {
        http_get_at(&agent_ip, 9810, "/readyz")
            .ok()
            .filter(|(c, _)| *c == 200)
    })
    .expect("the new agent pod is ready");
    let agent_status = || -> Option<serde_json::Value> {
        let (code, body) = http_get_at(&agent_ip, 9810, "/v1/status").ok()?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    };

    // GPUs through the kubelet: pods get devices from the test's device plugin, and the agent
    // labels each GPU's series with the pods holding it, from pod-resources, before any GPU
    // process exists. The plugin's own log of Allocate calls is the truth.
    let mut held: Vec<(&str, String)> = Vec::new();
    for (pod, count) in [("gpu-a", 1), ("gpu-b", 2)] {
        cluster.apply(
            &GPU_POD
                .replace("NAME", pod)
                .replace("COUNT", &count.to_string()),
        );
        wait_for(Duration::from_secs(120), || {
            let p = cluster.json(&["-n", "hr-test", "get", "pod", pod]);
            (p["status"]["phase"] == "Running").then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "{pod} never ran: {}",
                cluster.kubectl(&["-n", "hr-test", "describe", "pod", pod])
            )
        });
        let ids = gpus
            .allocations()
            .get(held.iter().map(|(p, _)| *p).collect::<BTreeSet<_>>().len())
            .cloned()
            .unwrap_or_else(|| panic!("no Allocate logged for {pod}: {:?}", gpus.allocations()));
        assert_eq!(ids.len(), count, "{pod} got {ids:?}");
        held.extend(ids.into_iter().map(|id| (pod, id)));
    }
    let mut last = Vec::new();
    let labelled = wait_for(Duration::from_secs(60), || {
        let (_, body) = http_get_at(&agent_ip, 9810, "/metrics").ok()?;
        last = parse_metrics(&body);
        held.iter()
            .all(|(pod, id)| {
                let uuid = id.split("::").next().unwrap_or(id);
                let who = [
                    ("namespace", "hr-test"),
                    ("pod", *pod),
                    ("container", "cuda"),
                ];
                let mut util = vec![("UUID", uuid)];
                util.extend(who);
                let mut alloc = vec![("device_id", id.as_str()), ("resource", "nvidia.com/gpu")];
                alloc.extend(who);
                !find(&last, "headroom_gpu_utilization_ratio", &util).is_empty()
                    && find(&last, "headroom_gpu_allocation", &alloc).len() == 1
            })
            .then_some(())
    });
    assert!(
        labelled.is_some(),
        "GPU series not labelled with their pods {held:?}: {:?}",
        last.iter()
            .filter(|s| s.name.starts_with("headroom_gpu_"))
            .collect::<Vec<_>>()
    );
    let status = agent_status().expect("agent /v1/status");
    let pr = &status["gpu_attribution"]["pod_resources"];
    assert_eq!(pr["state"], "ok", "{pr}");
    assert_eq!(pr["devices_allocated"], 3, "{pr}");
    assert_eq!(pr["devices_allocatable"], 3, "{pr}");

    // A GPU process in gpu-a: NVML's process list resolves to the same pod through its cgroup.
    let gpu_a = cluster.json(&["-n", "hr-test", "get", "pod", "gpu-a"]);
    let cid = gpu_a["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .and_then(|c| c.strip_prefix("containerd://"))
        .expect("gpu-a's container id")
        .to_string();
    let pid = container_pid(&cid).expect("gpu-a's process");
    let a_uuid = held[0].1.split("::").next().unwrap_or_default().to_string();
    let a_gpu = GPU_UUIDS
        .iter()
        .position(|u| *u == a_uuid)
        .expect("a fake GPU");
    gpus.processes(&[(a_gpu, pid)]);
    let used = wait_for(Duration::from_secs(30), || {
        let (_, body) = http_get_at(&agent_ip, 9810, "/metrics").ok()?;
        let m = parse_metrics(&body);
        find(
            &m,
            "headroom_gpu_container_memory_used_bytes",
            &[
                ("UUID", a_uuid.as_str()),
                ("namespace", "hr-test"),
                ("pod", "gpu-a"),
                ("container", "cuda"),
            ],
        )
        .first()
        .map(|s| s.value)
    });
    assert_eq!(
        used,
        Some(3e9),
        "NVML process of gpu-a (pid {pid}) not attributed to it"
    );
    let nvml = &agent_status().expect("status")["gpu_attribution"]["nvml_processes"];
    assert_eq!(nvml["attributed"], 1, "{nvml}");

    // The API server and the kubelet go away (the pod-resources socket with it): the agent
    // says so on /v1/status, keeps the last GPU allocations and keeps sampling.
    let pid_of = |component: &str| -> i32 {
        std::fs::read_to_string(format!("/var/lib/headroom-kube/pids/{component}"))
            .unwrap_or_else(|e| panic!("{component} pid: {e}"))
            .trim()
            .parse()
            .expect("pid")
    };
    for component in ["kube-apiserver", "kubelet"] {
        // SAFETY: kill with a pid this cluster started and a valid signal number.
        unsafe { libc::kill(pid_of(component), libc::SIGKILL) };
    }
    let down = wait_for(Duration::from_secs(60), || {
        let s = agent_status()?;
        (s["kubernetes_api"]["state"] == "error"
            && s["gpu_attribution"]["pod_resources"]["state"] == "error")
            .then_some(s)
    })
    .unwrap_or_else(|| {
        panic!(
            "the agent never reported the API server and the kubelet down: {:?}",
            agent_status()
        )
    });
    eprintln!(
        "API server down, agent says: {}\nkubelet down, agent says: {}",
        down["kubernetes_api"]["error"], down["gpu_attribution"]["pod_resources"]["error"]
    );
    assert_eq!(
        down["gpu_attribution"]["allocations"]
            .as_array()
            .map(Vec::len),
        Some(3),
        "allocations dropped while the kubelet is away"
    );
    let before = down["last_sample_at"].as_f64().expect("last_sample_at");
    std::thread::sleep(Duration::from_secs(3));
    let after = agent_status().expect("the agent still serves /v1/status")["last_sample_at"]
        .as_f64()
        .expect("last_sample_at");
    assert!(
        after > before + 1.0,
        "sampling stopped with the API server and the kubelet down"
    );

    // A second kube-up while one runs starts no second cluster (the first one also starts the
    // API server again, reusing the running cluster's certificates and state).
    let first = kube_up()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kube-up");
    std::thread::sleep(Duration::from_millis(300));
    let second = kube_up().output().expect("kube-up");
    assert!(!second.status.success(), "a concurrent kube-up succeeded");
    assert!(
        text(&second).contains("another kube-up"),
        "concurrent kube-up: {}",
        text(&second)
    );
    let first_out = first.wait_with_output().expect("wait for kube-up");
    assert!(
        first_out.status.success(),
        "re-running kube-up on a running cluster failed:\n{}",
        text(&first_out)
    );
    let back = wait_for(Duration::from_secs(120), || {
        let s = agent_status()?;
        (s["kubernetes_api"]["state"] == "synced"
            && s["gpu_attribution"]["pod_resources"]["state"] == "ok")
            .then_some(())
    });
    assert!(
        back.is_some(),
        "the agent's API watch or pod-resources client did not recover: {:?}",
        agent_status()
    );

    drop(gpus);
    cluster.down();
    let left = kubepods_cgroups();
    assert!(left.is_empty(), "kube-down left cgroups: {left:?}");
    assert_eq!(
        firewall_rules(),
        firewall_before,
        "kube-down left firewall rules"
    );
    assert!(!Path::new("/var/lib/headroom-kube").exists());
}
