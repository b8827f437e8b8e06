//! Prometheus exposition, encoded at scrape time from the newest snapshot: a scrape costs one
//! pass over values already in memory and never touches procfs, cgroups or NVML. Families
//! with no rows are left out. Names are `headroom_<thing>_<unit>`; counters get `_total` from
//! the encoder.

use std::fmt;

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;

use crate::sample::{Snapshot, unix_seconds};
use crate::shared::Shared;

pub type Labels = Vec<(String, String)>;

/// Writes one gauge family.
pub fn gauges<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, f64)>,
) -> fmt::Result {
    family(enc, name, help, MetricType::Gauge, rows)
}

/// Writes one counter family; `name` is without the `_total` suffix.
pub fn counters<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, f64)>,
) -> fmt::Result {
    family(enc, name, help, MetricType::Counter, rows)
}

fn family<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    rows: impl IntoIterator<Item = (L, f64)>,
) -> fmt::Result {
    let mut rows = rows.into_iter().filter(|(_, v)| v.is_finite()).peekable();
    if rows.peek().is_none() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(name, help, None, ty)?;
    for (labels, v) in rows {
        let mut f = m.encode_family(&labels)?;
        match ty {
            MetricType::Counter => f.encode_counter::<NoLabelSet, f64, f64>(&v, None)?,
            _ => f.encode_gauge(&v)?,
        }
    }
    Ok(())
}

/// `labels` plus one more pair.
pub fn with(labels: &[(String, String)], key: &str, value: &str) -> Labels {
    let mut l = Vec::with_capacity(labels.len() + 1);
    l.extend_from_slice(labels);
    l.push((key.to_string(), value.to_string()));
    l
}

/// The agent's own series: build, sampling cost, sampler health, history size, decisions,
/// process usage and the hint sender's counters.
fn encode_self(shared: &Shared, enc: &mut DescriptorEncoder) -> fmt::Result {
    let none: [(&str, &str); 0] = [];
    gauges(
        enc,
        "headroom_build_info",
        "Build of the running agent.",
        [([("version", env!("CARGO_PKG_VERSION"))], 1.0)],
    )?;
    let cost = shared.cost().clone();
    counters(
        enc,
        "headroom_agent_samples",
        "Sampling passes completed.",
        [(none, cost.samples as f64)],
    )?;
    counters(
        enc,
        "headroom_agent_sample_cpu_seconds",
        "CPU time the sampling thread spent sampling.",
        [(none, cost.total_cpu_seconds)],
    )?;
    gauges(
        enc,
        "headroom_agent_sample_duration_seconds",
        "Wall time of the newest sampling pass.",
        [(none, cost.last_wall_seconds)],
    )?;
    let samplers = shared.samplers();
    gauges(
        enc,
        "headroom_agent_sampler_up",
        "1 when the sampler's newest pass succeeded.",
        samplers
            .iter()
            .map(|(n, h)| ([("sampler", *n)], if h.healthy { 1.0 } else { 0.0 })),
    )?;
    let (series, containers) = (
        shared.history().len(),
        shared.latest().map(|s| s.containers.len()).unwrap_or(0),
    );
    gauges(
        enc,
        "headroom_agent_history_series",
        "Series held in history.",
        [(none, series as f64)],
    )?;
    gauges(
        enc,
        "headroom_agent_containers",
        "Containers found by the newest sample.",
        [(none, containers as f64)],
    )?;
    counters(
        enc,
        "headroom_decisions",
        "Policy decisions, by resource, reason and whether they were written.",
        shared
            .decisions
            .counts()
            .into_iter()
            .map(|((r, why, applied), n)| {
                (
                    [
                        ("resource", r),
                        ("reason", why),
                        ("applied", if applied { "true" } else { "false" }),
                    ],
                    n as f64,
                )
            }),
    )?;
    counters(
        enc,
        "headroom_agent_lock_recoveries",
        "Locks taken back after a thread panicked while holding them (a bug; see the log), by lock.",
        shared
            .recovered()
            .into_iter()
            .map(|(lock, n)| ([("lock", lock)], n as f64)),
    )?;
    if let Some((rss, cpu)) = self_usage() {
        gauges(
            enc,
            "headroom_agent_resident_memory_bytes",
            "Resident memory of the agent process.",
            [(none, rss)],
        )?;
        counters(
            enc,
            "headroom_agent_cpu_seconds",
            "CPU time of the agent process.",
            [(none, cpu)],
        )?;
    }
    if let Some(client) = shared.hints.get() {
        let stats = client.stats();
        let rows = |f: fn(&headroom_protocol::client::StatsSnapshot) -> u64| {
            stats
                .iter()
                .map(move |(e, s)| ([("endpoint", e.clone())], f(s) as f64))
                .collect::<Vec<_>>()
        };
        counters(
            enc,
            "headroom_agent_hint_batches",
            "Hint batches the aggregator acknowledged, by endpoint and result.",
            stats.iter().flat_map(|(e, s)| {
                [
                    ("delivered", s.delivered),
                    ("duplicate", s.duplicates),
                    ("rejected", s.rejected),
                ]
                .map(|(r, v)| {
                    (
                        [("endpoint", e.clone()), ("result", r.to_string())],
                        v as f64,
                    )
                })
            }),
        )?;
        counters(
            enc,
            "headroom_agent_hint_send_failures",
            "Failed attempts to deliver a hint batch (unreachable, timeout, 5xx, 429, 401).",
            rows(|s| s.failures),
        )?;
        gauges(
            enc,
            "headroom_agent_hint_spool_batches",
            "Hint batches waiting in the on-disk spool.",
            rows(|s| s.spool_len),
        )?;
        counters(
            enc,
            "headroom_agent_hint_spool_dropped_batches",
            "Oldest spooled hint batches dropped because the spool was full.",
            rows(|s| s.dropped_oldest),
        )?;
    }
    gauges(
        enc,
        "headroom_agent_start_time_seconds",
        "When the agent started, seconds since the epoch.",
        [(none, unix_seconds::to_f64(shared.started_at))],
    )
}

/// Resident bytes and CPU seconds of this process, from /proc/self/stat.
fn self_usage() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    // Fields after the command: state is index 0, utime 11, stime 12, rss 21 (pages).
    let tps = procfs::ticks_per_second() as f64;
    let cpu = (f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / tps;
    let rss = f.get(21)?.parse::<f64>().ok()? * procfs::page_size() as f64;
    Some((rss, cpu))
}

/// The agent's own `prometheus_client` collector.
#[derive(Debug)]
pub struct AgentCollector {
    pub shared: std::sync::Arc<Shared>,
}

impl prometheus_client::collector::Collector for AgentCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let snapshot = self.shared.latest();
        encode_self(&self.shared, &mut enc)?;
        if let Some(s) = snapshot.as_deref() {
            encode_snapshot(s, &self.shared.hostname, &mut enc)?;
        }
        Ok(())
    }
}

fn none() -> [(&'static str, &'static str); 0] {
    []
}

pub fn encode_snapshot(s: &Snapshot, hostname: &str, enc: &mut DescriptorEncoder) -> fmt::Result {
    s.gpu.encode(enc, hostname, &|cgroup| {
        s.containers
            .iter()
            .find(|c| c.ident.cgroup == cgroup)
            .map(|c| {
                c.ident
                    .labels()
                    .into_iter()
                    .filter(|(k, _)| k == "namespace" || k == "pod" || k == "container")
                    .collect()
            })
            .unwrap_or_default()
    })?;
    if let Some(n) = &s.node {
        counters(
            enc,
            "headroom_node_cpu_seconds",
            "CPU time spent in each mode since boot, summed over all CPUs.",
            n.cpu_seconds.pairs().map(|(mode, v)| ([("mode", mode)], v)),
        )?;
        gauges(
            enc,
            "headroom_node_cpus",
            "Online CPUs.",
            [(none(), n.cpus as f64)],
        )?;
        gauges(
            enc,
            "headroom_node_cpu_usage_cores",
            "Cores busy since the previous sample.",
            n.cpu_usage_cores.map(|v| (none(), v)),
        )?;
        gauges(
            enc,
            "headroom_node_cpu_core_busy_ratio",
            "Busy share of each core since the previous sample.",
            n.core_busy_ratio
                .iter()
                .enumerate()
                .map(|(i, v)| ([("cpu", i.to_string())], *v)),
        )?;
        for (name, help, v) in [
            (
                "headroom_node_memory_total_bytes",
                "Physical memory.",
                n.memory_total_bytes,
            ),
            (
                "headroom_node_memory_available_bytes",
                "Memory available for new work without swapping (MemAvailable).",
                n.memory_available_bytes,
            ),
            (
                "headroom_node_memory_free_bytes",
                "Unused memory (MemFree).",
                n.memory_free_bytes,
            ),
            (
                "headroom_node_swap_total_bytes",
                "Swap space.",
                n.swap_total_bytes,
            ),
            (
                "headroom_node_swap_free_bytes",
                "Unused swap space.",
                n.swap_free_bytes,
            ),
        ] {
            gauges(enc, name, help, [(none(), v as f64)])?;
        }
        gauges(
            enc,
            "headroom_node_load_average",
            "Run-queue load average.",
            ["1m", "5m", "15m"]
                .iter()
                .zip(n.load)
                .map(|(w, v)| ([("window", *w)], v)),
        )?;
        gauges(
            enc,
            "headroom_node_procs_running",
            "Runnable tasks.",
            [(none(), n.procs_running as f64)],
        )?;
        pressure(enc, "node", &n.pressure, &n.pressure_some_ratio, |r| {
            vec![("resource".to_string(), r.to_string())]
        })?;
    }
    let c = &s.containers;
    let labels: Vec<Labels> = c.iter().map(|c| c.ident.labels()).collect();
    let rows = |f: &dyn Fn(&crate::sample::cgroup::ContainerSample) -> Option<f64>| {
        c.iter()
            .zip(&labels)
            .filter_map(|(c, l)| f(c).map(|v| (l.as_slice(), v)))
            .collect::<Vec<_>>()
    };
    gauges(
        enc,
        "headroom_container_cpu_usage_cores",
        "CPU used since the previous sample, in cores.",
        rows(&|c| c.cpu_cores),
    )?;
    counters(
        enc,
        "headroom_container_cpu_seconds",
        "CPU time consumed.",
        rows(&|c| c.stats.cpu_usage_seconds),
    )?;
    counters(
        enc,
        "headroom_container_cpu_periods",
        "CFS enforcement periods elapsed.",
        rows(&|c| c.stats.cpu_periods.map(|v| v as f64)),
    )?;
    counters(
        enc,
        "headroom_container_cpu_throttled_periods",
        "CFS periods in which the container was throttled.",
        rows(&|c| c.stats.cpu_throttled_periods.map(|v| v as f64)),
    )?;
    counters(
        enc,
        "headroom_container_cpu_throttled_seconds",
        "Time the container was throttled.",
        rows(&|c| c.stats.cpu_throttled_seconds),
    )?;
    gauges(
        enc,
        "headroom_container_cpu_throttled_ratio",
        "Share of CFS periods throttled since the previous sample.",
        rows(&|c| c.throttled_ratio),
    )?;
    gauges(
        enc,
        "headroom_container_cpu_quota_cores",
        "CFS quota in cores (absent when unlimited).",
        rows(&|c| c.stats.cpu_quota_cores),
    )?;
    gauges(
        enc,
        "headroom_container_cpu_period_seconds",
        "CFS period.",
        rows(&|c| c.stats.cpu_period_seconds),
    )?;
    gauges(
        enc,
        "headroom_container_memory_usage_bytes",
        "Memory charged to the cgroup.",
        rows(&|c| c.stats.memory_usage_bytes.map(|v| v as f64)),
    )?;
    gauges(
        enc,
        "headroom_container_memory_working_set_bytes",
        "Memory usage minus inactive file cache.",
        rows(&|c| c.stats.memory_working_set_bytes.map(|v| v as f64)),
    )?;
    gauges(
        enc,
        "headroom_container_memory_limit_bytes",
        "Hard memory limit (absent when unlimited).",
        rows(&|c| c.stats.memory_limit_bytes.map(|v| v as f64)),
    )?;
    gauges(
        enc,
        "headroom_container_memory_high_bytes",
        "memory.high on cgroup v2, the soft limit on v1 (absent when unlimited).",
        rows(&|c| c.stats.memory_high_bytes.map(|v| v as f64)),
    )?;
    counters(
        enc,
        "headroom_container_oom_kills",
        "Processes killed by the OOM killer in this cgroup.",
        rows(&|c| c.stats.oom_kills.map(|v| v as f64)),
    )?;
    gauges(
        enc,
        "headroom_container_pids",
        "Tasks in the cgroup.",
        rows(&|c| c.stats.pids.map(|v| v as f64)),
    )?;
    let mut stalled = Vec::new();
    let mut ratio = Vec::new();
    for (c, l) in c.iter().zip(&labels) {
        for p in &c.stats.pressure {
            stalled.push((
                with(&with(l, "resource", p.resource), "kind", "some"),
                p.some_seconds,
            ));
            if let Some(full) = p.full_seconds {
                stalled.push((with(&with(l, "resource", p.resource), "kind", "full"), full));
            }
        }
        for (r, v) in &c.pressure_some_ratio {
            ratio.push((with(l, "resource", r), *v));
        }
    }
    counters(
        enc,
        "headroom_container_pressure_stalled_seconds",
        "Time some (or all) tasks stalled on a resource (PSI).",
        stalled,
    )?;
    gauges(
        enc,
        "headroom_container_pressure_some_ratio",
        "Share of time since the previous sample that some task stalled on a resource.",
        ratio,
    )?;
    gauges(
        enc,
        "headroom_container_info",
        "One per container: its identity as labels.",
        c.iter().zip(&labels).map(|(c, l)| {
            let mut l = l.clone();
            l.push(("kind".into(), format!("{:?}", c.ident.kind).to_lowercase()));
            if let Some(rt) = &c.ident.runtime {
                l.push(("runtime".into(), rt.clone()));
            }
            (l, 1.0)
        }),
    )?;
    s.ebpf
        .encode(enc, &|id| s.cgroup_ids.get(&id).map(|i| i.labels()))?;
    encode_engines(&s.engines, enc)?;
    encode_forecasts(&s.forecasts, enc)
}

/// The engines' families in `/metrics`: the container's usual labels plus `engine` and `port`.
pub fn encode_engines(
    s: &crate::sample::engines::EngineSnapshot,
    enc: &mut prometheus_client::encoding::DescriptorEncoder,
) -> std::fmt::Result {
    use crate::sample::engines::vocab::{self, EngineKind, Signals};
    let labels: Vec<Labels> = s
        .engines
        .iter()
        .map(|e| {
            let l = with(
                &e.ident.labels(),
                "engine",
                e.engine.map_or("unknown", EngineKind::as_str),
            );
            with(&l, "port", &e.port.to_string())
        })
        .collect();
    let rows = |f: &dyn Fn(&Signals) -> Option<f64>| {
        s.engines
            .iter()
            .zip(&labels)
            .filter(|(e, _)| e.up)
            .filter_map(|(e, l)| Some((l.clone(), f(e.signals.as_ref()?)?)))
            .collect::<Vec<_>>()
    };
    gauges(
        enc,
        "headroom_engine_up",
        "1 when the newest scrape of the inference engine's metrics succeeded.",
        s.engines
            .iter()
            .zip(&labels)
            .map(|(e, l)| (l.clone(), if e.up { 1.0 } else { 0.0 })),
    )?;
    counters(
        enc,
        "headroom_engine_scrape_failures",
        "Failed scrapes of the inference engine's metrics (timeout, size limit, refused, not an engine).",
        s.engines
            .iter()
            .zip(&labels)
            .map(|(e, l)| (l.clone(), e.failures as f64)),
    )?;
    gauges(
        enc,
        "headroom_engine_scrape_duration_seconds",
        "Wall time of the newest scrape of the inference engine's metrics.",
        s.engines
            .iter()
            .zip(&labels)
            .map(|(e, l)| (l.clone(), e.last_scrape_duration_seconds)),
    )?;
    gauges(
        enc,
        "headroom_engine_requests_waiting",
        "Requests queued in the inference engine, not yet running (queue depth).",
        rows(&|g| g.requests_waiting),
    )?;
    gauges(
        enc,
        "headroom_engine_requests_running",
        "Requests the inference engine is running.",
        rows(&|g| g.requests_running),
    )?;
    gauges(
        enc,
        "headroom_engine_kv_cache_usage_ratio",
        "Share of the inference engine's KV cache in use.",
        rows(&|g| g.kv_cache_usage_ratio),
    )?;
    gauges(
        enc,
        "headroom_engine_prompt_tokens_per_second",
        "Prompt tokens processed per second over the newest scrape interval.",
        rows(&|g| g.prompt_tokens_per_second),
    )?;
    gauges(
        enc,
        "headroom_engine_generated_tokens_per_second",
        "Tokens generated per second over the newest scrape interval.",
        rows(&|g| g.generated_tokens_per_second),
    )?;
    gauges(
        enc,
        "headroom_engine_preemptions_per_second",
        "Requests preempted per second over the newest scrape interval.",
        rows(&|g| g.preemptions_per_second),
    )?;
    counters(
        enc,
        "headroom_engine_prompt_tokens",
        "Prompt tokens the engine has processed, as its own counter says.",
        rows(&|g| g.prompt_tokens_total),
    )?;
    counters(
        enc,
        "headroom_engine_generated_tokens",
        "Tokens the engine has generated, as its own counter says.",
        rows(&|g| g.generated_tokens_total),
    )?;
    counters(
        enc,
        "headroom_engine_preemptions",
        "Requests the engine has preempted, as its own counter says.",
        rows(&|g| g.preemptions_total),
    )?;
    let quantiles = |f: &dyn Fn(&Signals) -> Option<[f64; 3]>| {
        let mut out = Vec::new();
        for (e, l) in s.engines.iter().zip(&labels).filter(|(e, _)| e.up) {
            if let Some(q) = e.signals.as_ref().and_then(f) {
                for (level, v) in vocab::QUANTILES.iter().zip(q) {
                    out.push((with(l, "quantile", &level.to_string()), v));
                }
            }
        }
        out
    };
    gauges(
        enc,
        "headroom_engine_time_to_first_token_seconds",
        "Time to first token of the requests whose first token came in the newest scrape interval (quantiles of the engine's histogram, interval deltas).",
        quantiles(&|g| g.ttft_seconds),
    )?;
    gauges(
        enc,
        "headroom_engine_inter_token_latency_seconds",
        "Inter-token latency over the newest scrape interval (quantiles of the engine's histogram, interval deltas).",
        quantiles(&|g| g.itl_seconds),
    )
}

fn encode_forecasts(
    rows: &[crate::forecast::ForecastRow],
    enc: &mut DescriptorEncoder,
) -> fmt::Result {
    let labels: Vec<Labels> = rows
        .iter()
        .map(|r| {
            let mut l = Vec::with_capacity(r.key.labels.len() + 1);
            l.push(("series".to_string(), r.key.name.clone()));
            l.extend(r.key.labels.iter().cloned());
            l
        })
        .collect();
    let each = |f: &dyn Fn(&crate::forecast::ForecastRow) -> f64| {
        rows.iter()
            .zip(&labels)
            .map(|(r, l)| (l.as_slice(), f(r)))
            .collect::<Vec<_>>()
    };
    gauges(
        enc,
        "headroom_forecast_upper",
        "Demand the series will not exceed over the lead time, at the configured violation rate (unit of the series).",
        each(&|r| r.upper),
    )?;
    gauges(
        enc,
        "headroom_forecast_point",
        "Expected demand at the end of the lead time (unit of the series).",
        each(&|r| r.point),
    )?;
    gauges(
        enc,
        "headroom_forecast_recent_violation_ratio",
        "Recent share of steps whose demand exceeded the bound of the model in charge.",
        each(&|r| r.recent_violation_ratio),
    )?;
    gauges(
        enc,
        "headroom_forecast_recent_slack_ratio",
        "Recent spare capacity of the model in charge: sum(max(bound - demand, 0)) / sum(demand).",
        each(&|r| r.recent_slack_ratio),
    )?;
    gauges(
        enc,
        "headroom_forecast_model_info",
        "The model in charge of each series' forecast.",
        rows.iter()
            .zip(&labels)
            .map(|(r, l)| (with(l, "model", r.model), 1.0)),
    )
}

fn pressure(
    enc: &mut DescriptorEncoder,
    scope: &str,
    totals: &[crate::sample::cgroup::stats::PressureTotals],
    ratios: &[(&'static str, f64)],
    labels: impl Fn(&str) -> Labels,
) -> fmt::Result {
    let mut stalled = Vec::new();
    for p in totals {
        stalled.push((with(&labels(p.resource), "kind", "some"), p.some_seconds));
        if let Some(full) = p.full_seconds {
            stalled.push((with(&labels(p.resource), "kind", "full"), full));
        }
    }
    counters(
        enc,
        &format!("headroom_{scope}_pressure_stalled_seconds"),
        "Time some (or all) tasks stalled on a resource (PSI).",
        stalled,
    )?;
    gauges(
        enc,
        &format!("headroom_{scope}_pressure_some_ratio"),
        "Share of time since the previous sample that some task stalled on a resource.",
        ratios.iter().map(|(r, v)| (labels(r), *v)),
    )
}
