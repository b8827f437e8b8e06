//! Three agents, each a separate process in its own network namespace with its own workload in
//! its own cgroup and its own fake `libnvidia-ml` (one GPU on which that workload runs), report to
//! one aggregator in a fourth namespace over veth links. The aggregator's
//! JSON API and metrics must show the merged workload within two reporting intervals; then the
//! aggregator is killed for 30 s (`HEADROOM_E2E_OUTAGE_S` overrides): no agent may crash, their
//! spools must fill and drain, and the view after recovery must equal the one before.
//!
//! Addresses (10.213.0.0/16) exist only inside the namespaces the test creates and removes.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use headroom_tests::*;

const TOKEN: &str = "e2e-aggregator-token";
const INTERVAL_S: f64 = 1.0;

struct Netns(Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a thread that has joined namespace `ns`, so loopback there is reachable.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns with an fd we own; it only changes this thread's network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread")
}

/// A command that starts inside namespace `ns`. Unlike `ip netns exec`, this keeps the mount
/// namespace, so the process sees the host's /sys/fs/cgroup.
fn netns_command(ns: &str, program: &Path) -> Command {
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    let mut cmd = Command::new(program);
    // SAFETY: the closure only calls setns, which is async-signal-safe, on an fd opened before
    // the fork and kept alive by the closure.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

fn agg_json(ns: &str, port: u16, path: &'static str) -> Option<serde_json::Value> {
    in_netns(ns, move || match http_get(port, path) {
        Ok((200, body)) => serde_json::from_str(&body).ok(),
        _ => None,
    })
}

fn start_aggregator(ns: &str, bin: &Path, token: &Path, log: &Path) -> Child {
    let logf = std::fs::File::create(log).expect("aggregator log");
    Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(bin)
        .args([
            "aggregator",
            "--listen",
            "0.0.0.0:9470",
            "--grpc-listen",
            "127.0.0.1:9471",
        ])
        .arg("--token-file")
        .arg(token)
        .args(["--node-ttl", "60"])
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .expect("start the aggregator")
}

fn workload_view(ns: &str) -> Option<serde_json::Value> {
    agg_json(ns, 9470, "/v1/workloads/shop/Deployment/web")
}

/// The fields of the merged view that depend only on what runs, not on sampling noise.
fn stable(v: &serde_json::Value) -> serde_json::Value {
    let resources: Vec<serde_json::Value> = v["resources"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    serde_json::json!({
                        "resource": r["resource"], "replicas": r["replicas"],
                        // Capacity is the sum of the limits the test set.
                        "capacity": (r["capacity"].as_f64().unwrap_or(-1.0) * 1000.0).round(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    serde_json::json!({"id": v["id"], "nodes": v["nodes"], "current_replicas": v["current_replicas"], "resources": resources})
}

fn spooled(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().is_dir())
                .map(|e| {
                    std::fs::read_dir(e.path())
                        .map(|f| {
                            f.filter_map(Result::ok)
                                .filter(|x| x.path().extension().is_some_and(|x| x == "json"))
                                .count()
                        })
                        .unwrap_or(0)
                })
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn three_agents_in_netns_merge_at_one_aggregator_and_survive_its_outage() {
    if !require_root("three_agents_in_netns_merge_at_one_aggregator")
        || !require_tool("three_agents_in_netns_merge_at_one_aggregator", "ip")
    {
        return;
    }
    let outage_s: u64 = std::env::var("HEADROOM_E2E_OUTAGE_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let bin = agent_binary();
    let w = workload_binary();
    let fake = fake_nvml_lib();
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = tmp.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("token file");

    let tag = std::process::id() % 100_000;
    let agg_ns = format!("hr{tag}-agg");
    let names = ["a", "b", "c"];
    let mut all = vec![agg_ns.clone()];
    all.extend(names.iter().map(|n| format!("hr{tag}-{n}")));
    let _netns = Netns(all.clone());
    for ns in &all {
        ip(&["netns", "add", ns]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    for (i, n) in names.iter().enumerate() {
        let ns = format!("hr{tag}-{n}");
        let (ha, hg) = (format!("hr{tag}a{i}"), format!("hr{tag}g{i}"));
        ip(&[
            "link", "add", &ha, "netns", &ns, "type", "veth", "peer", "name", &hg, "netns", &agg_ns,
        ]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("10.213.{i}.2/24"),
            "dev",
            &ha,
        ]);
        ip(&[
            "-n",
            &agg_ns,
            "addr",
            "add",
            &format!("10.213.{i}.1/24"),
            "dev",
            &hg,
        ]);
        ip(&["-n", &ns, "link", "set", &ha, "up"]);
        ip(&["-n", &agg_ns, "link", "set", &hg, "up"]);
    }

    let agg_log = tmp.path().join("aggregator.log");
    let mut aggregator = start_aggregator(&agg_ns, &bin, &token, &agg_log);
    let t_agg = Instant::now();
    while agg_json(&agg_ns, 9470, "/readyz").is_none() {
        assert!(
            t_agg.elapsed() < Duration::from_secs(30),
            "aggregator not ready: {}",
            std::fs::read_to_string(&agg_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Each node: its own cgroup with half a core of quota and 256 MiB of memory limit, running
    // its own burner; all three belong to the workload shop/Deployment/web.
    let mut cgroups = Vec::new();
    let mut burners = Vec::new();
    let mut agents: Vec<(String, Child, PathBuf, PathBuf)> = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let cg = TestCgroup::create(&format!("web-{n}"), true, false);
        cg.write("cpu", "cpu.cfs_period_us", "100000");
        cg.write("cpu", "cpu.cfs_quota_us", "50000");
        cg.write(
            "memory",
            "memory.limit_in_bytes",
            &(256u64 << 20).to_string(),
        );
        let burner = cg.spawn(&w, &["burn", "1"]);
        // The fake NVML names the burner's pid; the agent must find it in its cgroup already.
        let t_enter = Instant::now();
        while !std::fs::read_to_string(format!("/proc/{}/cgroup", burner.id()))
            .is_ok_and(|t| t.contains(&cg.rel))
        {
            assert!(
                t_enter.elapsed() < Duration::from_secs(10),
                "burner never entered {}",
                cg.rel
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // The burner "runs on" this node's one GPU: 40 % SM and 10 GB of its memory.
        let gpu_dir = tmp.path().join(format!("nvml-{n}"));
        std::fs::create_dir_all(&gpu_dir).expect("fake NVML dir");
        let lib = gpu_dir.join("libnvidia-ml.so.1");
        std::fs::copy(&fake, &lib).expect("copy the fake NVML library");
        let script = gpu_dir.join("script.json");
        std::fs::write(
            &script,
            serde_json::json!({"gpus": [{
                "uuid": format!("GPU-e2e0000{i}-0000-0000-0000-000000000000"),
                "name": "NVIDIA H200", "pci_bus_id": format!("00000000:1{i}:00.0"),
                "memory_total": 150_000_000_000u64, "memory_used": 20_000_000_000u64,
                "utilization": 55,
                "processes": [{"pid": burner.id(), "memory_used": 10_000_000_000u64, "sm_util": 40}]
            }]})
            .to_string(),
        )
        .expect("fake NVML script");
        burners.push(burner);
        let state = tmp.path().join(format!("state-{n}"));
        let config = tmp.path().join(format!("agent-{n}.toml"));
        std::fs::write(
            &config,
            format!(
                "hostname = \"node-{n}\"\nsample_interval_s = {INTERVAL_S}\n\n[[aggregator.workloads]]\ncgroup = \"/headroom-test-*-web-*\"\nnamespace = \"shop\"\nkind = \"Deployment\"\nname = \"web\"\n"
            ),
        )
        .expect("agent config");
        let log = tmp.path().join(format!("agent-{n}.log"));
        let ns = format!("hr{tag}-{n}");
        let child = netns_command(&ns, &bin)
            .arg("agent")
            .arg("--config")
            .arg(&config)
            .args(["--listen", "127.0.0.1:9810", "--state-dir"])
            .arg(&state)
            .args(["--include-cgroup", &cg.rel])
            .arg("--nvml-library")
            .arg(&lib)
            .env("FAKE_NVML_SCRIPT", &script)
            .args(["--aggregator", &format!("http://10.213.{i}.1:9470")])
            .arg("--aggregator-token-file")
            .arg(&token)
            .env("HEADROOM_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log"))
            .spawn()
            .expect("start an agent");
        agents.push((ns, child, state, log));
        cgroups.push(cg);
    }
    let logs = |agents: &[(String, Child, PathBuf, PathBuf)]| {
        agents
            .iter()
            .map(|(ns, _, _, l)| {
                format!(
                    "--- {ns}\n{}",
                    std::fs::read_to_string(l).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    // Ready = first sample done, so the first report is on its way.
    let t_start = Instant::now();
    for (ns, _, _, _) in &agents {
        while !matches!(in_netns(ns, || http_get(9810, "/readyz")), Ok((200, _))) {
            assert!(
                t_start.elapsed() < Duration::from_secs(60),
                "agent in {ns} not ready: {}",
                logs(&agents)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let t0 = Instant::now();
    let merged = loop {
        if let Some(v) = workload_view(&agg_ns) {
            // CPU usage needs two samples, so the cpu resource joins one interval after memory.
            if v["nodes"] == 3
                && v["resources"]
                    .as_array()
                    .is_some_and(|r| r.len() == 4 && r.iter().all(|x| x["replicas"] == 3))
            {
                break v;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no merged workload: {:?}\n{}",
            workload_view(&agg_ns),
            logs(&agents)
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = t0.elapsed().as_secs_f64();
    eprintln!("merged workload visible {took:.2} s after the last agent was ready: {merged}");
    assert!(
        took <= 2.0 * INTERVAL_S,
        "merged view took {took:.2} s, more than two reporting intervals"
    );
    assert_eq!(merged["current_replicas"], 3);
    let cpu = merged["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resource"] == "cpu")
        .unwrap()
        .clone();
    assert!(
        (cpu["capacity"].as_f64().unwrap() - 1.5).abs() < 1e-6,
        "{cpu}"
    );
    let mem = merged["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resource"] == "memory")
        .unwrap()
        .clone();
    assert_eq!(
        mem["capacity"].as_f64().unwrap(),
        3.0 * (256u64 << 20) as f64
    );
    let nodes = agg_json(&agg_ns, 9470, "/v1/nodes").unwrap();
    let node_names: Vec<&str> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    assert_eq!(node_names, ["node-a", "node-b", "node-c"]);
    let metrics = in_netns(&agg_ns, || http_get(9470, "/metrics")).unwrap().1;
    let samples = parse_metrics(&metrics);
    let by = |name: &str| {
        find(&samples, name, &[("workload", "shop/Deployment/web")])
            .first()
            .map(|s| s.value)
    };
    assert_eq!(by("headroom_workload_nodes"), Some(3.0), "{metrics}");
    assert_eq!(by("headroom_workload_current_replicas"), Some(3.0));
    let before = stable(&merged);

    // Outage: the aggregator dies; agents keep sampling and spool.
    aggregator.kill().expect("kill the aggregator");
    let _ = aggregator.wait();
    std::thread::sleep(Duration::from_secs(outage_s));
    for (ns, child, state, _) in &mut agents {
        assert!(
            child.try_wait().expect("agent status").is_none(),
            "agent in {ns} exited during the outage: {}",
            logs(&[])
        );
        let n = spooled(&state.join("hints"));
        eprintln!("{ns}: {n} batches spooled after {outage_s} s");
        let m = parse_metrics(
            &in_netns(ns, || http_get(9810, "/metrics"))
                .expect("agent metrics")
                .1,
        );
        let gauge = find(&m, "headroom_agent_hint_spool_batches", &[])
            .first()
            .map(|s| s.value);
        assert!(
            gauge.is_some_and(|g| g >= 1.0),
            "{ns}: spool gauge {gauge:?}"
        );
        assert!(
            n as f64 >= outage_s as f64 / INTERVAL_S * 0.5,
            "{ns}: only {n} batches spooled"
        );
    }
    aggregator = start_aggregator(&agg_ns, &bin, &token, &agg_log);
    let t1 = Instant::now();
    loop {
        let drained = agents
            .iter()
            .all(|(_, _, state, _)| spooled(&state.join("hints")) == 0);
        let view = workload_view(&agg_ns);
        if drained && view.as_ref().is_some_and(|v| stable(v) == before) {
            eprintln!(
                "spools drained and view restored {:.2} s after the aggregator came back",
                t1.elapsed().as_secs_f64()
            );
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(60),
            "not recovered: view {:?} vs before {before}; spools {:?}\n{}",
            view.map(|v| stable(&v)),
            agents
                .iter()
                .map(|(_, _, s, _)| spooled(&s.join("hints")))
                .collect::<Vec<_>>(),
            logs(&agents)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Each node's last applied batch is its newest: seq kept counting through the outage.
    let nodes = agg_json(&agg_ns, 9470, "/v1/nodes").unwrap();
    for n in nodes["nodes"].as_array().unwrap() {
        assert!(
            n["seq"].as_u64().unwrap() as f64 >= outage_s as f64 / INTERVAL_S,
            "{n}"
        );
    }
    for (ns, child, _, _) in &mut agents {
        assert!(
            child.try_wait().expect("agent status").is_none(),
            "agent in {ns} exited"
        );
    }
    for (_, mut child, _, _) in agents {
        // SAFETY: kill with a pid we own and a valid signal number.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
    }
    let _ = aggregator.kill();
    let _ = aggregator.wait();
    for mut b in burners {
        let _ = b.kill();
        let _ = b.wait();
    }
    drop(cgroups);
}
