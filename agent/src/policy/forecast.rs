//! Demand forecasts as the policy sees them: an upper bound of demand over the lead time, per
//! container and resource. The engine asks through [`DemandForecast`] only, so any forecaster
//! (the models crate's per-series forecaster, or [`WindowForecast`] here) plugs in.

use std::collections::HashMap;
use std::collections::VecDeque;

use super::Resource;

/// Upper bound of demand over the configured lead time, in the resource's unit (cores, bytes).
pub trait DemandForecast {
    fn upper(&self, container: &str, resource: Resource) -> Option<f64>;
}

/// No forecast at all: the predictive strategy then proposes nothing.
pub struct NoForecast;

impl DemandForecast for NoForecast {
    fn upper(&self, _: &str, _: Resource) -> Option<f64> {
        None
    }
}

/// A cheap built-in forecaster: over a window of recent samples, the larger of the window's
/// maximum and a least-squares trend extrapolated `lead` steps ahead plus two residual standard
/// deviations. O(window) per observation, no allocation after warm-up.
#[derive(Debug, Clone)]
pub struct WindowForecast {
    window: usize,
    lead: f64,
    series: HashMap<(String, Resource), Series>,
}

#[derive(Debug, Clone, Default)]
struct Series {
    points: VecDeque<f64>,
    upper: Option<f64>,
    seen: bool,
}

impl WindowForecast {
    /// `window`: samples kept; `lead_steps`: how far ahead the bound must hold.
    pub fn new(window: usize, lead_steps: f64) -> WindowForecast {
        WindowForecast {
            window: window.max(3),
            lead: lead_steps.max(0.0),
            series: HashMap::new(),
        }
    }

    pub fn observe(&mut self, container: &str, resource: Resource, value: f64) {
        if !value.is_finite() {
            return;
        }
        let key = (container.to_string(), resource);
        let s = match self.series.get_mut(&key) {
            Some(s) => s,
            None => self.series.entry(key).or_default(),
        };
        s.seen = true;
        if s.points.len() == self.window {
            s.points.pop_front();
        }
        s.points.push_back(value);
        s.upper = bound(&s.points, self.lead);
    }

    /// Drops series not observed since the previous call (their containers are gone).
    pub fn sweep(&mut self) {
        self.series.retain(|_, s| std::mem::take(&mut s.seen));
    }
}

fn bound(points: &VecDeque<f64>, lead: f64) -> Option<f64> {
    let n = points.len();
    if n < 3 {
        return points.iter().copied().reduce(f64::max);
    }
    let nf = n as f64;
    let mean_x = (nf - 1.0) / 2.0;
    let mean_y = points.iter().sum::<f64>() / nf;
    let (mut sxy, mut sxx, mut max) = (0.0, 0.0, f64::MIN);
    for (i, y) in points.iter().enumerate() {
        let dx = i as f64 - mean_x;
        sxy += dx * (y - mean_y);
        sxx += dx * dx;
        max = max.max(*y);
    }
    let slope = sxy / sxx;
    let mut ss = 0.0;
    for (i, y) in points.iter().enumerate() {
        let fit = mean_y + slope * (i as f64 - mean_x);
        ss += (y - fit) * (y - fit);
    }
    let sd = (ss / (nf - 2.0)).sqrt();
    let ahead = mean_y + slope * (nf - 1.0 - mean_x + lead) + 2.0 * sd;
    Some(max.max(ahead))
}

impl DemandForecast for WindowForecast {
    fn upper(&self, container: &str, resource: Resource) -> Option<f64> {
        self.series
            .get(&(container.to_string(), resource))
            .and_then(|s| s.upper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rising_series_is_extrapolated_and_flat_series_stays_flat() {
        let mut f = WindowForecast::new(10, 5.0);
        for i in 0..10 {
            f.observe("/a", Resource::Cpu, i as f64 * 0.1);
            f.observe("/b", Resource::Cpu, 0.5);
        }
        let a = f.upper("/a", Resource::Cpu).unwrap();
        assert!((a - 1.4).abs() < 1e-6, "{a}");
        assert!((f.upper("/b", Resource::Cpu).unwrap() - 0.5).abs() < 1e-9);
        assert_eq!(f.upper("/c", Resource::Cpu), None);
        f.sweep();
        f.observe("/a", Resource::Cpu, 1.0);
        f.sweep();
        assert!(f.upper("/b", Resource::Cpu).is_none());
        assert!(f.upper("/a", Resource::Cpu).is_some());
    }
}
