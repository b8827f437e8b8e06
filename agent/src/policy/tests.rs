use proptest::prelude::{Strategy as PStrategy, any, prop_assert, prop_assert_eq, proptest};

use super::forecast::NoForecast;
use super::*;

struct Fixed(Option<f64>);

impl DemandForecast for Fixed {
    fn upper(&self, _: &str, _: Resource) -> Option<f64> {
        self.0
    }
}

const ENV: Envelope = Envelope {
    floor: 0.1,
    ceiling: 2.0,
};

fn cpu_obs(usage: f64, quota: f64, throttled: f64) -> Observation {
    Observation {
        cpu_usage: Some(usage),
        cpu_quota: Some(quota),
        throttled_ratio: Some(throttled),
        ..Default::default()
    }
}

fn run(
    e: &mut Engine,
    p: &Params,
    now: f64,
    obs: &Observation,
    f: &dyn DemandForecast,
) -> Vec<Decision> {
    let mut ds = e.evaluate(
        "/c",
        now,
        obs,
        p,
        Bounds {
            cpu: Some(ENV),
            memory: Some(MEM),
        },
        f,
    );
    for d in &mut ds {
        d.applied = d.resource != Resource::Gpu;
        e.record(d, obs, now, p.rollback_window_s);
    }
    ds
}

const MEM: Envelope = Envelope {
    floor: 64.0 * 1048576.0,
    ceiling: 1024.0 * 1048576.0,
};

#[test]
fn throttling_raises_by_at_most_one_step_then_cools_down() {
    let mut e = Engine::new(100.0);
    let p = Params::default();
    let d = run(&mut e, &p, 0.0, &cpu_obs(1.0, 1.0, 0.8), &NoForecast);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].reason, Reason::RuleHigh);
    assert!((d[0].to - 1.5).abs() < 1e-9, "{d:?}");
    // Within the cool-down, still throttled: nothing.
    assert!(run(&mut e, &p, 5.0, &cpu_obs(1.5, 1.0, 0.8), &NoForecast).is_empty());
    let d = run(&mut e, &p, 11.0, &cpu_obs(1.5, 1.0, 0.8), &NoForecast);
    assert!((d[0].to - 2.0).abs() < 1e-9, "ceiling caps the step: {d:?}");
}

#[test]
fn scale_in_waits_for_the_sustained_window_of_observed_low_load() {
    let mut e = Engine::new(100.0);
    let p = Params {
        scale_in_window_s: 30.0,
        ..Params::default()
    };
    // A low forecast alone never lowers: observed load must be low for the whole window.
    for t in 0..30 {
        let ds = run(
            &mut e,
            &p,
            t as f64,
            &cpu_obs(0.2, 1.5, 0.0),
            &Fixed(Some(0.2)),
        );
        assert!(ds.is_empty(), "lowered at {t} s: {ds:?}");
    }
    // A spike resets the window.
    assert!(run(&mut e, &p, 30.0, &cpu_obs(1.2, 1.5, 0.0), &Fixed(Some(0.2))).is_empty());
    for t in 31..61 {
        assert!(
            run(
                &mut e,
                &p,
                t as f64,
                &cpu_obs(0.2, 1.5, 0.0),
                &Fixed(Some(0.2))
            )
            .is_empty()
        );
    }
    let d = run(&mut e, &p, 61.0, &cpu_obs(0.2, 1.5, 0.0), &Fixed(Some(0.2)));
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(
        d[0].to < 1.5 && d[0].to >= 0.75 - 1e-9,
        "one step at most: {d:?}"
    );
}

#[test]
fn oom_kill_raises_memory_at_once_even_in_cool_down() {
    let mut e = Engine::new(100.0);
    let p = Params::default();
    let mib = 1048576.0;
    let mut obs = Observation {
        memory_working_set: Some(100.0 * mib),
        memory_high: Some(128.0 * mib),
        oom_kills: Some(0),
        ..Default::default()
    };
    // 100/128 is under util_high: nothing yet; the first pass also learns the OOM count.
    assert!(run(&mut e, &p, 0.0, &obs, &NoForecast).is_empty());
    obs.memory_working_set = Some(120.0 * mib);
    let d = run(&mut e, &p, 1.0, &obs, &NoForecast);
    assert_eq!(d[0].reason, Reason::RuleHigh);
    obs.memory_high = Some(d[0].to);
    obs.oom_kills = Some(1);
    let d = run(&mut e, &p, 2.0, &obs, &NoForecast);
    assert_eq!(d[0].reason, Reason::OomKill, "{d:?}");
    assert!(d[0].to > 192.0 * mib - 1.0);
}

#[test]
fn a_lowering_that_brings_throttling_is_rolled_back() {
    let mut e = Engine::new(100.0);
    let p = Params {
        scale_in_window_s: 0.0,
        cooldown_s: 0.0,
        ..Params::default()
    };
    let d = run(&mut e, &p, 0.0, &cpu_obs(0.3, 1.6, 0.0), &NoForecast);
    assert_eq!(d[0].reason, Reason::RuleLow);
    let lowered = d[0].to;
    let d = run(
        &mut e,
        &p,
        1.0,
        &cpu_obs(lowered, lowered, 0.9),
        &NoForecast,
    );
    assert_eq!(d[0].reason, Reason::Rollback, "{d:?}");
    assert!((d[0].to - 1.6).abs() < 1e-9);
}

#[test]
fn global_rate_limit_caps_writes() {
    let mut e = Engine::new(2.0);
    let p = Params::default();
    let mut n = 0;
    for c in 0..10 {
        let name = format!("/c{c}");
        n += e
            .evaluate(
                &name,
                0.0,
                &cpu_obs(1.0, 1.0, 0.9),
                &p,
                Bounds {
                    cpu: Some(ENV),
                    memory: None,
                },
                &NoForecast,
            )
            .len();
    }
    assert_eq!(n, 2);
}

#[test]
fn gpu_fault_is_a_drain_hint_reported_once() {
    let mut e = Engine::new(10.0);
    let p = Params::default();
    let obs = Observation {
        gpu_fault: true,
        ..Default::default()
    };
    let d = e.evaluate("/c", 0.0, &obs, &p, Bounds::default(), &NoForecast);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].reason, Reason::GpuFault);
    assert!(d[0].note.as_deref().unwrap().starts_with("drain"));
    assert!(
        e.evaluate("/c", 1.0, &obs, &p, Bounds::default(), &NoForecast)
            .is_empty()
    );
}

fn arb_obs() -> impl PStrategy<Value = (Observation, Option<f64>, Option<f64>)> {
    (
        (
            proptest::option::of(0.0f64..4.0),
            proptest::option::of(0.0f64..4.0),
            proptest::option::of(0.0f64..1.0),
            proptest::option::of(0.0f64..2e9),
            proptest::option::of(0.0f64..2e9),
        ),
        (
            proptest::option::of(0.0f64..1.0),
            proptest::option::of(0u64..5),
            proptest::option::of(0.0f64..2.0),
            any::<bool>(),
        ),
        proptest::option::of(0.0f64..5.0),
        proptest::option::of(0.0f64..3e9),
    )
        .prop_map(|((u, q, t, ws, mh), (pr, oom, lat, gf), fc, fcm)| {
            (
                Observation {
                    cpu_usage: u,
                    cpu_quota: q,
                    throttled_ratio: t,
                    memory_working_set: ws,
                    memory_high: mh,
                    memory_pressure_ratio: pr,
                    oom_kills: oom,
                    latency_seconds: lat,
                    gpu_fault: gf,
                },
                fc,
                fcm,
            )
        })
}

struct Both(Option<f64>, Option<f64>);

impl DemandForecast for Both {
    fn upper(&self, _: &str, r: Resource) -> Option<f64> {
        match r {
            Resource::Cpu => self.0,
            _ => self.1,
        }
    }
}

proptest! {
    /// Whatever the forecasts and signals, every decision stays inside [floor, ceiling]; a
    /// change from a value inside the envelope is at most one step (rollbacks return to a
    /// value that was itself inside); no resource changes twice within the cool-down except
    /// by an event or a rollback; and nothing is ever lowered before the scale-in window.
    #[test]
    fn envelope_invariants_hold(
        steps in proptest::collection::vec(arb_obs(), 1..60),
        floor in 0.05f64..0.5,
        span in 0.1f64..3.0,
        max_step in 0.05f64..1.0,
        cooldown in 0.0f64..10.0,
        window in 0.0f64..20.0,
        slo in proptest::option::of(0.1f64..1.0),
    ) {
        let cpu = Envelope { floor, ceiling: floor + span };
        let mem = Envelope { floor: 64.0 * 1048576.0, ceiling: 2e9 };
        let p = Params {
            max_step_ratio: max_step,
            cooldown_s: cooldown,
            scale_in_window_s: window,
            latency_slo_s: slo,
            ..Params::default()
        };
        let mut e = Engine::new(1000.0);
        let mut last_change: HashMap<Resource, f64> = HashMap::new();
        let mut first_seen: Option<f64> = None;
        for (i, (obs, fc, fcm)) in steps.into_iter().enumerate() {
            let now = i as f64;
            first_seen.get_or_insert(now);
            let ds = e.evaluate("/c", now, &obs, &p, Bounds { cpu: Some(cpu), memory: Some(mem) }, &Both(fc, fcm));
            for mut d in ds {
                if d.resource == Resource::Gpu {
                    prop_assert_eq!(d.reason, Reason::GpuFault);
                    continue;
                }
                let env = if d.resource == Resource::Cpu { cpu } else { mem };
                prop_assert!(d.to >= env.floor - 1e-9 && d.to <= env.ceiling + 1e-9, "{:?}", d);
                let exempt = matches!(d.reason, Reason::Rollback | Reason::Envelope);
                if let Some(from) = d.from && !exempt && from >= env.floor && from <= env.ceiling {
                    let bound = max_step * from.max(env.floor) + 1e-6 * env.ceiling;
                    prop_assert!((d.to - from).abs() <= bound, "step too large: {:?}", d);
                }
                let event = matches!(d.reason, Reason::OomKill | Reason::MemoryPressure | Reason::LatencySlo);
                if !exempt && !event && let Some(at) = last_change.get(&d.resource) {
                    prop_assert!(now - at >= cooldown, "cool-down broken: {:?}", d);
                }
                if matches!(d.reason, Reason::RuleLow) || (d.reason == Reason::Forecast && d.from.is_some_and(|f| d.to < f)) {
                    prop_assert!(now - first_seen.unwrap_or(0.0) >= window, "lowered early: {:?}", d);
                }
                d.applied = true;
                e.record(&d, &obs, now, p.rollback_window_s);
                last_change.insert(d.resource, now);
            }
        }
    }
}
