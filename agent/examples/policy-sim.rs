//! Replays shared CPU traces against a static quota, the reactive rule and the predictive
//! policy (simulation, no cgroups) and prints throttled-time equivalent and mean quota side by
//! side. Usage: `policy-sim [--points N] [--peak CORES] [--step-s S] TRACE.csv...`
//! (`timestamp_s,value` files; each is scaled so its range maps onto 0.1..=peak cores).

use headroom::policy::sim::{SimConfig, SimPolicy, replay, scale};
use headroom::policy::{Envelope, Strategy};

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
        "{:<44} {:>6} | {:>9} {:>8} | {:>9} {:>8} | {:>9} {:>8}",
        "trace (first N points, scaled 0.1..peak)",
        "demand",
        "static",
        "quota",
        "reactive",
        "quota",
        "predict",
        "quota"
    );
    println!(
        "{:<44} {:>6} | {:>9} {:>8} | {:>9} {:>8} | {:>9} {:>8}",
        "", "cores", "thr c·s", "cores", "thr c·s", "cores", "thr c·s", "cores"
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
        let (s, b, c) = compare(&demand, peak, step_s);
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
        println!(
            "{:<44} {:>6.3} | {:>9.2} {:>8.3} | {:>9.2} {:>8.3} | {:>9.2} {:>8.3}",
            name,
            s.mean_demand,
            s.throttled_core_seconds,
            s.mean_quota,
            b.throttled_core_seconds,
            b.mean_quota,
            c.throttled_core_seconds,
            c.mean_quota
        );
    }
}

type R = headroom::policy::sim::SimResult;

/// The three policies of the acceptance scenario: static at the 90th percentile of demand,
/// the reactive rule, the predictive policy; both dynamic ones start at the static quota.
fn compare(demand: &[f64], peak: f64, step_s: f64) -> (R, R, R) {
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
    };
    let reactive =
        headroom::policy::sim::acceptance_params(&[Strategy::Rule, Strategy::Event], step_s);
    let predictive =
        headroom::policy::sim::acceptance_params(&[Strategy::Predictive, Strategy::Event], step_s);
    (
        replay(demand, &SimPolicy::Static(p90), &cfg),
        replay(demand, &SimPolicy::Engine(reactive), &cfg),
        replay(demand, &SimPolicy::Engine(predictive), &cfg),
    )
}

fn fail(msg: &str) -> ! {
    eprintln!("policy-sim: {msg}");
    std::process::exit(2)
}
