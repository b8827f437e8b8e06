//! Cost benchmark (plain harness, prints figures): training on a week of 1-minute samples, one
//! ridge refit, one observe+forecast step, state size, and the CPU share of 500 series at 1 Hz.
//! Times are this thread's CPU time (so a busy shared machine does not inflate them by the time
//! the thread waited), with wall time alongside.
//! Uses the NASA July 1995 trace (`HEADROOM_TRACES_DIR`, else the repository's copy in
//! `tests/data/traces`), or a synthetic diurnal series of the same shape when it cannot be read.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use headroom_models::backtest::parse_trace;
use headroom_models::{ForecastConfig, Forecaster, SeriesForecaster};

const WEEK: usize = 10_080;

fn series() -> (Vec<f64>, String) {
    let dir = std::env::var("HEADROOM_TRACES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/traces"));
    let p = dir.join("nasa_http_1995/series_jul_requests_per_min.csv");
    if let Ok(text) = std::fs::read_to_string(&p)
        && let Ok(t) = parse_trace(&text)
    {
        return (t.values, format!("{}", p.display()));
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

/// CPU time consumed by this thread, in seconds.
fn cpu_now() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let (data, source) = series();
    println!("series: {source} ({} points)", data.len());
    let cfg = ForecastConfig::new(1, 0.05, 60.0);

    // Training on one week from scratch: ingest 10,080 samples, including every refit.
    let (mut ingest, mut ingest_wall) = (Vec::new(), Vec::new());
    let mut trained = None;
    for _ in 0..7 {
        let mut f = SeriesForecaster::new(cfg.clone()).unwrap_or_else(|e| panic!("{e}"));
        let (c0, t0) = (cpu_now(), Instant::now());
        for &v in &data[..WEEK] {
            f.observe(black_box(v));
        }
        ingest.push(cpu_now() - c0);
        ingest_wall.push(t0.elapsed().as_secs_f64());
        trained = Some(f);
    }
    let Some(f) = trained else { return };
    println!(
        "train from scratch on a week (10,080 observes incl. every refit): {:.2} ms CPU ({:.2} ms wall), median of 7",
        median(ingest) * 1e3,
        median(ingest_wall) * 1e3
    );

    // One refit after that week: period detection and both ridge fits.
    let mut refits = Vec::new();
    for _ in 0..50 {
        let mut g = f.clone();
        let c0 = cpu_now();
        g.refit();
        refits.push(cpu_now() - c0);
        black_box(&g);
    }
    println!(
        "one refit (period detection + 2 linfa ridge fits of 1,024 rows): {:.3} ms CPU, median of 50",
        median(refits) * 1e3
    );

    // Steady state: observe + forecast per step over the next week (refits amortised in).
    let steps = data.len().min(2 * WEEK) - WEEK;
    let mut per_step = Vec::with_capacity(steps);
    let mut g = f.clone();
    let c0 = cpu_now();
    for &v in &data[WEEK..WEEK + steps] {
        let s = Instant::now();
        g.observe(black_box(v));
        black_box(g.forecast());
        per_step.push(s.elapsed().as_secs_f64());
    }
    let mean = (cpu_now() - c0) / steps as f64;
    per_step.sort_by(f64::total_cmp);
    let p = |q: f64| per_step[((per_step.len() - 1) as f64 * q) as usize] * 1e6;
    println!(
        "observe + forecast: {:.2} µs CPU per step incl. refits; wall per step median {:.2} µs, p99 {:.2} µs, max {:.0} µs ({steps} steps)",
        mean * 1e6,
        p(0.5),
        p(0.99),
        p(1.0)
    );

    // forecast() alone: what a reader of the latest result pays.
    let n = 1_000_000;
    let c0 = cpu_now();
    for _ in 0..n {
        black_box(black_box(&g).forecast());
    }
    println!(
        "forecast() alone: {:.3} µs CPU",
        (cpu_now() - c0) / f64::from(n) * 1e6
    );

    let json = serde_json::to_vec(&g).unwrap_or_default();
    println!(
        "state: {} bytes serialised as JSON (bound {} bytes)",
        json.len(),
        headroom_models::STATE_BOUND_BYTES
    );

    // 500 series at 1 Hz: one observe + forecast each per second.
    println!(
        "500 series at 1 Hz: {:.3} % of one core",
        mean * 500.0 * 100.0
    );
}
