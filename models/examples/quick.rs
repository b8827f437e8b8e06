// Dev harness: summary per trace at 0.05.
use headroom_models::backtest::*;
use headroom_models::report::*;
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let target: f64 = std::env::var("T")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.05);
    let base = [
        "reactive",
        "window-max",
        "vpa",
        "koordinator",
        "seasonal-naive",
    ];
    let mut rows = Vec::new();
    for p in &args {
        let text = std::fs::read_to_string(p).unwrap();
        let tr = parse_trace(&text).unwrap();
        let lead = lead_steps(60.0, tr.step);
        let t0 = std::time::Instant::now();
        let run = run(&tr, lead, target, &MODELS, &mut |_, _| {}).unwrap();
        let el = t0.elapsed();
        let sums = summarize(&tr, &run);
        let from = scored_from(tr.values.len(), tr.step);
        let c = compare(p, &tr.values, &run, sums.clone(), from, target, &base).unwrap();
        let mut chosen = std::collections::BTreeMap::new();
        for m in &run.chosen {
            *chosen.entry(*m).or_insert(0) += 1;
        }
        let name = p.rsplit('/').next().unwrap();
        println!(
            "{name:48} n={} L={lead} viol {:.4} slack {:.4} ridge {:.4}/{:.4} | vpa {:.4} koord {:.4} warm[{}] {:.4} best[{}] {:.4} | {:?} {:?}",
            tr.values.len(),
            c.default_violation,
            c.default_slack,
            sums[1].violation_rate,
            sums[1].relative_slack,
            c.slack_of("vpa").unwrap(),
            c.slack_of("koordinator").unwrap(),
            c.warmup_pick,
            c.slack_of(&c.warmup_pick).unwrap(),
            c.hindsight_best,
            c.slack_of(&c.hindsight_best).unwrap(),
            el,
            chosen
        );
        if c.scored >= 500 {
            rows.push(c);
        }
    }
    let r: Vec<&Comparison> = rows.iter().collect();
    println!(
        "geo vpa {:.3} koord {:.3} warm {:.3} best {:.3}",
        geo_mean_ratio(&r, &|c| c.slack_of("vpa")).unwrap_or(f64::NAN),
        geo_mean_ratio(&r, &|c| c.slack_of("koordinator")).unwrap_or(f64::NAN),
        geo_mean_ratio(&r, &|c| c.slack_of(&c.warmup_pick)).unwrap_or(f64::NAN),
        geo_mean_ratio(&r, &|c| c.slack_of(&c.hindsight_best)).unwrap_or(f64::NAN)
    );
}
