//! Self-contained SVG line charts for the status pages: inline markup with no script and no
//! external asset, a time axis relative to "now", gaps drawn as gaps, and vertical marks for
//! events. Each line's `class` picks its style in [`STYLE`] and each polyline carries
//! `data-points` so a test can count what was drawn.
//!
//! Pure string building: it never reads a clock or any state.

use std::fmt::Write;

/// How values of a chart are written on its axis and in captions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Unit {
    Cores,
    Bytes,
    Ratio,
    Seconds,
    PerSecond,
    Gpus,
    Replicas,
    Plain,
}

impl Unit {
    /// The unit of a metric from its name's suffix (`_cores`, `_bytes`, ...).
    pub fn of_metric(name: &str) -> Unit {
        if name.ends_with("_cores") {
            Unit::Cores
        } else if name.ends_with("_bytes") {
            Unit::Bytes
        } else if name.ends_with("_ratio") {
            Unit::Ratio
        } else if name.ends_with("_seconds") {
            Unit::Seconds
        } else if name.ends_with("_per_second") {
            Unit::PerSecond
        } else {
            Unit::Plain
        }
    }

    pub fn format(self, v: f64) -> String {
        match self {
            Unit::Cores => format!("{} cores", short(v)),
            Unit::Bytes => {
                let mut v = v;
                let mut i = 0;
                const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
                while v.abs() >= 1024.0 && i < U.len() - 1 {
                    v /= 1024.0;
                    i += 1;
                }
                format!("{} {}", short(v), U[i])
            }
            Unit::Ratio => format!("{} %", short(v * 100.0)),
            Unit::Seconds if v.abs() < 1.0 => format!("{} ms", short(v * 1e3)),
            Unit::Seconds => format!("{} s", short(v)),
            Unit::PerSecond => format!("{}/s", short(v)),
            Unit::Gpus => format!("{} GPUs", short(v)),
            Unit::Replicas => short(v),
            Unit::Plain => short(v),
        }
    }
}

/// A number in at most three significant figures' worth of text.
pub fn short(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Escapes text for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// One plotted line: contiguous runs of `(seconds, value)` points.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// CSS class: `demand`, `forecast`, `capacity`, `desired`, `nodes`.
    pub class: &'static str,
    pub runs: Vec<Vec<(f64, f64)>>,
}

impl Line {
    /// Splits `points` (in time order) into runs wherever a value is missing or two points lie
    /// more than `max_gap_s` apart.
    pub fn from_points(
        class: &'static str,
        points: impl IntoIterator<Item = (f64, Option<f64>)>,
        max_gap_s: f64,
    ) -> Line {
        let mut runs: Vec<Vec<(f64, f64)>> = Vec::new();
        let mut open = false;
        let mut last_t = f64::NEG_INFINITY;
        for (t, v) in points {
            match v.filter(|v| v.is_finite()) {
                Some(v) => {
                    if !open || t - last_t > max_gap_s {
                        runs.push(Vec::new());
                    }
                    if let Some(r) = runs.last_mut() {
                        r.push((t, v));
                    }
                    open = true;
                    last_t = t;
                }
                None => open = false,
            }
        }
        Line { class, runs }
    }

    pub fn points(&self) -> usize {
        self.runs.iter().map(Vec::len).sum()
    }

    pub fn max(&self) -> f64 {
        self.runs.iter().flatten().map(|p| p.1).fold(0.0, f64::max)
    }

    pub fn last(&self) -> Option<f64> {
        self.runs.last().and_then(|r| r.last()).map(|p| p.1)
    }
}

/// An event drawn as a vertical line with its text on hover.
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    pub t: f64,
    pub text: String,
    /// CSS class: `mark` (replica changes), `decision` or `decision applied` (policy decisions).
    pub class: &'static str,
}

/// A value known only as of now, drawn as a horizontal line across the chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Level {
    pub value: f64,
    pub class: &'static str,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    pub unit: Unit,
    /// Drawn in order: later lines on top.
    pub lines: Vec<Line>,
    pub level: Option<Level>,
    pub marks: Vec<Mark>,
}

pub const W: f64 = 600.0;
pub const H: f64 = 150.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 8.0;
const BOTTOM: f64 = 20.0;

/// Writes the chart as one `<svg>` spanning `[from, to]` seconds (`to` is labelled "now").
pub fn svg(out: &mut String, c: &Chart, from: f64, to: f64) {
    let ymax = c
        .lines
        .iter()
        .map(Line::max)
        .chain(c.level.as_ref().map(|l| l.value))
        .fold(0.0, f64::max);
    let ymax = if ymax > 0.0 { ymax * 1.1 } else { 1.0 };
    let span = (to - from).max(1e-3);
    let x = |t: f64| LEFT + ((t - from) / span).clamp(0.0, 1.0) * (W - LEFT - RIGHT);
    let y = |v: f64| TOP + (1.0 - (v / ymax).clamp(0.0, 1.0)) * (H - TOP - BOTTOM);
    let _ = write!(
        out,
        r#"<svg class="plot" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{}">"#,
        esc(&c.title)
    );
    for i in 0..=3 {
        let v = ymax * f64::from(i) / 3.0;
        let yy = y(v);
        let _ = write!(
            out,
            r#"<line class="grid" x1="{LEFT}" x2="{}" y1="{yy:.1}" y2="{yy:.1}"/><text class="axis" x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            W - RIGHT,
            LEFT - 4.0,
            yy + 3.0,
            esc(&c.unit.format(v))
        );
    }
    for i in 0..=4 {
        let t = from + span * f64::from(i) / 4.0;
        let ago = span * f64::from(4 - i) / 4.0;
        let label = if i == 4 {
            "now".to_string()
        } else if ago >= 3600.0 {
            format!("-{}h", short(ago / 3600.0))
        } else if ago >= 60.0 {
            format!("-{}m", short(ago / 60.0))
        } else {
            format!("-{}s", short(ago))
        };
        let _ = write!(
            out,
            r#"<text class="axis" x="{:.1}" y="{}" text-anchor="middle">{label}</text>"#,
            x(t).clamp(LEFT + 10.0, W - RIGHT - 10.0),
            H - 4.0
        );
    }
    for line in &c.lines {
        for run in &line.runs {
            let _ = write!(
                out,
                r#"<polyline class="{}" data-points="{}" points=""#,
                line.class,
                run.len()
            );
            if let [(t, v)] = run.as_slice() {
                // A lone point still gets a visible segment.
                let _ = write!(
                    out,
                    "{:.1},{:.1} {:.1},{:.1}",
                    x(*t) - 1.5,
                    y(*v),
                    x(*t) + 1.5,
                    y(*v)
                );
            } else {
                for (i, &(t, v)) in run.iter().enumerate() {
                    let sep = if i == 0 { "" } else { " " };
                    let _ = write!(out, "{sep}{:.1},{:.1}", x(t), y(v));
                }
            }
            out.push_str("\"/>");
        }
    }
    if let Some(l) = &c.level {
        let yy = y(l.value);
        let _ = write!(
            out,
            r#"<line class="{}" x1="{LEFT}" x2="{}" y1="{yy:.1}" y2="{yy:.1}"><title>{}</title></line>"#,
            l.class,
            W - RIGHT,
            esc(&l.text)
        );
    }
    for m in &c.marks {
        let xx = x(m.t);
        let _ = write!(
            out,
            r#"<line class="{}" x1="{xx:.1}" x2="{xx:.1}" y1="{TOP}" y2="{}"><title>{}</title></line>"#,
            m.class,
            H - BOTTOM,
            esc(&m.text)
        );
    }
    out.push_str("</svg>");
}

/// Styles for charts and the pages around them.
pub const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}\
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .1em}h3{margin:.8em 0 .1em}\
.sub{color:#666;font-size:.85em;word-break:break-all}.panels{display:flex;flex-wrap:wrap;gap:1em}\
figure{margin:.4em 0;background:#fff;border:1px solid #ddd;padding:.3em}\
figcaption{font-size:.9em;margin-bottom:.2em}.now{color:#666}\
svg .grid{stroke:#eee}svg .axis{font-size:10px;fill:#777}\
polyline{fill:none;stroke-width:1.5}.demand{stroke:#1f77b4}\
.forecast{stroke:#ff7f0e;stroke-dasharray:5 3}.capacity{stroke:#2ca02c;stroke-width:2}\
.desired{stroke:#9467bd;stroke-dasharray:2 2}.nodes{stroke:#8c564b;stroke-width:1}\
.capacity-now{stroke:#2ca02c;stroke-dasharray:2 3}.mark{stroke:#d62728;stroke-width:1.5}\
.decision{stroke:#d62728;stroke-width:1;opacity:.5}.decision.applied{opacity:1;stroke-width:1.5}\
.key span{margin-right:1.2em}\
.key i{display:inline-block;width:1.6em;height:0;border-top:2px solid;vertical-align:middle;margin-right:.3em}\
table{border-collapse:collapse;font-size:.9em}td,th{padding:.15em .8em .15em 0;text-align:left}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_and_missing_values_split_runs() {
        let l = Line::from_points(
            "demand",
            [
                (0.0, Some(1.0)),
                (2.0, Some(2.0)),
                (4.0, None),
                (6.0, Some(3.0)),
                (20.0, Some(4.0)),
                (21.0, Some(f64::NAN)),
            ],
            5.0,
        );
        assert_eq!(
            l.runs,
            vec![
                vec![(0.0, 1.0), (2.0, 2.0)],
                vec![(6.0, 3.0)],
                vec![(20.0, 4.0)]
            ]
        );
        assert_eq!(l.points(), 4);
        assert_eq!(l.max(), 4.0);
        assert_eq!(l.last(), Some(4.0));
    }

    #[test]
    fn svg_draws_every_run_and_escapes_text() {
        let c = Chart {
            title: "<cpu> & \"more\"".into(),
            unit: Unit::Cores,
            lines: vec![Line::from_points(
                "demand",
                [(0.0, Some(1.0)), (1.0, Some(2.0)), (10.0, Some(1.0))],
                2.0,
            )],
            level: Some(Level {
                value: 3.0,
                class: "capacity-now",
                text: "3 cores now".into(),
            }),
            marks: vec![Mark {
                t: 1.0,
                text: "desired 1 → 2 <now>".into(),
                class: "mark",
            }],
        };
        let mut s = String::new();
        svg(&mut s, &c, 0.0, 10.0);
        assert_eq!(s.matches("<polyline").count(), 2);
        assert!(s.contains(r#"data-points="2""#) && s.contains(r#"data-points="1""#));
        assert!(s.contains("aria-label=\"&lt;cpu&gt; &amp; &quot;more&quot;\""));
        assert!(s.contains("<title>desired 1 → 2 &lt;now&gt;</title>"));
        assert!(s.contains(r#"<line class="capacity-now""#));
        // The level sets the scale: 3 cores × 1.1 at the top.
        assert!(s.contains(">3.30 cores</text>"), "{s}");
        assert!(!s.contains("<now>"));
        assert_eq!(Unit::Bytes.format(3.0 * 1024.0 * 1024.0), "3.00 MiB");
    }
}
