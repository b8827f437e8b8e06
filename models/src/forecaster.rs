//! The per-series forecaster the agent holds: every candidate model (headroom's ridge in three
//! calibrations and each baseline) is calibrated online on its own recent errors, scored by the
//! pinball loss at the operator's risk level, and the cheapest recent one is chosen, with a
//! switching penalty. An adaptive level on the chosen bound keeps the realised violation rate at
//! the target. Bounded state, no I/O.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::baselines::{PercentileRecommender, Reactive, seasonal_naive, window_max};
use crate::conformal::{AdaptiveLevel, ScoreWindow};
use crate::history::{History, RAW_CAPACITY, day_steps};
use crate::ridge::{Ridge, Transform};

/// Raw values a series keeps: a whole day where one fits in [`RAW_CAPACITY`] (seasonal naive
/// reads the value one day back), otherwise only what the models read: a ridge fit's window
/// (`LAGS` of features before `TRAIN_ROWS` origins and the lead after them) and the five-minute
/// window of the moving maximum. Further back, seasonal values come from the coarse buckets.
fn raw_capacity(step_seconds: f64, lead: u64) -> usize {
    let day = day_steps(step_seconds);
    if day > 0 && day as usize <= RAW_CAPACITY {
        return RAW_CAPACITY;
    }
    let fit = crate::ridge::LAGS + crate::ridge::TRAIN_ROWS + lead as usize;
    let window = crate::baselines::window_steps(step_seconds);
    (fit.max(window) + 1).min(RAW_CAPACITY)
}

/// Longest lead time accepted, in steps (pending forecasts are kept for each step of it).
pub const MAX_LEAD_STEPS: u32 = 1024;
/// Scores a candidate needs before its bound is trusted.
const MIN_SCORES: usize = 20;
/// Smoothing of the per-candidate recent cost (EWMA span, in steps).
const COST_SPAN: f64 = 150.0;
/// A challenger must be this much cheaper than the current choice to replace it.
const SWITCH_PENALTY: f64 = 0.1;

/// How a series' forecaster is set up.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ForecastConfig {
    /// Lead time in steps: a forecast issued after step t is for step t + lead_steps.
    pub lead_steps: u32,
    /// Share of steps on which demand may exceed the upper bound (e.g. 0.05).
    pub target_violation: f64,
    /// Sampling step of the series in seconds (sets the baselines' half-lives and the periods
    /// the seasonal detector looks for).
    pub step_seconds: f64,
    /// Scheduled refit of the ridge model, in steps (it also refits early on drift).
    pub refit_every: u32,
}

impl ForecastConfig {
    pub fn new(lead_steps: u32, target_violation: f64, step_seconds: f64) -> Self {
        Self {
            lead_steps,
            target_violation,
            step_seconds,
            refit_every: 1024,
        }
    }
}

/// Rejected configuration.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("lead_steps must be between 1 and {MAX_LEAD_STEPS}, got {0}")]
    Lead(u32),
    #[error("target_violation must be in (0, 0.5], got {0}")]
    Target(f64),
    #[error("step_seconds must be a positive number, got {0}")]
    Step(f64),
    #[error("refit_every must be at least 1")]
    Refit,
}

/// One forecast: the expected demand and the capacity covering it at the configured risk.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Forecast {
    /// Expected demand: headroom's ridge forecast (the latest value until the ridge is first
    /// fitted). Not tied to the candidate in charge, so it is not guaranteed to lie below `upper`.
    pub point: f64,
    /// Capacity that demand should exceed with probability at most the target violation rate.
    pub upper: f64,
    /// Name of the candidate model in charge.
    pub model: &'static str,
}

/// A candidate's recent record on this series.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CandidateError {
    pub model: &'static str,
    /// Recent mean pinball loss of its bound at the target level (the selection cost).
    pub cost: f64,
    /// Recent share of steps its bound was exceeded.
    pub violation_rate: f64,
    /// Recent Σmax(bound − demand, 0) / Σdemand.
    pub relative_slack: f64,
}

/// The interface every forecaster in this crate offers.
pub trait Forecaster {
    /// Feed the next sample (one per step, in order).
    fn observe(&mut self, value: f64);
    /// Refit now instead of waiting for the schedule.
    fn refit(&mut self);
    /// Forecast for `lead_steps` after the newest sample; None before any sample.
    fn forecast(&self) -> Option<Forecast>;
    /// Recent errors of the forecaster's candidates, the one in charge first.
    fn recent_errors(&self) -> Vec<CandidateError>;
}

/// Candidate models, in a fixed order (the state stores per-candidate vectors in this order).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Kind {
    Ridge,
    RidgeSqrt,
    RidgeSqrtScaled,
    Reactive,
    WindowMax,
    Vpa,
    Koordinator,
    SeasonalNaive,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Ridge,
        Kind::RidgeSqrt,
        Kind::RidgeSqrtScaled,
        Kind::Reactive,
        Kind::WindowMax,
        Kind::Vpa,
        Kind::Koordinator,
        Kind::SeasonalNaive,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Ridge => "ridge",
            Kind::RidgeSqrt => "ridge-sqrt",
            Kind::RidgeSqrtScaled => "ridge-sqrt-scaled",
            Kind::Reactive => "reactive",
            Kind::WindowMax => "window-max",
            Kind::Vpa => "vpa",
            Kind::Koordinator => "koordinator",
            Kind::SeasonalNaive => "seasonal-naive",
        }
    }

    fn transform(self) -> Transform {
        match self {
            Kind::Ridge => Transform::Identity,
            _ => Transform::SignedSqrt,
        }
    }

    /// Whether its conformal scores are divided by the local volatility (state-dependent width).
    fn scaled(self) -> bool {
        matches!(self, Kind::RidgeSqrtScaled)
    }

    /// Whether the candidate is one of the published baselines (as opposed to headroom's model).
    pub fn is_baseline(self) -> bool {
        !matches!(self, Kind::Ridge | Kind::RidgeSqrt | Kind::RidgeSqrtScaled)
    }
}

/// The forecasts of one step awaiting their outcome: the local error scale, the bound that was
/// applied, and per candidate its transformed point and its bound (None where it had none).
/// f32 and positional to keep the persisted state small; the applied bound stays exact.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct PendingStep(f32, Option<f64>, Vec<Option<f32>>, Vec<Option<f32>>);

/// JSON has no NaN: persist "no value yet" as null.
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        let o = if v.is_finite() { Some(*v) } else { None };
        o.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Candidate {
    kind: Kind,
    scores: ScoreWindow,
    cost: f64,
    viol: f64,
    slack: f64,
    demand: f64,
    outcomes: u32,
    /// The model's own output (a baseline's capacity as its source defines it), newest step.
    #[serde(with = "nan_as_null")]
    raw: f64,
    /// Its calibrated bound for the newest step; NaN until calibrated.
    #[serde(with = "nan_as_null")]
    upper: f64,
}

/// Per-series online forecaster (see the crate docs for how the agent uses it).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SeriesForecaster {
    cfg: ForecastConfig,
    history: History,
    ridge_id: Ridge,
    ridge_sqrt: Ridge,
    reactive: Reactive,
    vpa: PercentileRecommender,
    koord: PercentileRecommender,
    #[serde(deserialize_with = "candidates_in_order")]
    candidates: Vec<Candidate>,
    level: AdaptiveLevel,
    chosen: Option<usize>,
    pending: VecDeque<PendingStep>,
    since_refit: u32,
    /// Fast and slow EWMAs of the ridge's absolute error, for drift-triggered refits.
    err_fast: f64,
    err_slow: f64,
    latest: Option<(f64, f64, usize)>,
}

impl SeriesForecaster {
    pub fn new(cfg: ForecastConfig) -> Result<Self, ConfigError> {
        if cfg.lead_steps == 0 || cfg.lead_steps > MAX_LEAD_STEPS {
            return Err(ConfigError::Lead(cfg.lead_steps));
        }
        if !(cfg.target_violation > 0.0 && cfg.target_violation <= 0.5) {
            return Err(ConfigError::Target(cfg.target_violation));
        }
        if !(cfg.step_seconds.is_finite() && cfg.step_seconds > 0.0) {
            return Err(ConfigError::Step(cfg.step_seconds));
        }
        if cfg.refit_every == 0 {
            return Err(ConfigError::Refit);
        }
        let candidates = Kind::ALL
            .iter()
            .map(|&kind| Candidate {
                kind,
                scores: ScoreWindow::new(),
                cost: 0.0,
                viol: 0.0,
                slack: 0.0,
                demand: 0.0,
                outcomes: 0,
                raw: f64::NAN,
                upper: f64::NAN,
            })
            .collect();
        Ok(Self {
            history: History::new(
                cfg.step_seconds,
                raw_capacity(cfg.step_seconds, u64::from(cfg.lead_steps)),
            ),
            ridge_id: Ridge::new(Transform::Identity),
            ridge_sqrt: Ridge::new(Transform::SignedSqrt),
            reactive: Reactive::new(),
            vpa: PercentileRecommender::vpa(cfg.step_seconds),
            koord: PercentileRecommender::koordinator(cfg.step_seconds),
            candidates,
            level: AdaptiveLevel::new(cfg.target_violation),
            chosen: None,
            pending: VecDeque::new(),
            since_refit: 0,
            err_fast: 0.0,
            err_slow: 0.0,
            latest: None,
            cfg,
        })
    }

    pub fn config(&self) -> &ForecastConfig {
        &self.cfg
    }

    /// Number of samples observed.
    pub fn observed(&self) -> u64 {
        self.history.count
    }

    /// The newest output of every candidate: (model, its own output, its calibrated bound).
    /// A baseline's own output is its capacity exactly as its source defines it.
    pub fn candidate_outputs(&self) -> impl Iterator<Item = (Kind, f64, f64)> + '_ {
        self.candidates.iter().map(|c| (c.kind, c.raw, c.upper))
    }

    /// Seasonal cycles detected so far (daily, weekly).
    pub fn detected_periods(&self) -> (bool, bool) {
        (self.history.daily, self.history.weekly)
    }

    fn lead(&self) -> u64 {
        u64::from(self.cfg.lead_steps)
    }

    /// Steps between scheduled refits: while the history is young the training window grows
    /// fast, so refit whenever it has grown by a quarter, up to `refit_every`.
    fn refit_interval(&self) -> u32 {
        // Counted against the full capacity whatever the ring's own, so the cadence is the same
        // for every step size.
        let grown = (self.history.count.min(crate::history::RAW_CAPACITY as u64) / 4) as u32;
        grown.clamp(1, self.cfg.refit_every)
    }

    fn do_refit(&mut self) {
        self.history.detect_periods();
        let lead = self.lead();
        // A failed fit keeps the previous weights; the candidate's errors still show it.
        let _ = self.ridge_id.fit(&self.history, lead);
        let _ = self.ridge_sqrt.fit(&self.history, lead);
        self.since_refit = 0;
        self.err_fast = self.err_slow;
    }
}

/// Restored state must hold one candidate per [`Kind`], in order: the forecasts are matched to
/// candidates by position.
fn candidates_in_order<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Candidate>, D::Error> {
    let v = Vec::<Candidate>::deserialize(d)?;
    if v.len() != Kind::ALL.len() || v.iter().zip(Kind::ALL).any(|(c, k)| c.kind != k) {
        return Err(serde::de::Error::custom(format!(
            "state holds candidates {:?}, expected {:?}",
            v.iter().map(|c| c.kind.name()).collect::<Vec<_>>(),
            Kind::ALL.map(Kind::name)
        )));
    }
    Ok(v)
}

/// Local volatility in transformed units: mean absolute step change over the last 16 steps of
/// `recent` (oldest first), floored so a flat stretch does not collapse the bound to nothing.
fn local_scale(recent: &[f64]) -> f64 {
    let t = Transform::SignedSqrt;
    let w = &recent[recent.len().saturating_sub(17)..];
    let n = w.len().saturating_sub(1);
    if n == 0 {
        return 1.0;
    }
    let (mut s, mut lvl) = (0.0, 0.0);
    let mut prev = t.apply(w[0]);
    for v in &w[1..] {
        let z = t.apply(*v);
        s += (z - prev).abs();
        lvl += z.abs();
        prev = z;
    }
    (s / n as f64).max(0.05 * lvl / n as f64).max(1e-6)
}

/// Capacity as applied: never below zero for a non-negative series, and rounded down for
/// whole-valued demand, which never lands strictly between two whole numbers, so capacity there
/// is pure slack.
fn round(v: f64, nonnegative: bool, integral: bool) -> f64 {
    let v = if nonnegative { v.max(0.0) } else { v };
    // The nudge keeps float noise (4.9999999 for a bound of exactly 5) from dropping a whole unit.
    if integral {
        (v + 1e-9 * v.abs().max(1.0)).floor()
    } else {
        v
    }
}

fn pinball(y: f64, upper: f64, tau: f64) -> f64 {
    if y > upper {
        tau * (y - upper)
    } else {
        (1.0 - tau) * (upper - y)
    }
}

impl Forecaster for SeriesForecaster {
    fn observe(&mut self, value: f64) {
        if !value.is_finite() {
            return;
        }
        let lead = self.cfg.lead_steps as usize;
        let tau = 1.0 - self.cfg.target_violation;
        let k = 2.0 / (COST_SPAN + 1.0);
        // 1. Outcomes of the forecasts issued `lead` steps ago (their buffers are reused below).
        let mut spare = None;
        if self.pending.len() >= lead
            && let Some(PendingStep(scale, applied, zs, uppers)) = self.pending.pop_front()
        {
            for ((c, pz), pu) in self.candidates.iter_mut().zip(&zs).zip(&uppers) {
                let (pz, pu) = (*pz, *pu);
                let Some(pz) = pz else { continue };
                let z = c.kind.transform().apply(value);
                let sc = if c.kind.scaled() {
                    f64::from(scale)
                } else {
                    1.0
                };
                c.scores.push((z - f64::from(pz)) / sc);
                if let Some(u) = pu {
                    let u = f64::from(u);
                    let first = c.outcomes == 0;
                    let mix = |old: f64, new: f64| if first { new } else { old + k * (new - old) };
                    c.cost = mix(c.cost, pinball(value, u, tau));
                    c.viol = mix(c.viol, if value > u { 1.0 } else { 0.0 });
                    c.slack = mix(c.slack, (u - value).max(0.0));
                    c.demand = mix(c.demand, value.abs());
                    c.outcomes = c.outcomes.saturating_add(1);
                }
                if c.kind == Kind::RidgeSqrt {
                    let e = (z - f64::from(pz)).abs();
                    self.err_fast += 0.1 * (e - self.err_fast);
                    self.err_slow += 0.005 * (e - self.err_slow);
                }
            }
            if let Some(u) = applied {
                self.level.update(value > u);
            }
            spare = Some((zs, uppers));
        }

        // 2. The models learn the new sample.
        let at = self.history.count;
        self.history.push(value);
        self.reactive.update(value);
        self.vpa.update(value, at);
        self.koord.update(value, at);
        self.since_refit = self.since_refit.saturating_add(1);
        let rows_ready =
            self.history.raw.len() >= crate::ridge::LAGS + crate::ridge::MIN_ROWS + lead;
        // Drift: recent errors well above their long-run level. Rate-limited, and the fast
        // average restarts from the slow one after a refit, so a bursty series that is merely
        // noisy does not refit every few steps.
        let drift = self.err_slow > 0.0
            && self.err_fast > 2.5 * self.err_slow
            && self.since_refit >= (self.cfg.refit_every / 4).max(1);
        if rows_ready
            && (!self.ridge_sqrt.is_fitted() || self.since_refit >= self.refit_interval() || drift)
        {
            self.do_refit();
        }

        // 3. New forecasts from every candidate.
        let h = &self.history;
        let mut buf = Vec::with_capacity(9);
        let leadu = self.lead();
        let mut window = [0.0; crate::ridge::LAGS];
        let k = crate::ridge::recent(h, &mut window);
        let window = &window[..k];
        let ridge_id = self.ridge_id.predict(h, leadu, window, &mut buf);
        let ridge_sqrt = self.ridge_sqrt.predict(h, leadu, window, &mut buf);
        let wmax = window_max(h, self.cfg.step_seconds);
        let snaive = seasonal_naive(h, leadu);
        let vpa = self.vpa.capacity();
        let koord = self.koord.capacity();
        let react = self.reactive.capacity();
        let last = value;
        let points = [
            ridge_id, ridge_sqrt, ridge_sqrt, react, wmax, vpa, koord, snaive,
        ];
        let scale = local_scale(window);
        let alpha = self.level.alpha;
        let (nonneg, integral) = (self.history.nonnegative, self.history.integral);
        let (mut zs, mut bounds) = spare.unwrap_or_default();
        zs.clear();
        bounds.clear();
        for (c, point) in self.candidates.iter_mut().zip(points) {
            let Some(point) = point else {
                c.raw = f64::NAN;
                c.upper = f64::NAN;
                zs.push(None);
                bounds.push(None);
                continue;
            };
            let tr = c.kind.transform();
            let sc = if c.kind.scaled() { scale } else { 1.0 };
            let z = tr.apply(point);
            let upper = match c.scores.quantile(alpha) {
                Some(q) if c.scores.len() >= MIN_SCORES => {
                    round(tr.invert(z + q * sc), nonneg, integral)
                }
                _ => f64::NAN,
            };
            c.raw = point;
            c.upper = upper;
            zs.push(Some(crate::history::down_f32(z)));
            bounds.push(upper.is_finite().then_some(crate::history::up_f32(upper)));
        }

        // 4. Choose: lowest recent cost among calibrated candidates; the incumbent keeps its
        // place unless a challenger is clearly cheaper.
        let ready = |c: &Candidate| c.upper.is_finite() && c.outcomes >= MIN_SCORES as u32;
        let best = self
            .candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| ready(c))
            .min_by(|a, b| a.1.cost.total_cmp(&b.1.cost))
            .map(|(i, _)| i);
        self.chosen = match (self.chosen, best) {
            (Some(cur), Some(b)) if self.candidates.get(cur).is_some_and(ready) => {
                let cur_cost = self.candidates.get(cur).map_or(f64::INFINITY, |c| c.cost);
                if self.candidates[b].cost < (1.0 - SWITCH_PENALTY) * cur_cost {
                    Some(b)
                } else {
                    Some(cur)
                }
            }
            (_, b) => b,
        };
        self.latest = match self.chosen {
            Some(i) => Some((ridge_sqrt.unwrap_or(last), self.candidates[i].upper, i)),
            // Nothing calibrated yet: the moving-window maximum with HPA's 25 % headroom.
            None => wmax.map(|m| {
                (
                    ridge_sqrt.unwrap_or(last),
                    round(m * 1.25, nonneg, integral),
                    Kind::ALL
                        .iter()
                        .position(|k| *k == Kind::WindowMax)
                        .unwrap_or(0),
                )
            }),
        };
        let applied = self.latest.map(|(_, upper, _)| upper);
        self.pending
            .push_back(PendingStep(scale as f32, applied, zs, bounds));
        while self.pending.len() > lead {
            self.pending.pop_front();
        }
    }

    fn refit(&mut self) {
        if self.history.raw.len()
            >= crate::ridge::LAGS + crate::ridge::MIN_ROWS + self.cfg.lead_steps as usize
        {
            self.do_refit();
        }
    }

    fn forecast(&self) -> Option<Forecast> {
        self.latest.map(|(point, upper, i)| Forecast {
            point,
            upper,
            model: Kind::ALL.get(i).map_or("unknown", |k| k.name()),
        })
    }

    fn recent_errors(&self) -> Vec<CandidateError> {
        let mut v: Vec<(bool, CandidateError)> = self
            .candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| c.outcomes > 0)
            .map(|(i, c)| {
                (
                    Some(i) != self.chosen,
                    CandidateError {
                        model: c.kind.name(),
                        cost: c.cost,
                        violation_rate: c.viol,
                        relative_slack: if c.demand > 0.0 {
                            c.slack / c.demand
                        } else {
                            0.0
                        },
                    },
                )
            })
            .collect();
        v.sort_by_key(|(not_chosen, _)| *not_chosen);
        v.into_iter().map(|(_, e)| e).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(values: impl Iterator<Item = f64>, lead: u32) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut f = SeriesForecaster::new(ForecastConfig::new(lead, 0.05, 60.0))
            .unwrap_or_else(|e| panic!("{e}"));
        let (mut d, mut cap, mut ridge) = (Vec::new(), Vec::new(), Vec::new());
        for v in values {
            f.observe(v);
            d.push(v);
            cap.push(f.forecast().map_or(f64::NAN, |fc| fc.upper));
            ridge.push(f.candidate_outputs().nth(1).map_or(f64::NAN, |o| o.2));
        }
        (d, cap, ridge)
    }

    #[test]
    fn raw_ring_keeps_a_day_where_it_fits_and_what_models_read_otherwise() {
        assert_eq!(raw_capacity(60.0, 1), RAW_CAPACITY);
        // 10 s steps: a day is 8,640 steps; the ridge window (64 + 1,024 + lead) is what is read.
        assert_eq!(raw_capacity(10.0, 6), 64 + 1024 + 6 + 1);
        // Sub-second steps: the five-minute moving maximum needs more, up to the cap.
        assert_eq!(raw_capacity(0.25, 8), 1201);
        assert_eq!(raw_capacity(0.1, 8), RAW_CAPACITY);
    }

    #[test]
    fn constant_demand_is_never_violated() {
        for level in [5.0, 5.5, 0.37, 1234.0] {
            let (d, cap, ridge) = run(std::iter::repeat_n(level, 600), 3);
            for s in 200..d.len() {
                assert!(
                    cap[s - 3] >= d[s],
                    "level {level}: default {} at {s}",
                    cap[s - 3]
                );
                assert!(
                    ridge[s - 3] >= d[s],
                    "level {level}: ridge {} at {s}",
                    ridge[s - 3]
                );
                assert!(
                    cap[s - 3] <= level * 1.001,
                    "level {level}: default {} wastes",
                    cap[s - 3]
                );
            }
        }
    }

    #[test]
    fn violation_rate_recovers_after_a_level_shift() {
        // A noisy level that triples halfway: the bound must follow within a few hundred steps.
        let mut x: u64 = 42;
        let series = (0..4000).map(move |i| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            (if i < 2000 { 100.0 } else { 300.0 }) * (0.8 + 0.4 * u)
        });
        let (d, cap, _) = run(series, 1);
        let viol = |a: usize, b: usize| {
            (a..b).filter(|&s| d[s] > cap[s - 1]).count() as f64 / (b - a) as f64
        };
        assert!(
            viol(2500, 4000) <= 0.08,
            "after the shift: {}",
            viol(2500, 4000)
        );
        assert!(
            viol(500, 2000) >= 0.02 && viol(500, 2000) <= 0.08,
            "before: {}",
            viol(500, 2000)
        );
    }
}
