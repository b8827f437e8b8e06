//! The agent's GPU path end to end: the real `headroom agent` loads the fake `libnvidia-ml`
//! (crate `fake-nvml`) through `--nvml-library`, and /metrics and history are checked against the
//! fake's script, including attribution of real processes in cgroups the test creates; injected
//! faults; and a node without a driver.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use headroom_tests::*;
use serde_json::{Value, json};

/// A private copy of the fake as `libnvidia-ml.so.1`, with its script beside it.
struct Fake {
    dir: tempfile::TempDir,
    lib: PathBuf,
}

impl Fake {
    fn new(script: &Value) -> Fake {
        let dir = tempfile::tempdir().expect("tempdir");
        let lib = dir.path().join("libnvidia-ml.so.1");
        std::fs::copy(fake_nvml_lib(), &lib).expect("copy the fake library");
        let f = Fake { dir, lib };
        f.write(script);
        f
    }

    /// Atomic replace: the fake re-reads the script when the file changes.
    fn write(&self, script: &Value) {
        let tmp = self.dir.path().join("script.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(script).expect("json")).expect("write");
        std::fs::rename(&tmp, self.dir.path().join("fake-nvml.json")).expect("rename");
    }

    fn lib(&self) -> String {
        self.lib.display().to_string()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

const UUID0: &str = "GPU-8f1a2b3c-0000-4000-8000-000000000000";
const UUID1: &str = "GPU-8f1a2b3c-0000-4000-8000-000000000001";

fn value(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let found = find(samples, name, want);
    assert!(found.len() <= 1, "{name} {want:?}: {} series", found.len());
    found.first().map(|s| s.value)
}

fn trace_points() -> Vec<f64> {
    let p = workspace_root().join("tests/fake-nvml/traces/alibaba_gpu_util_mean_57s_head120.csv");
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').nth(1)?.parse().ok())
        .collect()
}

#[test]
fn gpu_metrics_match_the_script_and_attribute_real_cgroups() {
    if !require_root("gpu_metrics_match_the_script_and_attribute_real_cgroups")
        || !require_tool("gpu_metrics_match_the_script", "promtool")
    {
        return;
    }
    let w = workload_binary();
    let a = TestCgroup::create("gpu-a", true, false);
    let b = TestCgroup::create("gpu-b", true, false);
    let mut a1 = a.spawn(&w, &["sleep"]);
    let mut a2 = a.spawn(&w, &["sleep"]);
    let mut b1 = b.spawn(&w, &["sleep"]);
    let (pa1, pa2, pb1) = (a1.id(), a2.id(), b1.id());
    // `spawn` moves the child into its cgroup from the child's side: wait until it has.
    for (pid, cg) in [(pa1, &a.rel), (pb1, &b.rel), (pa2, &a.rel)] {
        wait_for(Duration::from_secs(5), || {
            let t = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
            t.lines()
                .any(|l| l.ends_with(&format!(":{cg}")))
                .then_some(())
        })
        .unwrap_or_else(|| panic!("pid {pid} never entered {cg}"));
    }

    let points = trace_points();
    let (epoch, step) = (now_ms(), 1500u64);
    let trace =
        workspace_root().join("tests/fake-nvml/traces/alibaba_gpu_util_mean_57s_head120.csv");
    let script = json!({
        "driver_version": "550.54.15",
        "epoch_ms": epoch,
        "gpus": [
            {
                "uuid": UUID0, "name": "NVIDIA H200", "pci_bus_id": "00000000:19:00.0",
                "memory_total": 150_754_820_096u64, "memory_used": 30_000_000_000u64,
                "utilization": {"trace": trace, "scale": 5.0, "step_ms": step},
                "memory_utilization": 35, "sm_clock_mhz": 1980, "memory_clock_mhz": 2619,
                "power_mw": 412_250, "power_limit_mw": 700_000, "temperature_c": 47,
                "ecc_corrected": 4, "throttle_reasons": 4,
                "gpm": {"sm_util": 61.5, "tensor_util": 22.5, "sm_occupancy": 40, "dram_bw_util": 55},
                "processes": [
                    {"pid": pa1, "memory_used": 10_000_000_000u64, "sm_util": 30, "mem_util": 12},
                    {"pid": pa2, "memory_used": 5_000_000_000u64, "sm_util": 20, "mem_util": 8},
                    {"pid": pb1, "memory_used": 2_000_000_000u64, "sm_util": 40, "mem_util": 10}
                ]
            },
            {
                "uuid": UUID1, "name": "NVIDIA H200", "pci_bus_id": "00000000:3B:00.0",
                "memory_used": 8_000_000_000u64, "utilization": 77, "memory_utilization": 18,
                "mig_mode": 1, "mig_instances": 2, "pcie_tx_kbps": 500, "pcie_rx_kbps": 250,
                "retired_pages_dbe": 1, "remapped_correctable": 2, "ecc_uncorrected": 1,
                "xids": [{"seq": 1, "xid": 13}],
                "processes": [{"pid": pb1, "memory_used": 1_000_000_000u64, "sm_util": 50}]
            }
        ]
    });
    let fake = Fake::new(&script);
    let agent = Agent::start(&[
        "--nvml-library",
        &fake.lib(),
        "--include-cgroup",
        "/headroom-test-*",
        "--sample-interval",
        "0.5",
    ]);
    let m = wait_for(Duration::from_secs(15), || {
        let m = agent.metrics();
        let ready = value(&m, "headroom_gpu_gpm_sm_activity_ratio", &[("UUID", UUID0)]).is_some()
            && find(
                &m,
                "headroom_gpu_container_memory_used_bytes",
                &[("cgroup", &a.rel)],
            )
            .len()
                == 1
            && value(
                &m,
                "headroom_gpu_container_sm_utilization_ratio",
                &[("UUID", UUID1), ("cgroup", &b.rel)],
            ) == Some(0.5);
        ready.then_some(m)
    })
    .unwrap_or_else(|| panic!("GPU metrics incomplete: {}", agent.log_text()));
    let t_scrape = now_ms();

    // DCGM-exporter labels on every per-GPU series.
    let u0 = find(&m, "headroom_gpu_utilization_ratio", &[("UUID", UUID0)]);
    assert_eq!(u0.len(), 1);
    let l = &u0[0].labels;
    assert_eq!(l.get("gpu").map(String::as_str), Some("0"));
    assert_eq!(
        l.get("pci_bus_id").map(String::as_str),
        Some("00000000:19:00.0")
    );
    assert_eq!(l.get("modelName").map(String::as_str), Some("NVIDIA H200"));
    assert!(l.get("Hostname").is_some_and(|h| !h.is_empty()), "{l:?}");

    // The replayed trace: the scraped value is the trace point at sample time (within a step).
    let idx = |t: u64| (t.saturating_sub(epoch) / step) as usize % points.len();
    let expect: Vec<f64> = [
        t_scrape.saturating_sub(1500),
        t_scrape.saturating_sub(750),
        t_scrape,
    ]
    .iter()
    .map(|t| (points[idx(*t)] * 5.0).round().clamp(0.0, 100.0) / 100.0)
    .collect();
    assert!(
        expect.iter().any(|e| (e - u0[0].value).abs() < 1e-9),
        "utilisation {} vs trace {expect:?}",
        u0[0].value
    );
    let g0 = [("UUID", UUID0)];
    let g1 = [("UUID", UUID1)];
    assert_eq!(value(&m, "headroom_gpu_utilization_ratio", &g1), Some(0.77));
    assert_eq!(
        value(&m, "headroom_gpu_memory_utilization_ratio", &g0),
        Some(0.35)
    );
    assert_eq!(value(&m, "headroom_gpu_memory_used_bytes", &g0), Some(30e9));
    assert_eq!(
        value(&m, "headroom_gpu_memory_total_bytes", &g0),
        Some(150_754_820_096.0)
    );
    assert_eq!(
        value(&m, "headroom_gpu_memory_free_bytes", &g0),
        Some(150_754_820_096.0 - 30e9)
    );
    assert_eq!(value(&m, "headroom_gpu_memory_used_bytes", &g1), Some(8e9));
    assert_eq!(value(&m, "headroom_gpu_sm_clock_hertz", &g0), Some(1980e6));
    assert_eq!(
        value(&m, "headroom_gpu_memory_clock_hertz", &g0),
        Some(2619e6)
    );
    assert_eq!(value(&m, "headroom_gpu_power_watts", &g0), Some(412.25));
    assert_eq!(
        value(&m, "headroom_gpu_power_limit_watts", &g0),
        Some(700.0)
    );
    assert_eq!(
        value(&m, "headroom_gpu_temperature_celsius", &g0),
        Some(47.0)
    );
    assert!(value(&m, "headroom_gpu_energy_joules_total", &g0).is_some_and(|j| j > 0.0));
    assert_eq!(
        value(
            &m,
            "headroom_gpu_ecc_errors_total",
            &[("UUID", UUID0), ("type", "corrected")]
        ),
        Some(4.0)
    );
    assert_eq!(
        value(
            &m,
            "headroom_gpu_throttle_reason_active",
            &[("UUID", UUID0), ("reason", "sw_power_cap")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&m, "headroom_gpu_gpm_sm_activity_ratio", &g0),
        Some(0.615)
    );
    assert_eq!(
        value(&m, "headroom_gpu_gpm_tensor_activity_ratio", &g0),
        Some(0.225)
    );
    assert_eq!(value(&m, "headroom_gpu_gpm_sm_activity_ratio", &g1), None);
    assert_eq!(value(&m, "headroom_gpu_mig_enabled", &g1), Some(1.0));
    assert_eq!(value(&m, "headroom_gpu_mig_instances", &g1), Some(2.0));
    assert_eq!(value(&m, "headroom_gpu_mig_enabled", &g0), Some(0.0));
    assert_eq!(
        value(&m, "headroom_gpu_pcie_tx_bytes_per_second", &g1),
        Some(500.0 * 1024.0)
    );
    assert_eq!(
        value(&m, "headroom_gpu_pcie_rx_bytes_per_second", &g1),
        Some(250.0 * 1024.0)
    );
    assert_eq!(
        value(
            &m,
            "headroom_gpu_retired_pages",
            &[("UUID", UUID1), ("cause", "double_bit")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &m,
            "headroom_gpu_remapped_rows",
            &[("UUID", UUID1), ("type", "correctable")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &m,
            "headroom_gpu_ecc_errors_total",
            &[("UUID", UUID1), ("type", "uncorrected")]
        ),
        Some(1.0)
    );
    // XID 13 is an application error: counted, and the GPU stays healthy.
    assert_eq!(value(&m, "headroom_gpu_xid_errors_total", &g1), Some(1.0));
    assert_eq!(value(&m, "headroom_gpu_last_xid", &g1), Some(13.0));
    assert_eq!(value(&m, "headroom_gpu_healthy", &g0), Some(1.0));
    assert_eq!(value(&m, "headroom_gpu_healthy", &g1), Some(1.0));
    assert_eq!(value(&m, "headroom_gpu_nvml_up", &[]), Some(1.0));

    // Real processes in real cgroups: per process, then summed per container and GPU.
    for (pid, cg, mem) in [(pa1, &a.rel, 10e9), (pa2, &a.rel, 5e9), (pb1, &b.rel, 2e9)] {
        let p = find(
            &m,
            "headroom_gpu_process_memory_used_bytes",
            &[("UUID", UUID0), ("pid", &pid.to_string())],
        );
        assert_eq!(p.len(), 1, "pid {pid}");
        assert_eq!(p[0].labels.get("cgroup"), Some(cg), "pid {pid}");
        assert_eq!(p[0].value, mem);
    }
    let p = [("UUID", UUID0), ("pid", &*pa1.to_string())];
    assert_eq!(
        value(&m, "headroom_gpu_process_sm_utilization_ratio", &p),
        Some(0.30)
    );
    assert_eq!(
        value(&m, "headroom_gpu_process_memory_utilization_ratio", &p),
        Some(0.12)
    );
    let ca = [("UUID", UUID0), ("cgroup", a.rel.as_str())];
    assert_eq!(
        value(&m, "headroom_gpu_container_memory_used_bytes", &ca),
        Some(15e9)
    );
    let sm = value(&m, "headroom_gpu_container_sm_utilization_ratio", &ca).expect("sm a");
    assert!((sm - 0.5).abs() < 1e-9, "{sm}");
    assert_eq!(
        value(&m, "headroom_gpu_container_processes", &ca),
        Some(2.0)
    );
    let cb0 = [("UUID", UUID0), ("cgroup", b.rel.as_str())];
    let cb1 = [("UUID", UUID1), ("cgroup", b.rel.as_str())];
    assert_eq!(
        value(&m, "headroom_gpu_container_memory_used_bytes", &cb0),
        Some(2e9)
    );
    assert_eq!(
        value(&m, "headroom_gpu_container_memory_used_bytes", &cb1),
        Some(1e9)
    );

    // Into history: per-GPU and per-container series.
    std::thread::sleep(Duration::from_secs(1));
    let h = agent.json(&format!(
        "/v1/history?name=container_gpu_memory_used_bytes&cgroup={}&UUID={UUID0}",
        a.rel
    ));
    let fine = h["series"][0]["fine"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        // History keeps f32 values.
        fine.iter().any(|p| p[1]
            .as_f64()
            .is_some_and(|v| (v - 15e9).abs() < 15e9 * 1e-6)),
        "container GPU memory history: {h}"
    );
    let h = agent.json(&format!(
        "/v1/history?name=gpu_utilization_ratio&UUID={UUID1}"
    ));
    let fine = h["series"][0]["fine"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        fine.iter()
            .any(|p| p[1].as_f64().is_some_and(|v| (v - 0.77).abs() < 1e-6)),
        "GPU history: {h}"
    );

    // promtool: clean except for DCGM-exporter's camelCase `modelName`, kept for dashboards.
    let (_, body) = agent.get("/metrics");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    std::io::Write::write_all(promtool.stdin.as_mut().expect("stdin"), body.as_bytes())
        .expect("feed promtool");
    let out = promtool.wait_with_output().expect("promtool output");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let other: Vec<&str> = printed
        .lines()
        .filter(|l| !l.contains("label names should be written in 'snake_case' not 'camelCase'"))
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(other.is_empty(), "promtool check metrics: {printed}");

    for c in [&mut a1, &mut a2, &mut b1] {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// On pure cgroup v2, containerd gives a non-privileged pod a private cgroup namespace, so the
/// agent reads other pods' processes as `/../<path>`. Reproduced with `unshare --cgroup` from a
/// cgroup of the agent's own: GPU processes must still land on their containers.
#[test]
fn gpu_processes_resolve_from_a_private_cgroup_namespace() {
    let test = "gpu_processes_resolve_from_a_private_cgroup_namespace";
    if !require_root(test) || !require_tool(test, "unshare") {
        return;
    }
    let w = workload_binary();
    let a = TestCgroup::create("nsgpu-a", true, false);
    let own = TestCgroup::create("nsagent", true, false);
    let mut p = a.spawn(&w, &["sleep"]);
    let pid = p.id();
    wait_for(Duration::from_secs(5), || {
        let t = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        t.lines()
            .any(|l| l.ends_with(&format!(":{}", a.rel)))
            .then_some(())
    })
    .expect("the workload entered its cgroup");
    let fake = Fake::new(&json!({"gpus": [{
        "uuid": UUID0, "pci_bus_id": "00000000:19:00.0", "utilization": 40,
        "memory_used": 9_000_000_000u64,
        "processes": [{"pid": pid, "memory_used": 6_000_000_000u64, "sm_util": 35}]
    }]}));
    let procs = own
        .procs_files()
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" ");
    let script = format!("for f in {procs}; do echo $$ > $f; done; exec unshare --cgroup \"$@\"");
    let agent = Agent::start_wrapped(
        &["sh", "-c", &script, "sh"],
        &[
            "--nvml-library",
            &fake.lib(),
            "--include-cgroup",
            "/headroom-test-*",
            "--sample-interval",
            "0.5",
        ],
    );
    // The agent really is in a namespace: its view of the workload is relative.
    let own_view = std::process::Command::new("nsenter")
        .args([
            "-t",
            &agent.pid().to_string(),
            "-C",
            "cat",
            &format!("/proc/{pid}/cgroup"),
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(
        own_view.contains("/.."),
        "the agent's cgroup namespace shows {own_view:?}"
    );
    let used = wait_for(Duration::from_secs(15), || {
        value(
            &agent.metrics(),
            "headroom_gpu_container_memory_used_bytes",
            &[("cgroup", &a.rel), ("UUID", UUID0)],
        )
    });
    assert_eq!(
        used,
        Some(6_000_000_000.0),
        "GPU memory of {} not attributed: {}",
        a.rel,
        agent.log_text()
    );
    let _ = p.kill();
    let _ = p.wait();
}

fn two_gpus() -> Value {
    json!({"gpus": [
        {"uuid": UUID0, "pci_bus_id": "00000000:19:00.0", "utilization": 10, "memory_used": 1_000_000u64},
        {"uuid": UUID1, "pci_bus_id": "00000000:3B:00.0", "utilization": 20, "memory_used": 2_000_000u64}
    ]})
}

#[test]
fn gpu_faults_leave_the_agent_serving_and_recover() {
    let base = two_gpus();
    let fake = Fake::new(&base);
    let cfg = fake.dir.path().join("headroom.toml");
    std::fs::write(&cfg, "[gpu]\nxid_unhealthy_hold_s = 2.0\n").expect("write config");
    let agent = Agent::start(&[
        "--config",
        &cfg.display().to_string(),
        "--nvml-library",
        &fake.lib(),
        "--sample-interval",
        "0.5",
    ]);
    let healthy = |gpu: &str| value(&agent.metrics(), "headroom_gpu_healthy", &[("UUID", gpu)]);
    assert!(
        wait_for(Duration::from_secs(10), || (healthy(UUID1) == Some(1.0))
            .then_some(()))
        .is_some()
    );
    let faults = [
        (json!({"lost": true}), "GPU_IS_LOST"),
        (json!({"xids": [{"seq": 1, "xid": 79}]}), "XID 79"),
        (
            json!({"errors": {"nvmlDeviceGetPowerUsage": 999}}),
            "nvmlDeviceGetPowerUsage failed",
        ),
        (
            json!({"delays_ms": {"nvmlDeviceGetTemperature": 3000}}),
            "nvmlDeviceGetTemperature",
        ),
    ];
    for (fault, reason) in &faults {
        let mut s = base.clone();
        for (k, v) in fault.as_object().expect("object") {
            s["gpus"][1][k] = v.clone();
        }
        fake.write(&s);
        wait_for(Duration::from_secs(15), || {
            (healthy(UUID1) == Some(0.0)).then_some(())
        })
        .unwrap_or_else(|| panic!("{reason}: GPU 1 never unhealthy: {}", agent.log_text()));
        let m = agent.metrics();
        assert_eq!(
            value(&m, "headroom_gpu_healthy", &[("UUID", UUID0)]),
            Some(1.0),
            "{reason}"
        );
        assert_eq!(
            value(&m, "headroom_gpu_utilization_ratio", &[("UUID", UUID0)]),
            Some(0.10),
            "{reason}"
        );
        assert!(
            !find(&m, "headroom_node_cpus", &[]).is_empty(),
            "{reason}: node metrics gone"
        );
        let status = agent.json("/v1/status");
        assert_eq!(
            status["samplers"]["gpu"]["healthy"],
            json!(false),
            "{reason}: {status}"
        );
        fake.write(&base);
        wait_for(Duration::from_secs(20), || {
            (healthy(UUID1) == Some(1.0)).then_some(())
        })
        .unwrap_or_else(|| panic!("{reason}: GPU 1 never recovered: {}", agent.log_text()));
        assert_eq!(
            value(
                &agent.metrics(),
                "headroom_gpu_utilization_ratio",
                &[("UUID", UUID1)]
            ),
            Some(0.20)
        );
    }
    let log = agent.log_text();
    let down: Vec<&str> = log.lines().filter(|l| l.contains("is unhealthy")).collect();
    let up: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("is healthy again"))
        .collect();
    assert_eq!(down.len(), faults.len(), "one line per fault: {log}");
    assert_eq!(up.len(), faults.len(), "one line per recovery: {log}");
    for ((_, reason), line) in faults.iter().zip(&down) {
        assert!(
            line.contains(reason) && line.contains(UUID1),
            "{reason}: {line}"
        );
    }
}

#[test]
fn agent_without_a_driver_logs_once_and_serves() {
    let system_nvml = [
        "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
        "/usr/lib64/libnvidia-ml.so.1",
    ];
    if system_nvml.iter().any(|p| Path::new(p).exists()) {
        eprintln!("SKIP agent_without_a_driver: this machine has an NVIDIA driver");
        return;
    }
    let agent = Agent::start(&["--sample-interval", "0.5"]);
    std::thread::sleep(Duration::from_secs(3));
    let m = agent.metrics();
    assert_eq!(value(&m, "headroom_gpu_nvml_up", &[]), Some(0.0));
    assert!(find(&m, "headroom_gpu_utilization_ratio", &[]).is_empty());
    assert!(
        !find(&m, "headroom_node_cpus", &[]).is_empty(),
        "node metrics served"
    );
    let log = agent.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("no GPU found")).collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("libnvidia-ml.so.1"), "{}", lines[0]);
    let status = agent.json("/v1/status");
    assert_eq!(
        status["samplers"]["gpu"]["healthy"],
        json!(true),
        "{status}"
    );
}
