//! Scale hints from what the agent measured: per workload and resource, the capacity its replicas
//! on this node hold, their usage, demand quantiles over the lead time, and what the node could
//! still give them. Batches go to the aggregator through `headroom_aggregator::client`.
//!
//! Until a forecaster feeds this module, the demand quantiles are those of the workload's own
//! recent usage (a persistence baseline), and the hint's reason says so. Building hints is pure:
//! it reads a snapshot and the history and never touches the network, disk or a cgroup.

use std::collections::BTreeMap;

use headroom_aggregator::schema::{Forecast, Hint, Quantile, Resource, WorkloadRef};

use crate::config::AggregatorConfig;
use crate::history::{History, SeriesKey};
use crate::sample::Snapshot;
use crate::sample::cgroup::identity::{Identity, Kind, glob_match};

/// Quantile levels every hint carries.
const LEVELS: [f64; 3] = [0.5, 0.9, 0.99];

/// v1 reports "no limit" as a huge number; anything at or above this is no limit.
const UNLIMITED_BYTES: u64 = 1 << 62;

/// Checks a workload identity the way the aggregator will, so a bad rule fails at start-up.
pub fn check_workload(namespace: &str, kind: &str, name: &str) -> Result<(), String> {
    let mut batch = headroom_aggregator::HintBatch {
        schema: headroom_aggregator::SCHEMA_V1.into(),
        node: "check".into(),
        epoch: 0,
        seq: 1,
        time: 1.0,
        interval_s: 1.0,
        hints: Vec::new(),
    };
    batch.hints.push(Hint {
        workload: WorkloadRef {
            namespace: namespace.into(),
            kind: kind.into(),
            name: name.into(),
        },
        resource: Resource::Cpu,
        replicas: 0,
        capacity: 0.0,
        usage: 0.0,
        forecast: Forecast {
            horizon_s: 1.0,
            quantiles: vec![Quantile { q: 0.5, value: 0.0 }],
        },
        local_headroom: 0.0,
        desired_capacity: 0.0,
        replica_delta: 0.0,
        confidence: 0.0,
        reason: String::new(),
    });
    headroom_aggregator::schema::validate(&batch)
        .map_err(|e| e.to_string().replace("hints[0].workload.", ""))
}

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
        if hashy(suffix, 5, 5) {
            if let Some((deploy, rs)) = rest.rsplit_once('-') {
                if hashy(rs, 6, 10)
                    && rs
                        .bytes()
                        .any(|b| b.is_ascii_digit() || b"bcdfghjklmnpqrstvwxz".contains(&b))
                {
                    return ("Deployment", deploy.to_owned());
                }
            }
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
    let (namespace, kind, name) = match (&ident.namespace, &ident.pod) {
        (Some(ns), Some(pod)) => {
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
    check_workload(&w.namespace, &w.kind, &w.name)
        .ok()
        .map(|_| w)
}

/// Empirical quantiles at [`LEVELS`] of `values` (sorted in place).
fn quantiles(values: &mut [f64]) -> [f64; 3] {
    values.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| {
        let i = ((values.len() as f64 - 1.0) * q).round() as usize;
        values.get(i).copied().unwrap_or(0.0).max(0.0)
    };
    [at(LEVELS[0]), at(LEVELS[1]), at(LEVELS[2])]
}

#[derive(Default)]
struct Acc {
    replicas: u32,
    capacity: f64,
    usage: f64,
    headroom: f64,
    q: [f64; 3],
    points: usize,
}

/// Recent values of one container series within `window_ms` before `now_ms`.
fn recent(history: &History, name: &str, cgroup: &str, now_ms: u64, window_ms: u64) -> Vec<f64> {
    let key = SeriesKey::new(name, vec![("cgroup".to_string(), cgroup.to_string())]);
    history
        .view(&key)
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

/// Builds one node's hints from its newest snapshot and history.
pub fn build_hints(
    cfg: &AggregatorConfig,
    snapshot: &Snapshot,
    history: &History,
    sample_interval_s: f64,
) -> Vec<Hint> {
    let now_ms = snapshot
        .at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let window_ms = cfg.window_s * 1000;
    let full_window = ((cfg.window_s as f64 / sample_interval_s).floor() as usize).max(1);
    let (node_cpus, idle_cores, mem_total, mem_available) = match &snapshot.node {
        Some(n) => (
            n.cpus as f64,
            (n.cpus as f64 - n.cpu_usage_cores.unwrap_or(n.cpus as f64)).max(0.0),
            n.memory_total_bytes as f64,
            n.memory_available_bytes as f64,
        ),
        None => (0.0, 0.0, 0.0, 0.0),
    };
    let mut groups: BTreeMap<(WorkloadRef, Resource), Acc> = BTreeMap::new();
    for c in &snapshot.containers {
        let Some(workload) = workload_of(cfg, &c.ident) else {
            continue;
        };
        let cg = c.ident.cgroup.as_str();
        if let Some(usage) = c.cpu_cores {
            let quota = c.stats.cpu_quota_cores;
            let capacity = quota.unwrap_or(node_cpus);
            // Without a limit the replica already has the whole node; with one, the node can
            // give it what is idle, up to the node's size.
            let headroom = quota.map_or(0.0, |q| idle_cores.min((node_cpus - q).max(0.0)));
            let mut v = recent(history, "container_cpu_usage_cores", cg, now_ms, window_ms);
            add(
                &mut groups,
                (workload.clone(), Resource::Cpu),
                capacity,
                usage,
                headroom,
                &mut v,
            );
        }
        if let Some(ws) = c.stats.memory_working_set_bytes {
            let limit = c
                .stats
                .memory_limit_bytes
                .filter(|l| *l < UNLIMITED_BYTES)
                .map(|l| l as f64);
            let capacity = limit.unwrap_or(mem_total);
            let headroom = limit.map_or(0.0, |l| mem_available.min((mem_total - l).max(0.0)));
            let mut v = recent(
                history,
                "container_memory_working_set_bytes",
                cg,
                now_ms,
                window_ms,
            );
            add(
                &mut groups,
                (workload, Resource::Memory),
                capacity,
                ws as f64,
                headroom,
                &mut v,
            );
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
            let desired = a.q[1];
            let delta = if per_replica > 0.0 {
                desired / per_replica - f64::from(a.replicas)
            } else {
                0.0
            };
            Hint {
                workload,
                resource,
                replicas: a.replicas,
                capacity: a.capacity,
                usage: a.usage,
                forecast: Forecast {
                    horizon_s: cfg.lead_time_s,
                    quantiles: LEVELS
                        .iter()
                        .zip(a.q)
                        .map(|(q, value)| Quantile { q: *q, value })
                        .collect(),
                },
                local_headroom: a.headroom,
                desired_capacity: desired,
                replica_delta: delta,
                confidence: (a.points as f64 / full_window as f64).clamp(0.0, 1.0),
                reason: format!(
                    "usage quantiles over the last {} s (persistence baseline)",
                    cfg.window_s
                ),
            }
        })
        .collect()
}

fn add(
    groups: &mut BTreeMap<(WorkloadRef, Resource), Acc>,
    key: (WorkloadRef, Resource),
    capacity: f64,
    usage: f64,
    headroom: f64,
    values: &mut Vec<f64>,
) {
    let points = values.len();
    if values.is_empty() {
        values.push(usage);
    }
    let q = quantiles(values);
    let a = groups.entry(key).or_default();
    a.replicas += 1;
    a.capacity += capacity.max(0.0);
    a.usage += usage.max(0.0);
    // Replicas on one node share the node's spare capacity: count it once.
    a.headroom = a.headroom.max(headroom);
    for (acc, v) in a.q.iter_mut().zip(q) {
        *acc += v;
    }
    // The least-observed replica bounds the confidence.
    a.points = if a.replicas == 1 {
        points
    } else {
        a.points.min(points)
    };
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
        assert!(
            check_workload("Bad_NS", "Deployment", "x")
                .unwrap_err()
                .contains("namespace")
        );
    }

    #[test]
    fn quantiles_are_ordered() {
        let mut v = vec![3.0, 1.0, 2.0, 10.0, 4.0];
        assert_eq!(quantiles(&mut v), [3.0, 10.0, 10.0]);
        assert_eq!(quantiles(&mut []), [0.0, 0.0, 0.0]);
    }
}
