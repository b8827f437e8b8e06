//! Shared pieces of headroom's end-to-end tests: the real agent binary started as a child
//! process, cgroups the tests create themselves (and remove), workload processes, a minimal
//! HTTP client and a Prometheus text parser. Nothing here touches a cgroup it did not create.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Set in CI: a test that cannot run (not root, a tool missing) fails instead of skipping.
pub const REQUIRE_ENV: &str = "HEADROOM_REQUIRE_PRIVILEGED_TESTS";

pub fn skip_or_fail(test: &str, reason: &str) -> bool {
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{test} cannot run: {reason} (and {REQUIRE_ENV}=1 forbids skipping)");
    }
    eprintln!("SKIP {test}: {reason}");
    false
}

/// True when the test may go on; otherwise prints why it skips (or panics under CI).
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        true
    } else {
        skip_or_fail(test, "needs root (creates cgroups)")
    }
}

pub fn require_tool(test: &str, tool: &str) -> bool {
    if which(tool).is_some() {
        true
    } else {
        skip_or_fail(test, &format!("`{tool}` is not installed"))
    }
}

pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    })
}

/// The repository's root (the workspace).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// The fake NVML library (crate `fake-nvml`, `libnvidia_ml_fake.so`), built once per test
/// process (`FAKE_NVML_LIB` overrides). Copy it as `libnvidia-ml.so.1` into a folder with its
/// `fake-nvml.json` script.
pub fn fake_nvml_lib() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        if let Some(p) = std::env::var_os("FAKE_NVML_LIB") {
            return PathBuf::from(p);
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--locked", "-p", "fake-nvml"])
            .current_dir(workspace_root())
            .status()
            .expect("run cargo build -p fake-nvml");
        assert!(status.success(), "building fake-nvml failed");
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"))
            .join("debug")
            .join("libnvidia_ml_fake.so")
    })
    .clone()
}

/// The `headroom` binary, built once per test process (`HEADROOM_BIN` overrides).
pub fn agent_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("HEADROOM_BIN") {
            return PathBuf::from(p);
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--locked", "-p", "headroom", "--bin", "headroom"])
            .current_dir(workspace_root())
            .status()
            .expect("run cargo build for the agent");
        assert!(status.success(), "building the agent failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"));
        target.join("debug").join("headroom")
    })
    .clone()
}

/// The test workload binary (`burn`, `alloc`, `sleep`).
/// Cargo builds it next to the test executables (`target/<profile>/`), which live in `deps/`.
pub fn workload_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    profile_dir.join("headroom-workload")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Plain HTTP/1.1 GET on loopback; returns (status, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    http_get_at("127.0.0.1", port, path)
}

/// Plain HTTP/1.1 GET to `host` (an address on this machine or in a test network namespace).
pub fn http_get_at(host: &str, port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect((host, port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    // One write, as HTTP clients send a request: `write!` on a socket would send each piece of
    // the format as its own segment, and a server may answer between them.
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// One sample from a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, parse_labels(rest.trim_end_matches('}'))),
            None => (series, BTreeMap::new()),
        };
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    out
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((k, after)) = rest.split_once("=\"") {
        let mut val = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        val.push(match n {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => val.push(c),
            }
        }
        out.insert(k.trim_start_matches(',').trim().to_string(), val);
        rest = &after[end..];
    }
    out
}

/// Samples of `name` whose labels include every pair in `want`.
pub fn find<'a>(samples: &'a [Sample], name: &str, want: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| {
            s.name == name
                && want
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

/// The agent as a child process with its own port and state directory.
pub struct Agent {
    pub child: Child,
    pub port: u16,
    pub state_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    log: PathBuf,
}

impl Agent {
    /// Starts `headroom agent` with `args` added, on a fresh port and state directory, and
    /// waits until it is ready.
    pub fn start(args: &[&str]) -> Agent {
        let tmp = tempfile::tempdir().expect("tempdir");
        let state = tmp.path().join("state");
        Agent::start_with_state(args, &state, Some(tmp))
    }

    pub fn start_with_state(
        args: &[&str],
        state_dir: &Path,
        tmp: Option<tempfile::TempDir>,
    ) -> Agent {
        Agent::start_via(&[], args, state_dir, tmp)
    }

    /// Starts the agent as the last arguments of `wrapper` (which must `exec "$@"`), e.g. in a
    /// cgroup namespace of its own.
    pub fn start_wrapped(wrapper: &[&str], args: &[&str]) -> Agent {
        let tmp = tempfile::tempdir().expect("tempdir");
        let state = tmp.path().join("state");
        Agent::start_via(wrapper, args, &state, Some(tmp))
    }

    fn start_via(
        wrapper: &[&str],
        args: &[&str],
        state_dir: &Path,
        tmp: Option<tempfile::TempDir>,
    ) -> Agent {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("headroom-agent-{port}.log"));
        let logf = std::fs::File::create(&log).expect("agent log file");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(agent_binary());
                c
            }
            None => Command::new(agent_binary()),
        };
        let child = cmd
            .arg("agent")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--state-dir", &state_dir.display().to_string()])
            .args(args)
            .env("HEADROOM_LOG", "info")
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("start the agent");
        let mut a = Agent {
            child,
            port,
            state_dir: state_dir.to_path_buf(),
            _tmp: tmp,
            log,
        };
        a.wait_ready(Duration::from_secs(30));
        a
    }

    pub fn wait_ready(&mut self, timeout: Duration) {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("agent exited early with {status}: {}", self.log_text());
            }
            if matches!(http_get(self.port, "/readyz"), Ok((200, _))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("agent not ready after {timeout:?}: {}", self.log_text());
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.port, path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}; log: {}", self.log_text()))
    }

    pub fn metrics(&self) -> Vec<Sample> {
        let (code, body) = self.get("/metrics");
        assert_eq!(code, 200, "{body}");
        parse_metrics(&body)
    }

    pub fn json(&self, path: &str) -> serde_json::Value {
        let (code, body) = self.get(path);
        assert_eq!(code, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits; returns how long the agent took to exit and its exit status.
    pub fn terminate(&mut self) -> (Duration, std::process::ExitStatus) {
        let t0 = Instant::now();
        // SAFETY: kill with a pid we own and a valid signal number.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return (t0.elapsed(), st);
            }
            if t0.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
                panic!("agent ignored SIGTERM for 10 s: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// A cgroup the test created, in every hierarchy asked for; removed (its processes killed
/// first) on drop.
pub struct TestCgroup {
    /// Path relative to the hierarchy root, e.g. `/headroom-test-1234-burn`.
    pub rel: String,
    pub dirs: Vec<PathBuf>,
}

/// v1 controllers as mounted on this node, and the v2 tree (root on pure v2, `unified/` on hybrid).
pub fn hierarchies() -> (Vec<PathBuf>, Option<PathBuf>) {
    let root = Path::new(CGROUP_ROOT);
    if root.join("cgroup.controllers").is_file() {
        return (Vec::new(), Some(root.to_path_buf()));
    }
    let v1 = ["cpu", "cpuacct", "memory", "pids"]
        .iter()
        .map(|c| root.join(c))
        .filter(|p| p.join("cgroup.procs").is_file())
        .fold(Vec::new(), |mut acc: Vec<PathBuf>, p| {
            let canon = p.canonicalize().unwrap_or(p.clone());
            if !acc
                .iter()
                .any(|q| q.canonicalize().unwrap_or(q.clone()) == canon)
            {
                acc.push(p);
            }
            acc
        });
    let unified = root.join("unified");
    (
        v1,
        Some(unified).filter(|u| u.join("cgroup.controllers").is_file()),
    )
}

impl TestCgroup {
    /// Creates `/headroom-test-<pid>-<name>` in the v1 controllers (when `v1`) and the v2 tree
    /// (when `v2`).
    pub fn create(name: &str, v1: bool, v2: bool) -> TestCgroup {
        let rel = format!("/headroom-test-{}-{name}", std::process::id());
        let (v1_dirs, v2_dir) = hierarchies();
        let mut dirs = Vec::new();
        if v1 {
            dirs.extend(v1_dirs.iter().map(|d| d.join(&rel[1..])));
        }
        if v2 && let Some(u) = v2_dir {
            dirs.push(u.join(&rel[1..]));
        }
        for d in &dirs {
            std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
        }
        TestCgroup { rel, dirs }
    }

    /// `cgroup.procs` of every hierarchy this cgroup was created in.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    pub fn dir(&self, controller: &str) -> Option<&PathBuf> {
        self.dirs
            .iter()
            .find(|d| d.parent().is_some_and(|p| p.ends_with(controller)))
    }

    pub fn write(&self, controller: &str, file: &str, value: &str) {
        let d = self
            .dir(controller)
            .unwrap_or_else(|| panic!("no {controller} dir"));
        std::fs::write(d.join(file), value)
            .unwrap_or_else(|e| panic!("write {}/{file}: {e}", d.display()));
    }

    /// Moves `pid` into this cgroup in every hierarchy it was created in.
    pub fn add(&self, pid: u32) {
        for d in &self.dirs {
            std::fs::write(d.join("cgroup.procs"), pid.to_string())
                .unwrap_or_else(|e| panic!("add {pid} to {}: {e}", d.display()));
        }
    }

    /// Starts `program` inside this cgroup: a shell writes its own pid into every
    /// `cgroup.procs` and then execs the program, so all its CPU and memory are charged here.
    pub fn spawn(&self, program: &Path, args: &[&str]) -> Child {
        let mut script = String::new();
        for d in &self.dirs {
            script.push_str(&format!(
                "echo $$ > '{}/cgroup.procs' || exit 97; ",
                d.display()
            ));
        }
        script.push_str("exec \"$0\" \"$@\"");
        Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .arg(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()))
    }

    fn pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for d in &self.dirs {
            if let Ok(t) = std::fs::read_to_string(d.join("cgroup.procs")) {
                pids.extend(t.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
        pids.sort();
        pids.dedup();
        pids
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for p in pids {
                // SAFETY: signalling processes this test started in its own cgroup.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for d in &self.dirs {
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// utime + stime of a process, in seconds, from `/proc/<pid>/stat`.
pub fn proc_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/<pid>/stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let tps = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime")) / tps
}

/// A `/proc/<pid>/status` memory field (`VmRSS`, `RssAnon`, ...) in bytes.
pub fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/<pid>/status");
    let prefix = format!("{field}:");
    status
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("{field} missing from /proc/{pid}/status"))
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if t0.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Chromium's flags for a closed network and a root user (no sandbox), with its own profile.
pub fn chromium(profile: &Path) -> Command {
    let mut c = Command::new("chromium");
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--window-size=1280,1600",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

/// Where screenshots are kept for CI to collect: `target/screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let d = target.join("screenshots");
    std::fs::create_dir_all(&d).expect("create target/screenshots");
    d
}

/// `data-points` of every polyline of `class` inside the section whose heading is `title`.
pub fn plotted_points(dom: &str, title: &str, class: &str) -> Vec<usize> {
    let Some(start) = dom.find(&format!("<h3>{title}</h3>")) else {
        return Vec::new();
    };
    let section = &dom[start..];
    let section = &section[..section.find("</section>").unwrap_or(section.len())];
    let needle = format!("class=\"{class}\" data-points=\"");
    section
        .match_indices(&needle)
        .filter_map(|(i, _)| {
            let rest = &section[i + needle.len()..];
            rest[..rest.find('"')?].parse().ok()
        })
        .collect()
}

/// One histogram family's `_count`, `_sum` and buckets for a label set, from /metrics.
pub struct PromHist {
    pub count: f64,
    pub sum: f64,
    /// (upper bound `le`, cumulative count), ascending.
    pub buckets: Vec<(f64, f64)>,
}

pub fn prom_hist(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> Option<PromHist> {
    let one = |suffix: &str| {
        find(samples, &format!("{name}{suffix}"), want)
            .first()
            .map(|s| s.value)
    };
    let mut buckets: Vec<(f64, f64)> = find(samples, &format!("{name}_bucket"), want)
        .iter()
        .map(|s| {
            let le = &s.labels["le"];
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().expect("le")
            };
            (le, s.value)
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    Some(PromHist {
        count: one("_count")?,
        sum: one("_sum")?,
        buckets,
    })
}

impl PromHist {
    /// Prometheus' histogram_quantile: linear interpolation inside the bucket holding the rank.
    pub fn quantile(&self, q: f64) -> f64 {
        let total = self.buckets.last().map_or(0.0, |b| b.1);
        let rank = q * total;
        let mut prev = (0.0, 0.0);
        for &(le, cum) in &self.buckets {
            if cum >= rank {
                if le.is_infinite() {
                    return prev.0;
                }
                return prev.0 + (le - prev.0) * (rank - prev.1) / (cum - prev.1).max(1.0);
            }
            prev = (le, cum);
        }
        prev.0
    }

    pub fn bucket_of(&self, v: f64) -> usize {
        self.buckets
            .iter()
            .position(|b| v <= b.0)
            .unwrap_or(self.buckets.len())
    }
}
