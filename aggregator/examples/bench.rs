//! Aggregator benchmark: hint ingestion rate with many simulated nodes, with the aggregator on one
//! core; `GetMetrics` latency percentiles at that load; and the time from a step in one node's load
//! (sampled every second and sent by the real hint client) to the changed value at `GetMetrics`.
//!
//! The whole aggregator (ingest runtime and scaler thread) is pinned to `--server-cpu`; the load
//! generator and the `GetMetrics` probe share another core. One saturated window is followed by
//! `--runs` windows paced at `--paced-hints-per-s`; each reports the ingest rate reached during
//! that same window, the CPU each thread used, and how much CPU other processes on the host took
//! (the figures mean little when that is high). Prints figures; asserts nothing. Run through
//! `scripts/bench-aggregator.sh`.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use headroom_aggregator::keda::proto::external_scaler_client::ExternalScalerClient;
use headroom_aggregator::keda::proto::{GetMetricsRequest, ScaledObjectRef};
use headroom_aggregator::{Aggregator, AggregatorConfig, MergePolicy};
use headroom_protocol::client::{ClientConfig, HintClient};
use headroom_protocol::schema::{Forecast, Hint, Quantile, Resource, WorkloadRef};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

struct Opts {
    nodes: usize,
    workloads: usize,
    seconds: f64,
    connections: usize,
    server_cpu: usize,
    steps: usize,
}

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pin_to(cpu: usize) -> bool {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity(0) affects only the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn hint(ns: &str, name: &str, resource: Resource, capacity: f64, p90: f64) -> Hint {
    Hint {
        workload: WorkloadRef {
            namespace: ns.into(),
            kind: "Deployment".into(),
            name: name.into(),
        },
        resource,
        replicas: 1,
        capacity,
        usage: capacity * 0.6,
        forecast: Forecast {
            horizon_s: 60.0,
            quantiles: vec![
                Quantile {
                    q: 0.5,
                    value: p90 * 0.8,
                },
                Quantile { q: 0.9, value: p90 },
                Quantile {
                    q: 0.99,
                    value: p90 * 1.2,
                },
            ],
        },
        local_headroom: 0.1,
        desired_capacity: p90,
        replica_delta: 0.0,
        confidence: 0.9,
        reason: "forecast p90 above capacity".into(),
    }
}

/// Body of node `i` split around its sequence number, so the generator only formats an integer.
fn node_body(i: usize, workloads: usize) -> (String, String) {
    let node = format!("node-{i:05}");
    // Three workloads from a pool (each on ~nodes*3/workloads nodes) plus one fleet-wide
    // workload on every node: two resources each, eight hints per batch.
    let mut hints = Vec::new();
    for j in 0..3 {
        let w = format!("svc-{}", (i * 3 + j) % workloads);
        hints.push(hint("bench", &w, Resource::Cpu, 2.0, 2.5));
        hints.push(hint("bench", &w, Resource::Memory, 4e9, 3e9));
    }
    hints.push(hint("bench", "fleet", Resource::Gpu, 1.0, 1.3));
    hints.push(hint("bench", "fleet", Resource::GpuMemory, 80e9, 60e9));
    let v = serde_json::json!({
        "schema": "headroom.hints/v1", "node": node, "epoch": 1, "seq": 999_999_999_999u64,
        "time": 1.7e9, "interval_s": 1.0, "hints": hints,
    });
    let s = v.to_string();
    let (a, b) = s.split_once("999999999999").unwrap();
    (a.to_owned(), b.to_owned())
}

const HINTS_PER_BATCH: u64 = 8;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Counters the generator keeps and the probe reads.
#[derive(Default)]
struct Load {
    running: AtomicBool,
    /// Batches per second across all connections; 0 sends as fast as the aggregator answers.
    pace: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
}

struct PhaseResult {
    hints_per_s: f64,
    /// Cores used by processes other than this benchmark during the window.
    others: f64,
    /// Of those, the share that ran on the aggregator's core.
    core_others: f64,
    /// Per thread name: cores used, and mean run-queue wait per time slice (us).
    threads: std::collections::BTreeMap<String, (f64, f64)>,
    refused: u64,
    fleet: Vec<Duration>,
    pool: Vec<Duration>,
    steps: Vec<Duration>,
}

fn main() {
    let o = Opts {
        nodes: arg("--nodes", 10_000),
        workloads: arg("--workloads", 1000),
        seconds: arg("--seconds", 10.0),
        connections: arg("--connections", 32),
        server_cpu: arg("--server-cpu", 0),
        steps: arg("--steps", 6),
    };
    let paced_hints: u64 = arg("--paced-hints-per-s", 50_000);
    let runs: usize = arg("--runs", 3);
    let saturation = !std::env::args().any(|a| a == "--no-saturation");
    let cpus = online_cpus();
    let client_cpu = if cpus > 1 {
        (o.server_cpu + 1) % cpus
    } else {
        o.server_cpu
    };
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "bench-token\n").unwrap();

    // The aggregator: one thread, one single-threaded runtime, pinned to one core (its scaler
    // thread inherits the pinning).
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_cpu = o.server_cpu;
    let scaler_rt_priority: u8 = arg("--scaler-rt-priority", 0);
    let server = std::thread::Builder::new()
        .name("agg-ingest".into())
        .spawn(move || {
            let pinned = pin_to(server_cpu);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let cfg = AggregatorConfig {
                    listen: "127.0.0.1:0".parse().unwrap(),
                    grpc_listen: "127.0.0.1:0".parse().unwrap(),
                    tokens: vec!["bench-token".into()],
                    policy: MergePolicy::default(),
                    max_body_bytes: 1 << 20,
                    node_rate: 20.0,
                    node_burst: 600.0,
                    tls: None,
                    scaler_rt_priority,
                    external_metrics: None,
                    stale_hold_s: headroom_aggregator::state::DEFAULT_STALE_HOLD_S,
                };
                let agg = Aggregator::bind(cfg).await.unwrap();
                addr_tx
                    .send((agg.http_addr().unwrap(), agg.grpc_addr().unwrap(), pinned))
                    .unwrap();
                agg.serve(async move {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
            });
        })
        .unwrap();
    let (http_addr, grpc_addr, pinned) = addr_rx.recv().unwrap();
    println!(
        "aggregator: ingest runtime and scaler thread on cpu {} (pinned: {pinned}; scaler {}); load generator and probe on cpu {client_cpu}; {cpus} cpus online",
        o.server_cpu,
        if scaler_rt_priority > 0 {
            format!("asks for SCHED_FIFO priority {scaler_rt_priority}")
        } else {
            "a normal thread with a 0.1 ms slice".to_string()
        }
    );
    println!(
        "load: {} simulated nodes, {HINTS_PER_BATCH} hints per batch ({} pooled workloads + 1 fleet-wide), {} connections, {} s per phase",
        o.nodes, o.workloads, o.connections, o.seconds
    );

    let bodies: Arc<Vec<(String, String)>> =
        Arc::new((0..o.nodes).map(|i| node_body(i, o.workloads)).collect());
    let load = Arc::new(Load::default());
    load.running.store(true, Ordering::Relaxed);

    let gen_thread = {
        let (bodies, load) = (bodies.clone(), load.clone());
        let conns = o.connections;
        let nodes = o.nodes;
        std::thread::Builder::new()
            .name("load-gen".into())
            .spawn(move || {
                pin_to(client_cpu);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let mut tasks = Vec::new();
                    for c in 0..conns {
                        let (bodies, load) = (bodies.clone(), load.clone());
                        tasks.push(tokio::spawn(async move {
                            let stream = tokio::net::TcpStream::connect(http_addr).await.unwrap();
                            stream.set_nodelay(true).unwrap();
                            let (mut send, conn) =
                                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                                    .await
                                    .unwrap();
                            tokio::spawn(conn);
                            let mut seq = 1u64;
                            let mut i = c;
                            let mut next = tokio::time::Instant::now();
                            while load.running.load(Ordering::Relaxed) {
                                let pace = load.pace.load(Ordering::Relaxed);
                                if pace > 0 {
                                    let period =
                                        Duration::from_secs_f64(conns as f64 / pace as f64);
                                    next += period;
                                    let now = tokio::time::Instant::now();
                                    if next > now {
                                        tokio::time::sleep_until(next).await;
                                    } else if now - next > period * 4 {
                                        next = now;
                                    }
                                } else {
                                    next = tokio::time::Instant::now();
                                }
                                let (a, b) = &bodies[i];
                                let body = format!("{a}{seq}{b}");
                                let req = hyper::Request::post("/v1/hints")
                                    .header("host", "bench")
                                    .header("authorization", "Bearer bench-token")
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap();
                                let resp = send.send_request(req).await.unwrap();
                                let status = resp.status();
                                let _ = resp.into_body().collect().await;
                                if status == 200 {
                                    load.ok.fetch_add(1, Ordering::Relaxed);
                                } else {
                                    load.failed.fetch_add(1, Ordering::Relaxed);
                                }
                                i += conns;
                                if i >= nodes {
                                    i = c;
                                    seq += 1;
                                }
                            }
                        }));
                    }
                    for t in tasks {
                        let _ = t.await;
                    }
                });
            })
            .unwrap()
    };
    // The probe stands in for KEDA (on another machine in a cluster); here it shares the load
    // generator's core, never the aggregator's. It asks for the same short time slice as the
    // scaler, so time it spends queued behind the load generator on its own core is not counted
    // as the aggregator's latency.
    pin_to(client_cpu);
    let probe_slice = headroom_aggregator::sched::request_short_slice(Duration::from_micros(100));
    eprintln!("probe thread: short time slice {probe_slice:?}");

    let probe_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (fleet_desired, phases) = probe_rt.block_on(async {
        // Let every node report at least once so the registry holds the whole fleet.
        let warm = Instant::now();
        while load.ok.load(Ordering::Relaxed) < o.nodes as u64
            && warm.elapsed() < Duration::from_secs(30)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc_addr}"))
            .unwrap()
            .tcp_nodelay(true)
            .connect()
            .await
            .unwrap();
        let mut grpc = ExternalScalerClient::new(channel);
        let fleet_desired = metric(&mut grpc, "bench/Deployment/fleet").await;

        // Step node: samples its load every second and sends it through the real client.
        let step_load = Arc::new(AtomicU64::new(1));
        let spool = tempfile::tempdir().unwrap();
        let mut ccfg = ClientConfig::new(
            "step-node",
            vec![format!("http://{http_addr}")],
            spool.path().into(),
        );
        ccfg.token_file = Some(token_file.clone());
        let client = HintClient::start(ccfg).unwrap();
        let sampler = {
            let step_load = step_load.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    let l = step_load.load(Ordering::Relaxed) as f64;
                    client
                        .submit(vec![hint("bench", "step", Resource::Cpu, 1.0, l)])
                        .await
                        .unwrap();
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(1500)).await;

        let mut paces = Vec::new();
        if saturation {
            paces.push(0);
        }
        paces.extend(std::iter::repeat_n(paced_hints, runs));
        let mut phases = Vec::new();
        for pace_hints in paces {
            load.pace
                .store(pace_hints / HINTS_PER_BATCH, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(500)).await;
            let r = phase(&o, &load, &mut grpc, &step_load).await;
            phases.push((pace_hints, r));
        }
        sampler.abort();
        (fleet_desired, phases)
    });
    // Closing the probe's connection first lets the scaler's graceful shutdown finish at once.
    drop(probe_rt);
    load.running.store(false, Ordering::Relaxed);
    let _ = gen_thread.join();
    let _ = stop_tx.send(());
    let _ = server.join();

    let mut paced_p99 = Vec::new();
    let mut paced_ingest = Vec::new();
    let n_paced = phases.iter().filter(|(p, _)| *p > 0).count();
    let mut k_paced = 0;
    for (pace, mut r) in phases {
        let label = if pace == 0 {
            "saturation (as fast as the aggregator answers)".to_string()
        } else {
            k_paced += 1;
            format!("paced at {pace} hints/s, window {k_paced} of {n_paced}")
        };
        println!("--- {label}");
        println!(
            "ingest during the window: {:.0} hints/s accepted ({:.0} batches/s), {} refused (target >= 50000 hints/s)",
            r.hints_per_s,
            r.hints_per_s / HINTS_PER_BATCH as f64,
            r.refused
        );
        let cores = |name: &str| r.threads.get(name).map_or(0.0, |t| t.0);
        let (_, wait_us) = r.threads.get("headroom-grpc").copied().unwrap_or_default();
        println!(
            "cpu: aggregator ingest thread {:.2} cores, scaler thread {:.2} (run-queue wait {wait_us:.0} us per wake-up); load generator {:.2}; probe {:.2}; other processes on the host {:.2} cores, {:.2} of them on the aggregator's core",
            cores("agg-ingest"),
            cores("headroom-grpc"),
            cores("load-gen"),
            cores("bench"),
            r.others,
            r.core_others
        );
        r.fleet.sort();
        r.pool.sort();
        let mut all: Vec<Duration> = r.fleet.iter().chain(&r.pool).copied().collect();
        all.sort();
        let line = |what: String, v: &[Duration]| {
            println!(
                "GetMetrics, {what}: n={} p50={:.3} ms p99={:.3} ms p999={:.3} ms max={:.3} ms",
                v.len(),
                ms(percentile(v, 0.5)),
                ms(percentile(v, 0.99)),
                ms(percentile(v, 0.999)),
                ms(v.last().copied().unwrap_or_default())
            )
        };
        line(
            format!(
                "fleet-wide workload on {} nodes (desired {fleet_desired})",
                o.nodes
            ),
            &r.fleet,
        );
        line(
            format!(
                "typical workload on ~{} nodes",
                o.nodes * 3 / o.workloads.max(1)
            ),
            &r.pool,
        );
        line("all calls (target p99 <= 1 ms)".into(), &all);
        if pace > 0 {
            paced_p99.push(ms(percentile(&all, 0.99)));
            paced_ingest.push(r.hints_per_s);
        }
        let shown: Vec<f64> = r.steps.iter().map(|d| ms(*d).round()).collect();
        r.steps.sort();
        println!(
            "step in a node's load to changed GetMetrics (1 s sampling, real hint client): n={} ms={shown:?} median={:.0} ms max={:.0} ms (target <= 2000 ms)",
            r.steps.len(),
            ms(percentile(&r.steps, 0.5)),
            ms(r.steps.last().copied().unwrap_or_default())
        );
    }
    if !paced_p99.is_empty() {
        let fmt = |v: &[f64], d: usize| {
            v.iter()
                .map(|x| format!("{x:.d$}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "=== {} paced windows: ingest [{}] hints/s; GetMetrics p99 [{}] ms",
            paced_p99.len(),
            fmt(&paced_ingest, 0),
            fmt(&paced_p99, 3)
        );
    }
}

fn schedstats() -> std::collections::BTreeMap<String, (u64, u64, u64)> {
    let mut m = std::collections::BTreeMap::new();
    for e in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let st = std::fs::read_to_string(e.path().join("schedstat")).unwrap_or_default();
        let v: Vec<u64> = st
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if v.len() == 3 {
            let ent = m.entry(comm).or_insert((0, 0, 0));
            ent.0 += v[0];
            ent.1 += v[1];
            ent.2 += v[2];
        }
    }
    m
}

/// Machine-wide busy time and this process's CPU time, to tell how much other processes used.
struct CpuSample {
    at: Instant,
    busy_ticks: u64,
    /// Busy time of the aggregator's core alone.
    core_busy_ticks: u64,
    own_ticks: u64,
}

/// Busy ticks of the `/proc/stat` line starting with `label` (`cpu` or `cpuN`).
fn stat_busy(stat: &str, label: &str) -> u64 {
    let v: Vec<u64> = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(label))
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: busy is everything but idle and iowait.
    v.iter().take(8).sum::<u64>() - v.get(3).unwrap_or(&0) - v.get(4).unwrap_or(&0)
}

impl CpuSample {
    fn now(core: usize) -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let busy_ticks = stat_busy(&stat, "cpu");
        let core_busy_ticks = stat_busy(&stat, &format!("cpu{core}"));
        let own = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let after_comm = own.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = after_comm
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        // utime and stime (fields 14 and 15) are the 11th and 12th numbers after the command
        // name (field 3, the state, is a letter).
        let own_ticks = f.get(10).unwrap_or(&0) + f.get(11).unwrap_or(&0);
        CpuSample {
            at: Instant::now(),
            busy_ticks,
            core_busy_ticks,
            own_ticks,
        }
    }

    fn others_since(&self, start: &CpuSample) -> f64 {
        let hz = 100.0; // USER_HZ
        let secs = self.at.duration_since(start.at).as_secs_f64().max(1e-3);
        let busy = self.busy_ticks.saturating_sub(start.busy_ticks) as f64;
        let own = self.own_ticks.saturating_sub(start.own_ticks) as f64;
        ((busy - own) / hz / secs).max(0.0)
    }

    /// Cores' worth of the aggregator's core that went to anything but `own_cores`.
    fn core_others_since(&self, start: &CpuSample, own_cores: f64) -> f64 {
        let secs = self.at.duration_since(start.at).as_secs_f64().max(1e-3);
        let busy = self.core_busy_ticks.saturating_sub(start.core_busy_ticks) as f64 / 100.0;
        (busy / secs - own_cores).max(0.0)
    }
}

type Grpc = ExternalScalerClient<tonic::transport::Channel>;

fn request(workload: &str) -> GetMetricsRequest {
    GetMetricsRequest {
        scaled_object_ref: Some(ScaledObjectRef {
            name: "x".into(),
            namespace: "bench".into(),
            scaler_metadata: [("workload".to_string(), workload.to_string())].into(),
        }),
        metric_name: String::new(),
    }
}

async fn metric(grpc: &mut Grpc, workload: &str) -> i64 {
    grpc.get_metrics(request(workload))
        .await
        .unwrap()
        .into_inner()
        .metric_values[0]
        .metric_value
}

/// One measuring window: GetMetrics latency on a fleet-wide and a typical workload, alternating,
/// and steps of the step node's load timed until GetMetrics shows them.
async fn phase(o: &Opts, load: &Load, grpc: &mut Grpc, step_load: &AtomicU64) -> PhaseResult {
    let ok0 = load.ok.load(Ordering::Relaxed);
    let failed0 = load.failed.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(o.seconds);
    let (mut fleet, mut pool, mut steps) = (Vec::new(), Vec::new(), Vec::new());
    let mut ingest: Option<(f64, u64)> = None;
    let cpu0 = CpuSample::now(o.server_cpu);
    let sched0 = schedstats();
    let mut others = 0.0;
    let mut core_others = 0.0;
    let mut threads = std::collections::BTreeMap::new();
    let mut k = 0usize;
    let mut next_step = Instant::now() + Duration::from_millis(300);
    let mut pending: Option<(Instant, i64)> = None;
    loop {
        let now = Instant::now();
        if now >= deadline && ingest.is_none() {
            let secs = t0.elapsed().as_secs_f64();
            let hints = (load.ok.load(Ordering::Relaxed) - ok0) * HINTS_PER_BATCH;
            ingest = Some((
                hints as f64 / secs,
                load.failed.load(Ordering::Relaxed) - failed0,
            ));
            let cpu1 = CpuSample::now(o.server_cpu);
            others = cpu1.others_since(&cpu0);
            for (name, (run, wait, n)) in schedstats() {
                if let Some((r0, w0, n0)) = sched0.get(&name) {
                    let wakeups = n.saturating_sub(*n0).max(1) as f64;
                    threads.insert(
                        name,
                        (
                            run.saturating_sub(*r0) as f64 / 1e9 / secs,
                            wait.saturating_sub(*w0) as f64 / 1e3 / wakeups,
                        ),
                    );
                }
            }
            let own: f64 = ["agg-ingest", "headroom-grpc"]
                .iter()
                .filter_map(|t| threads.get(*t).map(|c: &(f64, f64)| c.0))
                .sum();
            core_others = cpu1.core_others_since(&cpu0, own);
        }
        if now >= deadline && (steps.len() >= o.steps || now >= deadline + Duration::from_secs(20))
        {
            break;
        }
        let w = if k.is_multiple_of(2) {
            "bench/Deployment/fleet".to_string()
        } else {
            format!("bench/Deployment/svc-{}", k % o.workloads)
        };
        let s = Instant::now();
        metric(grpc, &w).await;
        if now < deadline {
            if k.is_multiple_of(2) {
                fleet.push(s.elapsed())
            } else {
                pool.push(s.elapsed())
            }
        }
        k += 1;
        let v = metric(grpc, "bench/Deployment/step").await;
        match pending {
            Some((t, want)) if v == want => {
                steps.push(t.elapsed());
                pending = None;
                // A pseudo-random phase against the 1 s sampler for the next step.
                next_step = Instant::now() + Duration::from_millis(300 + (k as u64 * 7919) % 1000);
            }
            None if Instant::now() >= next_step && steps.len() < o.steps => {
                // Load 1 -> 1 replica, load 5 -> 5 replicas (1.1 cores absorbable per replica).
                let (new_load, want) = if step_load.load(Ordering::Relaxed) == 1 {
                    (5, 5)
                } else {
                    (1, 1)
                };
                step_load.store(new_load, Ordering::Relaxed);
                pending = Some((Instant::now(), want));
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let (hints_per_s, refused) = ingest.unwrap_or((0.0, 0));
    PhaseResult {
        hints_per_s,
        others,
        core_others,
        threads,
        refused,
        fleet,
        pool,
        steps,
    }
}
