//! Backtests on a recorded series: parse `timestamp_s,value` text, replay it step by step through
//! the forecasters exactly as the agent would run them, and score the capacities. The caller
//! reads and writes files; this module only sees text and numbers.
//!
//! Causality is structural: the capacity for step s is the forecast issued right after step
//! s − L was observed, before any later sample exists, so a truncated series yields the same
//! capacities for every step both runs cover.

use serde::Serialize;

use crate::forecaster::{ConfigError, ForecastConfig, Forecaster, Kind, SeriesForecaster};

/// Shortest series accepted: anything shorter cannot calibrate a bound before it is scored.
pub const MIN_POINTS: usize = 20;

/// A regular series.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    pub timestamps: Vec<i64>,
    pub values: Vec<f64>,
    pub step: i64,
}

/// What is wrong with an input series; line numbers are 1-based lines of the text.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TraceError {
    #[error("empty input: expected a `timestamp_s,value` header and rows")]
    Empty,
    #[error("line {line}: expected 2 fields `timestamp_s,value`, got {got}")]
    Fields { line: usize, got: usize },
    #[error("line {line}: {what} is not a number: {text:?}")]
    NotNumber {
        line: usize,
        what: &'static str,
        text: String,
    },
    #[error("line {line}: timestamp {ts} is not a whole number of seconds")]
    Fractional { line: usize, ts: f64 },
    #[error(
        "line {line}: irregular step: expected timestamp {expected} (step {step} s), got {got}"
    )]
    Irregular {
        line: usize,
        expected: i64,
        got: i64,
        step: i64,
    },
    #[error("line {line}: timestamps must increase (step {step} s)")]
    NotIncreasing { line: usize, step: i64 },
    #[error("too short: {n} data rows; need at least {need} for lead time {lead} steps")]
    TooShort { n: usize, need: usize, lead: u32 },
}

/// Parse `timestamp_s,value` text with a header line and a fixed step.
pub fn parse_trace(text: &str) -> Result<Trace, TraceError> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let Some(header) = lines.next() else {
        return Err(TraceError::Empty);
    };
    let mut timestamps = Vec::new();
    let mut values = Vec::new();
    let mut parse_row = |no: usize, l: &str| -> Result<(), TraceError> {
        let line = no + 1;
        let f: Vec<&str> = l.split(',').map(str::trim).collect();
        if f.len() != 2 {
            return Err(TraceError::Fields { line, got: f.len() });
        }
        let num = |what: &'static str, s: &str| -> Result<f64, TraceError> {
            match s.parse::<f64>() {
                Ok(v) if v.is_finite() => Ok(v),
                _ => Err(TraceError::NotNumber {
                    line,
                    what,
                    text: s.to_string(),
                }),
            }
        };
        let ts = num("timestamp", f[0])?;
        if ts.fract() != 0.0 {
            return Err(TraceError::Fractional { line, ts });
        }
        timestamps.push(ts as i64);
        values.push(num("value", f[1])?);
        Ok(())
    };
    // A numeric first line is data, not a header.
    let mut line_of = Vec::new();
    let h: Vec<&str> = header.1.split(',').collect();
    if h.len() == 2 && h[0].trim().parse::<f64>().is_ok() {
        parse_row(header.0, header.1)?;
        line_of.push(header.0 + 1);
    }
    for (no, l) in lines {
        parse_row(no, l)?;
        line_of.push(no + 1);
    }
    if timestamps.len() < 2 {
        return Err(TraceError::TooShort {
            n: timestamps.len(),
            need: MIN_POINTS,
            lead: 1,
        });
    }
    let step = timestamps[1] - timestamps[0];
    if step <= 0 {
        return Err(TraceError::NotIncreasing {
            line: line_of[1],
            step,
        });
    }
    for i in 1..timestamps.len() {
        let expected = timestamps[i - 1] + step;
        if timestamps[i] != expected {
            return Err(TraceError::Irregular {
                line: line_of[i],
                expected,
                got: timestamps[i],
                step,
            });
        }
    }
    Ok(Trace {
        timestamps,
        values,
        step,
    })
}

/// Lead time in steps: `max(1, round(seconds / step))`.
pub fn lead_steps(lead_seconds: f64, step: i64) -> u32 {
    ((lead_seconds / step as f64).round().max(1.0)).min(f64::from(u32::MAX)) as u32
}

/// First emitted index: the first 20 % of the series is warm-up.
pub fn first_emitted(n: usize) -> usize {
    n / 5
}

/// First scored index, as the project's scorer defines it: `max(ceil(0.2 n), 50, 2 days)`, the
/// two days counting only for series with a step of at most 300 s that hold two days + 50 points.
pub fn scored_from(n: usize, step: i64) -> usize {
    let per_day = if step <= 300 {
        (86_400.0 / step as f64).round() as usize
    } else {
        0
    };
    let p = if per_day > 0 && n >= 2 * per_day + 50 {
        per_day
    } else {
        0
    };
    (n.div_ceil(5)).max(50).max(2 * p)
}

/// Models a backtest can emit.
pub const MODELS: [&str; 7] = [
    "default",
    "headroom-ridge",
    "reactive",
    "window-max",
    "vpa",
    "koordinator",
    "seasonal-naive",
];

/// Whether `name` is an emitted model name.
pub fn is_model(name: &str) -> bool {
    MODELS.contains(&name)
}

/// Capacities per model for every index (NaN where no forecast covers it: the first L steps).
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    pub models: Vec<&'static str>,
    /// First index written to the output (the end of the warm-up).
    pub first: usize,
    /// `capacity[m][s]`: capacity model `m` sets for step `s`.
    pub capacity: Vec<Vec<f64>>,
    /// Model in charge of `default` per index.
    pub chosen: Vec<&'static str>,
}

/// Replay `trace` through a fresh forecaster. `models` lists the names to keep (see [`MODELS`]).
/// `progress(done, total)` is called now and then.
pub fn run(
    trace: &Trace,
    lead: u32,
    target_violation: f64,
    models: &[&'static str],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Run, BacktestError> {
    let n = trace.values.len();
    let first = first_emitted(n);
    let need = MIN_POINTS.max(5 * lead as usize + 5);
    if n < need {
        return Err(BacktestError::Trace(TraceError::TooShort { n, need, lead }));
    }
    let cfg = ForecastConfig::new(lead, target_violation, trace.step as f64);
    let mut f = SeriesForecaster::new(cfg)?;
    let l = lead as usize;
    let mut capacity = vec![vec![f64::NAN; n]; models.len()];
    let mut chosen = vec![""; n];
    let idx = |k: Kind| Kind::ALL.iter().position(|x| *x == k).unwrap_or(0);
    let every = (n / 100).max(1);
    for (i, &v) in trace.values.iter().enumerate() {
        f.observe(v);
        if i % every == 0 {
            progress(i, n);
        }
        let s = i + l;
        if s >= n {
            continue;
        }
        let Some(fc) = f.forecast() else { continue };
        let outs: Vec<(Kind, f64, f64)> = f.candidate_outputs().collect();
        for (m, name) in models.iter().enumerate() {
            let c = match *name {
                "default" => fc.upper,
                "headroom-ridge" => {
                    let u = outs[idx(Kind::RidgeSqrt)].2;
                    if u.is_finite() { u } else { fc.upper }
                }
                "reactive" => outs[idx(Kind::Reactive)].1,
                "window-max" => outs[idx(Kind::WindowMax)].1,
                "vpa" => outs[idx(Kind::Vpa)].1,
                "koordinator" => outs[idx(Kind::Koordinator)].1,
                "seasonal-naive" => outs[idx(Kind::SeasonalNaive)].1,
                other => return Err(BacktestError::UnknownModel(other.to_string())),
            };
            capacity[m][s] = c;
        }
        chosen[s] = fc.model;
    }
    progress(n, n);
    Ok(Run {
        models: models.to_vec(),
        first,
        capacity,
        chosen,
    })
}

/// Backtest failures.
#[derive(Debug, thiserror::Error)]
pub enum BacktestError {
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("unknown model {0:?}; expected one of {MODELS:?}, `default` or `all`")]
    UnknownModel(String),
}

/// One model's score over the scored window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub model: String,
    pub violation_rate: f64,
    pub relative_slack: f64,
    pub shortfall: f64,
    pub capacity_changes_over_10pct: usize,
    pub scored_steps: usize,
    pub scored_from_index: usize,
}

/// Score capacities `cap[s]` (indices `from..n`) against demand, like the project's scorer.
pub fn score(demand: &[f64], cap: &[f64], from: usize) -> Summary {
    let n = demand.len().min(cap.len());
    let from = from.min(n);
    let mut tot = 0.0;
    let (mut viol, mut slack, mut short, mut changes) = (0usize, 0.0, 0.0, 0usize);
    for s in from..n {
        let (d, c) = (demand[s], cap[s]);
        tot += d;
        // A missing (NaN) capacity counts as a violation.
        if matches!(d.partial_cmp(&c), Some(std::cmp::Ordering::Greater) | None) {
            viol += 1;
        }
        slack += (c - d).max(0.0);
        short += (d - c).max(0.0);
        if s > from && (c - cap[s - 1]).abs() > 0.10 * cap[s - 1] {
            changes += 1;
        }
    }
    let tot = if tot == 0.0 { 1e-12 } else { tot };
    let k = (n - from).max(1) as f64;
    Summary {
        model: String::new(),
        violation_rate: viol as f64 / k,
        relative_slack: slack / tot,
        shortfall: short / tot,
        capacity_changes_over_10pct: changes,
        scored_steps: n - from,
        scored_from_index: from,
    }
}

/// Summaries per model over the scorer's window.
pub fn summarize(trace: &Trace, run: &Run) -> Vec<Summary> {
    let n = trace.values.len();
    let from = scored_from(n, trace.step);
    run.models
        .iter()
        .enumerate()
        .map(|(m, name)| {
            let mut s = score(&trace.values, &run.capacity[m], from);
            s.model = (*name).to_string();
            s
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_with_line_numbers() {
        let t = parse_trace("timestamp_s,value\n0,1\n10,2\n20,3.5\n").map_err(|e| e.to_string());
        assert_eq!(t.map(|t| (t.step, t.values)), Ok((10, vec![1.0, 2.0, 3.5])));
        assert_eq!(
            parse_trace("timestamp_s,value\n0,1\n10,2\n25,3\n"),
            Err(TraceError::Irregular {
                line: 4,
                expected: 20,
                got: 25,
                step: 10
            })
        );
        assert!(matches!(
            parse_trace("timestamp_s,value\n0,1\n10,x\n"),
            Err(TraceError::NotNumber {
                line: 3,
                what: "value",
                ..
            })
        ));
        assert_eq!(parse_trace(""), Err(TraceError::Empty));
    }

    #[test]
    fn scored_window_matches_the_scorer() {
        assert_eq!(scored_from(344, 10), 69);
        assert_eq!(scored_from(118, 30), 50);
        assert_eq!(scored_from(2880, 300), 576);
        assert_eq!(scored_from(39691, 60), 7939);
        assert_eq!(scored_from(1441, 57), 289);
    }

    #[test]
    fn lead_is_rounded_and_at_least_one() {
        assert_eq!(lead_steps(60.0, 3), 20);
        assert_eq!(lead_steps(60.0, 300), 1);
        assert_eq!(lead_steps(60.0, 57), 1);
        assert_eq!(lead_steps(60.0, 30), 2);
    }
}
