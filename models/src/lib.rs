//! headroom-models: forecasting for headroom, pure computation with no I/O. It owns the models
//! (headroom's ridge regression fitted with linfa, with conformal upper bounds), the baselines
//! it is measured against (HPA-style reactive, moving-window max, Kubernetes VPA, Koordinator,
//! seasonal naive), the per-series selection among them, and backtest/report logic. It must
//! never read or write files, sockets or clocks: callers hand it numbers and text.
//!
//! # Online use (one forecaster per series)
//!
//! ```
//! use headroom_models::{ForecastConfig, Forecaster, SeriesForecaster};
//!
//! // 1 Hz samples, a 60 s scale-up lead time, 5 % accepted risk of demand above capacity.
//! let mut f = SeriesForecaster::new(ForecastConfig::new(60, 0.05, 1.0))?;
//! for t in 0..600 {
//!     f.observe(100.0 + (t % 7) as f64); // once per step, in order
//! }
//! let fc = f.forecast().expect("a forecast after the first sample");
//! // fc.point: expected demand 60 steps ahead; fc.upper: capacity covering it with 95 %
//! // probability; fc.model: the candidate in charge ("ridge-sqrt", "vpa", ...).
//! assert!((100.0..=106.0).contains(&fc.point), "{fc:?}");
//! assert!((105.0..=110.0).contains(&fc.upper), "{fc:?}");
//! let state = serde_json::to_string(&f)?; // persist; bounded (see `STATE_BOUND_BYTES`)
//! let restored: SeriesForecaster = serde_json::from_str(&state)?;
//! assert_eq!(restored.forecast(), f.forecast());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! `observe` costs a few microseconds (the ridge refit, every `refit_every` steps or on drift,
//! a millisecond or two); `forecast` only reads the latest result. `recent_errors` reports each
//! candidate's recent pinball cost, violation rate and relative slack, the one in charge first,
//! for export as metrics.
//!
//! The forecast for step t + L is decided from samples up to step t only; a bound is the
//! capacity for that one step (one is issued every step, so every step of the lead time is
//! covered by its own forecast).

pub mod backtest;
pub mod baselines;
pub mod conformal;
pub mod forecaster;
pub mod history;
pub mod report;
pub mod ridge;

pub use forecaster::{
    CandidateError, ConfigError, Forecast, ForecastConfig, Forecaster, Kind, SeriesForecaster,
};

/// Upper bound on a series forecaster's serialised (JSON) state, in bytes, for lead times up to
/// [`STATE_BOUND_LEAD_STEPS`]; each further lead step adds about 200 bytes (the forecasts awaiting
/// their outcome).
pub const STATE_BOUND_BYTES: usize = 64 * 1024;

/// Longest lead time, in steps, for which [`STATE_BOUND_BYTES`] holds.
pub const STATE_BOUND_LEAD_STEPS: u32 = 64;
