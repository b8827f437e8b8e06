//! The status page served at `/`: one self-contained HTML document (inline CSS and SVG, no
//! script, no external asset) that plots, per container, per GPU and for the node, the demand
//! the agent measured, the forecast upper bound and the capacity applied, over the last hours,
//! with policy decisions marked on the timeline.
//!
//! It reads the history and the newest snapshot only; it never samples, and it draws whatever
//! series exist: a forecast or capacity series that is absent is simply not drawn. The newest
//! fine points come from the fine tier; older ones from the coarse tier's per-bucket maxima, so
//! a short peak stays visible at any zoom. The SVG itself is drawn by
//! `headroom_protocol::chart`, which the aggregator's page shares.

use std::collections::BTreeMap;
use std::fmt::Write;

use headroom_protocol::chart::{self, STYLE, Unit, esc, short};

use crate::history::{History, SeriesKey, SeriesView};
use crate::sample::Snapshot;

/// A policy decision to mark on the timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    pub t_ms: u64,
    /// Container cgroup the decision was about.
    pub cgroup: String,
    /// `cpu`, `memory`, `gpu`, ...: matched against the plotted series' names.
    pub resource: String,
    /// Shown on hover, e.g. `cpu 2.0 → 3.0 cores: forecast above quota`.
    pub text: String,
    pub applied: bool,
}

/// Marks from the JSON the agent serves at `/v1/decisions`
/// (`{"decisions": [{"at", "container", "resource", "from", "to", "reason", "applied", "note"}]}`,
/// `at` in seconds since the epoch). Entries missing a field the timeline needs are skipped.
pub fn marks_from_decisions(v: &serde_json::Value) -> Vec<Mark> {
    let Some(items) = v["decisions"].as_array() else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|d| {
            let at = d["at"].as_f64()?;
            let cgroup = d["container"].as_str()?.to_string();
            let resource = d["resource"].as_str()?.to_ascii_lowercase();
            let reason = d["reason"].as_str().unwrap_or("").replace('_', " ");
            let applied = d["applied"].as_bool().unwrap_or(false);
            let from = d["from"]
                .as_f64()
                .map(short)
                .unwrap_or_else(|| "unlimited".into());
            let to = d["to"].as_f64().map(short).unwrap_or_default();
            let mut text = format!("{resource} {from} → {to}: {reason}");
            if !applied {
                text.push_str(" (not applied");
                if let Some(n) = d["note"].as_str() {
                    text.push_str(": ");
                    text.push_str(n);
                }
                text.push(')');
            }
            Some(Mark {
                t_ms: (at * 1000.0) as u64,
                cgroup,
                resource,
                text,
                applied,
            })
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    /// Width of the time window, in hours.
    pub hours: f64,
    /// Most containers drawn (the busiest first); the rest are counted, not drawn.
    pub max_containers: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            hours: 6.0,
            max_containers: 24,
        }
    }
}

impl Options {
    /// `?hours=2&containers=10`; bad or out-of-range values fall back to the defaults.
    pub fn from_query(query: &str) -> Options {
        let mut o = Options::default();
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("hours", v)) => {
                    if let Ok(h) = v.parse::<f64>()
                        && h.is_finite()
                        && (0.01..=168.0).contains(&h)
                    {
                        o.hours = h;
                    }
                }
                Some(("containers", v)) => {
                    if let Ok(n) = v.parse::<usize>()
                        && (1..=500).contains(&n)
                    {
                        o.max_containers = n;
                    }
                }
                _ => {}
            }
        }
        o
    }
}

/// What a demand series is compared with.
struct Known {
    demand: &'static str,
    title: &'static str,
    /// History series holding the applied capacity, first found wins.
    capacity: &'static [&'static str],
}

const KNOWN: &[Known] = &[
    Known {
        demand: "container_cpu_usage_cores",
        title: "CPU",
        capacity: &["container_cpu_quota_cores", "container_cpu_limit_cores"],
    },
    Known {
        demand: "container_memory_working_set_bytes",
        title: "memory (working set)",
        capacity: &[
            "container_memory_high_bytes",
            "container_memory_limit_bytes",
        ],
    },
    Known {
        demand: "container_gpu_utilization_ratio",
        title: "GPU utilisation",
        capacity: &["container_gpu_share_ratio"],
    },
    Known {
        demand: "container_gpu_memory_used_bytes",
        title: "GPU memory",
        capacity: &["container_gpu_memory_limit_bytes"],
    },
    Known {
        demand: "container_request_latency_p99_seconds",
        title: "request latency p99",
        capacity: &[],
    },
    Known {
        demand: "container_request_rate_per_second",
        title: "requests",
        capacity: &[],
    },
    Known {
        demand: "container_engine_requests_waiting",
        title: "engine requests waiting (queue depth)",
        capacity: &[],
    },
    Known {
        demand: "container_engine_requests_running",
        title: "engine requests running",
        capacity: &[],
    },
    Known {
        demand: "container_engine_kv_cache_usage_ratio",
        title: "engine KV-cache usage",
        capacity: &[],
    },
    Known {
        demand: "container_engine_generated_tokens_per_second",
        title: "engine generated tokens/s",
        capacity: &[],
    },
    Known {
        demand: "container_engine_prompt_tokens_per_second",
        title: "engine prompt tokens/s",
        capacity: &[],
    },
    Known {
        demand: "container_engine_ttft_p99_seconds",
        title: "engine time to first token p99",
        capacity: &[],
    },
    Known {
        demand: "container_engine_itl_p99_seconds",
        title: "engine inter-token latency p99",
        capacity: &[],
    },
    Known {
        demand: "container_runqueue_delay_p99_seconds",
        title: "run-queue delay p99",
        capacity: &[],
    },
    Known {
        demand: "gpu_utilization_ratio",
        title: "GPU utilisation",
        capacity: &[],
    },
    Known {
        demand: "gpu_memory_used_bytes",
        title: "GPU memory",
        capacity: &["gpu_memory_total_bytes"],
    },
    Known {
        demand: "node_cpu_usage_cores",
        title: "node CPU",
        capacity: &[],
    },
    Known {
        demand: "node_memory_used_bytes",
        title: "node memory in use",
        capacity: &[],
    },
];

const FORECAST_PREFIX: &str = "forecast_upper_";

fn is_capacity(name: &str) -> bool {
    KNOWN.iter().any(|k| k.capacity.contains(&name))
}

/// The forecast series for `demand`: `forecast_upper_<demand>`, or `forecast_upper_<suffix>`
/// where the suffix is the demand name without its scope (`cpu_usage_cores`).
fn is_forecast_of(name: &str, demand: &str) -> bool {
    name.strip_prefix(FORECAST_PREFIX).is_some_and(|rest| {
        rest == demand
            || demand
                .strip_suffix(rest)
                .and_then(|scope| scope.strip_suffix('_'))
                .is_some_and(|scope| !scope.is_empty() && !scope.contains('_'))
    })
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum GroupKind {
    Node,
    Gpu,
    Container,
}

/// One plotted line: contiguous runs of finite points (a gap starts a new run).
#[derive(Debug, Default, Clone, PartialEq)]
struct Line {
    runs: Vec<Vec<(u64, f64)>>,
}

impl Line {
    fn points(&self) -> usize {
        self.runs.iter().map(Vec::len).sum()
    }
    #[cfg(test)]
    fn max(&self) -> f64 {
        self.runs.iter().flatten().map(|p| p.1).fold(0.0, f64::max)
    }
    fn last(&self) -> Option<f64> {
        self.runs.last().and_then(|r| r.last()).map(|p| p.1)
    }
}

#[derive(Debug)]
struct Panel {
    title: String,
    unit: Unit,
    demand: Line,
    forecast: Option<Line>,
    capacity: Option<Line>,
    /// Capacity known only from the newest sample (no history series for it).
    capacity_now: Option<f64>,
    marks: Vec<Mark>,
}

#[derive(Debug)]
struct Group {
    kind: GroupKind,
    title: String,
    subtitle: String,
    panels: Vec<Panel>,
    /// Sort key among containers: newest CPU demand.
    busy: f64,
}

/// Points of `view` in `[from_ms, now]`: coarse maxima before the fine tier begins, then the
/// fine points; reduced to at most `columns` points (the maximum of each column).
fn window(view: &SeriesView, from_ms: u64, to_ms: u64, columns: usize) -> Line {
    // Buckets are consecutive (gaps are NaN buckets), so two of them give the step.
    let step_ms = match view.coarse.as_slice() {
        [a, b, ..] => b.0.saturating_sub(a.0),
        _ => 60_000,
    };
    let fine_start = view.fine.first().map(|p| p.0).unwrap_or(u64::MAX);
    let mut pts: Vec<(u64, f64)> = Vec::with_capacity(view.fine.len() + view.coarse.len());
    for &(t, max, _mean) in &view.coarse {
        // A bucket is drawn at its end: the max is known only once the bucket is over.
        let t = t + step_ms;
        if t >= from_ms && t < fine_start {
            pts.push((t, max as f64));
        }
    }
    for &(t, v) in &view.fine {
        if t >= from_ms {
            pts.push((t, v as f64));
        }
    }
    let span = to_ms.saturating_sub(from_ms).max(1) as f64;
    let mut line = Line::default();
    let mut run: Vec<(u64, f64)> = Vec::new();
    let mut col: Option<(usize, u64, f64)> = None;
    let flush_col = |run: &mut Vec<(u64, f64)>, col: &mut Option<(usize, u64, f64)>| {
        if let Some((_, t, v)) = col.take() {
            run.push((t, v));
        }
    };
    for (t, v) in pts {
        if !v.is_finite() {
            flush_col(&mut run, &mut col);
            if !run.is_empty() {
                line.runs.push(std::mem::take(&mut run));
            }
            continue;
        }
        let c = (((t.saturating_sub(from_ms)) as f64 / span) * columns as f64) as usize;
        match &mut col {
            Some((cc, ct, cv)) if *cc == c => {
                if v > *cv {
                    *cv = v;
                }
                *ct = t;
            }
            _ => {
                flush_col(&mut run, &mut col);
                col = Some((c, t, v));
            }
        }
    }
    flush_col(&mut run, &mut col);
    if !run.is_empty() {
        line.runs.push(run);
    }
    line
}

/// `GPU 3` when the newest snapshot knows the UUID's index, else the UUID.
fn gpu_name(latest: Option<&Snapshot>, uuid: &str) -> String {
    latest
        .and_then(|s| s.gpu.gpus.iter().find(|g| g.id.uuid == uuid))
        .map(|g| format!("GPU {}", g.id.index))
        .unwrap_or_else(|| format!("GPU {uuid}"))
}

/// A series key's labels as `k="v"` text.
fn label_text(key: &SeriesKey) -> String {
    key.labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{v}\""))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Start of the plotted window: `hours` back, or where history begins if that is later (a young
/// agent's minutes of data fill the plot instead of a sliver at its right edge), at least a
/// minute back.
fn window_start<'a>(
    history: &History,
    keys: impl Iterator<Item = &'a SeriesKey>,
    opts: &Options,
    now_ms: u64,
) -> u64 {
    let asked = now_ms.saturating_sub((opts.hours * 3_600_000.0) as u64);
    let oldest = keys
        .filter_map(|k| history.view(k))
        .filter_map(|v| {
            let coarse = v.coarse.iter().find(|c| c.1.is_finite()).map(|c| c.0);
            let fine = v.fine.iter().find(|p| p.1.is_finite()).map(|p| p.0);
            coarse.into_iter().chain(fine).min()
        })
        .min()
        .unwrap_or(asked);
    asked.max(oldest.min(now_ms.saturating_sub(60_000)))
}

/// Everything the page shows, computed from history and the newest snapshot: the groups, how
/// many containers were left out, and where the time axis starts.
fn build(
    history: &History,
    latest: Option<&Snapshot>,
    marks: &[Mark],
    opts: &Options,
    now_ms: u64,
) -> (Vec<Group>, usize, u64) {
    const COLUMNS: usize = 560;
    // Group the series: containers by cgroup, GPUs by their labels, the node alone.
    let mut groups: BTreeMap<(GroupKind, String), Vec<&SeriesKey>> = BTreeMap::new();
    for key in history.keys() {
        let g = if let Some(cg) = key.label("cgroup") {
            (GroupKind::Container, cg.to_string())
        } else if key.name.starts_with("gpu_")
            || key.name.starts_with(&format!("{FORECAST_PREFIX}gpu_"))
        {
            (GroupKind::Gpu, label_text(key))
        } else if key.labels.is_empty() {
            (GroupKind::Node, String::new())
        } else {
            continue;
        };
        groups.entry(g).or_default().push(key);
    }
    // Only the busiest containers are drawn; choosing them from the newest CPU point alone keeps
    // the cost (and the time the history lock is held) independent of how many run here.
    let busiest = |keys: &[&SeriesKey]| {
        keys.iter()
            .find(|k| k.name == "container_cpu_usage_cores")
            .and_then(|k| history.latest(k))
            .map(|(_, v)| v as f64)
            .filter(|v| v.is_finite())
            .unwrap_or(0.0)
    };
    let mut ranked: Vec<(f64, String)> = groups
        .iter()
        .filter(|((kind, _), _)| *kind == GroupKind::Container)
        .map(|((_, id), keys)| (busiest(keys), id.clone()))
        .collect();
    ranked.sort_by(|a, b| {
        b.0.partial_cmp(&a.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| a.1.cmp(&b.1))
    });
    let hidden = ranked.len().saturating_sub(opts.max_containers);
    for (_, id) in ranked.into_iter().skip(opts.max_containers) {
        groups.remove(&(GroupKind::Container, id));
    }
    let from_ms = window_start(history, groups.values().flatten().copied(), opts, now_ms);
    let mut out = Vec::new();
    for ((kind, id), mut keys) in groups {
        keys.sort();
        let find = |name: &str| keys.iter().copied().find(|k| k.name == name);
        let line = |k: &SeriesKey| {
            history
                .view(k)
                .map(|v| window(&v, from_ms, now_ms, COLUMNS))
        };
        let container = latest.and_then(|s| {
            (kind == GroupKind::Container)
                .then(|| s.containers.iter().find(|c| c.ident.cgroup == id))
                .flatten()
        });
        let mut panels = Vec::new();
        let mut plotted: Vec<&SeriesKey> = Vec::new();
        // A container on two GPUs has one series per GPU under the same name: each is a panel.
        let known_order = KNOWN.iter().flat_map(|kn| {
            keys.iter()
                .copied()
                .filter(move |k| k.name == kn.demand)
                .map(move |k| (k, Some(kn)))
        });
        let others = keys
            .iter()
            .copied()
            .filter(|k| {
                !k.name.starts_with(FORECAST_PREFIX)
                    && !is_capacity(&k.name)
                    && !KNOWN.iter().any(|kn| kn.demand == k.name)
            })
            .map(|k| (k, None));
        for (key, known) in known_order.chain(others).collect::<Vec<_>>() {
            if plotted.contains(&key) {
                continue;
            }
            plotted.push(key);
            let Some(demand) = line(key) else { continue };
            if demand.points() == 0 {
                continue;
            }
            // Forecast and capacity belong to the same series: same labels, other name.
            let same = |name: &str| {
                keys.iter()
                    .copied()
                    .find(|k| k.labels == key.labels && k.name == name)
            };
            let forecast = keys
                .iter()
                .find(|k| k.labels == key.labels && is_forecast_of(&k.name, &key.name))
                .and_then(|k| line(k));
            let capacity = known
                .map(|k| k.capacity)
                .unwrap_or(&[])
                .iter()
                .find_map(|c| same(c).or_else(|| find(c)))
                .and_then(line)
                .filter(|l| l.points() > 0);
            let capacity_now = match (capacity.is_none(), key.name.as_str(), container, latest) {
                (true, "container_cpu_usage_cores", Some(c), _) => c.stats.cpu_quota_cores,
                (true, "container_memory_working_set_bytes", Some(c), _) => c
                    .stats
                    .memory_high_bytes
                    .or(c.stats.memory_limit_bytes)
                    .map(|v| v as f64),
                (true, "node_cpu_usage_cores", _, Some(s)) => {
                    s.node.as_ref().map(|n| n.cpus as f64)
                }
                (true, "node_memory_used_bytes", _, Some(s)) => {
                    s.node.as_ref().map(|n| n.memory_total_bytes as f64)
                }
                (true, "gpu_memory_used_bytes", _, Some(s)) => s
                    .gpu
                    .gpus
                    .iter()
                    .find(|g| Some(g.id.uuid.as_str()) == key.label("UUID"))
                    .and_then(|g| g.stats.memory_total_bytes)
                    .map(|v| v as f64),
                _ => None,
            };
            let resource_of = |m: &Mark| {
                let r = m.resource.as_str();
                key.name.contains(&format!("_{r}_")) || key.name.starts_with(&format!("{r}_"))
            };
            let panel_marks = marks
                .iter()
                .filter(|m| {
                    kind == GroupKind::Container
                        && m.cgroup == id
                        && m.t_ms >= from_ms
                        && resource_of(m)
                })
                .cloned()
                .collect();
            let mut title = known
                .map(|k| k.title.to_string())
                .unwrap_or_else(|| key.name.replace('_', " "));
            if kind == GroupKind::Container
                && let Some(uuid) = key.label("UUID")
            {
                title = format!("{title} on {}", gpu_name(latest, uuid));
            }
            if let Some(port) = key.label("port") {
                title = format!("{title} on port {port}");
            }
            panels.push(Panel {
                title,
                unit: Unit::of_metric(&key.name),
                demand,
                forecast,
                capacity,
                capacity_now,
                marks: panel_marks,
            });
        }
        if panels.is_empty() {
            continue;
        }
        let (title, subtitle) = match kind {
            GroupKind::Node => (String::new(), String::new()),
            GroupKind::Gpu => {
                let k = keys[0];
                let uuid = k.label("UUID").unwrap_or("");
                let gpu = latest.and_then(|s| s.gpu.gpus.iter().find(|g| g.id.uuid == uuid));
                let sub = match gpu {
                    Some(g) => format!("{} · {} · {}", g.id.model, g.id.pci_bus_id, uuid),
                    None => label_text(k),
                };
                (gpu_name(latest, uuid), sub)
            }
            GroupKind::Container => {
                let ident = container.map(|c| &c.ident);
                let name = match ident {
                    Some(i) => match (&i.namespace, &i.pod, &i.container) {
                        (Some(ns), Some(pod), Some(c)) => format!("{ns}/{pod}/{c}"),
                        _ => id.clone(),
                    },
                    None => id.clone(),
                };
                // The cgroup path goes underneath only when the title is something else.
                let sub = if name == id {
                    String::new()
                } else {
                    id.clone()
                };
                (name, sub)
            }
        };
        // Containers are ranked by CPU in use now: comparable across containers, unlike bytes.
        let busy = panels
            .iter()
            .find(|p| p.unit == Unit::Cores)
            .and_then(|p| p.demand.last())
            .unwrap_or(0.0);
        out.push(Group {
            kind,
            title,
            subtitle,
            panels,
            busy,
        });
    }
    // Node first, then GPUs, then the busiest containers.
    out.sort_by(|a, b| {
        a.kind.cmp(&b.kind).then(
            b.busy
                .partial_cmp(&a.busy)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then_with(|| a.title.cmp(&b.title)),
        )
    });
    (out, hidden, from_ms)
}

/// Draws a panel with the shared chart code: capacity under the forecast under the demand,
/// the capacity known only from the newest sample as a level, decisions as marks.
fn svg(out: &mut String, p: &Panel, from_ms: u64, to_ms: u64) {
    let secs = |l: &Line, class: &'static str| chart::Line {
        class,
        runs: l
            .runs
            .iter()
            .map(|r| r.iter().map(|&(t, v)| (t as f64 / 1e3, v)).collect())
            .collect(),
    };
    let mut lines = Vec::with_capacity(3);
    if let Some(c) = &p.capacity {
        lines.push(secs(c, "capacity"));
    }
    if let Some(f) = &p.forecast {
        lines.push(secs(f, "forecast"));
    }
    lines.push(secs(&p.demand, "demand"));
    let c = chart::Chart {
        title: p.title.clone(),
        unit: p.unit,
        lines,
        level: match (&p.capacity, p.capacity_now) {
            (None, Some(v)) => Some(chart::Level {
                value: v,
                class: "capacity-now",
                text: format!("{} now", p.unit.format(v)),
            }),
            _ => None,
        },
        marks: p
            .marks
            .iter()
            .map(|m| chart::Mark {
                t: m.t_ms as f64 / 1e3,
                text: m.text.clone(),
                class: if m.applied {
                    "decision applied"
                } else {
                    "decision"
                },
            })
            .collect(),
    };
    chart::svg(out, &c, from_ms as f64 / 1e3, to_ms as f64 / 1e3);
}

/// Facts for the page header.
#[derive(Debug, Clone, Default)]
pub struct Header {
    pub hostname: String,
    pub version: &'static str,
    pub uptime_seconds: f64,
    /// `(sampler, healthy, detail or error)`.
    pub samplers: Vec<(String, bool, String)>,
}

/// Renders the whole page.
pub fn render(
    header: &Header,
    history: &History,
    latest: Option<&Snapshot>,
    marks: &[Mark],
    opts: &Options,
    now_ms: u64,
) -> String {
    let (groups, hidden, from_ms) = build(history, latest, marks, opts, now_ms);
    let mut out = String::with_capacity(64 * 1024);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <meta http-equiv=\"refresh\" content=\"60\">\
         <title>headroom on {host}</title><style>{STYLE}</style></head><body>\
         <h1>headroom on {host}</h1>\
         <div class=\"sub\">agent {ver}, up {up}; up to the last {hours} h \
         (<a href=\"/?hours=1\">1 h</a> · <a href=\"/?hours=6\">6 h</a> · <a href=\"/?hours=24\">24 h</a>) · \
         <a href=\"/metrics\">/metrics</a> · <a href=\"/v1/status\">/v1/status</a></div>",
        host = esc(&header.hostname),
        ver = esc(header.version),
        up = Unit::Seconds.format(header.uptime_seconds),
        hours = short(opts.hours),
    );
    out.push_str("<table><tr><th>sampler</th><th>state</th><th></th></tr>");
    for (name, ok, detail) in &header.samplers {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td class=\"now\">{}</td></tr>",
            esc(name),
            if *ok { "ok" } else { "failing" },
            esc(detail)
        );
    }
    out.push_str("</table>");
    if let Some(e) = latest.map(|s| &s.engines).filter(|e| !e.engines.is_empty()) {
        out.push_str(
            "<table><tr><th>inference engine</th><th>container</th><th>endpoint</th><th>state</th>\
             <th>waiting</th><th>running</th><th>KV cache</th><th>tokens/s</th></tr>",
        );
        for x in &e.engines {
            let sig = x.signals.as_ref().filter(|_| x.up);
            let num = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map(f).unwrap_or_default();
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                x.engine.map_or("?", |k| k.as_str()),
                esc(&x.cgroup),
                esc(&x.address),
                esc(&x.path),
                match &x.last_error {
                    Some(err) if !x.up => format!("failing: {}", esc(err)),
                    _ => "ok".into(),
                },
                num(sig.and_then(|s| s.requests_waiting), &|v| format!("{v:.0}")),
                num(sig.and_then(|s| s.requests_running), &|v| format!("{v:.0}")),
                num(sig.and_then(|s| s.kv_cache_usage_ratio), &|v| format!(
                    "{:.0} %",
                    v * 100.0
                )),
                num(
                    sig.and_then(|s| s.generated_tokens_per_second),
                    &|v| format!("{v:.1}")
                ),
            );
        }
        out.push_str("</table>");
    }
    out.push_str(
        "<p class=\"key\"><span><i style=\"color:#1f77b4\"></i>demand (measured)</span>\
         <span><i style=\"color:#ff7f0e;border-top-style:dashed\"></i>forecast upper bound</span>\
         <span><i style=\"color:#2ca02c\"></i>capacity applied</span>\
         <span><i style=\"color:#d62728\"></i>policy decision</span></p>",
    );
    if groups.is_empty() {
        out.push_str("<p>No history yet: the first samples are being taken.</p>");
    }
    let mut section = None;
    for g in &groups {
        if section != Some(&g.kind) {
            section = Some(&g.kind);
            let _ = write!(
                out,
                "<h2 class=\"section\">{}</h2>",
                match g.kind {
                    GroupKind::Node => "Node",
                    GroupKind::Gpu => "GPUs",
                    GroupKind::Container => "Containers",
                }
            );
        }
        let kind = match g.kind {
            GroupKind::Node => "node",
            GroupKind::Gpu => "gpu",
            GroupKind::Container => "container",
        };
        let _ = write!(
            out,
            "<section class=\"group {kind}\">{}<div class=\"sub\">{}</div><div class=\"panels\">",
            if g.title.is_empty() {
                String::new()
            } else {
                format!("<h3>{}</h3>", esc(&g.title))
            },
            esc(&g.subtitle)
        );
        for p in &g.panels {
            let now = p
                .demand
                .last()
                .map(|v| p.unit.format(v))
                .unwrap_or_default();
            let fc = p
                .forecast
                .as_ref()
                .and_then(Line::last)
                .map(|v| format!(", forecast ≤ {}", p.unit.format(v)))
                .unwrap_or_default();
            let cap = p
                .capacity
                .as_ref()
                .and_then(Line::last)
                .or(p.capacity_now)
                .map(|v| format!(", capacity {}", p.unit.format(v)))
                .unwrap_or_default();
            let _ = write!(
                out,
                "<figure><figcaption>{} <span class=\"now\">now {}{}{}</span></figcaption>",
                esc(&p.title),
                esc(&now),
                esc(&fc),
                esc(&cap)
            );
            svg(&mut out, p, from_ms, now_ms);
            out.push_str("</figure>");
        }
        out.push_str("</div></section>");
    }
    if hidden > 0 {
        let _ = write!(
            out,
            "<p>{hidden} quieter containers not drawn (<a href=\"/?containers=500\">show all</a>).</p>"
        );
    }
    out.push_str("</body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, cgroup: &str) -> SeriesKey {
        SeriesKey::new(name, vec![("cgroup".into(), cgroup.into())])
    }

    fn count(html: &str, class: &str) -> usize {
        html.matches(&format!("class=\"{class}\" data-points=\""))
            .count()
    }

    fn points(html: &str, class: &str) -> usize {
        let needle = format!("class=\"{class}\" data-points=\"");
        html.match_indices(&needle)
            .map(|(i, _)| {
                let rest = &html[i + needle.len()..];
                rest[..rest.find('"').unwrap()].parse::<usize>().unwrap()
            })
            .sum()
    }

    fn page(h: &History, marks: &[Mark], now: u64) -> String {
        let opts = Options {
            hours: 0.2,
            max_containers: 10,
        };
        render(&Header::default(), h, None, marks, &opts, now)
    }

    #[test]
    fn plots_demand_forecast_and_capacity_when_present() {
        let mut h = History::new(1000, 900, 60, 1440);
        let t0 = 1_700_000_000_000u64;
        for i in 0..600u64 {
            let t = t0 + i * 1000;
            h.record(
                &key("container_cpu_usage_cores", "/a"),
                t,
                1.0 + (i % 10) as f64 / 10.0,
            );
            h.record(&key("forecast_upper_cpu_usage_cores", "/a"), t, 2.5);
            h.record(&key("container_cpu_quota_cores", "/a"), t, 3.0);
            h.record(&key("container_memory_working_set_bytes", "/b"), t, 1e9);
        }
        let now = t0 + 600_000;
        let marks = [Mark {
            t_ms: t0 + 300_000,
            cgroup: "/a".into(),
            resource: "cpu".into(),
            text: "cpu 2 → 3 cores <raise>".into(),
            applied: true,
        }];
        let html = page(&h, &marks, now);
        assert_eq!(count(&html, "demand"), 2, "one demand line per container");
        // The window starts where history does: 600 samples over 560 columns, one point per
        // column (the column's maximum).
        let n = points(&html, "demand");
        assert!((2 * 520..=2 * 561).contains(&n), "{n} points");
        assert_eq!(count(&html, "forecast"), 1);
        assert_eq!(count(&html, "capacity"), 1);
        assert!(html.contains("class=\"decision applied\""));
        assert!(html.contains("cpu 2 → 3 cores &lt;raise&gt;"), "escaped");
        assert!(!html.contains("<script"), "no script");
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "no external asset"
        );
        // The memory-only container has no forecast or capacity: nothing drawn for them.
        let b = &html[html.find("<h3>/b</h3>").unwrap()..];
        let b = &b[..b.find("</section>").unwrap()];
        assert!(!b.contains("class=\"forecast\""));
    }

    #[test]
    fn gaps_split_lines_and_old_points_come_from_the_coarse_tier() {
        // Fine tier holds 60 s; a 2 h window must reach into the coarse tier.
        let mut h = History::new(1000, 60, 60, 600);
        let k = key("container_cpu_usage_cores", "/a");
        let t0 = 1_700_000_000_000u64;
        for i in 0..3600u64 {
            // Down for five minutes in the middle.
            if (1800..2100).contains(&i) {
                continue;
            }
            h.record(&k, t0 + i * 1000, if i == 600 { 9.0 } else { 1.0 });
        }
        let now = t0 + 3_600_000;
        let html = render(
            &Header::default(),
            &h,
            None,
            &[],
            &Options {
                hours: 2.0,
                max_containers: 10,
            },
            now,
        );
        assert!(count(&html, "demand") >= 2, "the outage splits the line");
        // The one-second peak at 600 s survives as its minute's maximum.
        assert!(html.contains("9.90 cores") || html.contains("now 1.00 cores"));
        let v = h.view(&k).unwrap();
        let line = window(&v, now - 7_200_000, now, 560);
        assert!(line.max() >= 9.0, "peak kept: {}", line.max());
        assert!(line.points() <= 560 + line.runs.len());
    }

    #[test]
    fn busiest_containers_first_and_the_rest_counted() {
        let mut h = History::new(1000, 10, 60, 10);
        let t = 1_700_000_000_000u64;
        for i in 0..5 {
            h.record(
                &key("container_cpu_usage_cores", &format!("/c{i}")),
                t,
                i as f64,
            );
        }
        let html = render(
            &Header::default(),
            &h,
            None,
            &[],
            &Options {
                hours: 1.0,
                max_containers: 2,
            },
            t + 1000,
        );
        let c4 = html.find("<h3>/c4</h3>").expect("busiest drawn");
        let c3 = html.find("<h3>/c3</h3>").expect("second drawn");
        assert!(c4 < c3);
        assert!(!html.contains("<h3>/c0</h3>"));
        assert!(html.contains("3 quieter containers not drawn"));
    }

    #[test]
    fn gpus_and_per_gpu_container_series_get_their_own_panels() {
        let mut h = History::new(1000, 100, 60, 10);
        let t0 = 1_700_000_000_000u64;
        let gpu = |uuid: &str| vec![("UUID".to_string(), uuid.to_string())];
        let cg = |uuid: &str| {
            vec![
                ("UUID".to_string(), uuid.to_string()),
                ("cgroup".to_string(), "/job".to_string()),
            ]
        };
        for i in 0..60u64 {
            let t = t0 + i * 1000;
            for u in ["GPU-a", "GPU-b"] {
                h.record(&SeriesKey::new("gpu_utilization_ratio", gpu(u)), t, 0.5);
                h.record(
                    &SeriesKey::new("container_gpu_utilization_ratio", cg(u)),
                    t,
                    0.4,
                );
            }
            h.record(
                &SeriesKey::new(
                    "forecast_upper_container_gpu_utilization_ratio",
                    cg("GPU-b"),
                ),
                t,
                0.7,
            );
        }
        let html = page(&h, &[], t0 + 60_000);
        assert_eq!(html.matches("<section class=\"group gpu\">").count(), 2);
        let job = &html[html.find("<h3>/job</h3>").unwrap()..];
        assert_eq!(
            count(job, "demand"),
            2,
            "one panel per GPU the container uses"
        );
        assert_eq!(count(job, "forecast"), 1, "the forecast of GPU-b only");
        assert!(job.contains("GPU utilisation on GPU GPU-b"));
    }

    #[test]
    fn decisions_json_becomes_marks() {
        let v = serde_json::json!({"mode": "enforce", "decisions": [
            {"at": 1_700_000_000.5, "mode": "enforce", "container": "/a", "resource": "cpu",
             "from": 2.0, "to": 3.0, "reason": "forecast", "applied": true, "note": null},
            {"at": 1_700_000_001.0, "container": "/a", "resource": "memory", "from": null,
             "to": 1e9, "reason": "oom_kill", "applied": false, "note": "rate limited"},
            {"container": "/a", "resource": "cpu"}
        ]});
        let m = marks_from_decisions(&v);
        assert_eq!(m.len(), 2, "the entry without a time is skipped");
        assert_eq!(m[0].t_ms, 1_700_000_000_500);
        assert_eq!(m[0].text, "cpu 2.00 → 3.00: forecast");
        assert!(m[0].applied);
        assert_eq!(
            m[1].text,
            "memory unlimited → 1000000000: oom kill (not applied: rate limited)"
        );
        assert!(marks_from_decisions(&serde_json::json!({})).is_empty());
    }

    #[test]
    fn forecast_names_match_their_demand_only() {
        assert!(is_forecast_of(
            "forecast_upper_cpu_usage_cores",
            "container_cpu_usage_cores"
        ));
        assert!(is_forecast_of(
            "forecast_upper_container_cpu_usage_cores",
            "container_cpu_usage_cores"
        ));
        assert!(!is_forecast_of(
            "forecast_upper_usage_cores",
            "container_cpu_usage_cores"
        ));
        assert!(!is_forecast_of(
            "forecast_upper_memory_working_set_bytes",
            "container_cpu_usage_cores"
        ));
    }

    #[test]
    fn query_options_are_bounded() {
        assert_eq!(Options::from_query("hours=2&containers=5").hours, 2.0);
        assert_eq!(Options::from_query("hours=1e9").hours, 6.0);
        assert_eq!(Options::from_query("hours=NaN").hours, 6.0);
        assert_eq!(Options::from_query("containers=0").max_containers, 24);
    }

    #[test]
    fn empty_history_says_so() {
        let h = History::new(1000, 10, 60, 10);
        assert!(page(&h, &[], 1_700_000_000_000).contains("No history yet"));
    }
}
