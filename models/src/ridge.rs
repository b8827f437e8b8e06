//! headroom's own model: ridge regression, fitted with linfa, of the (transformed) demand `lead`
//! steps ahead on recent lags, window statistics and — only when the history shows the cycle —
//! daily and weekly seasonal terms. Training rows are rebuilt from the bounded history at each
//! refit, so the model state is just its weights. Never does I/O.

use linfa::prelude::*;
use linfa_linear::LinearRegression;
use ndarray::{Array1, Array2};
use serde::{Deserialize, Serialize};

use crate::history::{History, Period};

/// Variance-stabilising transform the model is fitted in. The signed square root turns
/// Poisson-like counts (variance ∝ level) into roughly constant-variance data and keeps the sign.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Transform {
    Identity,
    SignedSqrt,
}

impl Transform {
    pub fn apply(self, v: f64) -> f64 {
        match self {
            Transform::Identity => v,
            Transform::SignedSqrt => v.signum() * v.abs().sqrt(),
        }
    }

    pub fn invert(self, z: f64) -> f64 {
        match self {
            Transform::Identity => z,
            Transform::SignedSqrt => z * z.abs(),
        }
    }
}

/// Longest lag window a feature reads.
pub(crate) const LAGS: usize = 64;
/// Most training rows used by a fit.
pub const TRAIN_ROWS: usize = 1024;
/// Fewest training rows worth a fit.
pub const MIN_ROWS: usize = 32;
/// Ridge penalty on standardised features, relative to the number of rows.
const LAMBDA: f64 = 1e-3;

/// The newest samples of `h` (up to `LAGS`), oldest first, into `out`; returns how many.
pub fn recent(h: &History, out: &mut [f64; LAGS]) -> usize {
    let k = h.raw.len().min(LAGS);
    for (i, r) in out[..k].iter_mut().enumerate() {
        *r = h.raw.back(k - 1 - i).map_or(0.0, f64::from);
    }
    k
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
struct Seasons {
    daily: bool,
    weekly: bool,
}

impl Seasons {
    fn features(self) -> usize {
        5 + 2 * usize::from(self.daily) + 2 * usize::from(self.weekly)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Ridge {
    pub transform: Transform,
    seasons: Seasons,
    /// Weights on raw (unstandardised) features, then the intercept.
    weights: Vec<f64>,
    intercept: f64,
    fitted: bool,
}

/// Error from a refit; the previous weights stay in use.
#[derive(Debug, thiserror::Error)]
pub enum FitError {
    #[error("too few training rows ({0}, need {MIN_ROWS})")]
    TooFewRows(usize),
    #[error("linear solver failed: {0}")]
    Solver(String),
}

impl Ridge {
    pub fn new(transform: Transform) -> Self {
        Self {
            transform,
            seasons: Seasons::default(),
            weights: Vec::new(),
            intercept: 0.0,
            fitted: false,
        }
    }

    pub fn is_fitted(&self) -> bool {
        self.fitted
    }

    /// Features at origin `t` (absolute step) for target `t + lead`. `recent` holds the
    /// transformed values up to and including step `t`, oldest first (at most `LAGS` used).
    fn features(
        &self,
        seasons: Seasons,
        h: &History,
        t: u64,
        lead: u64,
        recent: &[f64],
        out: &mut Vec<f64>,
    ) -> Option<()> {
        out.clear();
        let last = *recent.last()?;
        let w = &recent[recent.len().saturating_sub(LAGS)..];
        let tail = |k: usize| &w[w.len().saturating_sub(k)..];
        let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
        let (s4, s16) = (tail(4), tail(16));
        let max16 = s16.iter().fold(f64::NEG_INFINITY, |a, b| a.max(*b));
        let (m4, m16, m64) = (mean(s4), mean(s16), mean(w));
        out.extend_from_slice(&[last, m4, m16, m64, max16]);
        for (on, p) in [(seasons.daily, Period::Day), (seasons.weekly, Period::Week)] {
            if !on {
                continue;
            }
            let ps = h.period_steps(p);
            let g = |at: u64| h.seasonal_level(at).map(|v| self.transform.apply(v));
            // Expected change from now to the target, as seen one period earlier, and the
            // target's level one period earlier; neutral values when the buckets do not reach.
            let target = (t + lead).checked_sub(ps).and_then(g);
            let now = t.checked_sub(ps).and_then(g);
            match (target, now) {
                (Some(a), Some(b)) => {
                    out.push(a - b);
                    out.push(a);
                }
                (Some(a), None) => {
                    out.push(0.0);
                    out.push(a);
                }
                _ => {
                    out.push(0.0);
                    out.push(last);
                }
            }
        }
        Some(())
    }

    /// Point forecast (in original units) for the step `lead` after the newest observation.
    /// `recent_raw`: the newest samples (up to `LAGS`), oldest first, as [`recent`] gives them.
    pub fn predict(
        &self,
        h: &History,
        lead: u64,
        recent_raw: &[f64],
        buf: &mut Vec<f64>,
    ) -> Option<f64> {
        if !self.fitted || h.count == 0 {
            return None;
        }
        let tr = self.transform;
        let k = recent_raw.len().min(LAGS);
        let mut recent = [0.0; LAGS];
        for (r, v) in recent[..k]
            .iter_mut()
            .zip(&recent_raw[recent_raw.len() - k..])
        {
            *r = tr.apply(*v);
        }
        self.features(self.seasons, h, h.count - 1, lead, &recent[..k], buf)?;
        let zhat = self.intercept
            + buf
                .iter()
                .zip(&self.weights)
                .map(|(x, w)| x * w)
                .sum::<f64>();
        Some(tr.invert(zhat))
    }

    /// Refit on every origin in the bounded history whose target is already observed.
    pub fn fit(&mut self, h: &History, lead: u64) -> Result<(), FitError> {
        let tr = self.transform;
        let vals: Vec<f64> = h
            .raw
            .to_vec()
            .into_iter()
            .map(|v| tr.apply(f64::from(v)))
            .collect();
        let n = vals.len();
        let lead_us = lead as usize;
        // The most recent TRAIN_ROWS origins only: as accurate on the shared traces as the whole
        // history, at half the cost, and quicker to follow a change.
        let first = LAGS
            .min(n)
            .saturating_sub(1)
            .max(3)
            .max(n.saturating_sub(lead_us + TRAIN_ROWS));
        if n <= first + lead_us {
            return Err(FitError::TooFewRows(0));
        }
        let rows = n - lead_us - first;
        if rows < MIN_ROWS {
            return Err(FitError::TooFewRows(rows));
        }
        let seasons = Seasons {
            daily: h.daily,
            weekly: h.weekly,
        };
        let p = seasons.features();
        let base = h.count - n as u64; // absolute step of vals[0]
        let mut x = Array2::<f64>::zeros((rows + p, p));
        let mut y = Array1::<f64>::zeros(rows + p);
        let mut buf = Vec::with_capacity(p);
        for (r, i) in (first..n - lead_us).enumerate() {
            if self
                .features(seasons, h, base + i as u64, lead, &vals[..=i], &mut buf)
                .is_none()
            {
                return Err(FitError::TooFewRows(r));
            }
            for (j, v) in buf.iter().enumerate() {
                x[[r, j]] = *v;
            }
            y[r] = vals[i + lead_us];
        }
        // Standardise so one penalty suits every feature scale; centre so the intercept is not
        // penalised.
        let mut mean = vec![0.0; p];
        let mut sd = vec![1.0; p];
        for j in 0..p {
            let col = x.slice(ndarray::s![..rows, j]);
            let m = col.sum() / rows as f64;
            let v = col.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / rows as f64;
            mean[j] = m;
            sd[j] = if v > 1e-24 { v.sqrt() } else { 1.0 };
        }
        let ymean = y.slice(ndarray::s![..rows]).sum() / rows as f64;
        for r in 0..rows {
            for j in 0..p {
                x[[r, j]] = (x[[r, j]] - mean[j]) / sd[j];
            }
            y[r] -= ymean;
        }
        // Ridge as least squares on data augmented with sqrt(λ)·I rows (targets 0).
        let ridge = (LAMBDA * rows as f64).sqrt();
        for j in 0..p {
            x[[rows + j, j]] = ridge;
        }
        let ds = Dataset::new(x, y);
        let fitted = LinearRegression::new()
            .with_intercept(false)
            .fit(&ds)
            .map_err(|e| FitError::Solver(e.to_string()))?;
        let beta = fitted.params();
        let mut w = Vec::with_capacity(p);
        let mut icpt = ymean;
        for j in 0..p {
            let wj = beta[j] / sd[j];
            if !wj.is_finite() {
                return Err(FitError::Solver("non-finite weight".into()));
            }
            icpt -= wj * mean[j];
            w.push(wj);
        }
        self.weights = w;
        self.intercept = icpt;
        self.seasons = seasons;
        self.fitted = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_a_linear_trend_ahead() {
        let mut h = History::new(60.0, crate::history::RAW_CAPACITY);
        for i in 0..500 {
            h.push(100.0 + 2.0 * i as f64);
        }
        let mut m = Ridge::new(Transform::Identity);
        m.fit(&h, 5)
            .map_err(|e| e.to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut buf = Vec::new();
        let mut r = [0.0; LAGS];
        let k = recent(&h, &mut r);
        let p = m.predict(&h, 5, &r[..k], &mut buf).unwrap_or(f64::NAN);
        // Last value 1098; five steps on the trend is 1108.
        assert!((p - 1108.0).abs() < 2.0, "predicted {p}");
    }

    #[test]
    fn signed_sqrt_round_trips() {
        for v in [-9.0, 0.0, 2.5, 1e6] {
            let t = Transform::SignedSqrt;
            assert!((t.invert(t.apply(v)) - v).abs() < 1e-9 * v.abs().max(1.0));
        }
    }
}
