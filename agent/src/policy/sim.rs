//! Replays a CPU demand trace against a policy without cgroups: each step the container gets
//! `min(demand, quota)`, demand above the quota counts as throttled (in core-seconds, the
//! throttled-time equivalent), and the policy sees what a real agent would (censored usage,
//! throttled ratio, its own quota). Pure: the caller supplies the trace.

use headroom_models::{ForecastConfig, Forecaster, SeriesForecaster};

use super::{
    Bounds, DemandForecast, Engine, Envelope, Observation, Params, Resource, Strategy,
    WindowForecast,
};

/// Which forecaster feeds the predictive strategy in a replay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SimForecast {
    /// The policy's built-in window forecast.
    Window,
    /// The models crate's per-series forecaster (the one the agent runs), at this accepted
    /// violation rate.
    Models { target_violation: f64 },
}

enum Source {
    Window(WindowForecast),
    Models(Box<SeriesForecaster>),
}

impl Source {
    fn observe(&mut self, v: f64) {
        match self {
            Source::Window(w) => w.observe("c", Resource::Cpu, v),
            Source::Models(m) => m.observe(v),
        }
    }
}

impl DemandForecast for Source {
    fn upper(&self, c: &str, r: Resource) -> Option<f64> {
        match self {
            Source::Window(w) => w.upper(c, r),
            Source::Models(m) => m.forecast().map(|f| f.upper),
        }
    }
}

/// Which policy a replay runs.
#[derive(Debug, Clone, PartialEq)]
pub enum SimPolicy {
    /// A fixed quota, in cores.
    Static(f64),
    /// The engine with these parameters (its strategies say reactive, predictive or both).
    Engine(Params),
}

#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    pub step_s: f64,
    pub envelope: Envelope,
    pub initial_quota: f64,
    /// Forecast window (samples) and lead (samples) of the built-in forecaster.
    pub window: usize,
    pub lead_steps: f64,
    pub writes_per_s: f64,
    pub forecast: SimForecast,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SimResult {
    /// Demand above the quota, summed over steps, in core-seconds.
    pub throttled_core_seconds: f64,
    /// Steps in which demand exceeded the quota.
    pub throttled_steps: usize,
    pub mean_quota: f64,
    pub mean_demand: f64,
    pub changes: usize,
}

/// Replays `demand` (cores per step) under `policy`.
pub fn replay(demand: &[f64], policy: &SimPolicy, cfg: &SimConfig) -> SimResult {
    let mut quota = match policy {
        SimPolicy::Static(q) => *q,
        SimPolicy::Engine(_) => cfg.initial_quota,
    };
    let mut engine = Engine::new(cfg.writes_per_s);
    let mut fc = match cfg.forecast {
        SimForecast::Window => Source::Window(WindowForecast::new(cfg.window, cfg.lead_steps)),
        SimForecast::Models { target_violation } => {
            let mc = ForecastConfig::new(
                (cfg.lead_steps.round() as u32).max(1),
                target_violation,
                cfg.step_s,
            );
            match SeriesForecaster::new(mc) {
                Ok(m) => Source::Models(Box::new(m)),
                // An unusable setting leaves the window forecast in charge.
                Err(_) => Source::Window(WindowForecast::new(cfg.window, cfg.lead_steps)),
            }
        }
    };
    let mut r = SimResult {
        throttled_core_seconds: 0.0,
        throttled_steps: 0,
        mean_quota: 0.0,
        mean_demand: 0.0,
        changes: 0,
    };
    let mut prev_throttled = None;
    for (i, d) in demand.iter().copied().enumerate() {
        let now = i as f64 * cfg.step_s;
        // The policy decides from what it saw up to the previous step, as the agent does.
        if let SimPolicy::Engine(params) = policy {
            let obs = Observation {
                cpu_usage: (i > 0).then(|| demand[i - 1].min(quota)),
                cpu_quota: Some(quota),
                throttled_ratio: prev_throttled,
                ..Default::default()
            };
            if params.strategies.contains(&Strategy::Predictive)
                && let Some(u) = obs.cpu_usage
            {
                fc.observe(u);
            }
            for mut dec in engine.evaluate(
                "c",
                now,
                &obs,
                params,
                Bounds {
                    cpu: Some(cfg.envelope),
                    memory: None,
                },
                &fc,
            ) {
                dec.applied = true;
                quota = dec.to;
                r.changes += 1;
                engine.record(&dec, &obs, now, params.rollback_window_s);
            }
        }
        let over = (d - quota).max(0.0);
        if over > 1e-9 {
            r.throttled_steps += 1;
        }
        r.throttled_core_seconds += over * cfg.step_s;
        // Demand above the quota throttles nearly every CFS period of the step.
        prev_throttled = Some(if over > 1e-9 { 1.0 } else { 0.0 });
        r.mean_quota += quota;
        r.mean_demand += d;
    }
    let n = demand.len().max(1) as f64;
    r.mean_quota /= n;
    r.mean_demand /= n;
    r
}

/// Engine parameters of the acceptance scenario (benchmark and end-to-end test share them):
/// time constants in steps of `step_s`, so compressed traces keep their shape. Without the
/// predictive strategy this is the reactive rule, which raises on the kernel's throttling
/// signal only (`util_high` = 1).
pub fn acceptance_params(strategies: &[Strategy], step_s: f64) -> Params {
    Params {
        strategies: strategies.to_vec(),
        util_high: if strategies.contains(&Strategy::Predictive) {
            Params::default().util_high
        } else {
            1.0
        },
        cooldown_s: 3.0 * step_s,
        scale_in_window_s: 10.0 * step_s,
        rollback_window_s: 10.0 * step_s,
        max_step_ratio: 0.3,
        ..Params::default()
    }
}

/// Scales a trace linearly so its minimum maps to `lo` and its maximum to `hi` cores.
pub fn scale(values: &[f64], lo: f64, hi: f64) -> Vec<f64> {
    let (min, max) = values
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
    let span = (max - min).max(1e-12);
    values
        .iter()
        .map(|v| lo + (v - min) / span * (hi - lo))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predictive_throttles_less_than_reactive_within_the_peak_static_quota() {
        // A daily-like cycle with multiplicative noise from a fixed LCG (no trace file needed).
        let mut x: u64 = 42;
        let demand: Vec<f64> = (0..600)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let noise = ((x >> 33) as f64 / (1u64 << 31) as f64 - 0.5) * 0.4;
                let base = 0.8 + 0.6 * ((i as f64 / 150.0) * std::f64::consts::PI).sin();
                (base * (1.0 + noise)).max(0.05)
            })
            .collect();
        let peak = demand.iter().copied().fold(0.0, f64::max);
        let cfg = SimConfig {
            step_s: 1.0,
            envelope: Envelope {
                floor: 0.1,
                ceiling: peak * 1.25,
            },
            initial_quota: peak,
            window: 20,
            lead_steps: 5.0,
            writes_per_s: 10.0,
            forecast: SimForecast::Window,
        };
        let s = replay(&demand, &SimPolicy::Static(peak), &cfg);
        assert_eq!(s.throttled_steps, 0);
        let b = replay(
            &demand,
            &SimPolicy::Engine(acceptance_params(&[Strategy::Rule, Strategy::Event], 1.0)),
            &cfg,
        );
        let c = replay(
            &demand,
            &SimPolicy::Engine(acceptance_params(
                &[Strategy::Predictive, Strategy::Event],
                1.0,
            )),
            &cfg,
        );
        assert!(b.throttled_core_seconds > 0.0, "{b:?}");
        assert!(
            c.throttled_core_seconds < b.throttled_core_seconds,
            "{b:?} {c:?}"
        );
        assert!(c.mean_quota <= s.mean_quota, "{s:?} {c:?}");
    }
}
