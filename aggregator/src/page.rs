//! The aggregator's status page at `/` and the short timeline behind it: per workload, the merged
//! usage, forecast demand, capacity and desired capacity of each resource, and current against
//! desired replicas, over the last half hour, with every change of desired replicas marked. One
//! self-contained HTML document (inline CSS and SVG from [`headroom_protocol::chart`], no script, no external
//! asset).
//!
//! The timeline is soft state like everything else here: a bounded ring per workload, sampled
//! from the merged views every [`STEP_S`] seconds, lost on restart. It never reads the network or
//! disk, and it never changes a view.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;

use crate::merge::{NodeView, WorkloadView};
use headroom_protocol::chart::{self, Chart, Line, Mark, Unit, esc, short};
use headroom_protocol::schema::Resource;

/// Seconds between timeline points.
pub const STEP_S: f64 = 2.0;
/// Points kept per workload (half an hour).
pub const POINTS: usize = 900;
/// Workloads followed; views of further workloads are served but not charted.
pub const MAX_WORKLOADS: usize = 200;
/// Desired-replica changes kept per workload.
const MARKS: usize = 64;

const RESOURCES: [Resource; 9] = [
    Resource::Cpu,
    Resource::Memory,
    Resource::Gpu,
    Resource::GpuMemory,
    Resource::Requests,
    Resource::EngineQueue,
    Resource::EngineKvCache,
    Resource::EngineTokens,
    Resource::EngineConcurrency,
];

fn slot(r: Resource) -> usize {
    match r {
        Resource::Cpu => 0,
        Resource::Memory => 1,
        Resource::Gpu => 2,
        Resource::GpuMemory => 3,
        Resource::Requests => 4,
        Resource::EngineQueue => 5,
        Resource::EngineKvCache => 6,
        Resource::EngineTokens => 7,
        Resource::EngineConcurrency => 8,
    }
}

/// One resource at one instant: usage, forecast demand, capacity, desired capacity (`f32`
/// keeps the ring small; the page draws three significant figures).
type Values = [f32; 4];

#[derive(Debug, Clone)]
struct Point {
    /// Seconds since the epoch.
    t: f64,
    nodes: u32,
    current: u64,
    desired: u64,
    resources: [Option<Values>; RESOURCES.len()],
}

#[derive(Debug, Clone, PartialEq)]
struct ReplicaChange {
    t: f64,
    from: u64,
    to: u64,
}

#[derive(Debug, Clone)]
struct Ring {
    title: String,
    points: VecDeque<Point>,
    changes: VecDeque<ReplicaChange>,
}

/// Recent merged views, per workload id.
#[derive(Debug, Default)]
pub struct Timeline {
    rings: BTreeMap<String, Ring>,
    last: Option<f64>,
    /// Workloads not followed because [`MAX_WORKLOADS`] were already.
    pub untracked: usize,
}

impl Timeline {
    /// True when a point is due at `now` (seconds since the epoch).
    pub fn due(&self, now: f64) -> bool {
        self.last.is_none_or(|l| now - l >= STEP_S || now < l)
    }

    /// Of the workloads `ids`, those to record: the ones already followed and, while there is
    /// room, new ones (the first seen, up to [`MAX_WORKLOADS`]); the rest are counted.
    pub fn followed<'a>(&mut self, ids: impl Iterator<Item = &'a str>) -> Vec<String> {
        let mut room = MAX_WORKLOADS.saturating_sub(self.rings.len());
        self.untracked = 0;
        let mut out = Vec::new();
        for id in ids {
            if self.rings.contains_key(id) {
                out.push(id.to_owned());
            } else if room > 0 {
                room -= 1;
                out.push(id.to_owned());
            } else {
                self.untracked += 1;
            }
        }
        out
    }

    /// Adds one point per view; forgets workloads whose newest point has left the window.
    pub fn record(&mut self, now: f64, views: &[WorkloadView]) {
        self.last = Some(now);
        for v in views {
            if !self.rings.contains_key(&v.id) && self.rings.len() >= MAX_WORKLOADS {
                self.untracked += 1;
                continue;
            }
            let ring = self.rings.entry(v.id.clone()).or_insert_with(|| Ring {
                title: format!("{}/{} {}", v.namespace, v.kind, v.name),
                points: VecDeque::with_capacity(64),
                changes: VecDeque::new(),
            });
            if let Some(prev) = ring.points.back()
                && prev.desired != v.desired_replicas
            {
                if ring.changes.len() == MARKS {
                    ring.changes.pop_front();
                }
                ring.changes.push_back(ReplicaChange {
                    t: now,
                    from: prev.desired,
                    to: v.desired_replicas,
                });
            }
            let mut resources = [None; RESOURCES.len()];
            for r in &v.resources {
                resources[slot(r.resource)] = Some([
                    r.usage as f32,
                    r.demand as f32,
                    r.capacity as f32,
                    r.desired_capacity as f32,
                ]);
            }
            if ring.points.len() == POINTS {
                ring.points.pop_front();
            }
            ring.points.push_back(Point {
                t: now,
                nodes: v.nodes as u32,
                current: v.current_replicas,
                desired: v.desired_replicas,
                resources,
            });
        }
        let horizon = now - STEP_S * POINTS as f64;
        self.rings
            .retain(|_, r| r.points.back().is_some_and(|p| p.t >= horizon));
        for r in self.rings.values_mut() {
            while r.points.front().is_some_and(|p| p.t < horizon) {
                r.points.pop_front();
            }
            while r.changes.front().is_some_and(|c| c.t < horizon) {
                r.changes.pop_front();
            }
        }
    }

    pub fn len(&self) -> usize {
        self.rings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rings.is_empty()
    }
}

/// Page settings from the query string.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    /// Most workloads drawn (in id order); the rest are counted.
    pub max_workloads: usize,
}

impl Options {
    /// `?workloads=N`; a bad or out-of-range value keeps the default.
    pub fn from_query(query: &str) -> Options {
        let mut o = Options { max_workloads: 40 };
        for pair in query.split('&') {
            if let Some(("workloads", v)) = pair.split_once('=')
                && let Ok(n) = v.parse::<usize>()
                && (1..=MAX_WORKLOADS).contains(&n)
            {
                o.max_workloads = n;
            }
        }
        o
    }
}

/// Facts for the page header.
#[derive(Debug, Clone, Default)]
pub struct Header {
    pub version: &'static str,
    pub uptime_seconds: f64,
    pub risk: f64,
}

fn unit_of(r: Resource) -> Unit {
    match r {
        Resource::Cpu => Unit::Cores,
        Resource::Memory | Resource::GpuMemory => Unit::Bytes,
        Resource::Gpu => Unit::Gpus,
        Resource::Requests | Resource::EngineTokens => Unit::PerSecond,
        Resource::EngineQueue | Resource::EngineKvCache | Resource::EngineConcurrency => {
            Unit::Plain
        }
    }
}

fn marks(ring: &Ring) -> Vec<Mark> {
    ring.changes
        .iter()
        .map(|c| Mark {
            t: c.t,
            text: format!("desired replicas {} → {}", c.from, c.to),
            class: "mark",
        })
        .collect()
}

fn figure(out: &mut String, c: &Chart, caption_now: &str, from: f64, to: f64) {
    let _ = write!(
        out,
        "<figure><figcaption>{} <span class=\"now\">{}</span></figcaption>",
        esc(&c.title),
        esc(caption_now)
    );
    chart::svg(out, c, from, to);
    out.push_str("</figure>");
}

fn ring_section(out: &mut String, id: &str, ring: &Ring, from: f64, now: f64) {
    let gap = STEP_S * 2.5;
    let last = ring.points.back();
    let _ = write!(
        out,
        "<section class=\"workload\" id=\"{}\"><h3>{}</h3><div class=\"sub\">{}</div><div class=\"panels\">",
        esc(id),
        esc(&ring.title),
        esc(&match last {
            Some(p) if now - p.t <= gap => format!(
                "{} node(s) reporting · replicas: {} now, {} desired",
                p.nodes, p.current, p.desired
            ),
            Some(p) => format!("no node has reported it for {} s", short(now - p.t)),
            None => String::new(),
        })
    );
    let series = |class: &'static str, f: &dyn Fn(&Point) -> Option<f64>| {
        Line::from_points(class, ring.points.iter().map(|p| (p.t, f(p))), gap)
    };
    let replicas = Chart {
        title: "Replicas".into(),
        unit: Unit::Replicas,
        lines: vec![
            series("nodes", &|p| Some(f64::from(p.nodes))),
            series("capacity", &|p| Some(p.current as f64)),
            series("desired", &|p| Some(p.desired as f64)),
        ],
        level: None,
        marks: marks(ring),
    };
    let caption = last
        .map(|p| format!("now {} current, {} desired", p.current, p.desired))
        .unwrap_or_default();
    figure(out, &replicas, &caption, from, now);
    for r in RESOURCES {
        let i = slot(r);
        if !ring.points.iter().any(|p| p.resources[i].is_some()) {
            continue;
        }
        let unit = unit_of(r);
        let field = |k: usize| move |p: &Point| p.resources[i].map(|v| f64::from(v[k]));
        let c = Chart {
            title: r.as_str().replace('_', " "),
            unit,
            lines: vec![
                series("capacity", &field(2)),
                series("desired", &field(3)),
                series("forecast", &field(1)),
                series("demand", &field(0)),
            ],
            level: None,
            marks: marks(ring),
        };
        let caption = last
            .and_then(|p| p.resources[i])
            .map(|v| {
                format!(
                    "now {} used, forecast {}, capacity {}",
                    unit.format(f64::from(v[0])),
                    unit.format(f64::from(v[1])),
                    unit.format(f64::from(v[2]))
                )
            })
            .unwrap_or_default();
        figure(out, &c, &caption, from, now);
    }
    out.push_str("</div></section>");
}

/// Renders the whole page at `now` (seconds since the epoch).
pub fn render(
    header: &Header,
    timeline: &Timeline,
    nodes: &[NodeView],
    opts: &Options,
    now: f64,
) -> String {
    let mut out = String::with_capacity(32 * 1024);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <meta http-equiv=\"refresh\" content=\"30\">\
         <title>headroom aggregator</title><style>{}</style></head><body>\
         <h1>headroom aggregator</h1>\
         <div class=\"sub\">version {}, up {}; merged scale hints of {} node(s), the last {} min; \
         demand is the forecast at the {} % level · \
         <a href=\"/v1/workloads\">/v1/workloads</a> · <a href=\"/v1/nodes\">/v1/nodes</a> · \
         <a href=\"/metrics\">/metrics</a> · <a href=\"/openapi.json\">/openapi.json</a></div>",
        chart::STYLE,
        esc(header.version),
        esc(&Unit::Seconds.format(header.uptime_seconds)),
        nodes.len(),
        short(STEP_S * POINTS as f64 / 60.0),
        short((1.0 - header.risk) * 100.0),
    );
    out.push_str("<h2>Nodes reporting</h2>");
    if nodes.is_empty() {
        out.push_str("<p class=\"empty\">No node is reporting: agents send their hints to <code>POST /v1/hints</code>.</p>");
    } else {
        out.push_str(
            "<table class=\"nodes\"><tr><th>node</th><th>last report</th><th>workloads</th><th>interval</th><th>batch</th></tr>",
        );
        for n in nodes {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{} s ago</td><td>{}</td><td>{} s</td><td>{}</td></tr>",
                esc(&n.node),
                short(n.age_s),
                n.workloads,
                short(n.interval_s),
                n.seq
            );
        }
        out.push_str("</table>");
    }
    out.push_str(
        "<h2>Workloads</h2><p class=\"key\"><span><i style=\"color:#1f77b4\"></i>usage (sum over nodes)</span>\
         <span><i style=\"color:#ff7f0e;border-top-style:dashed\"></i>forecast demand</span>\
         <span><i style=\"color:#2ca02c\"></i>capacity / current replicas</span>\
         <span><i style=\"color:#9467bd;border-top-style:dotted\"></i>desired</span>\
         <span><i style=\"color:#8c564b\"></i>nodes reporting</span>\
         <span><i style=\"color:#d62728\"></i>desired replicas changed</span></p>",
    );
    if timeline.is_empty() {
        out.push_str(
            "<p class=\"empty\">No workloads yet: the timeline starts with the first hints.</p>",
        );
    }
    let from = now - STEP_S * POINTS as f64;
    // Zoom in while the timeline is young so a new aggregator's first minutes fill the width.
    let oldest = timeline
        .rings
        .values()
        .filter_map(|r| r.points.front().map(|p| p.t))
        .fold(now, f64::min);
    let from = from.max(oldest - STEP_S).min(now - 60.0);
    for (id, ring) in timeline.rings.iter().take(opts.max_workloads) {
        ring_section(&mut out, id, ring, from, now);
    }
    let hidden = timeline.rings.len().saturating_sub(opts.max_workloads) + timeline.untracked;
    if hidden > 0 {
        let _ = write!(
            out,
            "<p>{hidden} more workload(s) not drawn (<a href=\"/?workloads={MAX_WORKLOADS}\">show up to {MAX_WORKLOADS}</a>; all are in <a href=\"/v1/workloads\">/v1/workloads</a>).</p>"
        );
    }
    out.push_str("</body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::ResourceView;

    fn view(name: &str, nodes: usize, current: u64, desired: u64, usage: f64) -> WorkloadView {
        WorkloadView {
            id: format!("ns/Deployment/{name}"),
            namespace: "ns".into(),
            kind: "Deployment".into(),
            name: name.into(),
            nodes,
            current_replicas: current,
            desired_replicas: desired,
            active: true,
            resources: vec![ResourceView {
                resource: Resource::Cpu,
                unit: "cores",
                replicas: current,
                capacity: 4.0,
                usage,
                demand: usage * 1.2,
                local_headroom: 0.0,
                desired_capacity: usage * 1.3,
                node_replica_delta: 0.0,
                confidence: 1.0,
                desired_replicas: desired,
            }],
            reasons: Vec::new(),
        }
    }

    fn node(name: &str) -> NodeView {
        NodeView {
            node: name.into(),
            epoch: 1,
            seq: 7,
            age_s: 0.5,
            batch_time: 0.0,
            interval_s: 1.0,
            workloads: 1,
        }
    }

    fn points(html: &str, class: &str) -> usize {
        html.match_indices(&format!("<polyline class=\"{class}\" data-points=\""))
            .map(|(i, m)| {
                let rest = &html[i + m.len()..];
                rest[..rest.find('"').unwrap()].parse::<usize>().unwrap()
            })
            .sum()
    }

    #[test]
    fn plots_usage_forecast_capacity_and_marks_replica_changes() {
        let mut t = Timeline::default();
        let now = 1_800_000_000.0;
        for i in 0..10 {
            let desired = if i < 6 { 2 } else { 3 };
            let at = now - 20.0 + 2.0 * f64::from(i);
            assert!(t.due(at));
            t.record(at, &[view("api", 2, 2, desired, 1.0 + f64::from(i))]);
            assert!(!t.due(at + 1.0));
        }
        let html = render(
            &Header::default(),
            &t,
            &[node("n1"), node("n2")],
            &Options::from_query(""),
            now,
        );
        assert_eq!(points(&html, "demand"), 10);
        assert_eq!(points(&html, "forecast"), 10);
        assert_eq!(points(&html, "capacity"), 20, "replicas and cpu capacity");
        assert_eq!(points(&html, "nodes"), 10);
        assert_eq!(
            html.matches("class=\"mark\"").count(),
            2,
            "one change, two charts"
        );
        assert!(html.contains("desired replicas 2 → 3"));
        assert!(html.contains("2 node(s) reporting · replicas: 2 now, 3 desired"));
        assert!(html.contains("<td>n2</td>"));
    }

    #[test]
    fn names_are_escaped() {
        let mut t = Timeline::default();
        let mut v = view("x", 1, 1, 1, 1.0);
        v.id = "ns/Deployment/<script>alert(1)</script>".into();
        v.name = "<script>alert(1)</script>".into();
        t.record(100.0, &[v]);
        let html = render(
            &Header::default(),
            &t,
            &[node("<b>n</b>")],
            &Options::from_query(""),
            101.0,
        );
        assert!(!html.contains("<script>"), "{html}");
        assert!(!html.contains("<b>n</b>"));
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("&lt;b&gt;n&lt;/b&gt;"));
    }

    #[test]
    fn empty_state_says_so() {
        let html = render(
            &Header::default(),
            &Timeline::default(),
            &[],
            &Options::from_query("workloads=abc"),
            0.0,
        );
        assert!(html.contains("No node is reporting"));
        assert!(html.contains("No workloads yet"));
        assert!(!html.contains("<polyline"));
    }

    #[test]
    fn rings_are_bounded_and_old_workloads_forgotten() {
        let mut t = Timeline::default();
        for i in 0..(POINTS + 50) {
            t.record(i as f64 * STEP_S, &[view("a", 1, 1, 1, 1.0)]);
        }
        assert_eq!(t.rings["ns/Deployment/a"].points.len(), POINTS);
        // "a" stops reporting; after one window it is gone.
        let later = (POINTS + 50) as f64 * STEP_S + STEP_S * POINTS as f64 + 1.0;
        t.record(later, &[view("b", 1, 1, 1, 1.0)]);
        assert_eq!(t.len(), 1);
        let many: Vec<_> = (0..MAX_WORKLOADS + 5)
            .map(|i| view(&format!("w{i}"), 1, 1, 1, 1.0))
            .collect();
        let ids: Vec<String> = many.iter().map(|v| v.id.clone()).collect();
        let wanted = t.followed(ids.iter().map(String::as_str));
        assert_eq!(wanted.len(), MAX_WORKLOADS - 1, "room left beside b");
        assert_eq!(t.untracked, 6);
        t.record(later + STEP_S, &many);
        assert_eq!(t.len(), MAX_WORKLOADS);
        assert_eq!(t.untracked, 12, "record() refuses the overflow too");
        let wanted = t.followed(ids.iter().map(String::as_str));
        assert_eq!(
            wanted.len(),
            MAX_WORKLOADS - 1,
            "followed ones stay followed"
        );
        assert_eq!(Options::from_query("workloads=5").max_workloads, 5);
    }
}
