//! Cost benchmark (plain harness, prints figures): training on a week of 1-minute samples, one
//! ridge refit, one observe+forecast step, state size, and the CPU share of 500 series at 1 Hz.
//! Uses the NASA July 1995 trace from the shared traces when present (`HEADROOM_TRACES_DIR` or
//! `../shared/data/traces`), else a synthetic diurnal series of the same shape.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use headroom_models::backtest::parse_trace;
use headroom_models::{ForecastConfig, Forecaster, SeriesForecaster};

const WEEK: usize = 10_080;

fn series() -> (Vec<f64>, String) {
    let dir = std::env::var("HEADROOM_TRACES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/traces")
        });
    let p = dir.join("nasa_http_1995/series_jul_requests_per_min.csv");
    if let Ok(text) = std::fs::read_to_string(&p) {
        if let Ok(t) = parse_trace(&text) {
            return (t.values, format!("{}", p.display()));
        }
    }
    let v = (0..WEEK * 3)
        .map(|i| {
            let day = (i as f64 / 1440.0 * std::f64::consts::TAU).sin();
            let noise = ((i * 7919) % 101) as f64 / 10.0;
            (50.0 + 30.0 * day + noise).round()
        })
        .collect();
    (v, "synthetic diurnal series".into())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let (data, source) = series();
    println!("series: {source} ({} points)", data.len());
    let cfg = ForecastConfig::new(1, 0.05, 60.0);

    // Training on one week: ingest 10,080 samples, including every scheduled refit.
    let mut ingest = Vec::new();
    let mut trained = None;
    for _ in 0..5 {
        let mut f = SeriesForecaster::new(cfg.clone()).unwrap_or_else(|e| panic!("{e}"));
        let t0 = Instant::now();
        for &v in &data[..WEEK] {
            f.observe(black_box(v));
        }
        ingest.push(t0.elapsed().as_secs_f64());
        trained = Some(f);
    }
    let Some(mut f) = trained else { return };
    println!(
        "train on a week (10,080 observes incl. refits): {:.2} ms (median of 5)",
        median(ingest) * 1e3
    );

    // One refit on the full bounded history (2,048 samples, both ridge variants, period detection).
    let mut refits = Vec::new();
    for _ in 0..50 {
        let mut g = f.clone();
        let t0 = Instant::now();
        g.refit();
        refits.push(t0.elapsed().as_secs_f64());
        black_box(&g);
    }
    println!(
        "one refit (2 ridge fits on the bounded history): {:.3} ms (median of 50)",
        median(refits) * 1e3
    );

    // Steady state: observe + forecast per step over the next week (refits amortised in).
    let steps = data.len().min(2 * WEEK) - WEEK;
    let mut per_step = Vec::new();
    let mut g = f.clone();
    let t0 = Instant::now();
    for &v in &data[WEEK..WEEK + steps] {
        let s = Instant::now();
        g.observe(black_box(v));
        black_box(g.forecast());
        per_step.push(s.elapsed().as_secs_f64());
    }
    let total = t0.elapsed().as_secs_f64();
    let mean = total / steps as f64;
    per_step.sort_by(f64::total_cmp);
    let p = |q: f64| per_step[((per_step.len() - 1) as f64 * q) as usize] * 1e6;
    println!(
        "observe + forecast: mean {:.2} µs, median {:.2} µs, p99 {:.2} µs, max {:.0} µs over {steps} steps",
        mean * 1e6,
        p(0.5),
        p(0.99),
        p(1.0)
    );

    // forecast() alone (what a reader of the latest result pays).
    let n = 1_000_000;
    let t0 = Instant::now();
    for _ in 0..n {
        black_box(black_box(&g).forecast());
    }
    println!(
        "forecast(): {:.3} µs",
        t0.elapsed().as_secs_f64() / f64::from(n) * 1e6
    );

    let json = serde_json::to_vec(&g).unwrap_or_default();
    println!(
        "state: {} bytes serialised as JSON (bound {} bytes)",
        json.len(),
        headroom_models::STATE_BOUND_BYTES
    );
    f.observe(0.0);

    // 500 series at 1 Hz: one observe + forecast each per second.
    println!(
        "500 series at 1 Hz: {:.3} % of one core",
        mean * 500.0 * 100.0
    );
}
