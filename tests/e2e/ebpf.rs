//! End-to-end checks of the eBPF probes on the real kernel, through the real agent where a user
//! would look (`/metrics`, `/v1/history`, `/v1/status`): a real HTTP server with a known
//! service time in a cgroup v2 directory made here, a real keep-alive client, CPU-starved and idle
//! processes in cgroups made here, and the kernel's own per-task run-queue accounting
//! (`/proc/<pid>/schedstat`) as the reference. Needs root; skips with a reason otherwise unless
//! `HEADROOM_REQUIRE_PRIVILEGED_TESTS=1`. Touches only cgroups it creates and removes them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use headroom_ebpf::hist::bucket_of;
use headroom_ebpf::{Attach, Histogram, Options, Probes, RequestKey, cgroup_id_of};
use headroom_tests::{Agent, PromHist, find, prom_hist, wait_for};

fn require_privileged() -> bool {
    std::env::var("HEADROOM_REQUIRE_PRIVILEGED_TESTS").is_ok_and(|v| v == "1")
}

/// True when the test can run; prints SKIP (or panics under HEADROOM_REQUIRE_PRIVILEGED_TESTS=1).
fn can_run(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut missing = Vec::new();
    if !root {
        missing.push("not root".to_string());
    }
    for tool in ["python3", "sh"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            missing.push(format!("{tool} not found"));
        }
    }
    if !Path::new(V2_ROOT_HYBRID).join("cgroup.procs").exists()
        && !Path::new(V2_ROOT_PURE).join("cgroup.procs").exists()
    {
        missing.push("no cgroup v2 hierarchy".into());
    }
    if missing.is_empty() {
        return true;
    }
    let reason = missing.join(", ");
    if require_privileged() {
        panic!("{test}: cannot run ({reason}) and HEADROOM_REQUIRE_PRIVILEGED_TESTS=1");
    }
    println!("SKIP {test}: {reason}");
    false
}

const V2_ROOT_HYBRID: &str = "/sys/fs/cgroup/unified";
const V2_ROOT_PURE: &str = "/sys/fs/cgroup";
const V1_CPU_ROOT: &str = "/sys/fs/cgroup/cpu";

fn v2_root() -> &'static Path {
    if Path::new(V2_ROOT_HYBRID).join("cgroup.procs").exists() {
        Path::new(V2_ROOT_HYBRID)
    } else {
        Path::new(V2_ROOT_PURE)
    }
}

/// A cgroup v2 directory (and, for CPU limits on a hybrid node, a v1 cpu one) made by this test.
struct TestCgroup {
    v2: PathBuf,
    v1_cpu: Option<PathBuf>,
}

impl TestCgroup {
    fn new(name: &str) -> TestCgroup {
        let dir = format!("headroom-test-{}-{name}", std::process::id());
        let v2 = v2_root().join(&dir);
        std::fs::create_dir(&v2).unwrap_or_else(|e| panic!("mkdir {}: {e}", v2.display()));
        TestCgroup { v2, v1_cpu: None }
    }

    /// Limits the cgroup to `quota_us` per 100 ms: through cpu.max on pure v2, or through a
    /// sibling v1 cpu cgroup on a hybrid node (where v2 has no cpu controller).
    fn with_cpu_quota(mut self, quota_us: u64) -> TestCgroup {
        if v2_root() == Path::new(V2_ROOT_PURE) {
            let parent = self.v2.parent().expect("cgroup has a parent");
            let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+cpu");
            write(&self.v2.join("cpu.max"), &format!("{quota_us} 100000"));
        } else {
            let dir = Path::new(V1_CPU_ROOT).join(self.v2.file_name().expect("named"));
            std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
            write(&dir.join("cpu.cfs_period_us"), "100000");
            write(&dir.join("cpu.cfs_quota_us"), &quota_us.to_string());
            self.v1_cpu = Some(dir);
        }
        self
    }

    fn id(&self) -> u64 {
        cgroup_id_of(&self.v2).unwrap_or_else(|e| panic!("{e}"))
    }

    fn enter(&self, pid: u32) {
        write(&self.v2.join("cgroup.procs"), &pid.to_string());
        if let Some(v1) = &self.v1_cpu {
            write(&v1.join("cgroup.procs"), &pid.to_string());
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for dir in std::iter::once(&self.v2).chain(self.v1_cpu.iter()) {
            // Processes are killed by their guards first; give the kernel a moment to reap them.
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn write(path: &Path, value: &str) {
    std::fs::write(path, value)
        .unwrap_or_else(|e| panic!("write {value:?} to {}: {e}", path.display()));
}

/// A child started held at a `read` on stdin, so it can be moved into cgroups before it does
/// anything; killed with its process group on drop.
struct Held {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Held {
    fn spawn(cmd: &mut Command) -> Held {
        use std::os::unix::process::CommandExt;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdin = child.stdin.take();
        Held { child, stdin }
    }

    fn release(&mut self) {
        let mut stdin = self.stdin.take().expect("released once");
        stdin.write_all(b"go\n").expect("write to held child");
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: kill on our own child's process group (created by process_group(0)).
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// A threaded HTTP/1.1 keep-alive server; `GET /?ms=N` answers after sleeping N ms. It binds
/// port 0 after reading one line from stdin and prints the port it got.
const SERVER: &str = r#"
import sys, time, http.server, socketserver
sys.stdin.readline()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        ms = float(self.path.split("ms=")[1]) if "ms=" in self.path else 0.0
        time.sleep(ms / 1000.0)
        # One write for head and body: two small writes would meet Nagle and delayed ACKs and
        # add 40 ms on the client's side that the server never spent.
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
    def log_message(self, *a):
        pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
s = S(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;

struct Server {
    // Kept for its Drop: the server dies with the guard.
    _held: Held,
    port: u16,
}

fn start_server(cg: &TestCgroup) -> Server {
    let mut held = Held::spawn(Command::new("python3").args(["-c", SERVER]));
    cg.enter(held.pid());
    held.release();
    let stdout = held.child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read server port");
    let port = line
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("server port {line:?}: {e}"));
    Server { _held: held, port }
}

/// One keep-alive connection sending `service_ms` requests in order; returns each request's
/// latency as the client saw it.
fn client(port: u16, service_ms: Vec<u32>) -> Vec<Duration> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to test server");
    stream.set_nodelay(true).expect("nodelay");
    let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
    let mut out = Vec::with_capacity(service_ms.len());
    for ms in service_ms {
        let t0 = Instant::now();
        write!(stream, "GET /?ms={ms} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").expect("send request");
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("read response header");
            assert!(!line.is_empty(), "server closed the connection");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().expect("content-length");
            }
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body).expect("read body");
        out.push(t0.elapsed());
    }
    out
}

/// Runs `per_conn` on `conns` concurrent keep-alive connections.
fn load(port: u16, conns: usize, per_conn: impl Fn(usize) -> Vec<u32> + Sync) -> Vec<Duration> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..conns)
            .map(|c| {
                let plan = per_conn(c);
                s.spawn(move || client(port, plan))
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("client thread"))
            .collect()
    })
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let idx = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn request_hist(probes: &Probes, key: RequestKey) -> Histogram {
    let reading = probes.read().expect("read eBPF maps");
    reading
        .request_latency
        .get(&key)
        .cloned()
        .unwrap_or_default()
}

impl TestCgroup {
    /// Path relative to the hierarchy root, as the agent names the container.
    fn rel(&self) -> String {
        format!("/{}", self.v2.file_name().expect("named").to_string_lossy())
    }
}

/// The agent, watching this test's cgroups, sampling every `interval_s`.
fn start_agent(interval_s: &str) -> Agent {
    let glob = format!("/headroom-test-{}-*", std::process::id());
    // The inference-engine sampler probes `/metrics` once on each new listening port of a
    // tracked container: one request more than these tests count exactly. Turned off here.
    let cfg = tempfile::NamedTempFile::new().expect("config file");
    std::fs::write(cfg.path(), "[engines]\nenabled = false\n").expect("write config");
    let cfg_path = cfg.path().display().to_string();
    let agent = Agent::start(&[
        "--config",
        &cfg_path,
        "--include-cgroup",
        &glob,
        "--sample-interval",
        interval_s,
    ]);
    let status = agent.json("/v1/status");
    for program in status["ebpf"]["programs"].as_array().expect("ebpf status") {
        assert_eq!(program["attached"], "tp_btf", "{status}");
    }
    agent
}

/// Waits until the agent lists the container `rel` (its first sample after the cgroup appeared).
fn wait_tracked(agent: &Agent, rel: &str) {
    let found = wait_for(Duration::from_secs(15), || {
        let s = agent.json("/v1/status");
        s["containers"]["items"]
            .as_array()?
            .iter()
            .any(|c| c["cgroup"] == rel)
            .then_some(())
    });
    assert!(
        found.is_some(),
        "agent never tracked {rel}: {}",
        agent.log_text()
    );
}

/// Returns right after the agent finishes its next sample, so what follows lands in one window.
fn next_sample(agent: &Agent) {
    let last = |a: &Agent| a.json("/v1/status")["last_sample_at"].as_f64();
    let before = last(agent);
    let t0 = Instant::now();
    while last(agent) == before {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "agent stopped sampling: {}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The agent's fine history of `name` for `rel` (and `port`), as (unix ms, value).
fn history(agent: &Agent, name: &str, rel: &str, port: Option<u16>) -> Vec<(u64, f64)> {
    let port = port.map(|p| format!("&port={p}")).unwrap_or_default();
    let v = agent.json(&format!("/v1/history?name={name}&cgroup={rel}{port}"));
    v["series"]
        .as_array()
        .and_then(|s| s.first())
        .and_then(|s| s["fine"].as_array())
        .map(|pts| {
            pts.iter()
                .filter_map(|p| Some((p[0].as_u64()?, p[1].as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// The newest history value of `name` for `rel` and `port`.
fn newest(agent: &Agent, name: &str, rel: &str, port: u16) -> f64 {
    history(agent, name, rel, Some(port))
        .last()
        .map(|p| p.1)
        .unwrap_or_else(|| panic!("no {name} history for {rel}:{port}: {}", agent.log_text()))
}

/// Interval long enough that a whole load (at most ~2.1 s) runs inside one sampling window, so
/// the agent's windowed p50/p99 cover exactly the requests the client timed.
const WINDOW_S: f64 = 4.0;

/// Runs `plan` against a fresh server in its own cgroup inside one agent window; returns the
/// cgroup, port and the client's sorted latencies.
fn one_window_load(
    agent: &Agent,
    name: &str,
    plan: impl Fn(usize) -> Vec<u32> + Sync,
) -> (TestCgroup, Server, Vec<Duration>) {
    let cg = TestCgroup::new(name);
    let server = start_server(&cg);
    wait_tracked(agent, &cg.rel());
    next_sample(agent);
    let t0 = Instant::now();
    let mut lat = load(server.port, 5, plan);
    assert!(
        t0.elapsed().as_secs_f64() < WINDOW_S * 0.8,
        "load took {:?}, longer than one window",
        t0.elapsed()
    );
    next_sample(agent);
    lat.sort();
    (cg, server, lat)
}

#[test]
fn agent_request_latency_fixed_and_mixed_service_times() {
    if !can_run("agent_request_latency_fixed_and_mixed_service_times") {
        return;
    }
    let agent = start_agent(&WINDOW_S.to_string());

    // Fixed 20 ms: 500 requests over 5 keep-alive connections.
    let (cg, server, client_lat) = one_window_load(&agent, "fixed", |_| vec![20; 100]);
    let (rel, port) = (cg.rel(), server.port);
    let port_s = port.to_string();
    let labels = [("cgroup", rel.as_str()), ("port", port_s.as_str())];
    let h = prom_hist(
        &agent.metrics(),
        "headroom_request_latency_seconds",
        &labels,
    )
    .unwrap_or_else(|| panic!("no request latency for {labels:?}: {}", agent.log_text()));
    let p50 = newest(&agent, "container_request_latency_p50_seconds", &rel, port);
    let rate = newest(&agent, "container_request_rate_per_second", &rel, port);
    println!(
        "fixed 20 ms: /metrics count {} mean {:.3} ms; history window rate {rate:.1}/s p50 {:.3} ms; client p50 {:.3} ms",
        h.count,
        h.sum / h.count * 1e3,
        p50 * 1e3,
        quantile(&client_lat, 0.5).as_secs_f64() * 1e3
    );
    assert_eq!(
        h.count, 500.0,
        "one count per request on keep-alive connections"
    );
    let metrics = agent.metrics();
    for program in ["request_latency", "runqueue_delay"] {
        let up = find(
            &metrics,
            "headroom_ebpf_program_up",
            &[("program", program)],
        );
        assert_eq!(up.first().map(|s| s.value), Some(1.0), "{program}");
    }
    assert!(
        (rate * WINDOW_S - 500.0).abs() < 500.0 * 0.05,
        "window rate {rate}/s does not cover the 500 requests"
    );
    assert!(
        (p50 - 0.020).abs() <= 0.020 * 0.05,
        "p50 {p50} s not within 5 % of 20 ms"
    );
    drop(server);

    // Mixed: 95 % at 2 ms, 5 % at 50 ms, so the 99th percentile is a 50 ms request.
    let (cg, server, client_lat) = one_window_load(&agent, "mixed", |c| {
        (0..100)
            .map(|i| if (i + c) % 20 == 0 { 50 } else { 2 })
            .collect()
    });
    let (rel, port) = (cg.rel(), server.port);
    let port_s = port.to_string();
    let labels = [("cgroup", rel.as_str()), ("port", port_s.as_str())];
    let h = prom_hist(
        &agent.metrics(),
        "headroom_request_latency_seconds",
        &labels,
    )
    .unwrap_or_else(|| panic!("no request latency for {labels:?}: {}", agent.log_text()));
    let truth = quantile(&client_lat, 0.99).as_secs_f64();
    let p99 = newest(&agent, "container_request_latency_p99_seconds", &rel, port);
    let prom_p99 = h.quantile(0.99);
    let (got, want) = (
        bucket_of((p99 * 1e9) as u64),
        bucket_of((truth * 1e9) as u64),
    );
    println!(
        "mixed 2/50 ms: /metrics count {} p99 {:.3} ms; history p99 {:.3} ms (bucket {got}); client p99 {:.3} ms (bucket {want})",
        h.count,
        prom_p99 * 1e3,
        p99 * 1e3,
        truth * 1e3
    );
    assert_eq!(h.count, 500.0);
    // Within one of the agent's own buckets (1/16 of a power of two), and within one of the
    // coarser buckets it exports.
    assert!(
        got.abs_diff(want) <= 1,
        "history p99 {p99} s more than one bucket from {truth} s"
    );
    assert!(
        h.bucket_of(prom_p99).abs_diff(h.bucket_of(truth)) <= 1,
        "/metrics p99 {prom_p99} s more than one bucket from {truth} s"
    );
}

fn schedstat_run_delay_ns(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok())
        .filter_map(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

fn children_of(pid: u32) -> Vec<u32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read {path}: {e}"))
        .split_whitespace()
        .map(|p| p.parse().expect("pid"))
        .collect()
}

#[test]
fn agent_runqueue_delay_starved_versus_idle() {
    if !can_run("agent_runqueue_delay_starved_versus_idle") {
        return;
    }
    // 4 busy processes sharing 0.1 CPU: each waits most of every period.
    let starved = TestCgroup::new("starved").with_cpu_quota(10_000);
    let idle = TestCgroup::new("idle");
    let agent = start_agent("0.5");
    let mut busy = Held::spawn(Command::new("sh").args([
        "-c",
        "read _; for i in 1 2 3 4; do (while :; do :; done) & done; wait",
    ]));
    starved.enter(busy.pid());
    busy.release();
    let mut sleeper =
        Held::spawn(Command::new("sh").args(["-c", "read _; while :; do sleep 0.02; done"]));
    idle.enter(sleeper.pid());
    sleeper.release();
    wait_tracked(&agent, &starved.rel());
    wait_tracked(&agent, &idle.rel());
    std::thread::sleep(Duration::from_millis(500));
    let busy_pids = children_of(busy.pid());
    assert_eq!(busy_pids.len(), 4, "busy children {busy_pids:?}");

    let read = |cg: &TestCgroup| {
        let rel = cg.rel();
        prom_hist(
            &agent.metrics(),
            "headroom_runqueue_delay_seconds",
            &[("cgroup", rel.as_str())],
        )
        .unwrap_or_else(|| panic!("no run-queue delay for {rel}: {}", agent.log_text()))
    };
    let (s0, i0, ref0) = (
        read(&starved),
        read(&idle),
        schedstat_run_delay_ns(&busy_pids),
    );
    std::thread::sleep(Duration::from_secs(4));
    let (s1, i1, ref1) = (
        read(&starved),
        read(&idle),
        schedstat_run_delay_ns(&busy_pids),
    );

    let mean = |a: &PromHist, b: &PromHist| (b.sum - a.sum) / (b.count - a.count).max(1.0);
    let (s_mean, i_mean) = (mean(&s0, &s1), mean(&i0, &i1));
    let measured = s1.sum - s0.sum;
    let reference = (ref1 - ref0) as f64 / 1e9;
    let s_p99 = history(
        &agent,
        "container_runqueue_delay_p99_seconds",
        &starved.rel(),
        None,
    );
    let i_p99 = history(
        &agent,
        "container_runqueue_delay_p99_seconds",
        &idle.rel(),
        None,
    );
    let last = |v: &[(u64, f64)]| v.iter().rev().take(4).map(|p| p.1).fold(0.0, f64::max);
    println!(
        "starved: {} waits, mean {:.3} ms, total {measured:.3} s (kernel schedstat {reference:.3} s), history p99 {:.3} ms; \
         idle: {} waits, mean {:.3} ms, history p99 {:.3} ms",
        s1.count - s0.count,
        s_mean * 1e3,
        last(&s_p99) * 1e3,
        i1.count - i0.count,
        i_mean * 1e3,
        last(&i_p99) * 1e3
    );
    assert!(
        s1.count > s0.count && i1.count > i0.count,
        "no waits recorded"
    );
    assert!(
        s_mean > 10.0 * i_mean,
        "starved mean {s_mean} not an order above idle {i_mean}"
    );
    // Right order of magnitude: each of 4 processes gets 0.025 CPU, so it waits ~97 % of the
    // time; the total the agent saw matches the kernel's own per-task accounting.
    assert!(
        measured > reference / 2.0 && measured < reference * 2.0,
        "agent saw {measured} s of run-queue wait, the kernel {reference} s"
    );
    assert!(
        last(&s_p99) > last(&i_p99),
        "history p99: starved {s_p99:?} idle {i_p99:?}"
    );
    drop(busy);
    drop(sleeper);
}

#[test]
fn refused_program_type_falls_back_to_the_next() {
    if !can_run("refused_program_type_falls_back_to_the_next") {
        return;
    }
    // fentry first: refused in sandboxes (EPERM) and kernels without trampolines; where it is
    // allowed it attaches and the chain stops there. Either way one of the two must be up.
    let probes = Probes::load(&Options {
        chain: vec![Attach::Fentry, Attach::RawTracepoint],
        ..Options::default()
    });
    let req = &probes.status()[0];
    println!("{req:?}");
    match req.attempts.first().map(|a| a.result.as_str()) {
        Some("attached") => assert_eq!(req.attached, Some(Attach::Fentry)),
        Some(r) => {
            assert!(r.starts_with("refused: "), "{r}");
            assert_eq!(req.attached, Some(Attach::RawTracepoint), "{req:?}");
            assert_eq!(req.attempts.len(), 2);
        }
        None => panic!("no attempt recorded: {req:?}"),
    }
    let runq = &probes.status()[1];
    assert_eq!(runq.attempts[0].result, "not applicable");
    assert_eq!(runq.attached, Some(Attach::RawTracepoint));

    // And the fallback really measures: a request through the raw tracepoints is counted.
    let cg = TestCgroup::new("fallback");
    let server = start_server(&cg);
    load(server.port, 2, |_| vec![1; 10]);
    let h = request_hist(
        &probes,
        RequestKey {
            cgroup_id: cg.id(),
            port: server.port,
        },
    );
    assert_eq!(h.count, 20);
}

#[test]
fn compat_object_without_local_storage_measures_too() {
    if !can_run("compat_object_without_local_storage_measures_too") {
        return;
    }
    let mut probes = Probes::load(&Options {
        compat_only: true,
        ..Options::default()
    });
    assert_eq!(probes.object(), Some("compat"));
    assert!(
        probes.status().iter().all(|s| s.up()),
        "{:?}",
        probes.status()
    );
    let cg = TestCgroup::new("compat");
    let server = start_server(&cg);
    load(server.port, 2, |_| vec![5; 10]);
    let h = request_hist(
        &probes,
        RequestKey {
            cgroup_id: cg.id(),
            port: server.port,
        },
    );
    assert_eq!(h.count, 20);
    let p50 = h.quantile_seconds(0.5).expect("recorded");
    assert!((0.005..0.0075).contains(&p50), "p50 {p50}");

    // Forgetting a key deletes its histogram from the kernel map; unknown keys are not errors.
    let key = RequestKey {
        cgroup_id: cg.id(),
        port: server.port,
    };
    let gone = probes.forget(
        &[
            key,
            RequestKey {
                cgroup_id: 0,
                port: 1,
            },
        ],
        &[0],
    );
    assert_eq!(gone.expect("forget"), 1);
    assert!(
        !probes
            .read()
            .expect("read")
            .request_latency
            .contains_key(&key)
    );
}

/// Clears the calling thread's effective capabilities (capabilities are per thread on Linux, so
/// the rest of the test process keeps root's).
fn drop_effective_capabilities() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset with a v3 header and two data structs, as capget(2) specifies.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut Header,
            data.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "capget: {}", std::io::Error::last_os_error());
    for d in &mut data {
        d.effective = 0;
    }
    // SAFETY: as above.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
    assert_eq!(rc, 0, "capset: {}", std::io::Error::last_os_error());
}

#[test]
fn without_privilege_every_program_is_reported_refused_and_nothing_fails() {
    if !can_run("without_privilege_every_program_is_reported_refused_and_nothing_fails") {
        return;
    }
    let unpriv_bpf =
        std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled").unwrap_or_default();
    std::thread::spawn(move || {
        drop_effective_capabilities();
        let probes = Probes::load(&Options::default());
        println!("{:?}", probes.status());
        assert_eq!(probes.status().len(), 2);
        for st in probes.status() {
            assert_eq!(
                st.attached, None,
                "{st:?} attached without privilege (unprivileged_bpf_disabled={unpriv_bpf:?})"
            );
            assert!(!st.attempts.is_empty());
            assert!(
                st.attempts
                    .iter()
                    .all(|a| a.result.starts_with("refused: ") || a.result == "not applicable"),
                "{st:?}"
            );
        }
        assert!(probes.program_ids().is_empty());
        let reading = probes.read().expect("reading nothing is not an error");
        assert!(reading.request_latency.is_empty() && reading.runqueue_delay.is_empty());
    })
    .join()
    .expect("unprivileged load must not panic");
}

#[test]
fn unprivileged_agent_reports_programs_refused_and_runs_on() {
    if !can_run("unprivileged_agent_reports_programs_refused_and_runs_on") {
        return;
    }
    if headroom_tests::which("setpriv").is_none() {
        let reason = "setpriv not installed (util-linux)";
        assert!(
            !require_privileged(),
            "{reason} and HEADROOM_REQUIRE_PRIVILEGED_TESTS=1"
        );
        println!("SKIP unprivileged_agent_reports_programs_refused_and_runs_on: {reason}");
        return;
    }
    // The agent as user nobody with no capabilities: loading any eBPF program is refused.
    let state = std::env::temp_dir().join(format!("headroom-test-{}-unpriv", std::process::id()));
    std::fs::create_dir_all(&state).expect("state dir");
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .expect("chmod state dir");
    let port = headroom_tests::free_port();
    let log = state.join("agent.log");
    let mut child = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(headroom_tests::agent_binary())
        .args([
            "agent",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--sample-interval",
            "0.5",
        ])
        .arg("--state-dir")
        .arg(&state)
        .env("HEADROOM_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start the agent under setpriv");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let ready = wait_for(Duration::from_secs(30), || {
        matches!(headroom_tests::http_get(port, "/readyz"), Ok((200, _))).then_some(())
    });
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert!(
            ready.is_some(),
            "unprivileged agent never got ready: {}",
            log_text()
        );
        let (_, body) = headroom_tests::http_get(port, "/v1/status").expect("status");
        let status: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
        let programs = status["ebpf"]["programs"]
            .as_array()
            .expect("ebpf programs");
        assert_eq!(programs.len(), 2, "{status}");
        for p in programs {
            assert!(p["attached"].is_null(), "{p} attached without privilege");
            let attempts = p["attempts"].as_array().expect("attempts");
            assert!(
                attempts.iter().all(|a| a["result"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("refused: ") || r == "not applicable")),
                "{p}"
            );
        }
        let (_, text) = headroom_tests::http_get(port, "/metrics").expect("metrics");
        let metrics = headroom_tests::parse_metrics(&text);
        for program in ["request_latency", "runqueue_delay"] {
            let up = find(
                &metrics,
                "headroom_ebpf_program_up",
                &[("program", program)],
            );
            assert_eq!(up.first().map(|s| s.value), Some(0.0), "{program}: {text}");
        }
        assert!(
            log_text().contains("refused"),
            "refusal not logged: {}",
            log_text()
        );
    }));
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&state);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

fn loaded_program_ids() -> Vec<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| p.id())
        .collect()
}

#[test]
fn dropping_the_probes_releases_programs() {
    if !can_run("dropping_the_probes_releases_programs") {
        return;
    }
    let probes = Probes::load(&Options::default());
    let ours = assert_attached_and_loaded(&probes);
    drop(probes);
    assert_released(&ours);
}

/// Checks that every group attached by tp_btf and that its six programs are loaded in the kernel;
/// returns their ids.
fn assert_attached_and_loaded(probes: &Probes) -> Vec<u32> {
    assert!(
        probes
            .status()
            .iter()
            .all(|s| s.attached == Some(Attach::TpBtf)),
        "{:?}",
        probes.status()
    );
    let ours = probes.program_ids();
    assert_eq!(ours.len(), 6, "{ours:?}");
    let loaded = loaded_program_ids();
    assert!(
        ours.iter().all(|id| loaded.contains(id)),
        "{ours:?} not all in {loaded:?}"
    );
    ours
}

/// Waits until none of `ours` is loaded any more (the kernel frees programs after an RCU grace
/// period) and fails if one still is after 10 s.
fn assert_released(ours: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut loaded = loaded_program_ids();
    while ours.iter().any(|id| loaded.contains(id)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        loaded = loaded_program_ids();
    }
    assert!(
        ours.iter().all(|id| !loaded.contains(id)),
        "{ours:?} still loaded after drop"
    );
}

#[test]
fn probes_from_the_agents_loader_process_measure_and_release() {
    if !can_run("probes_from_the_agents_loader_process_measure_and_release") {
        return;
    }
    let mut command = std::process::Command::new(headroom_tests::agent_binary());
    command.arg("ebpf-loader");
    let probes =
        headroom_ebpf::load_in_child(command, &Options::default(), Duration::from_secs(60))
            .expect("the agent's loader process hands the probes over");
    // The loader process has exited; its links must not have gone with it.
    let ours = assert_attached_and_loaded(&probes);
    // The programs run for this process now: a thread that sleeps and wakes adds run-queue
    // samples to this test's cgroup, read through the maps the loader handed over.
    let runqueue_samples = || -> u64 {
        probes
            .read()
            .expect("read maps")
            .runqueue_delay
            .values()
            .map(|h| h.count)
            .sum()
    };
    let before = runqueue_samples();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let after = runqueue_samples();
    assert!(after > before, "no run-queue samples: {before} -> {after}");
    drop(probes);
    assert_released(&ours);
}

#[test]
fn committed_objects_match_a_fresh_compile() {
    let have = |tool: &str| headroom_tests::which(tool).is_some();
    let mut missing: Vec<&str> = ["clang", "llvm-strip"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        missing.push("libbpf-dev headers");
    }
    if !missing.is_empty() {
        let reason = format!(
            "{} not installed (apt-get install clang llvm libbpf-dev)",
            missing.join(", ")
        );
        if require_privileged() {
            panic!(
                "committed_objects_match_a_fresh_compile: {reason} and HEADROOM_REQUIRE_PRIVILEGED_TESTS=1"
            );
        }
        println!("SKIP committed_objects_match_a_fresh_compile: {reason}");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("--check")
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "ebpf/build.sh --check failed: {text}");
}
