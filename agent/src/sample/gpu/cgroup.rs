//! PID → container key: the cgroup path of a host PID read from `<proc_root>/<pid>/cgroup`, cached
//! briefly so a busy GPU does not cost a file read per process per second. It only reads procfs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a PID's cgroup is trusted before it is read again (a process can be moved).
const REFRESH: Duration = Duration::from_secs(5);

/// Picks the container key from the text of `/proc/<pid>/cgroup`: the cgroup v2 path (`0::/path`)
/// when present and not the root, otherwise the v1 `cpu`/`cpuacct` line, otherwise `memory`.
/// Returns `None` when no usable line is there.
pub fn parse_cgroup_file(text: &str) -> Option<String> {
    let mut v2 = None;
    let mut cpu = None;
    let mut memory = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if id == "0" && ctrls.is_empty() {
            v2 = Some(path);
        } else if ctrls.split(',').any(|c| c == "cpu" || c == "cpuacct") {
            cpu = Some(path);
        } else if ctrls.split(',').any(|c| c == "memory") {
            memory = Some(path);
        }
    }
    let chosen = match v2 {
        Some(p) if p != "/" => Some(p),
        _ => cpu.or(memory).or(v2),
    };
    chosen.map(str::to_owned)
}

/// Cache of PID → cgroup path, refreshed every few seconds and pruned to the PIDs still on a GPU.
#[derive(Debug)]
pub struct CgroupResolver {
    proc_root: PathBuf,
    /// PID → (its start time, its cgroup, when read): a reused PID has another start time.
    cache: HashMap<u32, (u64, Option<String>, Instant)>,
}

/// Start time of a process (clock ticks after boot, field 22 of `/proc/<pid>/stat`).
fn start_time(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_ascii_whitespace().nth(19)?.parse().ok()
}

impl CgroupResolver {
    pub fn new(proc_root: &Path) -> Self {
        Self {
            proc_root: proc_root.to_path_buf(),
            cache: HashMap::new(),
        }
    }

    /// The cgroup of `pid`, or `None` when it cannot be read (process gone, or not in our PID
    /// namespace: a DaemonSet needs `hostPID: true` for NVML's host PIDs to resolve).
    pub fn resolve(&mut self, pid: u32, now: Instant) -> Option<String> {
        let dir = self.proc_root.join(pid.to_string());
        let started = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|s| start_time(&s))?;
        if let Some((t0, cg, at)) = self.cache.get(&pid) {
            // Spread re-reads over [REFRESH, 2 x REFRESH) by PID so no cycle re-reads them all.
            let ttl = REFRESH + REFRESH.mul_f64(f64::from(pid % 97) / 97.0);
            if *t0 == started && now.duration_since(*at) < ttl {
                return cg.clone();
            }
        }
        let cg = std::fs::read_to_string(dir.join("cgroup"))
            .ok()
            .and_then(|t| parse_cgroup_file(&t));
        self.cache.insert(pid, (started, cg.clone(), now));
        cg
    }

    /// Forgets PIDs not in `live`, so a reused PID is read afresh.
    pub fn retain(&mut self, live: impl Fn(u32) -> bool) {
        self.cache.retain(|pid, _| live(*pid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_v2_path() {
        let t = "12:memory:/kubepods/x\n0::/kubepods.slice/pod1/cri-abc.scope\n";
        assert_eq!(
            parse_cgroup_file(t).as_deref(),
            Some("/kubepods.slice/pod1/cri-abc.scope")
        );
    }

    #[test]
    fn falls_back_to_v1_cpu_when_v2_is_root() {
        let t = "11:memory:/docker/m\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/\n0::/\n";
        assert_eq!(parse_cgroup_file(t).as_deref(), Some("/docker/abc"));
    }

    #[test]
    fn falls_back_to_memory_then_root() {
        assert_eq!(
            parse_cgroup_file("9:memory:/m\n0::/\n").as_deref(),
            Some("/m")
        );
        assert_eq!(parse_cgroup_file("0::/\n").as_deref(), Some("/"));
        assert_eq!(parse_cgroup_file("garbage\n"), None);
    }

    #[test]
    fn resolves_from_a_proc_tree_and_caches() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("42")).expect("mkdir");
        let stat = |started: u64| {
            format!(
                "42 (python3 (x) y) S 1 42 42 0 -1 4194560 1 0 0 0 5 3 0 0 20 0 4 0 {started} 1000 10\n"
            )
        };
        std::fs::write(dir.path().join("42/stat"), stat(777)).expect("write");
        std::fs::write(dir.path().join("42/cgroup"), "0::/a/b\n").expect("write");
        let mut r = CgroupResolver::new(dir.path());
        let now = Instant::now();
        assert_eq!(r.resolve(42, now).as_deref(), Some("/a/b"));
        std::fs::write(dir.path().join("42/cgroup"), "0::/c\n").expect("write");
        assert_eq!(r.resolve(42, now).as_deref(), Some("/a/b"));
        assert_eq!(r.resolve(42, now + REFRESH * 2).as_deref(), Some("/c"));
        // The PID reused by another process (another start time): read again at once.
        std::fs::write(dir.path().join("42/cgroup"), "0::/d\n").expect("write");
        std::fs::write(dir.path().join("42/stat"), stat(999)).expect("write");
        assert_eq!(r.resolve(42, now + REFRESH * 2).as_deref(), Some("/d"));
        assert_eq!(r.resolve(7, now), None);
        r.retain(|p| p == 7);
        assert!(!r.cache.contains_key(&42));
    }
}
