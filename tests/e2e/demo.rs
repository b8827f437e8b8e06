//! `headroom demo` as a user runs it: one process, its printed URLs, the aggregator's JSON API
//! merging the three simulated nodes' workloads, the policy deciding on simulated containers, both
//! status pages in headless Chromium with data points plotted (screenshots kept in
//! `target/screenshots/`), a clean stop on SIGTERM, and bad flags refused with exit code 2.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use headroom_tests::*;

struct Demo {
    child: Child,
    lines: mpsc::Receiver<String>,
    out: Vec<String>,
}

impl Demo {
    fn start(args: &[&str]) -> Demo {
        let mut child = Command::new(agent_binary())
            .arg("demo")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start headroom demo");
        let stdout = child.stdout.take().expect("demo stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Demo {
            child,
            lines,
            out: Vec::new(),
        }
    }

    /// The URL printed on the line that starts with `label`, waiting for it.
    fn url(&mut self, label: &str, timeout: Duration) -> String {
        let t0 = Instant::now();
        loop {
            if let Some(u) = self
                .out
                .iter()
                .find(|l| l.trim_start().starts_with(label))
                .and_then(|l| l.split_whitespace().find(|w| w.starts_with("http://")))
            {
                return u.to_string();
            }
            let left = timeout.saturating_sub(t0.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.out.push(l),
                Err(_) => panic!(
                    "the demo never printed `{label}` within {timeout:?}; it printed:\n{}",
                    self.out.join("\n")
                ),
            }
        }
    }
}

impl Drop for Demo {
    /// SIGTERM first, so a failed test does not leave the demo's scratch folder behind.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill sends a signal to the child this test started.
            unsafe {
                libc::kill(self.child.id() as i32, libc::SIGTERM);
            }
            let _ = wait_for(Duration::from_secs(10), || self.child.try_wait().ok()?);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn port_of(url: &str) -> u16 {
    url.trim_start_matches("http://")
        .split(['/', ':'])
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {url}"))
}

fn json(port: u16, path: &str) -> Option<serde_json::Value> {
    let (status, body) = http_get(port, path).ok()?;
    (status == 200).then(|| serde_json::from_str(&body).ok())?
}

fn dump_dom(profile: &std::path::Path, url: &str) -> String {
    let out = chromium(profile)
        .arg("--dump-dom")
        .arg(url)
        .stderr(Stdio::null())
        .output()
        .expect("run chromium --dump-dom");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn screenshot(profile: &std::path::Path, url: &str, name: &str) {
    let shot = screenshot_dir().join(name);
    let _ = std::fs::remove_file(&shot);
    let out = chromium(profile)
        .arg(format!("--screenshot={}", shot.display()))
        .arg(url)
        .stderr(Stdio::null())
        .output()
        .expect("run chromium --screenshot");
    assert!(out.status.success(), "chromium --screenshot {url} failed");
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real PNG of {url}"
    );
    eprintln!("screenshot: {}", shot.display());
}

#[test]
fn demo_serves_merged_workloads_and_pages_with_data() {
    let test = "demo_serves_merged_workloads_and_pages_with_data";
    if !require_tool(test, "chromium") {
        return;
    }
    let started = Instant::now();
    let mut demo = Demo::start(&["--listen-base", "0", "--speed", "120"]);
    let agg = demo.url("aggregator status page", Duration::from_secs(60));
    let node1 = demo.url("demo-node-1 status page", Duration::from_secs(5));
    demo.url("demo-node-3 status page", Duration::from_secs(5));
    let agg_port = port_of(&agg);

    // The aggregator merges what the three nodes report: four workloads, two of them with a
    // replica on two nodes.
    let workloads = wait_for(Duration::from_secs(30), || {
        let v = json(agg_port, "/v1/workloads")?;
        let w = v["workloads"].as_array()?.clone();
        // CPU use is a rate: it appears from a node's second sample on.
        let has_cpu = |w: &serde_json::Value| {
            w["resources"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r["resource"] == "cpu"))
        };
        (w.len() == 4 && w.iter().all(has_cpu)).then_some(w)
    })
    .unwrap_or_else(|| {
        panic!(
            "the aggregator never listed the demo's four workloads: {:?}",
            json(agg_port, "/v1/workloads")
        )
    });
    let nodes_of = |name: &str| {
        workloads
            .iter()
            .find(|w| w["name"] == name)
            .and_then(|w| w["nodes"].as_u64())
    };
    assert_eq!(nodes_of("llm-chat"), Some(2), "{workloads:?}");
    assert_eq!(nodes_of("web"), Some(2), "{workloads:?}");
    assert_eq!(nodes_of("llm-code"), Some(1));
    assert_eq!(nodes_of("batch"), Some(1));
    let chat = workloads.iter().find(|w| w["name"] == "llm-chat").unwrap();
    let resources: Vec<&str> = chat["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["resource"].as_str())
        .collect();
    assert!(
        resources.contains(&"gpu") && resources.contains(&"cpu"),
        "the replayed GPUs reach the hints: {resources:?}"
    );
    let nodes = json(agg_port, "/v1/nodes").expect("/v1/nodes");
    assert_eq!(nodes["nodes"].as_array().map(Vec::len), Some(3), "{nodes}");
    assert!(
        started.elapsed() < Duration::from_secs(45),
        "data took {:?} to reach the aggregator",
        started.elapsed()
    );

    // The real policy, in enforce mode, changes a simulated container's capacity.
    let n1 = port_of(&node1);
    let applied = wait_for(Duration::from_secs(60), || {
        let v = json(n1, "/v1/decisions")?;
        v["decisions"]
            .as_array()?
            .iter()
            .find(|d| d["applied"] == true)
            .cloned()
    });
    assert!(
        applied.is_some(),
        "no applied decision on demo-node-1: {:?}",
        json(n1, "/v1/decisions")
    );
    // The aggregator's timeline takes a point every 2 s: wait for a few.
    let filled = wait_for(Duration::from_secs(40), || {
        let (_, page) = http_get(agg_port, "/").ok()?;
        let pts: usize = plotted_points(&page, "demo/Deployment batch", "nodes")
            .iter()
            .sum();
        (pts >= 6).then_some(())
    });
    assert!(filled.is_some(), "the aggregator's timeline did not fill");

    let profile = tempfile::tempdir().expect("chromium profile");
    let dom = dump_dom(profile.path(), &agg);
    assert!(
        dom.contains("<svg class=\"plot\""),
        "no plot on the aggregator page: {}",
        &dom[..dom.len().min(2000)]
    );
    for w in ["llm-chat", "llm-code", "web", "batch"] {
        let title = format!("demo/Deployment {w}");
        for class in ["demand", "forecast", "capacity", "desired", "nodes"] {
            let pts: usize = plotted_points(&dom, &title, class).iter().sum();
            assert!(pts >= 5, "{title}: {class} has {pts} points");
        }
    }
    assert!(dom.contains("2 node(s) reporting"), "merged replicas shown");
    assert_eq!(
        dom.matches("<td>demo-node-").count(),
        3,
        "three nodes listed"
    );

    let dom = dump_dom(profile.path(), &node1);
    for (section, class, min) in [
        ("/demo/llm-chat-7f9c4", "demand", 10),
        ("/demo/llm-chat-7f9c4", "forecast", 10),
        ("/demo/llm-chat-7f9c4", "capacity", 10),
        ("GPU 0", "demand", 10),
    ] {
        let pts: usize = plotted_points(&dom, section, class).iter().sum();
        assert!(pts >= min, "node page, {section}: {class} has {pts} points");
    }
    assert!(
        dom.contains("class=\"decision applied\""),
        "applied decisions marked on the node page"
    );

    screenshot(profile.path(), &agg, "status-page-demo-aggregator.png");
    screenshot(profile.path(), &node1, "status-page-demo-node.png");

    // SIGTERM: a clean, prompt stop that removes the scratch folder.
    let pid = demo.child.id();
    // SAFETY: kill sends a signal to the child this test started.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let t0 = Instant::now();
    let status = wait_for(Duration::from_secs(15), || demo.child.try_wait().ok()?)
        .expect("the demo did not stop within 15 s of SIGTERM");
    assert!(status.success(), "demo exited with {status}");
    eprintln!("stopped {:?} after SIGTERM", t0.elapsed());
    let scratch = std::env::temp_dir().join(format!("headroom-demo-{pid}"));
    assert!(!scratch.exists(), "{} left behind", scratch.display());
}

#[test]
fn bad_flags_exit_2_naming_the_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("bad.csv"), "0,1\n10,oops\n").expect("write trace");
    let bad = dir.path().display().to_string();
    for (args, wants) in [
        (vec!["--speed", "0"], "--speed"),
        (vec!["--duration=-3"], "--duration"),
        (
            vec!["--traces", "/nonexistent/traces"],
            "/nonexistent/traces",
        ),
        (vec!["--traces", bad.as_str()], "bad.csv, line 2"),
        (vec!["--no-such-flag"], "--no-such-flag"),
    ] {
        let out = Command::new(agent_binary())
            .arg("demo")
            .args(&args)
            .output()
            .expect("run headroom demo");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(wants), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?} printed URLs");
    }
}
