//! The right-sizing decision engine: pure functions of observations, forecasts and signals that
//! say how each managed container's CPU quota, memory soft limit and GPU share should change,
//! and why. Three strategy families combine per workload: rule-based thresholds with
//! hysteresis ([`Strategy::Rule`]), predictive capacity from a forecast upper bound
//! ([`Strategy::Predictive`]) and immediate reactions to events ([`Strategy::Event`]). Every
//! proposal passes through the safety [`Envelope`] (floor, ceiling, maximum step, cool-down,
//! sustained scale-in, global write rate, rollback).
//!
//! This module never reads or writes files, clocks or sockets: time comes in as seconds, and
//! the agent's actuators ([`crate::act`]) carry out what it decides.

pub mod forecast;
pub mod sim;

use std::collections::HashMap;

use serde::Serialize;

pub use forecast::{DemandForecast, WindowForecast};

/// What a decision changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Resource {
    /// CFS quota, in cores.
    Cpu,
    /// `memory.high` (v2) or the soft limit (v1), in bytes.
    Memory,
    /// CUDA MPS active thread percentage (0–100).
    Gpu,
}

impl Resource {
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Cpu => "cpu",
            Resource::Memory => "memory",
            Resource::Gpu => "gpu",
        }
    }
}

/// Why a decision was made; also the `reason` label of `headroom_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Rule: throttled or near the quota; raise.
    RuleHigh,
    /// Rule: usage stayed low for the whole scale-in window; lower.
    RuleLow,
    /// Predictive: forecast upper bound plus margin differs from the current capacity.
    Forecast,
    OomKill,
    MemoryPressure,
    LatencySlo,
    /// A GPU fault (XID, GPU lost): stop placing load there; drain hint, never a write.
    GpuFault,
    /// A lowering made throttling, OOM or latency worse: back to the value before it.
    Rollback,
    /// The current value lies outside the envelope: bring it inside.
    Envelope,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::RuleHigh => "rule_high",
            Reason::RuleLow => "rule_low",
            Reason::Forecast => "forecast",
            Reason::OomKill => "oom_kill",
            Reason::MemoryPressure => "memory_pressure",
            Reason::LatencySlo => "latency_slo",
            Reason::GpuFault => "gpu_fault",
            Reason::Rollback => "rollback",
            Reason::Envelope => "envelope",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    Rule,
    Predictive,
    Event,
}

/// What the engine saw when it decided: shown at `/v1/decisions` so an operator can see why.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Inputs {
    pub usage: Option<f64>,
    pub forecast_upper: Option<f64>,
    pub throttled_ratio: Option<f64>,
    pub memory_pressure_ratio: Option<f64>,
    pub oom_kills: Option<u64>,
    pub latency_seconds: Option<f64>,
    pub floor: f64,
    pub ceiling: f64,
}

/// One decision. `from` is `None` when the current value is unlimited.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub container: String,
    pub resource: Resource,
    pub from: Option<f64>,
    pub to: f64,
    pub reason: Reason,
    pub inputs: Inputs,
    /// Set by the caller: whether the value was written (`false` in observe mode, for hints
    /// and when rate-limited or refused).
    pub applied: bool,
    /// Why it was not applied, or a hint for the cluster (e.g. `drain`).
    pub note: Option<String>,
}

/// Floor and ceiling of one resource for one container.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Envelope {
    pub floor: f64,
    pub ceiling: f64,
}

impl Envelope {
    pub fn clamp(&self, v: f64) -> f64 {
        v.max(self.floor).min(self.ceiling)
    }
}

/// The envelopes of one container; `None` leaves that resource alone.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Bounds {
    pub cpu: Option<Envelope>,
    pub memory: Option<Envelope>,
}

/// Tunables of the engine; one set per workload (the config's defaults with overrides).
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub strategies: Vec<Strategy>,
    /// Predictive: capacity = forecast upper bound × (1 + margin).
    pub margin_ratio: f64,
    /// Largest change per decision, relative to the current value.
    pub max_step_ratio: f64,
    /// Seconds between two changes of one resource (events and rollbacks skip it).
    pub cooldown_s: f64,
    /// Lowering needs observed usage below the lowering threshold for this long.
    pub scale_in_window_s: f64,
    /// Rollback watches this long after a lowering.
    pub rollback_window_s: f64,
    /// Rule: raise when throttled for more than this share of periods.
    pub throttle_high: f64,
    /// Rule: raise when usage exceeds this share of the capacity.
    pub util_high: f64,
    /// Rule: lower when usage stays below this share of the capacity.
    pub util_low: f64,
    /// Rule target after a lowering: usage / util_target.
    pub util_target: f64,
    /// Event: memory pressure (PSI some ratio) above this is a spike.
    pub pressure_spike: f64,
    /// Event: latency SLO in seconds; `None` disables the latency reaction.
    pub latency_slo_s: Option<f64>,
    /// Changes smaller than this share of the current value are not worth a write.
    pub deadband_ratio: f64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            strategies: vec![Strategy::Rule, Strategy::Predictive, Strategy::Event],
            margin_ratio: 0.15,
            max_step_ratio: 0.5,
            cooldown_s: 10.0,
            scale_in_window_s: 60.0,
            rollback_window_s: 30.0,
            throttle_high: 0.05,
            util_high: 0.9,
            util_low: 0.5,
            util_target: 0.7,
            pressure_spike: 0.2,
            latency_slo_s: None,
            deadband_ratio: 0.05,
        }
    }
}

/// One container's state as sampled, for one pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observation {
    /// CPU used since the previous sample, in cores.
    pub cpu_usage: Option<f64>,
    /// Current quota in cores; `None` when unlimited.
    pub cpu_quota: Option<f64>,
    pub throttled_ratio: Option<f64>,
    pub memory_working_set: Option<f64>,
    /// Current `memory.high` / soft limit; `None` when unlimited.
    pub memory_high: Option<f64>,
    pub memory_pressure_ratio: Option<f64>,
    pub oom_kills: Option<u64>,
    /// Request latency (e.g. p99 from eBPF), seconds.
    pub latency_seconds: Option<f64>,
    /// A GPU this container uses reported a fault.
    pub gpu_fault: bool,
}

/// Per container and resource: what the engine remembers between passes.
#[derive(Debug, Clone, Default)]
struct Track {
    /// Value the engine last decided (and was told was applied); overrides the sample, whose
    /// settings are re-read only every few passes.
    believed: Option<Option<f64>>,
    last_change_s: Option<f64>,
    /// Since when observed usage has stayed below the lowering threshold.
    low_since_s: Option<f64>,
    /// After a lowering: the value before it and the signals then, until the window passes.
    watch: Option<Watch>,
    last_oom: Option<u64>,
    fault_reported: bool,
}

#[derive(Debug, Clone)]
struct Watch {
    until_s: f64,
    previous: Option<f64>,
    throttled: f64,
    oom: u64,
    latency: Option<f64>,
}

/// Global token bucket on writes.
#[derive(Debug, Clone)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at_s: f64,
}

impl Bucket {
    fn take(&mut self, now_s: f64) -> bool {
        self.tokens = (self.tokens + (now_s - self.at_s).max(0.0) * self.rate).min(self.burst);
        self.at_s = now_s;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The engine: holds per-container tracks and the global write budget.
#[derive(Debug)]
pub struct Engine {
    tracks: HashMap<(String, Resource), Track>,
    bucket: Bucket,
}

impl Engine {
    /// `writes_per_s`: the global write rate limit (burst of one second's worth, at least 1).
    pub fn new(writes_per_s: f64) -> Engine {
        let rate = writes_per_s.max(0.0);
        Engine {
            tracks: HashMap::new(),
            bucket: Bucket {
                rate,
                burst: rate.max(1.0),
                tokens: rate.max(1.0),
                at_s: 0.0,
            },
        }
    }

    /// Forgets containers not in `alive`.
    pub fn retain(&mut self, alive: impl Fn(&str) -> bool) {
        self.tracks.retain(|(c, _), _| alive(c));
    }

    /// Decisions for one container at time `now_s`. `forecast` gives demand upper bounds over
    /// the lead time. Every returned value lies inside its envelope.
    pub fn evaluate(
        &mut self,
        container: &str,
        now_s: f64,
        obs: &Observation,
        params: &Params,
        bounds: Bounds,
        forecast: &dyn DemandForecast,
    ) -> Vec<Decision> {
        let Bounds { cpu, memory } = bounds;
        let mut out = Vec::new();
        if let Some(env) = cpu {
            let r = ResourceObs {
                usage: obs.cpu_usage,
                current: obs.cpu_quota,
                throttled: obs.throttled_ratio,
                pressure: None,
            };
            if let Some(d) = self.one(
                container,
                Resource::Cpu,
                now_s,
                obs,
                &r,
                params,
                env,
                forecast,
            ) {
                out.push(d);
            }
        }
        if let Some(env) = memory {
            let r = ResourceObs {
                usage: obs.memory_working_set,
                current: obs.memory_high,
                throttled: None,
                pressure: obs.memory_pressure_ratio,
            };
            if let Some(d) = self.one(
                container,
                Resource::Memory,
                now_s,
                obs,
                &r,
                params,
                env,
                forecast,
            ) {
                out.push(d);
            }
        }
        if obs.gpu_fault && params.strategies.contains(&Strategy::Event) {
            let t = self
                .tracks
                .entry((container.to_string(), Resource::Gpu))
                .or_default();
            if !t.fault_reported {
                t.fault_reported = true;
                out.push(Decision {
                    container: container.to_string(),
                    resource: Resource::Gpu,
                    from: None,
                    to: 0.0,
                    reason: Reason::GpuFault,
                    inputs: Inputs::default(),
                    applied: false,
                    note: Some("drain: stop placing load on the faulted GPU".into()),
                });
            }
        } else if let Some(t) = self.tracks.get_mut(&(container.to_string(), Resource::Gpu)) {
            t.fault_reported = false;
        }
        out
    }

    /// Tells the engine whether a decision was written; only then does it count as the
    /// current value, start the cool-down and (for a lowering) the rollback watch.
    pub fn record(&mut self, d: &Decision, obs: &Observation, now_s: f64, rollback_window_s: f64) {
        if !d.applied {
            return;
        }
        let t = self
            .tracks
            .entry((d.container.clone(), d.resource))
            .or_default();
        t.believed = Some(Some(d.to));
        t.last_change_s = Some(now_s);
        t.low_since_s = None;
        let lowered = d.from.is_none_or(|f| d.to < f);
        t.watch = (lowered && d.reason != Reason::Rollback).then(|| Watch {
            until_s: now_s + rollback_window_s,
            previous: d.from,
            throttled: obs.throttled_ratio.unwrap_or(0.0),
            oom: obs.oom_kills.unwrap_or(0),
            latency: obs.latency_seconds,
        });
    }

    /// Tells the engine the real current value when the file differed from what it believed
    /// (someone else changed it).
    pub fn resync(&mut self, container: &str, resource: Resource, actual: Option<f64>) {
        if let Some(t) = self.tracks.get_mut(&(container.to_string(), resource)) {
            t.believed = Some(actual);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn one(
        &mut self,
        container: &str,
        resource: Resource,
        now_s: f64,
        obs: &Observation,
        r: &ResourceObs,
        params: &Params,
        env: Envelope,
        forecast: &dyn DemandForecast,
    ) -> Option<Decision> {
        let bucket = &mut self.bucket;
        let t = self
            .tracks
            .entry((container.to_string(), resource))
            .or_default();
        let current = t.believed.unwrap_or(r.current);
        // An unlimited value is treated as the ceiling for the step bound.
        let cur = current.unwrap_or(env.ceiling);
        let forecast_upper = if params.strategies.contains(&Strategy::Predictive) {
            forecast.upper(container, resource)
        } else {
            None
        };
        let inputs = Inputs {
            usage: r.usage,
            forecast_upper,
            throttled_ratio: r.throttled,
            memory_pressure_ratio: r.pressure,
            oom_kills: obs.oom_kills,
            latency_seconds: obs.latency_seconds,
            floor: env.floor,
            ceiling: env.ceiling,
        };
        let new_oom = match (t.last_oom, obs.oom_kills) {
            (Some(a), Some(b)) => b > a,
            _ => false,
        };
        if obs.oom_kills.is_some() {
            t.last_oom = obs.oom_kills;
        }
        let in_cooldown = t
            .last_change_s
            .is_some_and(|at| now_s - at < params.cooldown_s);

        // 1. Rollback: a lowering that made things worse goes back at once.
        if let Some(w) = t.watch.clone() {
            if now_s > w.until_s {
                t.watch = None;
            } else {
                let thr = r.throttled.unwrap_or(0.0);
                let worse_throttle = resource == Resource::Cpu
                    && thr > params.throttle_high
                    && thr > w.throttled + 0.1;
                let worse_oom = obs.oom_kills.unwrap_or(0) > w.oom;
                let worse_latency = matches!((params.latency_slo_s, obs.latency_seconds, w.latency),
                    (Some(slo), Some(now), before) if now > slo && before.is_none_or(|b| now > b * 1.2));
                if worse_throttle || worse_oom || worse_latency {
                    t.watch = None;
                    let to = env.clamp(w.previous.unwrap_or(env.ceiling));
                    return decision(container, resource, current, to, Reason::Rollback, inputs);
                }
            }
        }

        // 2. The current value must lie inside the envelope.
        if let Some(c) = current
            && (c < env.floor - 1e-9 || c > env.ceiling + 1e-9)
        {
            let to = env.clamp(c);
            return bucket
                .take(now_s)
                .then(|| decision(container, resource, current, to, Reason::Envelope, inputs))
                .flatten();
        }

        let step_up = cur + params.max_step_ratio * cur.max(env.floor);
        let step_down = cur - params.max_step_ratio * cur.max(env.floor);
        let bounded = |v: f64| env.clamp(v.min(step_up).max(step_down));

        // 3. Events: immediate, skip the cool-down, still inside the envelope and step.
        if params.strategies.contains(&Strategy::Event) {
            let ev = if resource == Resource::Memory && new_oom {
                Some(Reason::OomKill)
            } else if resource == Resource::Memory
                && r.pressure.is_some_and(|p| p > params.pressure_spike)
            {
                Some(Reason::MemoryPressure)
            } else if resource == Resource::Cpu
                && matches!((params.latency_slo_s, obs.latency_seconds), (Some(slo), Some(l)) if l > slo)
            {
                Some(Reason::LatencySlo)
            } else {
                None
            };
            if let Some(reason) = ev {
                let to = bounded(step_up);
                if to > cur * (1.0 + 1e-9) || current.is_none() && to < env.ceiling {
                    return bucket
                        .take(now_s)
                        .then(|| decision(container, resource, current, to, reason, inputs))
                        .flatten();
                }
            }
        }

        let usage = r.usage?;
        // Observed low load, for scale-in: below the lowering threshold of the current value.
        if usage < params.util_low * cur {
            t.low_since_s.get_or_insert(now_s);
        } else {
            t.low_since_s = None;
        }
        let sustained_low = t
            .low_since_s
            .is_some_and(|s| now_s - s >= params.scale_in_window_s);

        // 4. Proposals from the rule and the forecast; the larger raise wins, and a lowering
        // happens only when every active strategy agrees and load has been low for the window.
        let mut raise: Option<(f64, Reason)> = None;
        let mut lower: Option<(f64, Reason)> = None;
        let mut lower_votes = 0;
        let mut voters = 0;
        if params.strategies.contains(&Strategy::Rule) {
            voters += 1;
            let throttled = r.throttled.is_some_and(|x| x > params.throttle_high);
            if throttled || usage > params.util_high * cur {
                raise = Some((step_up, Reason::RuleHigh));
            } else if usage < params.util_low * cur {
                lower_votes += 1;
                lower = Some((usage / params.util_target, Reason::RuleLow));
            }
        }
        if let Some(upper) = forecast_upper {
            voters += 1;
            let mut want = upper * (1.0 + params.margin_ratio);
            // Usage under a quota is censored at the quota: while throttled, demand is at
            // least what the quota allowed, so the forecast can only be trusted upwards.
            if r.throttled.is_some_and(|x| x > params.throttle_high) {
                want = want.max(cur * (1.0 + params.max_step_ratio));
            }
            if want > cur * (1.0 + params.deadband_ratio) {
                if raise.is_none_or(|(v, _)| want > v) {
                    raise = Some((want, Reason::Forecast));
                }
            } else if want < cur * (1.0 - params.deadband_ratio) {
                lower_votes += 1;
                if lower.is_none_or(|(v, _)| want > v) {
                    lower = Some((want, Reason::Forecast));
                }
            }
        }
        let proposal = if let Some((v, reason)) = raise {
            Some((v, reason))
        } else if voters > 0 && lower_votes == voters && sustained_low {
            // Never lower below what is used now.
            lower.map(|(v, reason)| (v.max(usage * (1.0 + params.margin_ratio)), reason))
        } else {
            None
        };
        let (want, reason) = proposal?;
        if in_cooldown {
            return None;
        }
        let to = bounded(want);
        let changed = match current {
            Some(c) => (to - c).abs() > params.deadband_ratio * c.max(env.floor),
            None => to < env.ceiling,
        };
        if !changed {
            return None;
        }
        if !bucket.take(now_s) {
            return None;
        }
        decision(container, resource, current, to, reason, inputs)
    }
}

struct ResourceObs {
    usage: Option<f64>,
    current: Option<f64>,
    throttled: Option<f64>,
    pressure: Option<f64>,
}

fn decision(
    container: &str,
    resource: Resource,
    from: Option<f64>,
    to: f64,
    reason: Reason,
    inputs: Inputs,
) -> Option<Decision> {
    to.is_finite().then(|| Decision {
        container: container.to_string(),
        resource,
        from,
        to,
        reason,
        inputs,
        applied: false,
        note: None,
    })
}

#[cfg(test)]
mod tests;
