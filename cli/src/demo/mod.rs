//! `headroom demo`: an aggregator and three simulated nodes in one process, replaying real traces
//! accelerated, for a first look without a GPU node.
//!
//! Each node is the real agent ([`headroom_agent::agent::start`]): history, forecasters, the policy engine
//! and its actuator, hint reports over HTTP to the real aggregator, the status page and
//! `/metrics`. Only what lies under the samplers is simulated ([`sim`]): the kernel's cgroup and
//! procfs files (in a scratch folder, written from the traces and limited by what the actuator
//! wrote) and the GPUs (snapshots from the traces instead of NVML). This module never touches a
//! real cgroup, never loads NVML or eBPF, and listens on 127.0.0.1 only.

pub mod scenario;
pub mod sim;
pub mod trace;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use headroom_agent::config::{Config, PolicyMode, WorkloadRule};

/// Flags of `headroom demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Trace seconds replayed per wall second.
    #[arg(long, default_value_t = 60.0, value_name = "N")]
    pub speed: f64,
    /// First of five consecutive ports on 127.0.0.1: aggregator HTTP, aggregator gRPC (KEDA),
    /// then one status page per node; 0 picks free ports.
    #[arg(long, default_value_t = 18470, value_name = "PORT")]
    pub listen_base: u16,
    /// Stop after this many wall seconds (default: run until Ctrl-C or SIGTERM).
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<f64>,
    /// Replay these `timestamp_s,value` CSV files (one container each) instead of the embedded
    /// traces.
    #[arg(long, value_name = "DIR")]
    pub traces: Option<PathBuf>,
    /// Seconds of history each node starts with: the trace before the start is fed through the
    /// nodes' samplers and forecasters at once (no decisions, no hints), as if they had been
    /// running; 0 starts empty.
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    pub warmup: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A flag or input file that cannot work; exit code 2.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Run(#[from] anyhow::Error),
}

/// Seconds between samples on every demo node.
const SAMPLE_INTERVAL_S: f64 = 1.0;
/// How often the simulated kernels advance.
const TICK: Duration = Duration::from_millis(100);
/// Longest warm-up: what the agents' fine history tier holds.
const MAX_WARMUP_S: u32 = 600;

fn validate(args: &DemoArgs) -> Result<(), DemoError> {
    if !(args.speed.is_finite() && args.speed > 0.0 && args.speed <= 100_000.0) {
        return Err(DemoError::Usage(format!(
            "--speed {}: must be a number of trace seconds per wall second, above 0 and at most 100000",
            args.speed
        )));
    }
    if let Some(d) = args.duration
        && !(d.is_finite() && d > 0.0)
    {
        return Err(DemoError::Usage(format!(
            "--duration {d}: must be a positive number of seconds"
        )));
    }
    if args.warmup > MAX_WARMUP_S {
        return Err(DemoError::Usage(format!(
            "--warmup {}: at most {MAX_WARMUP_S} seconds (the history's fine tier)",
            args.warmup
        )));
    }
    if args.listen_base > u16::MAX - 4 {
        return Err(DemoError::Usage(format!(
            "--listen-base {}: the demo needs five consecutive ports, so at most {}",
            args.listen_base,
            u16::MAX - 4
        )));
    }
    Ok(())
}

fn port(base: u16, i: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], if base == 0 { 0 } else { base + i }))
}

/// The agent configuration of one demo node: everything under `dir`, the policy enforcing on the
/// simulated containers, hints to the demo's aggregator.
fn node_config(
    spec: &sim::NodeSpec,
    node: &sim::SimNode,
    dir: &std::path::Path,
    listen: SocketAddr,
    aggregator: &str,
    token_file: &std::path::Path,
) -> Result<Config, DemoError> {
    let mut c = Config {
        listen,
        state_dir: dir.join("state"),
        sample_interval_s: SAMPLE_INTERVAL_S,
        hostname: spec.name.clone(),
        ..Config::default()
    };
    c.cgroup.root = node.cgroup_root.clone();
    c.cgroup.proc_root = node.proc_root.clone();
    c.cgroup.include = vec!["/demo/*".into()];
    c.cgroup.systemd_services = false;
    c.cgroup.runtime_state_dirs = Vec::new();
    c.kubernetes.log_dir = dir.join("no-kubernetes-logs");
    c.gpu.enabled = false;
    c.ebpf.enabled = false;
    c.aggregator.endpoints = vec![aggregator.to_string()];
    c.aggregator.token_file = Some(token_file.to_path_buf());
    c.aggregator.window_s = 60;
    c.aggregator.workloads = spec
        .containers
        .iter()
        .map(|ct| WorkloadRule {
            cgroup: ct.cgroup.clone(),
            namespace: "demo".into(),
            kind: "Deployment".into(),
            name: ct.workload.clone(),
        })
        .collect();
    c.policy.mode = PolicyMode::Enforce;
    c.policy.manage = vec!["/demo/*".into()];
    // memory.max follows memory.high, so a hard limit never stops a raise.
    c.policy.allow_memory_max = true;
    // A demo minute is an hour of trace: act on the same scale.
    c.policy.cooldown_s = 5.0;
    c.policy.scale_in_window_s = 30.0;
    c.policy.rollback_window_s = 20.0;
    c.policy.lead_time_s = 10.0;
    c.forecast.lead_time_s = 10.0;
    c.history.save_interval_s = 3600;
    c.validate()
        .map_err(|e| DemoError::Usage(format!("demo node {}: {e}", spec.name)))?;
    Ok(c)
}

/// Runs `steps` sampling passes per node, as fast as they go, over the trace before the start:
/// the simulated kernel advances one sample interval of trace per pass, the node's real samplers
/// read it, and the passes go through the real forecasters into the history, stamped one interval
/// apart ending now. The result is saved in each node's state folder, where the agent restores it
/// at start as it would after a restart. The policy and the hint sender do not see these passes.
fn warm_up(
    kernels: &mut [sim::SimNode],
    configs: &[Config],
    steps: usize,
    speed: f64,
) -> anyhow::Result<()> {
    let now_t = Arc::new(std::sync::atomic::AtomicU64::new(0f64.to_bits()));
    let mut nodes = Vec::new();
    for (k, c) in kernels.iter().zip(configs) {
        let t = now_t.clone();
        let time: sim::TraceTime = Arc::new(move || f64::from_bits(t.load(Ordering::Relaxed)));
        let samplers = headroom_agent::agent::Samplers::new(c).with_gpu(Box::new(k.gpus(time)));
        let shared = headroom_agent::shared::Shared::new(
            c,
            headroom_agent::agent::new_history(c),
            c.hostname.clone(),
        );
        let forecasts = headroom_agent::forecast::Forecasts::new(&c.forecast, c.sample_interval_s)
            .map_err(|e| anyhow::anyhow!("forecast settings: {e}"))?;
        nodes.push((samplers, shared, forecasts, Instant::now()));
    }
    let step_ms = (SAMPLE_INTERVAL_S * 1000.0) as u64;
    let end_ms = headroom_agent::agent::unix_ms(std::time::SystemTime::now());
    let stale_ms = configs
        .first()
        .map_or(30_000, |c| c.history.stale_after_s * 1000);
    for i in 0..steps {
        let t = i as f64 * SAMPLE_INTERVAL_S * speed;
        now_t.store(t.to_bits(), Ordering::Relaxed);
        // A few milliseconds per pass keep the rates the samplers compute smooth.
        std::thread::sleep(Duration::from_millis(2));
        let t_ms = end_ms.saturating_sub((steps - i) as u64 * step_ms);
        for (k, (samplers, shared, forecasts, last)) in kernels.iter_mut().zip(&mut nodes) {
            let dt = last.elapsed().as_secs_f64();
            *last = Instant::now();
            k.tick_with(t, dt, SAMPLE_INTERVAL_S)?;
            let mut snapshot = samplers.sample(shared);
            headroom_agent::agent::record_pass(
                shared,
                Some(forecasts),
                &mut snapshot,
                t_ms,
                stale_ms,
            );
        }
    }
    for ((_, shared, forecasts, _), c) in nodes.iter().zip(configs) {
        let dir = headroom_agent::state::StateDir::open(&c.state_dir)?;
        headroom_agent::agent::save_history(&dir, shared);
        headroom_agent::agent::save_forecasts(&dir, forecasts);
    }
    Ok(())
}

/// Removes the scratch folder when the demo ends, however it ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(dir = %self.0.display(), error = %e, "cannot remove the demo's scratch folder");
        }
    }
}

/// Runs the demo until Ctrl-C, SIGTERM or `--duration`.
pub fn run(args: &DemoArgs) -> Result<(), DemoError> {
    validate(args)?;
    let specs = match &args.traces {
        Some(dir) => scenario::from_dir(dir),
        None => scenario::builtin(),
    }
    .map_err(|e| DemoError::Usage(e.to_string()))?;

    let scratch = std::env::temp_dir().join(format!("headroom-demo-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", scratch.display()))?;
    let scratch = Scratch(scratch);
    let token = format!(
        "demo-{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let token_file = scratch.0.join("token");
    std::fs::write(&token_file, format!("{token}\n"))
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", token_file.display()))?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("headroom-demo-io")
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;

    let agg_cfg = headroom_aggregator::AggregatorConfig {
        listen: port(args.listen_base, 0),
        grpc_listen: port(args.listen_base, 1),
        tokens: vec![token],
        policy: headroom_aggregator::MergePolicy::default(),
        max_body_bytes: 1 << 20,
        node_rate: 20.0,
        node_burst: 600.0,
        tls: None,
        scaler_rt_priority: 0,
        external_metrics: None,
        stale_hold_s: headroom_aggregator::state::DEFAULT_STALE_HOLD_S,
    };
    let aggregator = runtime
        .block_on(headroom_aggregator::Aggregator::bind(agg_cfg))
        .map_err(|e| DemoError::Usage(format!("aggregator: {e} (try another --listen-base)")))?;
    let agg_http = aggregator.http_addr().map_err(anyhow::Error::from)?;
    let agg_grpc = aggregator.grpc_addr().map_err(anyhow::Error::from)?;
    let (agg_stop, agg_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agg_task = runtime.spawn(aggregator.serve(async {
        let _ = agg_stop_rx.await;
    }));
    let agg_url = format!("http://{agg_http}");

    let mut kernels = Vec::new();
    let mut configs = Vec::new();
    for (i, spec) in specs.into_iter().enumerate() {
        let dir = scratch.0.join(&spec.name);
        let kernel = sim::SimNode::create(&dir, spec.clone())
            .map_err(|e| anyhow::anyhow!("simulated node {}: {e}", spec.name))?;
        configs.push(node_config(
            &spec,
            &kernel,
            &dir,
            port(args.listen_base, 2 + i as u16),
            &agg_url,
            &token_file,
        )?);
        kernels.push(kernel);
    }
    let steps = (f64::from(args.warmup) / SAMPLE_INTERVAL_S).round() as usize;
    if steps > 0 {
        let t0 = Instant::now();
        match warm_up(&mut kernels, &configs, steps, args.speed) {
            Ok(()) => tracing::info!(
                samples = steps,
                trace_seconds = steps as f64 * SAMPLE_INTERVAL_S * args.speed,
                wall_ms = t0.elapsed().as_millis() as u64,
                "warm-up: history and forecasters filled from the trace before the start"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "warm-up failed; the nodes start with empty history")
            }
        }
    }
    let clock = sim::Clock {
        start: Instant::now(),
        speed: args.speed,
        offset_s: steps as f64 * SAMPLE_INTERVAL_S * args.speed,
    };
    let mut nodes = Vec::new();
    let mut failed = None;
    for (kernel, cfg) in kernels.iter().zip(configs) {
        let gpus = kernel.gpus(clock.source());
        let name = cfg.hostname.clone();
        match headroom_agent::agent::start(cfg, &runtime, move |c| {
            headroom_agent::agent::Samplers::new(c).with_gpu(Box::new(gpus))
        }) {
            Ok(r) => nodes.push(r),
            Err(e) => {
                failed = Some(DemoError::Usage(format!(
                    "demo node {name}: {e:#} (try another --listen-base)"
                )));
                break;
            }
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let kernel_thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("headroom-demo-sim".into())
            .spawn(move || {
                let mut last = Instant::now();
                let mut warned = false;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    let dt = last.elapsed().as_secs_f64();
                    last = Instant::now();
                    let t = clock.trace_s();
                    for k in &mut kernels {
                        if let Err(e) = k.tick(t, dt)
                            && !warned
                        {
                            tracing::error!(error = %e, "simulated node cannot write its files; its samples go stale");
                            warned = true;
                        }
                    }
                }
            })
            .map_err(|e| anyhow::anyhow!("cannot start the simulation thread: {e}"))?
    };

    let outcome = match failed {
        Some(e) => Err(e),
        None => {
            print_banner(args, &agg_url, agg_grpc, &nodes);
            let wait = async {
                match args.duration {
                    Some(d) => {
                        tokio::select! {
                            s = headroom_agent::agent::wait_for_signal() => s,
                            _ = tokio::time::sleep(Duration::from_secs_f64(d)) => "--duration",
                        }
                    }
                    None => headroom_agent::agent::wait_for_signal().await,
                }
            };
            let why = runtime.block_on(wait);
            tracing::info!(why, "demo stopping");
            Ok(())
        }
    };
    for n in nodes {
        n.stop(&runtime);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = kernel_thread.join();
    let _ = agg_stop.send(());
    let served =
        runtime.block_on(async { tokio::time::timeout(Duration::from_secs(3), agg_task).await });
    if let Ok(Ok(Err(e))) = served {
        tracing::warn!(error = %e, "aggregator stopped with an error");
    }
    runtime.shutdown_timeout(Duration::from_millis(200));
    drop(scratch);
    if outcome.is_ok() {
        println!("headroom demo: stopped");
    }
    outcome
}

fn print_banner(
    args: &DemoArgs,
    agg: &str,
    grpc: SocketAddr,
    nodes: &[headroom_agent::agent::Running],
) {
    let mut out = String::new();
    let source = match &args.traces {
        Some(d) => format!("the traces in {}", d.display()),
        None => "real public traces (Azure LLM 2023, Mooncake 2025, NASA-HTTP 1995, Google cluster 2011)".into(),
    };
    out.push_str(&format!(
        "headroom demo: an aggregator and {} simulated nodes replaying {source},\n\
         {} trace seconds per wall second. Each node runs the real agent (history, forecasts,\n\
         policy in enforce mode on simulated containers, hints to the aggregator); only the\n\
         kernel files and GPUs under its samplers are simulated.\n",
        nodes.len(),
        args.speed
    ));
    if args.warmup > 0 {
        out.push_str(&format!(
            "Warm-up: each node starts with {} s of history, made by feeding the {} trace seconds\n\
             before the start through its samplers and forecasters at once (no decisions or hints).\n",
            args.warmup,
            f64::from(args.warmup) * args.speed
        ));
    }
    out.push('\n');
    out.push_str(&format!("  aggregator status page   {agg}/\n"));
    out.push_str(&format!(
        "  aggregator JSON API      {agg}/v1/workloads  {agg}/v1/nodes\n"
    ));
    out.push_str(&format!("  aggregator metrics       {agg}/metrics\n"));
    out.push_str(&format!("  KEDA external scaler     {grpc} (gRPC)\n"));
    for n in nodes {
        let url = format!("http://{}", n.listen);
        out.push_str(&format!(
            "  {:<24} {url}/   ({url}/metrics  {url}/v1/status  {url}/v1/decisions)\n",
            format!("{} status page", n.shared.hostname)
        ));
    }
    out.push_str("\nPages fill within seconds; the policy's first decisions follow within a minute.\nCtrl-C stops the demo.\n");
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> DemoArgs {
        DemoArgs {
            speed: 60.0,
            listen_base: 18470,
            duration: None,
            traces: None,
            warmup: 300,
        }
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        assert!(validate(&args()).is_ok());
        for bad in [
            DemoArgs {
                speed: 0.0,
                ..args()
            },
            DemoArgs {
                speed: f64::NAN,
                ..args()
            },
            DemoArgs {
                duration: Some(-1.0),
                ..args()
            },
            DemoArgs {
                listen_base: 65534,
                ..args()
            },
            DemoArgs {
                warmup: 601,
                ..args()
            },
        ] {
            assert!(matches!(validate(&bad), Err(DemoError::Usage(_))));
        }
    }
}
