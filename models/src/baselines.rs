//! The recommenders people run today, implemented from their sources so headroom's model is
//! measured against them rather than against straw men. Each baseline turns the history of one
//! series into the capacity it would set `lead` steps ahead; none of them looks at the future.
//! They keep their own small state and never do I/O.

use serde::{Deserialize, Serialize};

use crate::history::{History, Period};

/// Kubernetes HPA (`pkg/controller/podautoscaler/replica_calculator.go`):
/// `desired = current × currentMetric / targetMetric`, skipped while the ratio is within the
/// controller's tolerance (`--horizontal-pod-autoscaler-tolerance`, default 0.1). With a target
/// utilisation of 80 % the capacity it provisions is the latest demand × 1.25.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Reactive {
    capacity: Option<f64>,
}

impl Reactive {
    pub const TARGET_UTILISATION: f64 = 0.8;
    pub const TOLERANCE: f64 = 0.1;

    pub fn new() -> Self {
        Self { capacity: None }
    }

    pub fn update(&mut self, v: f64) {
        let desired = v / Self::TARGET_UTILISATION;
        self.capacity = Some(match self.capacity {
            Some(c) if c > 0.0 && (desired / c - 1.0).abs() <= Self::TOLERANCE => c,
            _ => desired,
        });
    }

    pub fn capacity(&self) -> Option<f64> {
        self.capacity
    }
}

impl Default for Reactive {
    fn default() -> Self {
        Self::new()
    }
}

/// Steps in [`window_max`]'s window.
pub fn window_steps(step_seconds: f64) -> usize {
    ((300.0 / step_seconds).round() as usize).max(5)
}

/// Moving-window maximum: the highest demand over the last five minutes, which is what HPA's
/// scale-down stabilisation window (`behavior.scaleDown.stabilizationWindowSeconds`, default
/// 300 s) keeps; at least 5 samples so coarse series still get a window.
pub fn window_max(h: &History, step_seconds: f64) -> Option<f64> {
    let w = window_steps(step_seconds);
    let mut m: Option<f64> = None;
    for age in 0..w {
        match h.raw.back(age) {
            Some(v) => m = Some(m.map_or(f64::from(v), |x: f64| x.max(f64::from(v)))),
            None => break,
        }
    }
    m
}

/// Seasonal naive (Hyndman & Athanasopoulos, *Forecasting: Principles and Practice*, §5.2):
/// the value one season before the target time. The season is one day when a daily cycle has
/// been detected, else the method degrades to naive (the latest value).
pub fn seasonal_naive(h: &History, lead: u64) -> Option<f64> {
    let last = h.last()?;
    if !h.daily {
        return Some(last);
    }
    let d = h.period_steps(Period::Day);
    // Target step is count-1+lead; one day earlier must already be observed.
    let target = h.count - 1 + lead;
    if d < lead || target < d {
        return Some(last);
    }
    let age = (h.count - 1) - (target - d);
    match h.raw.back(age as usize) {
        Some(v) => Some(f64::from(v)),
        None => h.seasonal_level(target - d).or(Some(last)),
    }
}

/// Exponentially bucketed histogram whose sample weights double every half-life, as in the
/// Kubernetes VPA recommender (`pkg/recommender/util/decaying_histogram.go`,
/// `histogram_options.go`): bucket `i` starts at `first × (ratio^i − 1)/(ratio − 1)`; a
/// percentile is the end of the bucket where the cumulative weight reaches it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(try_from = "DecayingHistogramState")]
pub struct DecayingHistogram {
    weights: Vec<f32>,
    total: f64,
    first_bucket: f64,
    ratio: f64,
    half_life_steps: f64,
    /// Step whose weight is 1; moved forward as weights grow, to stay in range (VPA shifts its
    /// reference timestamp the same way).
    reference: u64,
}

/// A [`DecayingHistogram`] as restored, checked before use: a state file is untrusted bytes.
#[derive(Deserialize)]
struct DecayingHistogramState {
    weights: Vec<f32>,
    total: f64,
    first_bucket: f64,
    ratio: f64,
    half_life_steps: f64,
    reference: u64,
}

impl TryFrom<DecayingHistogramState> for DecayingHistogram {
    type Error = String;

    fn try_from(s: DecayingHistogramState) -> Result<Self, String> {
        if !s.weights.is_empty() && s.weights.len() != Self::BUCKETS {
            return Err(format!(
                "decaying histogram: {} weights, want 0 or {}",
                s.weights.len(),
                Self::BUCKETS
            ));
        }
        let finite = [s.total, s.first_bucket, s.ratio, s.half_life_steps];
        if finite.iter().any(|v| !v.is_finite())
            || s.total < 0.0
            || s.first_bucket < 0.0
            || s.ratio <= 1.0
            || s.half_life_steps <= 0.0
        {
            return Err(format!(
                "decaying histogram: total {}, first bucket {}, ratio {}, half-life {} out of range",
                s.total, s.first_bucket, s.ratio, s.half_life_steps
            ));
        }
        Ok(DecayingHistogram {
            weights: s.weights,
            total: s.total,
            first_bucket: s.first_bucket,
            ratio: s.ratio,
            half_life_steps: s.half_life_steps,
            reference: s.reference,
        })
    }
}

impl DecayingHistogram {
    /// 256 buckets at 5 % growth span a range of 10^6 above the first bucket, VPA's CPU span
    /// (0.01 to 1000 cores) with room to spare.
    pub const BUCKETS: usize = 256;

    pub fn new(ratio: f64, half_life_steps: f64) -> Self {
        Self {
            weights: Vec::new(),
            total: 0.0,
            first_bucket: 0.0,
            ratio,
            half_life_steps: half_life_steps.max(1.0),
            reference: 0,
        }
    }

    fn bucket_start(&self, i: usize) -> f64 {
        self.first_bucket * (self.ratio.powi(i as i32) - 1.0) / (self.ratio - 1.0)
    }

    fn bucket_of(&self, v: f64) -> usize {
        if v <= 0.0 {
            return 0;
        }
        let x = v / self.first_bucket * (self.ratio - 1.0) + 1.0;
        let i = (x.ln() / self.ratio.ln()).floor();
        (i.max(0.0) as usize).min(Self::BUCKETS - 1)
    }

    pub fn add(&mut self, v: f64, at: u64) {
        if self.weights.is_empty() {
            if v.abs() <= 0.0 {
                // The scale is set by the first non-zero sample; until then only zeros are known.
                self.total += 1.0;
                return;
            }
            // VPA's CPU histogram starts at 0.01 cores, about 1 % of a typical container's use:
            // take the same relative resolution from the first non-zero sample.
            self.first_bucket = v.abs() * 0.01;
            self.weights = vec![0.0; Self::BUCKETS];
            self.weights[0] = self.total as f32;
        }
        let mut exp = (at.saturating_sub(self.reference)) as f64 / self.half_life_steps;
        if exp > 50.0 {
            let scale = 0.5f64.powf(exp);
            for w in &mut self.weights {
                *w = (f64::from(*w) * scale) as f32;
            }
            self.total *= scale;
            self.reference = at;
            exp = 0.0;
        }
        let w = 2f64.powf(exp);
        let b = self.bucket_of(v);
        self.weights[b] = (f64::from(self.weights[b]) + w) as f32;
        self.total += w;
    }

    pub fn percentile(&self, p: f64) -> Option<f64> {
        if self.total <= 0.0 {
            return None;
        }
        if self.weights.is_empty() {
            return Some(0.0);
        }
        let goal = p * self.total;
        let mut acc = 0.0;
        for (i, w) in self.weights.iter().enumerate() {
            acc += f64::from(*w);
            if acc >= goal {
                return Some(self.bucket_start((i + 1).min(Self::BUCKETS - 1)));
            }
        }
        Some(self.bucket_start(Self::BUCKETS - 1))
    }
}

/// A percentile recommender over a decaying histogram with a safety margin.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PercentileRecommender {
    hist: DecayingHistogram,
    percentile: f64,
    margin: f64,
}

impl PercentileRecommender {
    /// Kubernetes VPA recommender defaults (`pkg/recommender/logic/recommender.go`,
    /// `model/aggregations_config.go`): target = p90 of the CPU histogram × (1 + 0.15 safety
    /// margin), 5 % bucket growth, 24 h decay half-life.
    pub fn vpa(step_seconds: f64) -> Self {
        Self {
            hist: DecayingHistogram::new(1.05, 86_400.0 / step_seconds),
            percentile: 0.90,
            margin: 0.15,
        }
    }

    /// Koordinator koordlet peak predictor (`pkg/koordlet/prediction/peak_predictor.go`, defaults
    /// in `config.go`: `CPUHistogramDecayHalfLife` 12 h, `SafetyMarginPercent` 10): a decaying
    /// histogram with 5 % bucket growth; peak = p95 × (1 + 0.10).
    pub fn koordinator(step_seconds: f64) -> Self {
        Self {
            hist: DecayingHistogram::new(1.05, 43_200.0 / step_seconds),
            percentile: 0.95,
            margin: 0.10,
        }
    }

    pub fn update(&mut self, v: f64, at: u64) {
        self.hist.add(v, at);
    }

    pub fn capacity(&self) -> Option<f64> {
        self.hist
            .percentile(self.percentile)
            .map(|p| p * (1.0 + self.margin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_percentile_is_the_bucket_end_covering_the_weight() {
        let mut h = DecayingHistogram::new(1.05, 1e9);
        for i in 0..100 {
            h.add(f64::from(i + 1), i as u64);
        }
        let p90 = h.percentile(0.9).unwrap_or(0.0);
        // 90 of 100 samples are <= 90: the bucket end lands within one 5 % bucket above it.
        assert!((90.0..=90.0 * 1.06).contains(&p90), "p90 = {p90}");
    }

    #[test]
    fn decay_forgets_old_samples() {
        // Half-life of 10 steps: 100 old samples at 100, then 50 recent ones at 10.
        let mut h = DecayingHistogram::new(1.05, 10.0);
        for t in 0..100 {
            h.add(100.0, t);
        }
        for t in 200..250 {
            h.add(10.0, t);
        }
        let p90 = h.percentile(0.9).unwrap_or(0.0);
        // The first bucket is 1 % of the first sample (1.0), so 10 lies in [9.55, 11.03).
        assert!(
            (10.0..11.1).contains(&p90),
            "old peak should have decayed away, p90 = {p90}"
        );
    }

    #[test]
    fn vpa_target_is_p90_with_margin() {
        let mut r = PercentileRecommender::vpa(60.0);
        for t in 0..1000u64 {
            r.update((t % 20) as f64 + 1.5, t);
        }
        let c = r.capacity().unwrap_or(0.0);
        // p90 of uniform 1.5..=20.5 is 18.5, × 1.15 = 21.3 (plus at most one 5 % bucket).
        assert!((21.2..=21.3 * 1.06).contains(&c), "capacity = {c}");
    }

    #[test]
    fn reactive_holds_within_tolerance() {
        let mut r = Reactive::new();
        r.update(100.0);
        assert_eq!(r.capacity(), Some(125.0));
        r.update(105.0); // 131.25 / 125 = 1.05: within 10 %
        assert_eq!(r.capacity(), Some(125.0));
        r.update(200.0);
        assert_eq!(r.capacity(), Some(250.0));
    }
    /// Found by the state-file fuzzer: a restored histogram with 22 weights indexed past them.
    #[test]
    fn a_restored_histogram_with_the_wrong_bucket_count_is_refused() {
        let mut h = DecayingHistogram::new(1.05, 10.0);
        h.add(1.0, 0);
        let mut v = serde_json::to_value(&h).unwrap();
        v["weights"] = serde_json::json!(vec![0.5f32; 22]);
        let e = serde_json::from_value::<DecayingHistogram>(v)
            .unwrap_err()
            .to_string();
        assert!(e.contains("22 weights"), "{e}");
        let back: DecayingHistogram =
            serde_json::from_value(serde_json::to_value(&h).unwrap()).unwrap();
        assert_eq!(back, h);
    }
}
