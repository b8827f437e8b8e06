//! Benchmark helper: loads the probes, prints `ready` once attached, waits for a line (or EOF) on
//! stdin, then prints one JSON line with the request-latency histogram measured meanwhile for the
//! given cgroup v2 directory and port (count, p50, p99, mean, in seconds) and, when
//! `kernel.bpf_stats_enabled` is 1, the kernel's run-time accounting of each program. Used by
//! `scripts/bench-ebpf.sh`; exits 1 with the reason when the probes cannot attach.
//!
//!   hold <cgroup-v2-dir> <port>

use std::io::BufRead;
use std::path::PathBuf;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, port] = args.as_slice() else {
        eprintln!("usage: hold <cgroup-v2-dir> <port>");
        std::process::exit(2);
    };
    let dir = PathBuf::from(dir);
    let cgroup_id = headroom_ebpf::cgroup_id_of(&dir).unwrap_or_else(|e| {
        eprintln!("hold: {e}");
        std::process::exit(2);
    });
    let port: u16 = port.parse().unwrap_or_else(|e| {
        eprintln!("hold: port {port:?}: {e}");
        std::process::exit(2);
    });
    // HOLD_ONLY=request_latency|runqueue_delay loads one group, to see what each one costs.
    let only = std::env::var("HOLD_ONLY").unwrap_or_default();
    let opts = headroom_ebpf::Options {
        request_latency: only.is_empty() || only == headroom_ebpf::REQUEST_LATENCY,
        runqueue_delay: only.is_empty() || only == headroom_ebpf::RUNQUEUE_DELAY,
        ..headroom_ebpf::Options::default()
    };
    let probes = headroom_ebpf::Probes::load(&opts);
    for s in probes.status() {
        eprintln!(
            "hold: {} attached via {:?} after {:?}",
            s.program, s.attached, s.attempts
        );
    }
    if !probes.status().iter().all(|s| s.up()) {
        eprintln!("hold: not every program attached");
        std::process::exit(1);
    }
    let key = headroom_ebpf::RequestKey { cgroup_id, port };
    let before = match probes.read() {
        Ok(r) => r.request_latency.get(&key).cloned().unwrap_or_default(),
        Err(e) => {
            eprintln!("hold: {e}");
            std::process::exit(1);
        }
    };
    println!("ready");
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    let after = match probes.read() {
        Ok(r) => r.request_latency.get(&key).cloned().unwrap_or_default(),
        Err(e) => {
            eprintln!("hold: {e}");
            std::process::exit(1);
        }
    };
    let h = after.since(&before);
    let num = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.9}"));
    let stats: Vec<String> = probes
        .program_stats()
        .into_iter()
        .filter(|(_, _, runs)| *runs > 0)
        .map(|(name, t, runs)| {
            format!(
                "{{\"program\":\"{name}\",\"run_ns\":{},\"runs\":{runs}}}",
                t.as_nanos()
            )
        })
        .collect();
    println!(
        "{{\"count\":{},\"p50_s\":{},\"p99_s\":{},\"mean_s\":{},\"programs\":[{}]}}",
        h.bucket_total(),
        num(h.quantile_seconds(0.5)),
        num(h.quantile_seconds(0.99)),
        num(h.mean_seconds()),
        stats.join(",")
    );
}
