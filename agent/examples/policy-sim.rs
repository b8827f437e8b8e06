//! Replays shared CPU traces against a static quota, the reactive rule and the predictive
//! policy (simulation, no cgroups) and prints throttled-time equivalent and mean quota side by
//! side. Usage: `policy-sim [--points N] [--peak CORES] [--step-s S] TRACE.csv...`
//! (`timestamp_s,value` files; each is scaled so its range maps onto 0.1..=peak cores).

use headroom_agent::policy::sim::{SimConfig, SimForecast, SimPolicy, replay, scale};
use headroom_agent::policy::{Envelope, Strategy};

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut points, mut peak, mut step_s) = (600usize, 1.6f64, 1.0f64);
    let mut files = Vec::new();
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> f64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| fail(&format!("{name} needs a number")))
        };
        match a.as_str() {
            "--points" => points = num("--points") as usize,
            "--peak" => peak = num("--peak"),
            "--step-s" => step_s = num("--step-s"),
            _ => files.push(a),
        }
    }
    if files.is_empty() {
        fail("give at least one trace file");
    }
    println!(
        "Throttled-time equivalent (core-seconds of demand above the quota) and mean quota (cores)"
    );
    println!(
        "per policy; each trace's first {points} points scaled to 0.1..{peak} cores, {step_s} s per point."
    );
    println!(
        "{:<48} {:>6} | {:>15} | {:>15} | {:>15} | {:>15} | {:>15}",
        "trace",
        "demand",
        "static@peak",
        "static@p90",
        "reactive",
        "predict(window)",
        "predict(models)"
    );
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap_or_else(|e| fail(&format!("{f}: {e}")));
        let raw: Vec<f64> = text
            .lines()
            .skip(1)
            .filter_map(|l| l.split(',').nth(1)?.trim().parse().ok())
            .take(points)
            .collect();
        if raw.len() < 10 {
            fail(&format!("{f}: fewer than 10 values"));
        }
        let demand = scale(&raw, 0.1, peak);
        let rows = compare(&demand, peak, step_s);
        let name = std::path::Path::new(f)
            .iter()
            .rev()
            .take(2)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .map(|p| p.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("/");
        let cells: Vec<String> = rows
            .iter()
            .map(|r| format!("{:>7.2} {:>7.3}", r.throttled_core_seconds, r.mean_quota))
            .collect();
        println!(
            "{:<48} {:>6.3} | {}",
            name,
            rows[0].mean_demand,
            cells.join(" | ")
        );
    }
}

type R = headroom_agent::policy::sim::SimResult;

/// The policies of the acceptance scenario side by side: a static quota at the peak and at
/// the 90th percentile of demand, the reactive rule, and the predictive policy fed by the
/// built-in window forecast and by the models crate's forecaster. The dynamic ones start at
/// the 90th percentile.
fn compare(demand: &[f64], peak: f64, step_s: f64) -> Vec<R> {
    let mut sorted = demand.to_vec();
    sorted.sort_by(f64::total_cmp);
    let p90 = sorted[(sorted.len() * 9 / 10).min(sorted.len() - 1)];
    let cfg = SimConfig {
        step_s,
        envelope: Envelope {
            floor: 0.1,
            ceiling: (peak * 1.25).max(p90),
        },
        initial_quota: p90,
        window: 60,
        lead_steps: 5.0,
        writes_per_s: 10.0,
        forecast: SimForecast::Window,
    };
    let reactive =
        headroom_agent::policy::sim::acceptance_params(&[Strategy::Rule, Strategy::Event], step_s);
    let predictive = headroom_agent::policy::sim::acceptance_params(
        &[Strategy::Predictive, Strategy::Event],
        step_s,
    );
    let models = SimConfig {
        forecast: SimForecast::Models {
            target_violation: 0.05,
        },
        ..cfg.clone()
    };
    vec![
        replay(demand, &SimPolicy::Static(peak), &cfg),
        replay(demand, &SimPolicy::Static(p90), &cfg),
        replay(demand, &SimPolicy::Engine(reactive), &cfg),
        replay(demand, &SimPolicy::Engine(predictive.clone()), &cfg),
        replay(demand, &SimPolicy::Engine(predictive), &models),
    ]
}

fn fail(msg: &str) -> ! {
    eprintln!("policy-sim: {msg}");
    std::process::exit(2)
}
