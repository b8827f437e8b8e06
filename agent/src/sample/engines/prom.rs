//! Just enough of the Prometheus text format (0.0.4) to read an inference engine's `/metrics`:
//! samples of the families the engine mapping asks for, summed over their label sets, and
//! cumulative histograms with the quantile arithmetic of PromQL's `histogram_quantile`.
//! Anything else in the body (other families, comments, timestamps) is skipped unparsed.

use std::collections::HashMap;

/// One sample's labels and value.
type Row = (Vec<(String, String)>, f64);

/// The samples of one body whose names were asked for, by sample name.
#[derive(Debug, Default)]
pub struct Exposition {
    samples: HashMap<String, Vec<Row>>,
}

/// Parses the sample lines of `body` whose name `wanted` accepts. Malformed lines are skipped:
/// one bad line from an engine must not hide the rest of its metrics.
pub fn parse(body: &str, wanted: impl Fn(&str) -> bool) -> Exposition {
    let mut out = Exposition::default();
    for line in body.lines() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .bytes()
            .position(|b| b == b'{' || b.is_ascii_whitespace())
            .unwrap_or(line.len());
        let name = &line[..name_end];
        if !wanted(name) {
            continue;
        }
        let rest = &line[name_end..];
        let (labels, rest) = if rest.starts_with('{') {
            match parse_labels(rest) {
                Some(x) => x,
                None => continue,
            }
        } else {
            (Vec::new(), rest)
        };
        let Some(value) = rest.split_ascii_whitespace().next().and_then(parse_value) else {
            continue;
        };
        out.samples
            .entry(name.to_string())
            .or_default()
            .push((labels, value));
    }
    out
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// `{a="x",b="y\"z"} rest` → the pairs and what follows the closing brace.
fn parse_labels(s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    let mut chars = s.char_indices().skip(1).peekable();
    loop {
        // Skip separators.
        while let Some((_, c)) = chars.peek() {
            if *c == ',' || c.is_ascii_whitespace() {
                chars.next();
            } else {
                break;
            }
        }
        let (i, c) = chars.next()?;
        if c == '}' {
            return Some((labels, &s[i + 1..]));
        }
        let mut key = String::from(c);
        loop {
            let (_, c) = chars.next()?;
            if c == '=' {
                break;
            }
            key.push(c);
        }
        if chars.next()?.1 != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            let (_, c) = chars.next()?;
            match c {
                '"' => break,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        }
        labels.push((key.trim().to_string(), value));
    }
}

impl Exposition {
    /// Sum of every sample named `name` whose labels hold all of `matching` (`None` when there
    /// is none): several label sets (models, engine cores) of one process add up.
    pub fn sum(&self, name: &str, matching: &[(&str, &str)]) -> Option<f64> {
        let rows = self.samples.get(name)?;
        let mut found = false;
        let mut total = 0.0;
        for (labels, v) in rows {
            let ok = matching
                .iter()
                .all(|(k, want)| labels.iter().any(|(lk, lv)| lk == k && lv == want));
            if ok && v.is_finite() {
                found = true;
                total += v;
            }
        }
        found.then_some(total)
    }

    /// The cumulative histogram `base` (`_bucket`, `_count`, `_sum`), buckets of every label
    /// set summed by `le`, bounds multiplied by `scale` (a histogram in milliseconds reads in
    /// seconds with 0.001).
    pub fn histogram(&self, base: &str, scale: f64) -> Option<Histogram> {
        let rows = self.samples.get(&format!("{base}_bucket"))?;
        let mut by_le: Vec<(f64, f64)> = Vec::new();
        for (labels, v) in rows {
            let Some(le) = labels
                .iter()
                .find(|(k, _)| k == "le")
                .and_then(|(_, v)| parse_value(v))
            else {
                continue;
            };
            if le.is_nan() || !v.is_finite() {
                continue;
            }
            let le = if le.is_finite() { le * scale } else { le };
            match by_le.iter_mut().find(|(b, _)| *b == le) {
                Some((_, c)) => *c += v,
                None => by_le.push((le, *v)),
            }
        }
        by_le.sort_by(|a, b| a.0.total_cmp(&b.0));
        if by_le.is_empty() {
            return None;
        }
        Some(Histogram {
            buckets: by_le,
            sum: self.sum(&format!("{base}_sum"), &[]).unwrap_or(0.0) * scale,
        })
    }
}

/// A cumulative histogram: `(upper bound, observations at or below it)`, bounds ascending.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
}

impl Histogram {
    /// Observations in all buckets (the `+Inf` bucket's count, or the last one's).
    pub fn count(&self) -> f64 {
        self.buckets.last().map_or(0.0, |b| b.1)
    }

    /// What was observed since `earlier`, bucket by bucket; `None` when the bucket layouts
    /// differ. A count that went down means the engine restarted: its whole histogram is new.
    pub fn since(&self, earlier: &Histogram) -> Option<Histogram> {
        if self.buckets.len() != earlier.buckets.len()
            || self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .any(|(a, b)| a.0 != b.0)
        {
            return None;
        }
        if self
            .buckets
            .iter()
            .zip(&earlier.buckets)
            .any(|(a, b)| a.1 < b.1)
        {
            return Some(self.clone());
        }
        Some(Histogram {
            buckets: self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .map(|(a, b)| (a.0, a.1 - b.1))
                .collect(),
            sum: (self.sum - earlier.sum).max(0.0),
        })
    }

    /// The `q` quantile as PromQL's `histogram_quantile` computes it: linear within the
    /// bucket the rank falls in, the highest finite bound when it falls in `+Inf`; `None`
    /// without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total <= 0.0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = q * total;
        let mut below = 0.0;
        let mut lower = 0.0;
        for (i, &(le, cum)) in self.buckets.iter().enumerate() {
            if cum >= rank && cum > below {
                if le.is_infinite() {
                    return Some(if i == 0 { 0.0 } else { self.buckets[i - 1].0 });
                }
                let lower = if i == 0 && le <= 0.0 { le } else { lower };
                return Some(lower + (le - lower) * (rank - below) / (cum - below));
            }
            below = cum;
            lower = le;
        }
        self.buckets
            .iter()
            .rev()
            .find(|b| b.0.is_finite())
            .map(|b| b.0)
    }

    /// Index of the bucket holding `value` (for "within one bucket" comparisons).
    pub fn bucket_of(&self, value: f64) -> usize {
        self.buckets
            .iter()
            .position(|b| value <= b.0)
            .unwrap_or(self.buckets.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_escapes_and_sums() {
        let body = "# HELP x y\n# TYPE a gauge\na{model=\"m\\\"1\",engine=\"0\"} 2\na{model=\"m2\"} 3.5 1700000000\nb 1e+06\nbad{unterminated 3\nc NaN\n";
        let e = parse(body, |_| true);
        assert_eq!(e.sum("a", &[]), Some(5.5));
        assert_eq!(e.sum("a", &[("model", "m\"1")]), Some(2.0));
        assert_eq!(e.sum("b", &[]), Some(1e6));
        assert_eq!(e.sum("bad", &[]), None);
        assert_eq!(e.sum("c", &[]), None, "NaN is no value");
        let only_a = parse(body, |n| n == "a");
        assert_eq!(only_a.sum("b", &[]), None);
    }

    #[test]
    fn quantiles_follow_histogram_quantile() {
        let body = "h_bucket{le=\"0.1\"} 10\nh_bucket{le=\"0.5\"} 30\nh_bucket{le=\"1\"} 40\nh_bucket{le=\"+Inf\"} 40\nh_sum 9\nh_count 40\n";
        let h = parse(body, |_| true)
            .histogram("h", 1.0)
            .expect("histogram");
        assert_eq!(h.count(), 40.0);
        // rank 20: between 10 (le 0.1) and 30 (le 0.5): 0.1 + 0.4 * 10/20.
        assert!((h.quantile(0.5).expect("q") - 0.3).abs() < 1e-12);
        // rank 4 in the first bucket: 0 + 0.1 * 4/10.
        assert!((h.quantile(0.1).expect("q") - 0.04).abs() < 1e-12);
        assert!((h.quantile(0.99).expect("q") - (0.5 + 0.5 * 9.6 / 10.0)).abs() < 1e-12);
        assert_eq!(h.bucket_of(0.3), 1);
        let tail = parse("h_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 5\n", |_| true)
            .histogram("h", 1.0)
            .expect("histogram");
        assert_eq!(
            tail.quantile(0.9),
            Some(1.0),
            "+Inf answers the top finite bound"
        );
    }

    #[test]
    fn interval_deltas_and_restarts() {
        let h = |a: f64, b: f64| Histogram {
            buckets: vec![(1.0, a), (f64::INFINITY, b)],
            sum: b,
        };
        let d = h(5.0, 8.0).since(&h(2.0, 3.0)).expect("same layout");
        assert_eq!(d.buckets, vec![(1.0, 3.0), (f64::INFINITY, 5.0)]);
        assert_eq!(h(1.0, 1.0).since(&h(2.0, 3.0)), Some(h(1.0, 1.0)));
        let other = Histogram {
            buckets: vec![(2.0, 1.0)],
            sum: 0.0,
        };
        assert_eq!(h(1.0, 1.0).since(&other), None);
        let ms = parse(
            "t_bucket{le=\"100\"} 1\nt_bucket{le=\"+Inf\"} 1\nt_sum 50\n",
            |_| true,
        )
        .histogram("t", 1e-3)
        .expect("histogram");
        assert_eq!(ms.buckets[0].0, 0.1);
        assert!((ms.sum - 0.05).abs() < 1e-12);
    }
}
