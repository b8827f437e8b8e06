//! The agent on a real node: real cgroups and processes, a real runc container, a real
//! Prometheus server, restarts with saved state, and the CLI's error paths.

use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use headroom_tests::*;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Mean of the agent's fine history points of `name` for `cgroup` within `[from, to]` ms.
fn history_mean(agent: &Agent, name: &str, cgroup: &str, from: u64, to: u64) -> Option<f64> {
    let v = agent.json(&format!("/v1/history?name={name}&cgroup={cgroup}"));
    let series = v["series"].as_array()?.first()?.clone();
    let pts: Vec<f64> = series["fine"]
        .as_array()?
        .iter()
        .filter_map(|p| {
            let t = p[0].as_u64()?;
            let v = p[1].as_f64()?;
            (t >= from && t <= to).then_some(v)
        })
        .collect();
    (!pts.is_empty()).then(|| pts.iter().sum::<f64>() / pts.len() as f64)
}

#[test]
fn container_cpu_and_memory_match_proc() {
    if !require_root("container_cpu_and_memory_match_proc") {
        return;
    }
    let (v1, v2) = hierarchies();
    let w = workload_binary();
    // A quota keeps the v1 burner's rate steady whatever else runs on the machine.
    let burn = TestCgroup::create("burn", true, false);
    burn.write("cpu", "cpu.cfs_period_us", "100000");
    burn.write("cpu", "cpu.cfs_quota_us", "50000");
    let alloc = TestCgroup::create("alloc", true, false);
    let burn_v2 =
        (v2.is_some() && !v1.is_empty()).then(|| TestCgroup::create("burnv2", false, true));

    let mut burner = burn.spawn(&w, &["burn", "1"]);
    let mut allocator = alloc.spawn(&w, &["alloc", "128"]);
    let mut burner_v2 = burn_v2.as_ref().map(|c| c.spawn(&w, &["burn", "1"]));

    let agent = Agent::start(&[
        "--include-cgroup",
        "/headroom-test-*",
        "--sample-interval",
        "0.5",
    ]);
    std::thread::sleep(Duration::from_secs(2));
    let t1 = now_ms();
    let i1 = Instant::now();
    let c1 = proc_cpu_seconds(burner.id());
    let c1v2 = burner_v2.as_ref().map(|b| proc_cpu_seconds(b.id()));
    std::thread::sleep(Duration::from_secs(8));
    let c2 = proc_cpu_seconds(burner.id());
    let c2v2 = burner_v2.as_ref().map(|b| proc_cpu_seconds(b.id()));
    let wall = i1.elapsed().as_secs_f64();
    let t2 = now_ms();

    let check = |label: &str, cg: &str, proc_cores: f64| {
        let agent_cores = history_mean(&agent, "container_cpu_usage_cores", cg, t1, t2)
            .unwrap_or_else(|| panic!("{label}: no CPU history for {cg}: {}", agent.log_text()));
        let err = (agent_cores - proc_cores).abs() / proc_cores;
        eprintln!(
            "{label}: agent {agent_cores:.3} cores, /proc {proc_cores:.3} cores, error {:.1} %",
            err * 100.0
        );
        assert!(
            err <= 0.10,
            "{label}: agent {agent_cores} vs /proc {proc_cores}"
        );
    };
    check("v1 burner", &burn.rel, (c2 - c1) / wall);
    if let (Some(cg), Some(a), Some(b)) = (&burn_v2, c1v2, c2v2) {
        check("v2 burner", &cg.rel, (b - a) / wall);
    }

    let samples = agent.metrics();
    let ws = find(
        &samples,
        "headroom_container_memory_working_set_bytes",
        &[("cgroup", &alloc.rel)],
    );
    assert_eq!(ws.len(), 1, "working set of {}", alloc.rel);
    // The process's own memory is its anonymous resident set; its shared-library pages were
    // read into the page cache (and charged) by whoever ran those libraries first.
    let anon = proc_status_bytes(allocator.id(), "RssAnon") as f64;
    let rss = proc_status_bytes(allocator.id(), "VmRSS") as f64;
    let err = (ws[0].value - anon).abs() / anon;
    eprintln!(
        "allocator: agent working set {} bytes, /proc RssAnon {anon} bytes (VmRSS {rss}), error {:.2} %",
        ws[0].value,
        err * 100.0
    );
    assert!(
        err <= 0.05,
        "memory: agent {} vs RssAnon {anon}",
        ws[0].value
    );
    let quota = find(
        &samples,
        "headroom_container_cpu_quota_cores",
        &[("cgroup", &burn.rel)],
    );
    assert_eq!(quota.first().map(|s| s.value), Some(0.5));
    let periods = find(
        &samples,
        "headroom_container_cpu_periods_total",
        &[("cgroup", &burn.rel)],
    );
    assert!(periods.first().is_some_and(|s| s.value > 0.0));

    // A container that disappears between samples drops out without errors.
    let _ = allocator.kill();
    let _ = allocator.wait();
    drop(alloc);
    let gone = wait_for(Duration::from_secs(5), || {
        let s = agent.metrics();
        find(&s, "headroom_container_info", &[])
            .iter()
            .all(|x| {
                x.labels.get("cgroup").map(String::as_str)
                    != Some(&format!("/headroom-test-{}-alloc", std::process::id()))
            })
            .then_some(())
    });
    assert!(gone.is_some(), "removed cgroup still reported");
    let status = agent.json("/v1/status");
    assert_eq!(status["samplers"]["cgroup"]["healthy"], true, "{status}");
    let _ = burner.kill();
    let _ = burner.wait();
    if let Some(b) = burner_v2.as_mut() {
        let _ = b.kill();
        let _ = b.wait();
    }
}

#[test]
fn runc_container_is_discovered_with_its_id() {
    if !require_root("runc_container_is_discovered_with_its_id")
        || !require_tool("runc_container_is_discovered_with_its_id", "runc")
    {
        return;
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(std::path::Path::new)
        .find(|p| p.is_file());
    let Some(busybox) = busybox else {
        assert!(require_tool(
            "runc_container_is_discovered_with_its_id",
            "busybox"
        ));
        return;
    };
    let bundle = tempfile::tempdir().unwrap();
    let rootfs = bundle.path().join("rootfs/bin");
    std::fs::create_dir_all(&rootfs).unwrap();
    std::fs::copy(busybox, rootfs.join("busybox")).unwrap();
    for tool in ["sh", "sleep"] {
        std::os::unix::fs::symlink("busybox", rootfs.join(tool)).unwrap();
    }
    let ok = Command::new("runc")
        .arg("spec")
        .current_dir(bundle.path())
        .status()
        .unwrap();
    assert!(ok.success());
    let spec_path = bundle.path().join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&spec_path).unwrap()).unwrap();
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = serde_json::json!(["/bin/sleep", "300"]);
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let id = format!("headroom-test-{}-runc", std::process::id());
    let ok = Command::new("runc")
        .args(["run", "-d", &id])
        .current_dir(bundle.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success(), "runc run failed");
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("runc")
                .args(["delete", "--force", &self.0])
                .status();
        }
    }
    let _cleanup = Cleanup(id.clone());

    let agent = Agent::start(&["--sample-interval", "0.5"]);
    let found = wait_for(Duration::from_secs(10), || {
        let s = agent.metrics();
        find(&s, "headroom_container_info", &[("container_id", &id)])
            .first()
            .map(|x| x.labels.clone())
    })
    .unwrap_or_else(|| {
        panic!(
            "runc container {id} not discovered: {}",
            agent.get("/v1/status").1
        )
    });
    assert_eq!(found.get("runtime").map(String::as_str), Some("runc"));
    assert_eq!(found.get("kind").map(String::as_str), Some("runc"));
    let cgroup = found["cgroup"].clone();
    let s = agent.metrics();
    assert!(
        !find(
            &s,
            "headroom_container_memory_usage_bytes",
            &[("cgroup", &cgroup)]
        )
        .is_empty()
    );
    assert!(
        !find(
            &s,
            "headroom_container_cpu_seconds_total",
            &[("cgroup", &cgroup)]
        )
        .is_empty()
    );
}

#[test]
fn prometheus_scrapes_the_agent_and_promtool_accepts_it() {
    if !require_tool("prometheus_scrapes_the_agent", "prometheus")
        || !require_tool("prometheus_scrapes_the_agent", "promtool")
    {
        return;
    }
    let agent = Agent::start(&["--sample-interval", "0.5"]);
    let (_, body) = agent.get("/metrics");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), body.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && printed.trim().is_empty(),
        "promtool check metrics: {printed}"
    );

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: headroom\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n", agent.port),
    )
    .unwrap();
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let value = wait_for(Duration::from_secs(60), || {
        let (code, body) = http_get(port, "/api/v1/query?query=headroom_node_cpus").ok()?;
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let r = v["data"]["result"].as_array()?.first()?.clone();
        r["value"][1].as_str()?.parse::<f64>().ok()
    });
    let _ = prom.kill();
    let _ = prom.wait();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as f64)
        .unwrap_or(1.0);
    assert!(
        value.is_some(),
        "Prometheus never returned headroom_node_cpus"
    );
    assert!(value.unwrap() >= 1.0 && value.unwrap() <= cpus.max(value.unwrap()));
}

#[test]
fn history_survives_restart_and_bad_state_is_moved_aside() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let mut a = Agent::start_with_state(&["--sample-interval", "0.2"], &state, None);
    std::thread::sleep(Duration::from_secs(2));
    let before = now_ms();
    let (took, status) = a.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
    let file = state.join("history.bin");
    let saved = std::fs::metadata(&file)
        .expect("history saved on SIGTERM")
        .modified()
        .unwrap();
    assert!(
        saved
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
            + 1000
            >= before
    );

    let b = Agent::start_with_state(&["--sample-interval", "0.2"], &state, None);
    let v = b.json("/v1/history?name=node_memory_used_bytes");
    let fine = v["series"][0]["fine"].as_array().unwrap().clone();
    let oldest = fine
        .iter()
        .filter_map(|p| p[1].as_f64().map(|_| p[0].as_u64().unwrap()))
        .min()
        .unwrap();
    assert!(
        oldest < before,
        "history from before the restart was not restored"
    );
    assert!(
        b.log_text().contains("restored history"),
        "{}",
        b.log_text()
    );
    drop(b);

    std::fs::write(&file, b"definitely not a headroom state file").unwrap();
    let c = Agent::start_with_state(&["--sample-interval", "0.2"], &state, None);
    let log = c.log_text();
    assert!(
        log.contains("not a headroom state file") && log.contains("moved it to"),
        "{log}"
    );
    let moved = std::fs::read_dir(&state)
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("history.bin.bad-")
        });
    assert!(moved);
    assert_eq!(c.get("/healthz").0, 200);
}

fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(agent_binary())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run headroom {args:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_errors_name_the_key_and_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let bad_key = tmp.path().join("bad-key.toml");
    std::fs::write(&bad_key, "[history]\nfine_retention_seconds = 10\n").unwrap();
    let (code, _, err) = run_cli(&["agent", "--config", bad_key.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("fine_retention_seconds") && err.contains("bad-key.toml"),
        "{err}"
    );

    let bad_value = tmp.path().join("bad-value.toml");
    std::fs::write(&bad_value, "sample_interval_s = -1.0\n").unwrap();
    let (code, _, err) = run_cli(&["agent", "--config", bad_value.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("sample_interval_s"), "{err}");

    let (code, _, err) = run_cli(&["agent", "--config", "/nonexistent/headroom.toml"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/headroom.toml"), "{err}");

    let (code, _, err) = run_cli(&["agent", "--listen", "not-an-address"]);
    assert_eq!(code, 2);
    assert!(err.contains("--listen"), "{err}");

    // Found before any state is touched or any port bound.
    let state = tmp.path().join("untouched-state");
    let bad_name = tmp.path().join("bad-name.toml");
    std::fs::write(
        &bad_name,
        format!(
            "hostname = \"Not_A_Node\"\nstate_dir = {state:?}\nlisten = \"127.0.0.1:0\"\n[aggregator]\nendpoints = [\"http://127.0.0.1:9\"]\n"
        ),
    )
    .unwrap();
    let (code, _, err) = run_cli(&["agent", "--config", bad_name.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("hostname") && err.contains("Not_A_Node"),
        "{err}"
    );
    assert!(
        !state.exists(),
        "the state directory was created before the error"
    );
    let bad_url = tmp.path().join("bad-url.toml");
    std::fs::write(
        &bad_url,
        format!(
            "hostname = \"node-a\"\nstate_dir = {state:?}\n[aggregator]\nendpoints = [\"aggregator:9470\"]\n"
        ),
    )
    .unwrap();
    let (code, _, err) = run_cli(&["agent", "--config", bad_url.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("aggregator"), "{err}");
    assert!(!state.exists());

    let good = tmp.path().join("good.toml");
    std::fs::write(
        &good,
        "sample_interval_s = 2.5\n[cgroup]\ninclude = [\"/batch/*\"]\n",
    )
    .unwrap();
    let (code, out, err) = run_cli(&[
        "agent",
        "--config",
        good.to_str().unwrap(),
        "--print-config",
        "--listen",
        "127.0.0.1:9999",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("sample_interval_s = 2.5"), "{out}");
    assert!(out.contains("listen = \"127.0.0.1:9999\""), "{out}");
    assert!(
        out.contains("[history]") && out.contains("fine_retention_s"),
        "{out}"
    );
    assert!(out.contains("/batch/*"), "{out}");
}

#[test]
fn forecasts_are_exported_and_survive_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let mut a = Agent::start_with_state(&["--sample-interval", "0.2"], &state, None);
    let upper = wait_for(Duration::from_secs(20), || {
        let s = a.metrics();
        let up = find(
            &s,
            "headroom_forecast_upper",
            &[("series", "node_memory_used_bytes")],
        );
        let pt = find(
            &s,
            "headroom_forecast_point",
            &[("series", "node_memory_used_bytes")],
        );
        let model = find(
            &s,
            "headroom_forecast_model_info",
            &[("series", "node_memory_used_bytes")],
        );
        match (up.first(), pt.first(), model.first()) {
            (Some(u), Some(p), Some(_)) if u.value >= p.value && u.value > 0.0 => Some(u.value),
            _ => None,
        }
    });
    assert!(
        upper.is_some(),
        "no forecast for node memory: {}",
        a.log_text()
    );
    let hist = a.json("/v1/history?name=forecast_upper_node_memory_used_bytes");
    assert!(!hist["series"][0]["fine"].as_array().unwrap().is_empty());
    let (_, status) = a.terminate();
    assert!(status.success());
    assert!(
        state.join("forecasts.bin").is_file(),
        "forecasters not saved on SIGTERM"
    );

    let b = Agent::start_with_state(&["--sample-interval", "0.2"], &state, None);
    let log = b.log_text();
    assert!(log.contains("restored forecasters"), "{log}");
    // A restored forecaster answers from the first sample on.
    let s = b.metrics();
    assert!(
        !find(
            &s,
            "headroom_forecast_upper",
            &[("series", "node_memory_used_bytes")]
        )
        .is_empty()
    );

    // Forecasters saved with other settings (here a 15 s step instead of 10 s: the forecaster
    // step is never shorter than the sample interval) are moved aside, not trusted.
    drop(b);
    let c = Agent::start_with_state(&["--sample-interval", "15"], &state, None);
    assert!(
        c.log_text().contains("saved forecasters unusable"),
        "{}",
        c.log_text()
    );
}
