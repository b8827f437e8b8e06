//! End-to-end checks of the eBPF probes on the real kernel: a real HTTP server with a known
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

#[test]
fn request_latency_fixed_and_mixed_service_times() {
    if !can_run("request_latency_fixed_and_mixed_service_times") {
        return;
    }
    let probes = Probes::load(&Options::default());
    assert_eq!(probes.object(), Some("local_storage"));
    let st = &probes.status()[0];
    assert!(st.up(), "request_latency not attached: {st:?}");

    // Fixed 20 ms: 500 requests over 5 keep-alive connections.
    let cg = TestCgroup::new("fixed");
    let server = start_server(&cg);
    let mut client_lat = load(server.port, 5, |_| vec![20; 100]);
    client_lat.sort();
    let h = request_hist(
        &probes,
        RequestKey {
            cgroup_id: cg.id(),
            port: server.port,
        },
    );
    let p50 = h.quantile_seconds(0.5).expect("requests recorded");
    println!(
        "fixed 20 ms: probes count {} p50 {:.3} ms mean {:.3} ms; client p50 {:.3} ms",
        h.count,
        p50 * 1e3,
        h.mean_seconds().unwrap_or(0.0) * 1e3,
        quantile(&client_lat, 0.5).as_secs_f64() * 1e3
    );
    assert_eq!(h.count, 500, "one histogram entry per request");
    assert_eq!(h.bucket_total(), 500);
    assert!(
        (p50 - 0.020).abs() <= 0.020 * 0.05,
        "p50 {p50} s not within 5 % of 20 ms"
    );
    drop(server);

    // Mixed: 95 % at 2 ms, 5 % at 50 ms, so the 99th percentile is a 50 ms request.
    let cg2 = TestCgroup::new("mixed");
    let server = start_server(&cg2);
    let mut client_lat = load(server.port, 5, |c| {
        (0..100)
            .map(|i| if (i + c) % 20 == 0 { 50 } else { 2 })
            .collect()
    });
    client_lat.sort();
    let h = request_hist(
        &probes,
        RequestKey {
            cgroup_id: cg2.id(),
            port: server.port,
        },
    );
    let p99 = h.quantile_seconds(0.99).expect("requests recorded");
    let truth = quantile(&client_lat, 0.99).as_secs_f64();
    let (got_b, truth_b) = (
        bucket_of((p99 * 1e9) as u64),
        bucket_of((truth * 1e9) as u64),
    );
    println!(
        "mixed 2/50 ms: probes count {} p99 {:.3} ms (bucket {got_b}); client p99 {:.3} ms (bucket {truth_b})",
        h.count,
        p99 * 1e3,
        truth * 1e3
    );
    assert_eq!(h.count, 500);
    assert!(
        got_b.abs_diff(truth_b) <= 1,
        "p99 {p99} s more than one bucket from the truth {truth} s"
    );
    // The 2 ms mass must not leak into the 50 ms tail or vice versa.
    let p50 = h.quantile_seconds(0.5).expect("recorded");
    assert!((0.0019..0.004).contains(&p50), "mixed p50 {p50} s");
    drop(server);
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
fn runqueue_delay_starved_versus_idle() {
    if !can_run("runqueue_delay_starved_versus_idle") {
        return;
    }
    let probes = Probes::load(&Options::default());
    let st = &probes.status()[1];
    assert!(st.up(), "runqueue_delay not attached: {st:?}");

    // 4 busy processes sharing 0.1 CPU: each waits most of every period.
    let starved = TestCgroup::new("starved").with_cpu_quota(10_000);
    let idle = TestCgroup::new("idle");
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
    std::thread::sleep(Duration::from_millis(500));
    let busy_pids = children_of(busy.pid());
    assert_eq!(busy_pids.len(), 4, "busy children {busy_pids:?}");

    let before = probes.read().expect("read maps");
    let ref_before = schedstat_run_delay_ns(&busy_pids);
    std::thread::sleep(Duration::from_secs(3));
    let after = probes.read().expect("read maps");
    let ref_after = schedstat_run_delay_ns(&busy_pids);

    let window =
        |r: &headroom_ebpf::Reading, id| r.runqueue_delay.get(&id).cloned().unwrap_or_default();
    let s = window(&after, starved.id()).since(&window(&before, starved.id()));
    let i = window(&after, idle.id()).since(&window(&before, idle.id()));
    let (s50, s99) = (
        s.quantile_seconds(0.5).expect("starved samples"),
        s.quantile_seconds(0.99).expect("starved"),
    );
    let (i50, i99) = (
        i.quantile_seconds(0.5).expect("idle samples"),
        i.quantile_seconds(0.99).expect("idle"),
    );
    let reference = (ref_after - ref_before) as f64 / 1e9;
    let measured = s.sum_ns as f64 / 1e9;
    println!(
        "starved: n {} p50 {:.3} ms p99 {:.3} ms total wait {measured:.3} s (kernel schedstat {reference:.3} s); idle: n {} p50 {:.3} ms p99 {:.3} ms",
        s.count,
        s50 * 1e3,
        s99 * 1e3,
        i.count,
        i50 * 1e3,
        i99 * 1e3
    );
    assert!(
        s50 > 10.0 * i50,
        "starved p50 {s50} not an order above idle p50 {i50}"
    );
    assert!(s99 > i99, "starved p99 {s99} not above idle p99 {i99}");
    // The total wait the probes saw agrees with the kernel's own per-task accounting within a
    // factor of two (the windows are read at slightly different instants).
    assert!(
        measured > reference / 2.0 && measured < reference * 2.0,
        "probes saw {measured} s of run-queue wait, the kernel {reference} s"
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
    let probes = Probes::load(&Options {
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
    drop(probes);
    // The kernel frees programs after an RCU grace period, so give it a moment.
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
