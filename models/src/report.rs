//! Comparison at equal risk and the evaluation report: given demand and each model's capacities,
//! scale every baseline by the one constant factor (chosen with hindsight) that makes its
//! realised violation rate equal to headroom's, and compare slack; render the tables and SVG
//! plots as text. Pure: the caller writes the files.

use std::fmt::Write as _;

use crate::backtest::{Run, Summary, score};

/// Slack of `cap` over `from..to` after scaling it by the smallest factor k > 0 whose violation
/// rate is at most `rate`; returns (k, slack, realised violation rate).
pub fn slack_at_rate(
    demand: &[f64],
    cap: &[f64],
    from: usize,
    to: usize,
    rate: f64,
) -> (f64, f64, f64) {
    let n = to.saturating_sub(from);
    if n == 0 {
        return (1.0, 0.0, 0.0);
    }
    let mut forced = 0usize; // steps no positive factor can cover
    let mut ratios = Vec::with_capacity(n);
    for s in from..to {
        let (d, c) = (demand[s], cap[s]);
        if c > 0.0 {
            ratios.push(d / c);
        } else if d > c {
            forced += 1;
        }
    }
    ratios.sort_by(f64::total_cmp);
    let allowed = (rate * n as f64).floor() as usize;
    let spare = allowed.saturating_sub(forced);
    // Violations at factor k: ratios strictly above k. Leaving the `spare` largest uncovered.
    let k = if ratios.is_empty() {
        1.0
    } else if spare >= ratios.len() {
        0.0
    } else {
        ratios[ratios.len() - 1 - spare].max(0.0)
    };
    let scaled: Vec<f64> = (0..demand.len())
        .map(|s| if s >= from && s < to { cap[s] * k } else { 0.0 })
        .collect();
    let sm = score(&demand[..to], &scaled[..to], from);
    (k, sm.relative_slack, sm.violation_rate)
}

/// One trace's comparison at one target.
#[derive(Clone, Debug)]
pub struct Comparison {
    pub trace: String,
    pub target: f64,
    pub scored: usize,
    /// Raw scores of every emitted model.
    pub summaries: Vec<Summary>,
    /// Realised violation rate of `default`.
    pub default_violation: f64,
    pub default_slack: f64,
    /// Per baseline: slack when scaled to `default`'s realised violation rate.
    pub equal_risk: Vec<(String, f64)>,
    /// Baseline an operator would pick from the warm-up alone.
    pub warmup_pick: String,
    pub hindsight_best: String,
}

impl Comparison {
    pub fn slack_of(&self, model: &str) -> Option<f64> {
        self.equal_risk
            .iter()
            .find(|(m, _)| m == model)
            .map(|(_, s)| *s)
    }
}

/// Compare `default` with the baselines in `run` over the scored window `from..n`.
pub fn compare(
    trace_name: &str,
    demand: &[f64],
    run: &Run,
    summaries: Vec<Summary>,
    from: usize,
    target: f64,
    baselines: &[&str],
) -> Option<Comparison> {
    let n = demand.len();
    let dsum = summaries.iter().find(|s| s.model == "default")?;
    let rate = dsum.violation_rate;
    let mut equal_risk = Vec::new();
    let mut warm = Vec::new();
    for b in baselines {
        let Some(bi) = run.models.iter().position(|m| m == b) else {
            continue;
        };
        let cap = &run.capacity[bi];
        let (_, slack, _) = slack_at_rate(demand, cap, from, n, rate);
        equal_risk.push(((*b).to_string(), slack));
        // The warm-up an operator sees: what each baseline would have set over the first 20 %
        // (from the first step a forecast covers), judged at the target rate.
        let lead = cap.iter().position(|c| c.is_finite()).unwrap_or(0);
        let (_, ws, _) = slack_at_rate(demand, cap, lead, run.first.max(lead + 1), target);
        warm.push(((*b).to_string(), ws));
    }
    let pick = |v: &[(String, f64)]| {
        v.iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(m, _)| m.clone())
            .unwrap_or_default()
    };
    Some(Comparison {
        trace: trace_name.to_string(),
        target,
        scored: n - from,
        default_violation: rate,
        default_slack: dsum.relative_slack,
        warmup_pick: pick(&warm),
        hindsight_best: pick(&equal_risk),
        equal_risk,
        summaries,
    })
}

/// Geometric mean of `default`'s slack over a baseline's equal-risk slack.
pub fn geo_mean_ratio(
    rows: &[&Comparison],
    baseline: &dyn Fn(&Comparison) -> Option<f64>,
) -> Option<f64> {
    let mut acc = 0.0;
    let mut k = 0;
    for c in rows {
        let b = baseline(c)?;
        if b <= 0.0 || c.default_slack <= 0.0 {
            continue;
        }
        acc += (c.default_slack / b).ln();
        k += 1;
    }
    (k > 0).then(|| (acc / f64::from(k)).exp())
}

/// A small line plot: demand and capacities over `from..to`, as an SVG document.
pub fn svg_plot(
    title: &str,
    demand: &[f64],
    series: &[(&str, &[f64])],
    from: usize,
    to: usize,
) -> String {
    let (w, h, pad) = (900.0, 300.0, 40.0);
    let mut hi: f64 = 0.0;
    for s in from..to {
        hi = hi.max(demand[s]);
        for (_, c) in series {
            if c[s].is_finite() {
                hi = hi.max(c[s]);
            }
        }
    }
    let hi = if hi > 0.0 { hi * 1.05 } else { 1.0 };
    let span = (to - from).max(2) as f64 - 1.0;
    let x = |s: usize| pad + (s - from) as f64 / span * (w - 2.0 * pad);
    let y = |v: f64| h - pad - (v / hi).clamp(0.0, 1.0) * (h - 2.0 * pad);
    let colours = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd"];
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(out, r#"<text x="{pad}" y="20">{}</text>"#, escape(title));
    let _ = writeln!(
        out,
        r#"<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/><text x="4" y="{t}">{hi:.3}</text><text x="4" y="{b}">0</text>"#,
        b = h - pad,
        r = w - pad,
        t = pad + 4.0
    );
    let mut line = |name: &str, vals: &dyn Fn(usize) -> f64, colour: &str, idx: usize| {
        let mut pts = String::new();
        for s in from..to {
            let v = vals(s);
            if v.is_finite() {
                let _ = write!(pts, "{:.1},{:.1} ", x(s), y(v));
            }
        }
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="1" points="{pts}"/>"#
        );
        let lx = pad + 10.0 + 150.0 * idx as f64;
        let _ = writeln!(
            out,
            r#"<rect x="{lx}" y="{ly}" width="10" height="10" fill="{colour}"/><text x="{tx}" y="{ty}">{}</text>"#,
            escape(name),
            ly = h - 22.0,
            tx = lx + 14.0,
            ty = h - 13.0
        );
    };
    line("demand", &|s| demand[s], "#444444", 0);
    for (i, (name, c)) in series.iter().enumerate() {
        line(name, &|s| c[s], colours[i % colours.len()], i + 1);
    }
    out.push_str("</svg>\n");
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_risk_scaling_hits_the_rate() {
        let demand: Vec<f64> = (0..100).map(|i| f64::from(i % 10 + 1)).collect();
        let cap = vec![5.0; 100];
        // 10 % allowed: only the 10s may exceed, so the factor is 9/5.
        let (k, slack, v) = slack_at_rate(&demand, &cap, 0, 100, 0.10);
        assert!((k - 1.8).abs() < 1e-12);
        assert!((v - 0.10).abs() < 1e-12);
        let expect: f64 =
            demand.iter().map(|d| (9.0 - d).max(0.0)).sum::<f64>() / demand.iter().sum::<f64>();
        assert!((slack - expect).abs() < 1e-12);
    }
}
