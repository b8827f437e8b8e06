//! What the demo's three nodes run: which containers, replicas of which workloads, each following
//! which trace and at what size. The built-in scenario replays the excerpts embedded from
//! `traces/` (see its README for sources and licences); `--traces DIR` builds one from any
//! `timestamp_s,value` files instead.

use std::path::Path;
use std::sync::Arc;

use super::sim::{ContainerSpec, Demand, GpuSpec, NodeSpec};
use super::trace::{Trace, TraceError};

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;
/// An H200's memory as NVML reports it.
const H200_BYTES: u64 = 150_754_820_096;

/// The embedded traces: (name, file contents).
const EMBEDDED: [(&str, &str); 6] = [
    (
        "azure_llm_conv_requests_10s",
        include_str!("traces/azure_llm_conv_requests_10s.csv"),
    ),
    (
        "azure_llm_code_requests_10s",
        include_str!("traces/azure_llm_code_requests_10s.csv"),
    ),
    (
        "mooncake_requests_3s",
        include_str!("traces/mooncake_requests_3s.csv"),
    ),
    (
        "nasa_http_jul01-03_requests_1min",
        include_str!("traces/nasa_http_jul01-03_requests_1min.csv"),
    ),
    (
        "google_job3418442_cpu_util_5min",
        include_str!("traces/google_job3418442_cpu_util_5min.csv"),
    ),
    (
        "google_job3418442_mem_util_5min",
        include_str!("traces/google_job3418442_mem_util_5min.csv"),
    ),
];

fn embedded(name: &str) -> Result<Arc<Trace>, TraceError> {
    let text = EMBEDDED
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .unwrap_or_default();
    Trace::parse(name, &format!("(embedded) {name}.csv"), text).map(Arc::new)
}

fn demand(trace: &Arc<Trace>, offset_s: f64, base: f64, peak: f64) -> Demand {
    Demand {
        trace: trace.clone(),
        offset_s,
        base,
        peak,
    }
}

/// An LLM-serving replica: its GPU follows the request rate, and so, less steeply, do the CPU
/// (tokenising, batching) and host memory it needs.
fn llm(cgroup: &str, workload: &str, requests: &Arc<Trace>, offset_s: f64) -> ContainerSpec {
    ContainerSpec {
        cgroup: cgroup.into(),
        workload: workload.into(),
        cpu: demand(requests, offset_s, 0.3, 1.4),
        memory: demand(requests, offset_s, 3.0 * GIB, 1.0 * GIB),
        start_cpu_cores: 1.0,
        start_memory_high_bytes: (6.0 * GIB) as u64,
        gpu: Some(GpuSpec {
            utilization: demand(requests, offset_s, 0.04, 0.86),
            memory: demand(requests, offset_s, 40.0 * GIB, 60.0 * GIB),
            memory_total_bytes: H200_BYTES,
        }),
    }
}

fn web(cgroup: &str, requests: &Arc<Trace>, offset_s: f64) -> ContainerSpec {
    ContainerSpec {
        cgroup: cgroup.into(),
        workload: "web".into(),
        cpu: demand(requests, offset_s, 0.1, 2.2),
        memory: demand(requests, offset_s, 384.0 * MIB, 512.0 * MIB),
        start_cpu_cores: 1.0,
        start_memory_high_bytes: (2.0 * GIB) as u64,
        gpu: None,
    }
}

/// The built-in scenario: two LLM services on GPU nodes (one with a replica on each), a web
/// front end with a replica on two nodes, and a batch job.
pub fn builtin() -> Result<Vec<NodeSpec>, TraceError> {
    let conv = embedded("azure_llm_conv_requests_10s")?;
    let code = embedded("azure_llm_code_requests_10s")?;
    let moon = embedded("mooncake_requests_3s")?;
    let nasa = embedded("nasa_http_jul01-03_requests_1min")?;
    let gcpu = embedded("google_job3418442_cpu_util_5min")?;
    let gmem = embedded("google_job3418442_mem_util_5min")?;
    Ok(vec![
        NodeSpec {
            name: "demo-node-1".into(),
            cpus: 8,
            memory_bytes: (64.0 * GIB) as u64,
            containers: vec![llm("/demo/llm-chat-7f9c4", "llm-chat", &conv, 0.0), {
                let mut c = llm("/demo/llm-code-2b1d8", "llm-code", &code, 0.0);
                c.memory = demand(&code, 0.0, 2.0 * GIB, 1.0 * GIB);
                c.start_memory_high_bytes = (4.0 * GIB) as u64;
                c
            }],
        },
        NodeSpec {
            name: "demo-node-2".into(),
            cpus: 8,
            memory_bytes: (64.0 * GIB) as u64,
            containers: vec![
                llm("/demo/llm-chat-a41e2", "llm-chat", &moon, 0.0),
                web("/demo/web-5c6d1", &nasa, 0.0),
            ],
        },
        NodeSpec {
            name: "demo-node-3".into(),
            cpus: 16,
            memory_bytes: (128.0 * GIB) as u64,
            containers: vec![
                // Half a day later in the same web log: the other replica sees another load.
                web("/demo/web-9e0f3", &nasa, 12.0 * 3600.0),
                ContainerSpec {
                    cgroup: "/demo/batch-3418442".into(),
                    workload: "batch".into(),
                    cpu: demand(&gcpu, 0.0, 0.4, 3.0),
                    memory: demand(&gmem, 0.0, 2.0 * GIB, 6.0 * GIB),
                    start_cpu_cores: 2.0,
                    start_memory_high_bytes: (12.0 * GIB) as u64,
                    gpu: None,
                },
            ],
        },
    ])
}

/// A workload name from a file name: lowercase letters, digits and `-`, at most 40 characters.
fn workload_name(stem: &str) -> String {
    let mut s: String = stem
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    while s.contains("--") {
        s = s.replace("--", "-");
    }
    let s: String = s.trim_matches('-').chars().take(40).collect();
    let s = s.trim_end_matches('-').to_string();
    if s.is_empty() { "trace".into() } else { s }
}

/// One container per `*.csv` file in `dir` (sorted by name), spread over three nodes; each
/// file's values drive CPU and memory.
pub fn from_dir(dir: &Path) -> Result<Vec<NodeSpec>, TraceError> {
    let read_err = |source| TraceError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(read_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "csv") && p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(TraceError::Shape {
            origin: dir.display().to_string(),
            what: "holds no *.csv trace (`timestamp_s,value` lines)".into(),
        });
    }
    let mut nodes: Vec<NodeSpec> = (1..=3)
        .map(|i| NodeSpec {
            name: format!("demo-node-{i}"),
            cpus: 8,
            memory_bytes: (64.0 * GIB) as u64,
            containers: Vec::new(),
        })
        .collect();
    for (i, f) in files.iter().enumerate() {
        let trace = Arc::new(Trace::from_file(f)?);
        let name = workload_name(&trace.name);
        nodes[i % 3].containers.push(ContainerSpec {
            cgroup: format!("/demo/{name}-{i}"),
            workload: name,
            cpu: demand(&trace, 0.0, 0.2, 2.0),
            memory: demand(&trace, 0.0, 512.0 * MIB, 1.0 * GIB),
            start_cpu_cores: 1.0,
            start_memory_high_bytes: (2.0 * GIB) as u64,
            gpu: None,
        });
    }
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_traces_parse_and_share_workloads_across_nodes() {
        let nodes = builtin().unwrap();
        assert_eq!(nodes.len(), 3);
        let replicas = |w: &str| {
            nodes
                .iter()
                .filter(|n| n.containers.iter().any(|c| c.workload == w))
                .count()
        };
        assert_eq!(replicas("llm-chat"), 2);
        assert_eq!(replicas("web"), 2);
        for n in &nodes {
            for c in &n.containers {
                let cpu = c.cpu.at(1234.0);
                assert!(cpu > 0.0 && cpu < n.cpus as f64, "{}: {cpu}", c.cgroup);
            }
        }
    }

    #[test]
    fn a_dir_of_traces_becomes_containers() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("My Trace.csv"), "0,1\n60,3\n").unwrap();
        std::fs::write(t.path().join("notes.txt"), "not a trace").unwrap();
        let nodes = from_dir(t.path()).unwrap();
        assert_eq!(nodes[0].containers[0].workload, "my-trace");
        assert_eq!(nodes[0].containers[0].cgroup, "/demo/my-trace-0");
        let empty = tempfile::tempdir().unwrap();
        let e = from_dir(empty.path()).unwrap_err().to_string();
        assert!(e.contains("holds no *.csv"), "{e}");
        std::fs::write(empty.path().join("bad.csv"), "0,x\n").unwrap();
        let e = from_dir(empty.path()).unwrap_err().to_string();
        assert!(e.contains("bad.csv, line 1"), "{e}");
    }
}
