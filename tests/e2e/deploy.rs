//! How headroom is installed and looked at: the systemd units (`systemd-analyze verify` and
//! `security`), the sysusers/tmpfiles entries applied to a scratch root, the example
//! configuration, the agent's sd_notify protocol (READY, WATCHDOG, STOPPING) on a real notify
//! socket, the agent as `nobody` without capabilities, the Kubernetes manifests, the Grafana
//! dashboard in a real Prometheus, and the status page in headless Chromium.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use headroom_tests::*;

/// The unit as installed: its `/usr/local/bin/headroom` replaced by the binary just built, so
/// `verify` checks a command that exists. Nothing else in the unit changes.
fn installed_unit(dir: &Path, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(workspace_root().join("systemd").join(name))
        .unwrap_or_else(|e| panic!("read systemd/{name}: {e}"));
    assert!(
        text.contains("ExecStart=/usr/local/bin/headroom "),
        "{name}: ExecStart must run /usr/local/bin/headroom"
    );
    let bin = agent_binary();
    let out = dir.join(name);
    std::fs::write(
        &out,
        text.replace("/usr/local/bin/headroom", &bin.display().to_string()),
    )
    .expect("write unit copy");
    out
}

/// Overall exposure printed by `systemd-analyze security --offline=yes`.
fn security_score(unit: &Path) -> (f64, String) {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(unit)
        .output()
        .expect("run systemd-analyze security");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure in: {text}"));
    let score = line
        .split(':')
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("cannot read a score from `{line}`"));
    (score, line.trim().to_string())
}

#[test]
fn units_verify_clean_and_agent_is_hardened() {
    if !require_tool(
        "units_verify_clean_and_agent_is_hardened",
        "systemd-analyze",
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut scores = Vec::new();
    for name in ["headroom-agent.service", "headroom-aggregator.service"] {
        let unit = installed_unit(dir.path(), name);
        let out = Command::new("systemd-analyze")
            .args(["verify", "--no-pager"])
            .arg(&unit)
            .output()
            .expect("run systemd-analyze verify");
        // verify exits 0 on many problems; anything it prints is a problem.
        let printed = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            printed.trim().is_empty() && out.status.success(),
            "systemd-analyze verify {name}: {printed}"
        );
        let (score, line) = security_score(&unit);
        eprintln!("{name}: {line}");
        scores.push((name, score));
    }
    assert!(
        scores[0].1 <= 4.0,
        "agent exposure {} is above the 4.0 target",
        scores[0].1
    );
    assert!(
        scores[1].1 <= scores[0].1,
        "the aggregator needs no privilege, so it must score no worse than the agent: {scores:?}"
    );
    // The agent keeps only the capabilities its features need; the aggregator has none.
    let agent = std::fs::read_to_string(workspace_root().join("systemd/headroom-agent.service"))
        .expect("read agent unit");
    let caps = agent
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("agent unit bounds its capabilities");
    let mut caps: Vec<&str> = caps.split_whitespace().collect();
    caps.sort();
    assert_eq!(
        caps,
        [
            "CAP_BPF",
            "CAP_DAC_OVERRIDE",
            "CAP_DAC_READ_SEARCH",
            "CAP_PERFMON"
        ]
    );
    for must in [
        "Type=notify",
        "WatchdogSec=",
        "User=headroom",
        "NoNewPrivileges=yes",
    ] {
        assert!(agent.contains(must), "agent unit lacks {must}");
    }
}

#[test]
fn sysusers_and_tmpfiles_create_the_state_directory() {
    let test = "sysusers_and_tmpfiles_create_the_state_directory";
    if !require_tool(test, "systemd-sysusers") || !require_tool(test, "systemd-tmpfiles") {
        return;
    }
    if !require_root(test) {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(root.path().join("etc")).expect("mkdir etc");
    let run = |tool: &str, file: &str, extra: &[&str]| {
        let out = Command::new(tool)
            .arg(format!("--root={}", root.path().display()))
            .args(extra)
            .arg(workspace_root().join("systemd").join(file))
            .output()
            .unwrap_or_else(|e| panic!("run {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run("systemd-sysusers", "sysusers.d/headroom.conf", &[]);
    run(
        "systemd-tmpfiles",
        "tmpfiles.d/headroom.conf",
        &["--create"],
    );
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).expect("passwd");
    let entry = passwd
        .lines()
        .find(|l| l.starts_with("headroom:"))
        .unwrap_or_else(|| panic!("no headroom user in {passwd}"));
    let uid: u32 = entry
        .split(':')
        .nth(2)
        .and_then(|u| u.parse().ok())
        .expect("uid");
    assert!(uid > 0 && uid < 1000, "a system user: {entry}");
    use std::os::unix::fs::MetadataExt;
    let state = std::fs::metadata(root.path().join("var/lib/headroom")).expect("state dir made");
    assert!(state.is_dir());
    assert_eq!(state.uid(), uid, "state dir owned by the agent's user");
    assert_eq!(state.mode() & 0o777, 0o750);
}

#[test]
fn example_config_is_accepted() {
    let out = Command::new(agent_binary())
        .args(["agent", "--print-config", "--config"])
        .arg(workspace_root().join("systemd/headroom.toml"))
        .output()
        .expect("run headroom agent --print-config");
    assert!(
        out.status.success(),
        "systemd/headroom.toml rejected: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("state_dir = \"/var/lib/headroom\""),
        "{printed}"
    );
}

/// Datagrams received on `sock` until `until` returns true or `timeout` passes.
fn collect(
    sock: &UnixDatagram,
    timeout: Duration,
    until: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let mut got = Vec::new();
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < timeout && !until(&got) {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    got
}

#[test]
fn agent_notifies_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let port = free_port();
    let log = dir.path().join("agent.log");
    let mut child = Command::new(agent_binary())
        .args(["agent", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--sample-interval", "0.2"])
        .env("NOTIFY_SOCKET", &path)
        // A 2 s watchdog: pings are due at least every second.
        .env("WATCHDOG_USEC", "2000000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start the agent");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    let first = collect(&sock, Duration::from_secs(30), |g| !g.is_empty());
    assert!(
        first
            .first()
            .is_some_and(|m| m.lines().any(|l| l == "READY=1")),
        "first notification must carry READY=1: {first:?}; log: {}",
        log_text()
    );
    // READY is only sent once the first sample is published, so /readyz already answers.
    let (code, _) = http_get(port, "/readyz").expect("GET /readyz");
    assert_eq!(code, 200);
    let t0 = Instant::now();
    let pings = collect(&sock, Duration::from_secs(4), |g| {
        g.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3
    });
    let elapsed = t0.elapsed();
    let n = pings.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(
        n >= 3,
        "expected 3 watchdog pings within 4 s, got {pings:?}"
    );
    // One ping per half watchdog interval, not one per 0.2 s sample.
    assert!(
        elapsed >= Duration::from_millis(1800),
        "pings came too fast: {n} in {elapsed:?}"
    );
    assert!(
        !pings.iter().any(|m| m.contains("READY=1")),
        "READY sent twice"
    );

    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let stopping = collect(&sock, Duration::from_secs(10), |g| {
        g.iter().any(|m| m.contains("STOPPING=1"))
    });
    assert!(
        stopping.iter().any(|m| m.contains("STOPPING=1")),
        "no STOPPING=1 on SIGTERM: {stopping:?}"
    );
    let status = child.wait().expect("wait for the agent");
    assert!(
        status.success(),
        "agent exit: {status}; log: {}",
        log_text()
    );
}

#[test]
fn kubernetes_manifests_validate() {
    // kubernetes-validate is a pip package; its console script marks it installed.
    if !require_tool("kubernetes_manifests_validate", "kubernetes-validate") {
        return;
    }
    let out = Command::new("python3")
        .arg(workspace_root().join("scripts/validate-manifests.py"))
        .arg("--agent-bin")
        .arg(agent_binary())
        .output()
        .expect("run scripts/validate-manifests.py");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}");
    assert!(out.status.success(), "manifest validation failed:\n{text}");
    // Every manifest file took part, for both Kubernetes versions.
    for dir in ["deploy", "deploy/optional"] {
        for f in std::fs::read_dir(workspace_root().join(dir)).expect(dir) {
            let name = f.expect("entry").file_name().to_string_lossy().into_owned();
            if name.ends_with(".yaml") && name != "kustomization.yaml" {
                assert!(
                    text.contains(&format!("{dir}/{name}")),
                    "{dir}/{name} not checked"
                );
            }
        }
    }
    assert!(text.contains("Kubernetes 1.30.0 --strict"));
    assert!(text.contains("ScaledObject/llm-serve (documented spec"));
    assert!(text.contains("(accepted by the agent)"));
}

/// A private copy of the fake NVML (`tests/fake-nvml`) as `libnvidia-ml.so.1` in `dir`, with a
/// script beside it: two H200s, one replaying a real GPU utilisation trace, `pid` using both.
fn fake_nvml(dir: &Path, pid: u32) -> PathBuf {
    let lib = dir.join("libnvidia-ml.so.1");
    std::fs::copy(fake_nvml_lib(), &lib).expect("copy the fake NVML");
    let trace =
        workspace_root().join("tests/fake-nvml/traces/alibaba_gpu_util_mean_57s_head120.csv");
    let script = serde_json::json!({
        "driver_version": "550.54.15",
        "gpus": [
            {
                "uuid": "GPU-6f1b2c3d-0000-4000-8000-000000000000", "name": "NVIDIA H200",
                "pci_bus_id": "00000000:19:00.0", "memory_total": 150_754_820_096u64,
                "memory_used": {"trace": trace, "scale": 1.0e9, "step_ms": 250},
                "utilization": {"trace": trace, "scale": 5.0, "step_ms": 250},
                "power_mw": 412_250, "power_limit_mw": 700_000, "temperature_c": 47,
                "processes": [{"pid": pid, "memory_used": 10_000_000_000u64, "sm_util": 30, "mem_util": 12}]
            },
            {
                "uuid": "GPU-6f1b2c3d-0001-4000-8000-000000000000", "name": "NVIDIA H200",
                "pci_bus_id": "00000000:3B:00.0", "memory_total": 150_754_820_096u64,
                "memory_used": 8_000_000_000u64, "utilization": 77,
                "power_mw": 300_000, "power_limit_mw": 700_000, "temperature_c": 41,
                "processes": [{"pid": pid, "memory_used": 2_000_000_000u64, "sm_util": 50}]
            }
        ]
    });
    std::fs::write(
        dir.join("fake-nvml.json"),
        serde_json::to_vec_pretty(&script).expect("json"),
    )
    .expect("write the fake NVML script");
    lib
}

/// Waits until `pid` is in the cgroup `rel` (the workload moves itself in after it starts).
fn wait_in_cgroup(pid: u32, rel: &str) {
    wait_for(Duration::from_secs(5), || {
        let t = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        t.lines()
            .any(|l| l.ends_with(&format!(":{rel}")))
            .then_some(())
    })
    .unwrap_or_else(|| panic!("pid {pid} never entered {rel}"));
}

#[test]
fn status_page_plots_real_containers_in_chromium() {
    let test = "status_page_plots_real_containers_in_chromium";
    if !require_root(test) || !require_tool(test, "chromium") {
        return;
    }
    let w = workload_binary();
    let busy = TestCgroup::create("page-busy", true, false);
    busy.write("cpu", "cpu.cfs_period_us", "100000");
    busy.write("cpu", "cpu.cfs_quota_us", "40000");
    let mem = TestCgroup::create("page-mem", true, false);
    let mut burner = busy.spawn(&w, &["burn", "1"]);
    let mut allocator = mem.spawn(&w, &["alloc", "64"]);
    wait_in_cgroup(burner.id(), &busy.rel);
    let nvml_dir = tempfile::tempdir().expect("tempdir");
    let nvml = fake_nvml(nvml_dir.path(), burner.id());
    let agent = Agent::start(&[
        "--nvml-library",
        &nvml.display().to_string(),
        "--include-cgroup",
        &format!("/headroom-test-{}-page-*", std::process::id()),
        "--sample-interval",
        "0.25",
        // The policy watches the throttled burner and decides, writing nothing (observe).
        "--mode",
        "observe",
        "--manage",
        &busy.rel,
    ]);
    // Twenty-odd samples: enough for lines, short enough for CI.
    std::thread::sleep(Duration::from_secs(6));
    let decided = wait_for(Duration::from_secs(30), || {
        let v = agent.json(&format!("/v1/decisions?container={}", busy.rel));
        (!v["decisions"].as_array()?.is_empty()).then_some(())
    });
    assert!(
        decided.is_some(),
        "the policy made no decision about the throttled burner: {}",
        agent.log_text()
    );

    let profile = tempfile::tempdir().expect("chromium profile");
    let url = format!("http://127.0.0.1:{}/", agent.port);
    let dom = chromium(profile.path())
        .arg("--dump-dom")
        .arg(&url)
        .stderr(Stdio::null())
        .output()
        .expect("run chromium --dump-dom");
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    assert!(
        dom.contains("<svg class=\"plot\""),
        "no plot rendered by Chromium: {}",
        &dom[..dom.len().min(2000)]
    );
    // Node plots and both containers' demand lines hold data points, as the browser parsed them.
    assert!(dom.contains("<h2 class=\"section\">Node</h2>"));
    for (cg, what) in [(&busy.rel, "CPU"), (&mem.rel, "memory")] {
        let pts = plotted_points(&dom, cg, "demand");
        assert!(
            pts.iter().sum::<usize>() >= 10,
            "{cg}: demand lines {pts:?} should hold the samples taken; log: {}",
            agent.log_text()
        );
        assert!(dom.contains(what), "{what} panel missing");
    }
    // Both fake GPUs get a section with data, and the burner's use of each is its own panel.
    assert_eq!(
        dom.matches("<section class=\"group gpu\">").count(),
        2,
        "two GPU sections"
    );
    for gpu in ["GPU 0", "GPU 1"] {
        let pts = plotted_points(&dom, gpu, "demand");
        assert!(pts.iter().sum::<usize>() >= 10, "{gpu}: {pts:?}");
    }
    let busy_html = {
        let s = &dom[dom
            .find(&format!("<h3>{}</h3>", busy.rel))
            .expect("busy section")..];
        s[..s.find("</section>").unwrap_or(s.len())].to_string()
    };
    assert!(
        busy_html.contains("GPU utilisation on GPU 0"),
        "per-GPU container panel"
    );
    assert!(
        busy_html.contains("GPU memory on GPU 1"),
        "per-GPU container panel"
    );
    // The policy's decision about the burner is marked on its timeline, with its reason.
    assert!(
        busy_html.contains("class=\"decision\"") && busy_html.contains("(not applied"),
        "decision mark on the burner's plot"
    );
    // The quota is a history series: drawn as a line over time, not only as today's value.
    assert!(
        busy_html.contains("class=\"capacity\" data-points="),
        "CPU capacity line"
    );
    // The quota the test set is the applied CPU capacity: 0.40 cores.
    let busy_section = &dom[dom
        .find(&format!("<h3>{}</h3>", busy.rel))
        .expect("busy section")..];
    assert!(
        busy_section[..busy_section
            .find("</section>")
            .unwrap_or(busy_section.len())]
            .contains("capacity 0.40 cores"),
        "CPU quota shown as capacity"
    );

    let shot = screenshot_dir().join("status-page-agent.png");
    let _ = std::fs::remove_file(&shot);
    let out = chromium(profile.path())
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&url)
        .stderr(Stdio::null())
        .output()
        .expect("run chromium --screenshot");
    assert!(out.status.success(), "chromium --screenshot failed");
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real PNG"
    );
    eprintln!("screenshot: {}", shot.display());
    let _ = burner.kill();
    let _ = allocator.kill();
    let _ = burner.wait();
    let _ = allocator.wait();
}

fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| dashboard_exprs(x, out)),
        _ => {}
    }
}

/// `headroom_*` identifiers in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(p) = expr[i..].find("headroom_") {
        let s = i + p;
        let mut e = s;
        while e < b.len() && (b[e].is_ascii_alphanumeric() || b[e] == b'_') {
            e += 1;
        }
        out.push(expr[s..e].to_string());
        i = e;
    }
    out
}

/// The family a sample name belongs to, as the code spells it.
fn family(name: &str) -> &str {
    for suffix in ["_bucket", "_count", "_sum", "_total"] {
        if let Some(f) = name.strip_suffix(suffix) {
            return f;
        }
    }
    name
}

/// `"headroom_..."` string literals in the workspace's Rust sources.
fn source_metric_names() -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut stack: Vec<PathBuf> = ["agent", "aggregator", "ebpf", "models"]
        .iter()
        .map(|d| workspace_root().join(d))
        .filter(|d| d.is_dir())
        .collect();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read source dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                for n in metric_names(&text) {
                    if text.contains(&format!("\"{n}\"")) {
                        names.insert(n);
                    }
                }
            }
        }
    }
    names
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn grafana_dashboard_names_exported_metrics_and_runs_in_prometheus() {
    let test = "grafana_dashboard_names_exported_metrics_and_runs_in_prometheus";
    if !require_root(test) || !require_tool(test, "prometheus") {
        return;
    }
    let text = std::fs::read_to_string(workspace_root().join("deploy/grafana/headroom.json"))
        .expect("read deploy/grafana/headroom.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    assert_eq!(dash["uid"], "headroom");
    let mut exprs = Vec::new();
    dashboard_exprs(&dash, &mut exprs);
    assert!(exprs.len() >= 30, "{} expressions", exprs.len());

    // A container with a CPU quota and a memory limit, so ratio panels have both sides.
    let w = workload_binary();
    let cg = TestCgroup::create("dash", true, false);
    cg.write("cpu", "cpu.cfs_period_us", "100000");
    cg.write("cpu", "cpu.cfs_quota_us", "50000");
    cg.write("memory", "memory.limit_in_bytes", "536870912");
    let mut burner = cg.spawn(&w, &["burn", "1"]);
    wait_in_cgroup(burner.id(), &cg.rel);
    let nvml_dir = tempfile::tempdir().expect("tempdir");
    let nvml = fake_nvml(nvml_dir.path(), burner.id());
    // A real aggregator the agent reports to, so the scaling panels have workloads.
    let agg_dir = tempfile::tempdir().expect("tempdir");
    let token = agg_dir.path().join("token");
    std::fs::write(&token, "dashboard-test-token\n").expect("write token");
    let (agg_port, agg_grpc) = (free_port(), free_port());
    let mut aggregator = Command::new(agent_binary())
        .args(["aggregator", "--listen", &format!("127.0.0.1:{agg_port}")])
        .args(["--grpc-listen", &format!("127.0.0.1:{agg_grpc}")])
        .arg("--token-file")
        .arg(&token)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the aggregator");
    let agg_ready = wait_for(Duration::from_secs(30), || {
        matches!(http_get(agg_port, "/readyz"), Ok((200, _))).then_some(())
    });
    assert!(agg_ready.is_some(), "aggregator not ready");
    let agent = Agent::start(&[
        "--nvml-library",
        &nvml.display().to_string(),
        "--include-cgroup",
        &cg.rel,
        "--sample-interval",
        "0.5",
        "--aggregator",
        &format!("http://127.0.0.1:{agg_port}"),
        "--aggregator-token-file",
        &token.display().to_string(),
    ]);
    // The aggregator knows a workload once the agent's first batches arrive.
    let reported = wait_for(Duration::from_secs(30), || {
        let (code, body) = http_get(agg_port, "/v1/workloads").ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (code == 200 && !v["workloads"].as_array()?.is_empty()).then_some(())
    });
    assert!(
        reported.is_some(),
        "no workload reached the aggregator: {}",
        agent.log_text()
    );
    // Ratios since the previous sample need two samples.
    std::thread::sleep(Duration::from_secs(2));
    let (_, agg_metrics) = http_get(agg_port, "/metrics").expect("aggregator /metrics");
    let live: std::collections::BTreeSet<String> = agent
        .metrics()
        .into_iter()
        .chain(parse_metrics(&agg_metrics))
        .map(|s| family(&s.name).to_string())
        .collect();
    let source = source_metric_names();

    // 1. Every name the dashboard uses is exported: scraped now, or in the code.
    let mut unknown = Vec::new();
    for e in &exprs {
        for n in metric_names(e) {
            let f = family(&n);
            if !live.contains(f) && !source.contains(f) {
                unknown.push(format!("{n} in `{e}`"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "names neither exported nor in the code:\n{}",
        unknown.join("\n")
    );

    // 2. Every expression parses and runs in a real Prometheus scraping the agent and the
    // aggregator.
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: headroom\n    static_configs:\n      - targets: ['127.0.0.1:{}', '127.0.0.1:{}']\n",
            agent.port, agg_port
        ),
    )
    .expect("write prometheus.yml");
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    let query = |q: &str| -> Option<serde_json::Value> {
        let (_, body) = http_get(port, &format!("/api/v1/query?query={}", url_encode(q))).ok()?;
        serde_json::from_str(&body).ok()
    };
    let scraped = wait_for(Duration::from_secs(60), || {
        let v = query("headroom_node_cpus")?;
        (!v["data"]["result"].as_array()?.is_empty()).then_some(())
    });
    assert!(scraped.is_some(), "Prometheus never scraped the agent");
    // rate() needs two samples inside its window.
    std::thread::sleep(Duration::from_secs(4));
    let mut failures = Vec::new();
    let mut with_data = 0;
    for e in &exprs {
        let q = if let Some(inner) = e
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
        {
            // Grafana's label_values(metric, label): the metric selector is the query.
            inner.split(',').next().unwrap_or(inner).trim().to_string()
        } else {
            e.clone()
        };
        let q = q
            .replace("$__rate_interval", "30s")
            .replace("$__range", "5m")
            .replace("$instance", ".*")
            .replace("$namespace", ".*")
            .replace("$workload", ".*");
        let Some(v) = query(&q) else {
            failures.push(format!("no answer for `{q}`"));
            continue;
        };
        if v["status"] != "success" {
            failures.push(format!("`{q}`: {}", v["error"]));
            continue;
        }
        let rows = v["data"]["result"].as_array().map_or(0, Vec::len);
        // Expressions over what this agent exports must return data (a filter like `> 0`
        // legitimately returns nothing on a quiet node).
        let all_live = metric_names(&q).iter().all(|n| live.contains(family(n)));
        if all_live && !q.contains("> 0") && rows == 0 {
            failures.push(format!(
                "`{q}` returned no data although the agent exports it"
            ));
        }
        if rows > 0 {
            with_data += 1;
        }
    }
    let _ = prom.kill();
    let _ = prom.wait();
    let _ = aggregator.kill();
    let _ = aggregator.wait();
    let _ = burner.kill();
    let _ = burner.wait();
    eprintln!(
        "{} dashboard expressions ran; {with_data} returned data from one agent and an aggregator",
        exprs.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn agent_runs_unprivileged_and_names_each_missing_capability_once() {
    let test = "agent_runs_unprivileged_and_names_each_missing_capability_once";
    if !require_root(test) {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    const NOBODY: u32 = 65534;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // Runtime state as runc leaves it: a root-only directory.
    let runc = dir.path().join("runc");
    std::fs::create_dir(&runc).expect("mkdir runc");
    std::fs::set_permissions(&runc, std::fs::Permissions::from_mode(0o700)).expect("chmod runc");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("mkdir state");
    // SAFETY: chown of a directory this test created.
    let c = std::ffi::CString::new(state.display().to_string()).expect("path");
    assert_eq!(unsafe { libc::chown(c.as_ptr(), NOBODY, NOBODY) }, 0);
    let config = dir.path().join("headroom.toml");
    std::fs::write(
        &config,
        format!(
            "[cgroup]\nruntime_state_dirs = [\"{}\"]\n[ebpf]\nenabled = true\n",
            runc.display()
        ),
    )
    .expect("write config");
    let port = free_port();
    let log = dir.path().join("agent.log");
    let mut cmd = Command::new(agent_binary());
    cmd.args(["agent", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(&state)
        .args(["--sample-interval", "0.25"])
        .env("HEADROOM_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"));
    // SAFETY: only async-signal-safe calls between fork and exec. Leaving uid 0 clears the
    // permitted and effective capability sets.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("start the agent as nobody");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let ready = wait_for(Duration::from_secs(30), || {
        matches!(http_get(port, "/readyz"), Ok((200, _))).then_some(())
    });
    assert!(
        ready.is_some(),
        "unprivileged agent never ready: {}",
        log_text()
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).expect("status");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains(&NOBODY.to_string())),
        "not running as nobody"
    );
    assert!(
        status.lines().any(|l| l == "CapEff:\t0000000000000000"),
        "has capabilities"
    );
    // Sampling goes on: more samples, metrics and the status page are served.
    std::thread::sleep(Duration::from_secs(3));
    let (code, metrics) = http_get(port, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200);
    let samples = parse_metrics(&metrics);
    let passes = find(&samples, "headroom_agent_samples_total", &[]);
    assert!(passes.first().is_some_and(|s| s.value >= 5.0), "{passes:?}");
    let (code, page) = http_get(port, "/").expect("GET /");
    assert_eq!(code, 200);
    assert!(page.contains("data-points"), "status page without plots");
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let exit = child.wait().expect("wait");
    let text = log_text();
    assert!(exit.success(), "exit {exit}: {text}");
    // Each missing capability is named once, however many samples were taken.
    for (cap, what) in [
        ("CAP_BPF", "eBPF probes"),
        ("CAP_DAC_READ_SEARCH", "runtime state"),
    ] {
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(cap)).collect();
        assert_eq!(lines.len(), 1, "{what}: {cap} should be named once: {text}");
        assert!(lines[0].contains("WARN"), "{}", lines[0]);
    }
    assert!(
        text.contains(&runc.display().to_string()),
        "the unreadable directory is named"
    );
}
