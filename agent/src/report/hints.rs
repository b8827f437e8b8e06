//! Scale hints from what the agent measured: per workload and resource, the capacity its replicas
//! on this node hold, their usage, demand quantiles over the lead time, and what the node could
//! still give them. Batches go to the aggregator through `headroom_protocol::client`.
//!
//! Demand comes from the agent's forecasters (expected value and calibrated upper bound over the
//! lead time) where a series has one, and otherwise from quantiles of the series' own recent
//! history; the hint's reason says which. Building hints is pure: it reads a snapshot and the
//! history and never touches the network, disk or a cgroup.

use std::collections::{BTreeMap, HashMap};

use headroom_protocol::quantile_at;
use headroom_protocol::schema::{Forecast, Hint, Quantile, Resource, WorkloadRef};

use crate::cgroup_files::UNLIMITED_BYTES;
use crate::config::{AggregatorConfig, Config};
use crate::forecast::ForecastRow;
use crate::history::{History, SeriesKey};
use crate::sample::Snapshot;
use crate::sample::cgroup::identity::{Identity, Kind, configured, glob_match};

/// Quantile levels every hint carries.
const LEVELS: [f64; 4] = [0.5, 0.9, 0.95, 0.99];

/// Characters an object name may hold; others become `-`, and the ends are trimmed to alnum.
fn object_name(raw: &str) -> Option<String> {
    let s: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    let s: String = s.chars().take(253).collect();
    let s = s.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    (!s.is_empty()).then(|| s.to_owned())
}

/// Owner of a Kubernetes pod from its generated name: `<deployment>-<rs hash>-<5>` is a
/// Deployment, `<statefulset>-<ordinal>` a StatefulSet; anything else stands alone as a Pod.
/// The API server would know for sure; the agent does not ask it, so this is a convention.
pub fn pod_owner(pod: &str) -> (&'static str, String) {
    let hashy = |s: &str, min: usize, max: usize| {
        (min..=max).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    if let Some((rest, suffix)) = pod.rsplit_once('-') {
        if hashy(suffix, 5, 5)
            && let Some((deploy, rs)) = rest.rsplit_once('-')
            && hashy(rs, 6, 10)
            && rs
                .bytes()
                .any(|b| b.is_ascii_digit() || b"bcdfghjklmnpqrstvwxz".contains(&b))
        {
            return ("Deployment", deploy.to_owned());
        }
        if !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_digit()) {
            return ("StatefulSet", rest.to_owned());
        }
    }
    ("Pod", pod.to_owned())
}

/// The workload a container belongs to, or `None` when it cannot be named validly.
pub fn workload_of(cfg: &AggregatorConfig, ident: &Identity) -> Option<WorkloadRef> {
    if let Some(rule) = cfg
        .workloads
        .iter()
        .find(|r| glob_match(&r.cgroup, &ident.cgroup))
    {
        return Some(WorkloadRef {
            namespace: rule.namespace.clone(),
            kind: rule.kind.clone(),
            name: rule.name.clone(),
        });
    }
    let last = ident
        .cgroup
        .rsplit('/')
        .find(|s| !s.is_empty())
        .unwrap_or("root");
    let owner = ident.owner_kind.as_deref().zip(ident.owner_name.as_ref());
    let (namespace, kind, name) = match (&ident.namespace, &ident.pod, owner) {
        // The API server's answer, when the agent has it.
        (Some(ns), Some(_), Some((kind, name))) => (ns.clone(), kind, name.clone()),
        (Some(ns), Some(pod), _) => {
            let (kind, name) = pod_owner(pod);
            (ns.clone(), kind, name)
        }
        _ => match ident.kind {
            Kind::SystemdService => (
                "default".into(),
                "Service",
                last.trim_end_matches(".service").to_owned(),
            ),
            Kind::Configured => ("default".into(), "Cgroup", last.to_owned()),
            _ => (
                "default".into(),
                "Container",
                ident
                    .container
                    .clone()
                    .or_else(|| ident.container_id.clone())
                    .unwrap_or_else(|| last.to_owned()),
            ),
        },
    };
    let w = WorkloadRef {
        namespace,
        kind: kind.to_owned(),
        name: object_name(&name)?,
    };
    headroom_protocol::schema::check_workload(&w)
        .ok()
        .map(|_| w)
}

/// Empirical quantiles at `levels` of `values` (sorted in place).
fn empirical(values: &mut [f64], levels: &[f64]) -> Vec<Quantile> {
    values.sort_by(|a, b| a.total_cmp(b));
    levels
        .iter()
        .map(|&q| {
            let i = ((values.len() as f64 - 1.0) * q).round() as usize;
            Quantile {
                q,
                value: values.get(i).copied().unwrap_or(0.0).max(0.0),
            }
        })
        .collect()
}

/// Recent values of one series within `window_ms` before `now_ms`.
fn recent(history: &History, key: &SeriesKey, now_ms: u64, window_ms: u64) -> Vec<f64> {
    history
        .view(key)
        .map(|v| {
            v.fine
                .into_iter()
                .filter(|(t, _)| *t + window_ms >= now_ms)
                .map(|(_, x)| f64::from(x))
                .filter(|x| x.is_finite())
                .collect()
        })
        .unwrap_or_default()
}

/// One container's claim on one resource, before containers of a workload are summed.
struct Item {
    workload: WorkloadRef,
    /// The replica it is part of: its pod (containers of one pod are one replica), else its
    /// own cgroup.
    replica: String,
    resource: Resource,
    capacity: f64,
    usage: f64,
    headroom: f64,
    /// History series whose sum is this demand (several GPUs make several series).
    keys: Vec<SeriesKey>,
}

/// Demand of one item: quantiles at [`LEVELS`], its confidence, and what they came from.
struct Demand {
    values: [f64; 4],
    confidence: f64,
    source: String,
}

fn demand(
    item: &Item,
    forecasts: &HashMap<&SeriesKey, &ForecastRow>,
    history: &History,
    ctx: &Ctx,
) -> Demand {
    let points = item
        .keys
        .iter()
        .map(|k| recent(history, k, ctx.now_ms, ctx.window_ms).len())
        .min()
        .unwrap_or(0);
    let fill = (points as f64 / ctx.full_window as f64).clamp(0.0, 1.0);
    let rows: Option<Vec<&ForecastRow>> = item
        .keys
        .iter()
        .map(|k| forecasts.get(k).copied())
        .collect();
    if let Some(rows) = rows.filter(|r| !r.is_empty()) {
        // The forecaster gives the expected demand and a bound that demand exceeds with
        // probability `target_violation`; read them as the median and that quantile.
        let point: f64 = rows.iter().map(|r| r.point.max(0.0)).sum();
        let upper: f64 = rows
            .iter()
            .map(|r| r.upper.max(0.0))
            .sum::<f64>()
            .max(point);
        let q_upper = 1.0 - ctx.target_violation;
        let known = if q_upper > 0.5 {
            vec![
                Quantile {
                    q: 0.5,
                    value: point,
                },
                Quantile {
                    q: q_upper,
                    value: upper,
                },
            ]
        } else {
            vec![Quantile {
                q: 0.5,
                value: upper,
            }]
        };
        let worst = rows
            .iter()
            .map(|r| r.recent_violation_ratio)
            .fold(0.0, f64::max);
        let miss = ((worst - ctx.target_violation).max(0.0) / (1.0 - ctx.target_violation))
            .clamp(0.0, 1.0);
        let models: Vec<&str> = rows.iter().map(|r| r.model).collect();
        return Demand {
            values: LEVELS.map(|q| quantile_at(&known, q)),
            confidence: fill * (1.0 - miss),
            source: format!("forecast ({}) over {} s", models.join("+"), ctx.lead_time_s),
        };
    }
    let mut values = [0.0; 4];
    for k in &item.keys {
        let mut v = recent(history, k, ctx.now_ms, ctx.window_ms);
        if v.is_empty() {
            continue;
        }
        for (acc, q) in values.iter_mut().zip(empirical(&mut v, &LEVELS)) {
            *acc += q.value;
        }
    }
    if points == 0 {
        values = [item.usage.max(0.0); 4];
    }
    Demand {
        values,
        confidence: fill,
        source: format!("usage quantiles over the last {} s", ctx.window_s),
    }
}

struct Ctx {
    now_ms: u64,
    window_ms: u64,
    window_s: u64,
    full_window: usize,
    lead_time_s: f64,
    target_violation: f64,
}

fn series(name: &str, labels: &[(&str, &str)]) -> SeriesKey {
    SeriesKey::new(
        name,
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// The containers' claims on CPU, memory, GPUs and GPU memory.
fn items(cfg: &AggregatorConfig, snapshot: &Snapshot) -> Vec<Item> {
    let (node_cpus, idle_cores, mem_total, mem_available) = match &snapshot.node {
        Some(n) => (
            n.cpus as f64,
            (n.cpus as f64 - n.cpu_usage_cores.unwrap_or(n.cpus as f64)).max(0.0),
            n.memory_total_bytes as f64,
            n.memory_available_bytes as f64,
        ),
        None => (0.0, 0.0, 0.0, 0.0),
    };
    let mut out = Vec::new();
    let mut idents: HashMap<&str, &Identity> = HashMap::new();
    for c in &snapshot.containers {
        idents.insert(c.ident.cgroup.as_str(), &c.ident);
        let Some(workload) = workload_of(cfg, &c.ident) else {
            continue;
        };
        let cg = c.ident.cgroup.as_str();
        let replica = c.ident.pod_uid.clone().unwrap_or_else(|| cg.to_string());
        if let Some(usage) = c.cpu_cores {
            let quota = c.stats.cpu_quota_cores;
            // Without a limit the container already has the whole node; with one, the node can
            // give it what is idle, up to the node's size.
            out.push(Item {
                workload: workload.clone(),
                replica: replica.clone(),
                resource: Resource::Cpu,
                capacity: quota.unwrap_or(node_cpus),
                usage,
                headroom: quota.map_or(0.0, |q| idle_cores.min((node_cpus - q).max(0.0))),
                keys: vec![series("container_cpu_usage_cores", &[("cgroup", cg)])],
            });
        }
        if let Some(ws) = c.stats.memory_working_set_bytes {
            let limit = c
                .stats
                .memory_limit_bytes
                .filter(|l| *l < UNLIMITED_BYTES)
                .map(|l| l as f64);
            out.push(Item {
                workload,
                replica,
                resource: Resource::Memory,
                capacity: limit.unwrap_or(mem_total),
                usage: ws as f64,
                headroom: limit.map_or(0.0, |l| mem_available.min((mem_total - l).max(0.0))),
                keys: vec![series(
                    "container_memory_working_set_bytes",
                    &[("cgroup", cg)],
                )],
            });
        }
    }
    out.extend(engine_items(cfg, snapshot));
    // GPUs: a container holds the GPUs it runs on; its SM share of each is its use, in GPUs.
    let mut per_cgroup: BTreeMap<&str, Vec<&crate::sample::gpu::ContainerUsage>> = BTreeMap::new();
    for u in &snapshot.gpu.containers {
        per_cgroup.entry(u.cgroup.as_str()).or_default().push(u);
    }
    for (cg, uses) in per_cgroup {
        let workload = match idents.get(cg) {
            Some(ident) => workload_of(cfg, ident),
            None => workload_of(cfg, &configured(cg)),
        };
        let replica = idents
            .get(cg)
            .and_then(|i| i.pod_uid.clone())
            .unwrap_or_else(|| cg.to_string());
        let Some(workload) = workload else {
            continue;
        };
        let gpus: Vec<_> = uses
            .iter()
            .filter_map(|u| snapshot.gpu.gpus.get(u.gpu).map(|g| (u, g)))
            .collect();
        if gpus.is_empty() {
            continue;
        }
        out.push(Item {
            workload: workload.clone(),
            replica: replica.clone(),
            resource: Resource::Gpu,
            capacity: gpus.len() as f64,
            usage: gpus
                .iter()
                .map(|(u, _)| u.sm_utilization_ratio.max(0.0))
                .sum(),
            headroom: 0.0,
            keys: gpus
                .iter()
                .map(|(_, g)| {
                    series(
                        "container_gpu_utilization_ratio",
                        &[("UUID", &g.id.uuid), ("cgroup", cg)],
                    )
                })
                .collect(),
        });
        let total: f64 = gpus
            .iter()
            .filter_map(|(_, g)| g.stats.memory_total_bytes)
            .map(|b| b as f64)
            .sum();
        let free: f64 = gpus
            .iter()
            .filter_map(|(_, g)| {
                Some(g.stats.memory_total_bytes? as f64 - g.stats.memory_used_bytes? as f64)
            })
            .map(|f| f.max(0.0))
            .sum();
        out.push(Item {
            workload,
            replica,
            resource: Resource::GpuMemory,
            capacity: total,
            usage: gpus.iter().map(|(u, _)| u.memory_used_bytes as f64).sum(),
            headroom: free,
            keys: gpus
                .iter()
                .map(|(_, g)| {
                    series(
                        "container_gpu_memory_used_bytes",
                        &[("UUID", &g.id.uuid), ("cgroup", cg)],
                    )
                })
                .collect(),
        });
    }
    out
}

/// Inference engines' claims: queue depth, KV cache and generated tokens per container, each
/// with the per-replica target as its capacity, so the aggregator's demand / (capacity /
/// replicas) is demand / target. A target of 0 leaves the signal out.
fn engine_items(cfg: &AggregatorConfig, snapshot: &Snapshot) -> Vec<Item> {
    let mut out = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for (e, _, _) in snapshot.engines.up() {
        if seen.contains(&e.cgroup.as_str()) {
            continue;
        }
        seen.push(&e.cgroup);
        let Some(workload) = workload_of(cfg, &e.ident) else {
            continue;
        };
        let cg = e.cgroup.as_str();
        let replica = e.ident.pod_uid.clone().unwrap_or_else(|| cg.to_string());
        // The container's engines together, as the history has them.
        let mine = || snapshot.engines.up().filter(|(x, _, _)| x.cgroup == cg);
        let sum = |f: &dyn Fn(&crate::sample::engines::vocab::Signals) -> Option<f64>| {
            let v: Vec<f64> = mine().filter_map(|(_, _, s)| f(s)).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>())
        };
        let kv = mine()
            .filter_map(|(_, _, s)| s.kv_cache_usage_ratio)
            .reduce(f64::max);
        let t = e.targets;
        if t.concurrency_per_replica > 0.0 {
            let running = sum(&|s| s.requests_running);
            let waiting = sum(&|s| s.requests_waiting);
            if running.is_some() || waiting.is_some() {
                out.push(Item {
                    workload: workload.clone(),
                    replica: replica.clone(),
                    resource: Resource::EngineConcurrency,
                    capacity: t.concurrency_per_replica,
                    usage: running.unwrap_or(0.0) + waiting.unwrap_or(0.0),
                    headroom: 0.0,
                    // Both forecasts, summed: requests in flight.
                    keys: [
                        running.map(|_| "container_engine_requests_running"),
                        waiting.map(|_| "container_engine_requests_waiting"),
                    ]
                    .into_iter()
                    .flatten()
                    .map(|n| series(n, &[("cgroup", cg)]))
                    .collect(),
                });
            }
        }
        for (resource, target, usage, name) in [
            (
                Resource::EngineQueue,
                t.waiting_per_replica,
                sum(&|s| s.requests_waiting),
                "container_engine_requests_waiting",
            ),
            (
                Resource::EngineKvCache,
                t.kv_cache_ratio,
                kv,
                "container_engine_kv_cache_usage_ratio",
            ),
            (
                Resource::EngineTokens,
                t.tokens_per_second,
                sum(&|s| s.generated_tokens_per_second),
                "container_engine_generated_tokens_per_second",
            ),
        ] {
            let Some(usage) = usage.filter(|_| target > 0.0) else {
                continue;
            };
            out.push(Item {
                workload: workload.clone(),
                replica: replica.clone(),
                resource,
                capacity: target,
                usage,
                headroom: 0.0,
                keys: vec![series(name, &[("cgroup", cg)])],
            });
        }
    }
    out
}

#[derive(Default)]
struct Acc {
    replicas: u32,
    /// The replicas seen so far (see [`Item::replica`]).
    pods: Vec<String>,
    capacity: f64,
    usage: f64,
    headroom: f64,
    values: [f64; 4],
    confidence: f64,
    sources: Vec<String>,
}

/// Builds one node's hints from its newest snapshot (with its forecasts) and history.
pub fn build_hints(config: &Config, snapshot: &Snapshot, history: &History) -> Vec<Hint> {
    let cfg = &config.aggregator;
    let ctx = Ctx {
        now_ms: snapshot
            .at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        window_ms: cfg.window_s * 1000,
        window_s: cfg.window_s,
        full_window: ((cfg.window_s as f64 / config.sample_interval_s).floor() as usize).max(1),
        lead_time_s: config.forecast.lead_time_s,
        target_violation: config.forecast.target_violation,
    };
    let forecasts: HashMap<&SeriesKey, &ForecastRow> =
        snapshot.forecasts.iter().map(|r| (&*r.key, r)).collect();
    let mut groups: BTreeMap<(WorkloadRef, Resource), Acc> = BTreeMap::new();
    for item in items(cfg, snapshot) {
        let d = demand(&item, &forecasts, history, &ctx);
        let a = groups.entry((item.workload, item.resource)).or_default();
        let first_of_replica = !a.pods.contains(&item.replica);
        if first_of_replica {
            a.pods.push(item.replica.clone());
            a.replicas += 1;
        }
        a.capacity += item.capacity.max(0.0);
        a.usage += item.usage.max(0.0);
        // Replicas on one node share the node's spare capacity: count it once.
        a.headroom = a.headroom.max(item.headroom);
        for (acc, v) in a.values.iter_mut().zip(d.values) {
            *acc += v;
        }
        // The least certain replica bounds the confidence.
        a.confidence = if a.replicas == 1 && first_of_replica {
            d.confidence
        } else {
            a.confidence.min(d.confidence)
        };
        if !a.sources.contains(&d.source) {
            a.sources.push(d.source);
        }
    }
    groups
        .into_iter()
        .map(|((workload, resource), a)| {
            let per_replica = if a.replicas > 0 {
                a.capacity / f64::from(a.replicas)
            } else {
                0.0
            };
            // The capacity wanted is the bound the forecaster is calibrated for.
            let desired = a.values[2];
            Hint {
                workload,
                resource,
                replicas: a.replicas,
                capacity: a.capacity,
                usage: a.usage,
                forecast: Forecast {
                    horizon_s: ctx.lead_time_s,
                    quantiles: LEVELS
                        .iter()
                        .zip(a.values)
                        .map(|(q, value)| Quantile { q: *q, value })
                        .collect(),
                },
                local_headroom: a.headroom,
                desired_capacity: desired,
                replica_delta: if per_replica > 0.0 {
                    desired / per_replica - f64::from(a.replicas)
                } else {
                    0.0
                },
                confidence: a.confidence.clamp(0.0, 1.0),
                reason: a.sources.join("; ").chars().take(256).collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_owners_follow_controller_naming() {
        assert_eq!(
            pod_owner("web-7d4b9c8f6d-x2k4p"),
            ("Deployment", "web".into())
        );
        assert_eq!(
            pod_owner("llm-serve-5f9c7b6d8-abcde"),
            ("Deployment", "llm-serve".into())
        );
        assert_eq!(pod_owner("db-2"), ("StatefulSet", "db".into()));
        assert_eq!(pod_owner("standalone"), ("Pod", "standalone".into()));
    }

    #[test]
    fn rules_win_and_names_are_sanitised() {
        let mut cfg = AggregatorConfig::default();
        let ident = |cg: &str, kind| Identity {
            cgroup: cg.into(),
            kind,
            runtime: None,
            container_id: None,
            pod_uid: None,
            namespace: None,
            pod: None,
            container: None,
            owner_kind: None,
            owner_name: None,
            manage: None,
            latency_slo_us: None,
        };
        let w = workload_of(
            &cfg,
            &ident("/system.slice/nginx.service", Kind::SystemdService),
        )
        .unwrap();
        assert_eq!(w.id(), "default/Service/nginx");
        let w = workload_of(&cfg, &ident("/batch/job one!", Kind::Configured)).unwrap();
        assert_eq!(w.id(), "default/Cgroup/job-one");
        cfg.workloads.push(crate::config::WorkloadRule {
            cgroup: "/batch/*".into(),
            namespace: "shop".into(),
            kind: "Deployment".into(),
            name: "web".into(),
        });
        let w = workload_of(&cfg, &ident("/batch/job one!", Kind::Configured)).unwrap();
        assert_eq!(w.id(), "shop/Deployment/web");
    }

    #[test]
    fn empirical_quantiles_are_ordered() {
        let mut v = vec![3.0, 1.0, 2.0, 10.0, 4.0];
        let q: Vec<f64> = empirical(&mut v, &LEVELS).iter().map(|q| q.value).collect();
        assert_eq!(q, [3.0, 10.0, 10.0, 10.0]);
        assert!(empirical(&mut [], &LEVELS).iter().all(|q| q.value == 0.0));
    }

    fn container_sample(
        cgroup: &str,
        cores: f64,
        quota: f64,
    ) -> crate::sample::cgroup::ContainerSample {
        let stats = crate::sample::cgroup::CgroupStats {
            cpu_quota_cores: Some(quota),
            ..Default::default()
        };
        crate::sample::cgroup::ContainerSample {
            ident: std::sync::Arc::new(configured(cgroup)),
            stats,
            cpu_cores: Some(cores),
            throttled_ratio: None,
            pressure_some_ratio: Vec::new(),
        }
    }

    /// Two replicas of one workload on a node: one series forecast, one falling back to its
    /// history; the hint sums both at every level and names both sources.
    #[test]
    fn hints_sum_replicas_from_forecasts_and_history() {
        let mut config = Config {
            sample_interval_s: 1.0,
            ..Default::default()
        };
        config.aggregator.window_s = 10;
        config
            .aggregator
            .workloads
            .push(crate::config::WorkloadRule {
                cgroup: "/web-*".into(),
                namespace: "shop".into(),
                kind: "Deployment".into(),
                name: "web".into(),
            });
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000);
        let mut history = History::new(1000, 64, 60, 4);
        let key_b = series("container_cpu_usage_cores", &[("cgroup", "/web-b")]);
        for i in 0..10u64 {
            history.record(&key_b, 991_000 + i * 1000, 0.1 * (i + 1) as f64);
        }
        let key_a = series("container_cpu_usage_cores", &[("cgroup", "/web-a")]);
        let snapshot = Snapshot {
            at,
            node: None,
            containers: vec![
                container_sample("/web-a", 0.4, 1.0),
                container_sample("/web-b", 0.9, 1.0),
            ],
            gpu: crate::sample::gpu::GpuSnapshot::empty(
                at,
                crate::sample::gpu::NvmlStatus::Disabled,
            ),
            ebpf: Default::default(),
            cgroup_ids: Default::default(),
            engines: Default::default(),
            gone: Vec::new(),
            forecasts: vec![ForecastRow {
                upper_key: std::sync::Arc::new(SeriesKey {
                    name: crate::forecast::upper_series_name(&key_a.name),
                    labels: key_a.labels.clone(),
                }),
                key: std::sync::Arc::new(key_a),
                point: 0.5,
                upper: 0.8,
                model: "ets",
                recent_violation_ratio: 0.0,
                recent_slack_ratio: 0.0,
            }],
        };
        let hints = build_hints(&config, &snapshot, &history);
        assert_eq!(hints.len(), 1, "{hints:?}");
        let h = &hints[0];
        assert_eq!(h.workload.id(), "shop/Deployment/web");
        assert_eq!((h.replicas, h.capacity), (2, 2.0));
        assert!((h.usage - 1.3).abs() < 1e-9);
        // Replica a: median 0.5, q0.95 = 0.8 (held above). Replica b: empirical over 0.1..1.0.
        let got: Vec<f64> = h.forecast.quantiles.iter().map(|q| q.value).collect();
        let a = [0.5, 0.5 + 0.3 * (0.4 / 0.45), 0.8, 0.8];
        let b = [0.6, 0.9, 1.0, 1.0];
        for i in 0..4 {
            assert!((got[i] - (a[i] + b[i])).abs() < 1e-6, "level {i}: {got:?}");
        }
        assert!((h.desired_capacity - 1.8).abs() < 1e-6);
        assert!(
            h.reason.contains("forecast (ets)") && h.reason.contains("usage quantiles"),
            "{}",
            h.reason
        );
        // Replica a has no history yet: no confidence until it has some.
        assert_eq!(h.confidence, 0.0);
        let batch = headroom_protocol::HintBatch {
            schema: headroom_protocol::SCHEMA_V1.into(),
            node: "node-a".into(),
            epoch: 1,
            seq: 1,
            time: 1.0,
            interval_s: 1.0,
            hints,
        };
        headroom_protocol::schema::validate(&batch).unwrap();
    }

    /// Two pods of a Deployment named by the API, each with an app and a sidecar: one workload,
    /// two replicas, named by the owner even where the pod name would say otherwise.
    #[test]
    fn replicas_are_pods_and_owners_come_from_the_api() {
        let config = Config {
            sample_interval_s: 1.0,
            ..Default::default()
        };
        let pod = |uid: &str, name: &str, container: &str, cores: f64| {
            let mut c = container_sample(&format!("/kubepods/pod{uid}/{container}"), cores, 1.0);
            let mut ident = configured(&c.ident.cgroup);
            ident.kind = Kind::Kubernetes;
            ident.pod_uid = Some(uid.into());
            ident.namespace = Some("shop".into());
            ident.pod = Some(name.into());
            ident.container = Some(container.into());
            ident.owner_kind = Some("Deployment".into());
            ident.owner_name = Some("checkout".into());
            c.ident = std::sync::Arc::new(ident);
            c
        };
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000);
        let snapshot = Snapshot {
            at,
            node: None,
            containers: vec![
                pod("u1", "renamed-by-hand", "app", 0.4),
                pod("u1", "renamed-by-hand", "sidecar", 0.1),
                pod("u2", "renamed-by-hand-2", "app", 0.5),
                pod("u2", "renamed-by-hand-2", "sidecar", 0.1),
            ],
            gpu: crate::sample::gpu::GpuSnapshot::empty(
                at,
                crate::sample::gpu::NvmlStatus::Disabled,
            ),
            ebpf: Default::default(),
            cgroup_ids: Default::default(),
            engines: Default::default(),
            gone: Vec::new(),
            forecasts: Vec::new(),
        };
        let hints = build_hints(&config, &snapshot, &History::new(1000, 64, 60, 4));
        let cpu: Vec<_> = hints
            .iter()
            .filter(|h| h.resource == Resource::Cpu)
            .collect();
        assert_eq!(cpu.len(), 1, "{hints:?}");
        assert_eq!(cpu[0].workload.id(), "shop/Deployment/checkout");
        assert_eq!(cpu[0].replicas, 2);
        assert!((cpu[0].usage - 1.1).abs() < 1e-9);
    }

    /// Two replicas of an LLM Deployment, each with a llama.cpp engine: queue and KV-cache hints
    /// carry replicas × target as capacity, tokens are left out (no target), and the aggregator
    /// sizes the workload as demand / target with GPU utilisation out of the decision.
    #[test]
    fn engine_signals_become_hints_sized_by_targets() {
        use crate::sample::engines::vocab::{EngineKind, Signals};
        use crate::sample::engines::{EngineSample, EngineSnapshot, Source};
        let mut config = Config {
            sample_interval_s: 1.0,
            ..Default::default()
        };
        config.aggregator.window_s = 10;
        config.engines.targets.concurrency_per_replica = 4.0;
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000);
        let mut history = History::new(1000, 64, 60, 4);
        let mut engine = |uid: &str, waiting: f64, kv: f64| {
            let cg = format!("/kubepods/pod{uid}/llm");
            let mut ident = configured(&cg);
            ident.kind = Kind::Kubernetes;
            ident.pod_uid = Some(uid.into());
            ident.namespace = Some("ml".into());
            ident.pod = Some(format!("llm-{uid}"));
            ident.owner_kind = Some("Deployment".into());
            ident.owner_name = Some("llm".into());
            for i in 0..10u64 {
                let t = 991_000 + i * 1000;
                history.record(
                    &series("container_engine_requests_waiting", &[("cgroup", &cg)]),
                    t,
                    waiting,
                );
                history.record(
                    &series("container_engine_kv_cache_usage_ratio", &[("cgroup", &cg)]),
                    t,
                    kv,
                );
            }
            EngineSample {
                cgroup: cg,
                ident: std::sync::Arc::new(ident),
                engine: Some(EngineKind::LlamaCpp),
                port: 8080,
                address: "10.0.0.1:8080".into(),
                path: "/metrics".into(),
                source: Source::Discovered,
                up: true,
                last_error: None,
                consecutive_failures: 0,
                scrapes: 10,
                failures: 0,
                last_scrape_duration_seconds: 0.001,
                last_success_at: Some(at),
                signals: Some(Signals {
                    requests_waiting: Some(waiting),
                    requests_running: Some(2.0),
                    kv_cache_usage_ratio: Some(kv),
                    generated_tokens_per_second: Some(50.0),
                    ..Default::default()
                }),
                targets: config.engines.targets,
            }
        };
        let engines = EngineSnapshot {
            enabled: true,
            engines: vec![engine("u1", 6.0, 0.9), engine("u2", 10.0, 0.7)],
            ..Default::default()
        };
        let snapshot = Snapshot {
            at,
            node: None,
            containers: Vec::new(),
            gpu: crate::sample::gpu::GpuSnapshot::empty(
                at,
                crate::sample::gpu::NvmlStatus::Disabled,
            ),
            ebpf: Default::default(),
            cgroup_ids: Default::default(),
            engines: std::sync::Arc::new(engines),
            gone: Vec::new(),
            forecasts: Vec::new(),
        };
        let hints = build_hints(&config, &snapshot, &history);
        let get = |r: Resource| {
            hints
                .iter()
                .find(|h| h.resource == r)
                .unwrap_or_else(|| panic!("no {r:?} hint: {hints:?}"))
        };
        let queue = get(Resource::EngineQueue);
        assert_eq!(queue.workload.id(), "ml/Deployment/llm");
        assert_eq!(
            (queue.replicas, queue.capacity, queue.usage),
            (2, 8.0, 16.0)
        );
        assert_eq!(queue.confidence, 1.0);
        let kv = get(Resource::EngineKvCache);
        assert_eq!(kv.replicas, 2);
        assert!((kv.capacity - 1.6).abs() < 1e-9 && (kv.usage - 1.6).abs() < 1e-9);
        assert!(
            hints.iter().all(|h| h.resource != Resource::EngineTokens),
            "no tokens target, no tokens hint"
        );
        // In flight: 2 running + 6 waiting, 2 + 10; no running history yet, so no confidence.
        let c = get(Resource::EngineConcurrency);
        assert_eq!((c.replicas, c.capacity, c.usage), (2, 8.0, 20.0));
        assert_eq!(c.confidence, 0.0);
        // What the aggregator accepts (its merge of engine signals: aggregator/src/merge.rs).
        let batch = headroom_protocol::HintBatch {
            schema: headroom_protocol::SCHEMA_V1.into(),
            node: "node-a".into(),
            epoch: 1,
            seq: 1,
            time: 1.0,
            interval_s: 1.0,
            hints,
        };
        headroom_protocol::schema::validate(&batch).unwrap();
    }
}
