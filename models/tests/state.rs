//! Persisted state: bounded, complete (a restored forecaster continues exactly as the original),
//! and checked on restore.

use headroom_models::{ForecastConfig, Forecaster, STATE_BOUND_BYTES, SeriesForecaster};

/// Full-precision, noisy, bursty values: the worst case for the size of the JSON state.
fn noisy(i: u64) -> f64 {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5851_F42D_4C95_7F2D;
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let u = (x >> 11) as f64 / (1u64 << 53) as f64;
    let day = (i as f64 / 86_400.0 * std::f64::consts::TAU).sin();
    (1000.0 + 400.0 * day) * (0.5 + u) * if u > 0.97 { 7.3 } else { 1.0 }
}

#[test]
fn state_stays_bounded_and_restores_exactly() {
    let mut f =
        SeriesForecaster::new(ForecastConfig::new(60, 0.05, 1.0)).unwrap_or_else(|e| panic!("{e}"));
    let mut max = 0;
    for i in 0..30_000u64 {
        f.observe(noisy(i));
        if i % 5_000 == 4_999 {
            let n = serde_json::to_vec(&f)
                .map(|v| v.len())
                .unwrap_or(usize::MAX);
            max = max.max(n);
        }
    }
    eprintln!("largest state at lead 60: {max} bytes");
    assert!(max <= STATE_BOUND_BYTES, "state grew to {max} bytes");

    let json = serde_json::to_string(&f).unwrap_or_else(|e| panic!("{e}"));
    let mut g: SeriesForecaster = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(f.forecast(), g.forecast());
    for i in 30_000..31_000u64 {
        f.observe(noisy(i));
        g.observe(noisy(i));
        assert_eq!(
            f.forecast(),
            g.forecast(),
            "diverged after restore at step {i}"
        );
    }
}

#[test]
fn state_restores_before_calibration_too() {
    let mut f =
        SeriesForecaster::new(ForecastConfig::new(5, 0.05, 10.0)).unwrap_or_else(|e| panic!("{e}"));
    for i in 0..3u64 {
        f.observe(noisy(i));
        let json = serde_json::to_string(&f).unwrap_or_else(|e| panic!("{e}"));
        let g: SeriesForecaster =
            serde_json::from_str(&json).unwrap_or_else(|e| panic!("step {i}: {e}"));
        assert_eq!(f.forecast(), g.forecast());
    }
}

#[test]
fn state_at_the_longest_bounded_lead_stays_bounded() {
    let lead = headroom_models::STATE_BOUND_LEAD_STEPS;
    let mut f = SeriesForecaster::new(ForecastConfig::new(lead, 0.01, 1.0))
        .unwrap_or_else(|e| panic!("{e}"));
    for i in 0..6_000u64 {
        f.observe(noisy(i));
    }
    let n = serde_json::to_vec(&f)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    eprintln!("state at lead {lead}: {n} bytes");
    assert!(n <= STATE_BOUND_BYTES, "state at lead {lead} is {n} bytes");
}

#[test]
fn damaged_state_is_rejected() {
    let mut f =
        SeriesForecaster::new(ForecastConfig::new(1, 0.05, 60.0)).unwrap_or_else(|e| panic!("{e}"));
    for i in 0..100u64 {
        f.observe(noisy(i));
    }
    let json = serde_json::to_string(&f).unwrap_or_else(|e| panic!("{e}"));
    let broken = json.replacen("\"cap\":2048", "\"cap\":0", 1);
    assert_ne!(broken, json, "test must actually damage the state");
    assert!(serde_json::from_str::<SeriesForecaster>(&broken).is_err());
    let reordered = json.replacen("\"kind\":\"Ridge\"", "\"kind\":\"Vpa\"", 1);
    assert_ne!(reordered, json, "test must actually damage the state");
    assert!(serde_json::from_str::<SeriesForecaster>(&reordered).is_err());
}

#[test]
fn bad_config_is_refused() {
    assert!(SeriesForecaster::new(ForecastConfig::new(0, 0.05, 1.0)).is_err());
    assert!(SeriesForecaster::new(ForecastConfig::new(1, 0.0, 1.0)).is_err());
    assert!(SeriesForecaster::new(ForecastConfig::new(1, 0.05, f64::NAN)).is_err());
}
