//! Causality: a backtest on a truncated copy of a real trace must set exactly the same capacity,
//! for every model, at every step both runs cover. Any use of data after s − L would break this.

use std::path::PathBuf;

use headroom_models::backtest::{MODELS, Trace, lead_steps, parse_trace, run};

/// The real traces: `$HEADROOM_TRACES_DIR`, else the repository's copy in `tests/data/traces`.
/// Missing data fails the test rather than skipping it.
fn traces_dir() -> PathBuf {
    if let Ok(d) = std::env::var("HEADROOM_TRACES_DIR") {
        return PathBuf::from(d);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/traces")
}

fn load(rel: &str) -> Trace {
    let p = traces_dir().join(rel);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (HEADROOM_TRACES_DIR names a traces folder; unset, tests/data/traces)",
            p.display()
        )
    });
    parse_trace(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn truncated(t: &Trace, n: usize) -> Trace {
    Trace {
        timestamps: t.timestamps[..n].to_vec(),
        values: t.values[..n].to_vec(),
        step: t.step,
    }
}

fn check(rel: &str, max_len: usize) {
    let full = load(rel);
    let full = truncated(&full, full.values.len().min(max_len));
    let lead = lead_steps(60.0, full.step);
    let a =
        run(&full, lead, 0.05, &MODELS, &mut |_, _| {}).unwrap_or_else(|e| panic!("{rel}: {e}"));
    for frac in [0.5, 0.77] {
        let n = (full.values.len() as f64 * frac) as usize;
        let b = run(&truncated(&full, n), lead, 0.05, &MODELS, &mut |_, _| {})
            .unwrap_or_else(|e| panic!("{rel} cut at {n}: {e}"));
        let mut compared = 0;
        for (m, name) in MODELS.iter().enumerate() {
            for s in 0..n {
                let (x, y) = (a.capacity[m][s], b.capacity[m][s]);
                assert!(
                    x.to_bits() == y.to_bits(),
                    "{rel}: model {name} step {s}: full run {x}, run cut at {n} {y}"
                );
                compared += usize::from(x.is_finite());
            }
        }
        assert!(
            compared > MODELS.len() * n / 2,
            "{rel}: too few capacities compared ({compared})"
        );
    }
}

#[test]
fn truncation_identity_alibaba_gpu_util() {
    check(
        "alibaba_genai_2026/series_cluster_gpu_util_mean_57s.csv",
        usize::MAX,
    );
}

#[test]
fn truncation_identity_google_cpu() {
    check(
        "google_cluster_2011/series_job3418442_cpu_util_5min.csv",
        usize::MAX,
    );
}

#[test]
fn truncation_identity_mooncake_lead_20_steps() {
    check("mooncake_kimi_2025/series_requests_per_3s.csv", usize::MAX);
}

#[test]
fn truncation_identity_azure_bursty() {
    check("azure_llm_2023/series_code_tokens_per_10s.csv", usize::MAX);
}

#[test]
fn truncation_identity_nasa_past_daily_detection() {
    // Four days: long enough for the daily cycle to be detected and used mid-run.
    check("nasa_http_1995/series_jul_requests_per_min.csv", 4 * 1440);
}

/// Stronger than truncation: the capacity for step s must already be known after observing
/// steps 0..=s−L, so a forecaster fed only that prefix must produce it exactly.
#[test]
fn capacity_for_s_is_decided_from_data_up_to_s_minus_lead() {
    use headroom_models::{ForecastConfig, Forecaster, SeriesForecaster};
    let full = load("mooncake_kimi_2025/series_requests_per_3s.csv");
    let lead = lead_steps(60.0, full.step);
    let a = run(&full, lead, 0.05, &MODELS, &mut |_, _| {}).unwrap_or_else(|e| panic!("{e}"));
    let l = lead as usize;
    let mut checked = 0;
    for cut in [300usize, 517, 800, 1100] {
        let mut f = SeriesForecaster::new(ForecastConfig::new(lead, 0.05, full.step as f64))
            .unwrap_or_else(|e| panic!("{e}"));
        for &v in &full.values[..cut] {
            f.observe(v);
        }
        let fc = f
            .forecast()
            .unwrap_or_else(|| panic!("no forecast after {cut} samples"));
        let s = cut - 1 + l;
        assert_eq!(
            fc.upper.to_bits(),
            a.capacity[0][s].to_bits(),
            "step {s}: decided after {cut} samples"
        );
        checked += 1;
    }
    assert_eq!(checked, 4);
}
