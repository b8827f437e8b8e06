//! One forecaster per demand series, fed every sample by the sampling thread: the expected
//! demand and its calibrated upper bound over the configured lead time, for the policies, the
//! metrics and the history. Forecaster state is saved with the history so a restart does not
//! start from zero. The models themselves live in `headroom-models`; this module only owns
//! which series get one, their lifetime and their persistence.

use std::collections::HashMap;
use std::sync::Arc;

use headroom_models::{ForecastConfig, Forecaster, SeriesForecaster};
use serde::{Deserialize, Serialize};

use crate::config::ForecastSettings;
use crate::history::SeriesKey;

/// The newest forecast of one series.
#[derive(Debug, Clone, Serialize)]
pub struct ForecastRow {
    pub key: Arc<SeriesKey>,
    /// The history series this forecast's upper bound is recorded in.
    #[serde(skip)]
    pub upper_key: Arc<SeriesKey>,
    pub point: f64,
    pub upper: f64,
    pub model: &'static str,
    /// Recent share of steps whose demand exceeded the bound of the model in charge.
    pub recent_violation_ratio: f64,
    /// Recent Σ max(bound − demand, 0) / Σ demand of the model in charge.
    pub recent_slack_ratio: f64,
}

/// Name of the history series holding a series' forecast upper bound.
pub fn upper_series_name(name: &str) -> String {
    format!("forecast_upper_{name}")
}

pub struct Forecasts {
    settings: ForecastSettings,
    model: ForecastConfig,
    /// Samples folded into one forecaster step.
    samples_per_step: u32,
    series: HashMap<SeriesKey, Tracked>,
    /// Number of the current `observe` call; a series not stamped with it was absent.
    pass: u64,
    warned_full: bool,
}

/// A forecaster, the peak of the current step's samples, and the keys its rows carry (shared
/// rather than rebuilt every sample).
struct Tracked {
    forecaster: SeriesForecaster,
    step_peak: f64,
    step_samples: u32,
    /// Whether the forecaster has seen a step yet; a new series gets its first sample at once so
    /// it has a forecast from the start.
    fed: bool,
    /// The forecast made at the newest step.
    row: Option<ForecastRow>,
    /// The newest `observe` call that carried this series.
    seen_in: u64,
    key: Arc<SeriesKey>,
    upper_key: Arc<SeriesKey>,
}

impl Tracked {
    /// `fed`: the forecaster comes with history (restored), so it answers from the first sample.
    fn new(key: &SeriesKey, forecaster: SeriesForecaster, fed: bool) -> Tracked {
        let mut t = Tracked {
            forecaster,
            step_peak: f64::NEG_INFINITY,
            step_samples: 0,
            fed,
            row: None,
            seen_in: 0,
            key: Arc::new(key.clone()),
            upper_key: Arc::new(SeriesKey {
                name: upper_series_name(&key.name),
                labels: key.labels.clone(),
            }),
        };
        if fed {
            t.refresh_row();
        }
        t
    }

    fn refresh_row(&mut self) {
        self.row = self.forecaster.forecast().map(|fc| {
            let err = self.forecaster.recent_errors().into_iter().next();
            ForecastRow {
                key: self.key.clone(),
                upper_key: self.upper_key.clone(),
                point: fc.point,
                upper: fc.upper,
                model: fc.model,
                recent_violation_ratio: err.as_ref().map_or(f64::NAN, |e| e.violation_rate),
                recent_slack_ratio: err.as_ref().map_or(f64::NAN, |e| e.relative_slack),
            }
        });
    }
}

#[derive(Serialize, Deserialize)]
struct Saved {
    model: ForecastConfig,
    series: Vec<(SeriesKey, SeriesForecaster)>,
}

impl Forecasts {
    /// `None` when forecasting is disabled; an error names the bad setting.
    pub fn new(settings: &ForecastSettings, sample_interval_s: f64) -> Result<Forecasts, String> {
        let samples_per_step = (settings.step_s / sample_interval_s).round().max(1.0) as u32;
        let step_s = f64::from(samples_per_step) * sample_interval_s;
        let lead_steps = ((settings.lead_time_s / step_s).round() as u32).max(1);
        let model = ForecastConfig::new(lead_steps, settings.target_violation, step_s);
        // Validates the combination once, here, rather than on the first series.
        SeriesForecaster::new(model.clone()).map_err(|e| e.to_string())?;
        Ok(Forecasts {
            settings: settings.clone(),
            model,
            samples_per_step,
            series: HashMap::new(),
            pass: 0,
            warned_full: false,
        })
    }

    pub fn wants(&self, name: &str) -> bool {
        self.settings.series.iter().any(|s| s == name)
    }

    pub fn len(&self) -> usize {
        self.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// The series that have a forecaster.
    pub fn keys(&self) -> impl Iterator<Item = &SeriesKey> {
        self.series.keys()
    }

    /// Feeds this sample's values; series absent from `points` are dropped (their container or
    /// GPU is gone). Returns the newest forecast of every series.
    pub fn observe(&mut self, points: &[(SeriesKey, f64)]) -> Vec<ForecastRow> {
        self.pass += 1;
        let pass = self.pass;
        let mut out = Vec::new();
        for (key, v) in points {
            if !self.wants(&key.name) || !v.is_finite() {
                continue;
            }
            let t = match self.series.get_mut(key) {
                Some(t) => t,
                None => {
                    if self.series.len() >= self.settings.max_series {
                        if !self.warned_full {
                            tracing::warn!(
                                limit = self.settings.max_series,
                                "forecast.max_series reached; new series go without forecasts"
                            );
                            self.warned_full = true;
                        }
                        continue;
                    }
                    let Ok(f) = SeriesForecaster::new(self.model.clone()) else {
                        continue;
                    };
                    self.series
                        .entry(key.clone())
                        .or_insert_with(|| Tracked::new(key, f, false))
                }
            };
            t.seen_in = pass;
            t.step_peak = t.step_peak.max(*v);
            t.step_samples += 1;
            if !t.fed || t.step_samples >= self.samples_per_step {
                t.forecaster.observe(t.step_peak);
                t.fed = true;
                t.step_peak = f64::NEG_INFINITY;
                t.step_samples = 0;
                t.refresh_row();
            }
            // Between steps the newest forecast stands.
            if let Some(row) = &t.row {
                out.push(row.clone());
            }
        }
        self.series.retain(|_, t| t.seen_in == pass);
        out
    }

    pub fn lead_time_s(&self) -> f64 {
        self.model.lead_steps as f64 * self.model.step_seconds
    }

    pub fn target_violation(&self) -> f64 {
        self.model.target_violation
    }

    /// Writes the state as JSON, one forecaster at a time (the whole can be many MiB).
    pub fn write_state(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        #[derive(Serialize)]
        struct SavedRef<'a, S> {
            model: &'a ForecastConfig,
            series: S,
        }
        struct Each<'a>(&'a HashMap<SeriesKey, Tracked>);
        impl Serialize for Each<'_> {
            fn serialize<Ser: serde::Serializer>(&self, s: Ser) -> Result<Ser::Ok, Ser::Error> {
                s.collect_seq(self.0.iter().map(|(k, t)| (k, &t.forecaster)))
            }
        }
        let saved = SavedRef {
            model: &self.model,
            series: Each(&self.series),
        };
        serde_json::to_writer(w, &saved).map_err(std::io::Error::other)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = self.write_state(&mut out);
        out
    }

    /// Restores saved forecasters made with the same model settings; returns how many.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<usize, String> {
        let saved: Saved = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if saved.model != self.model {
            return Err(format!(
                "saved with lead {} steps, target {}, step {} s; now lead {} steps, target {}, step {} s",
                saved.model.lead_steps,
                saved.model.target_violation,
                saved.model.step_seconds,
                self.model.lead_steps,
                self.model.target_violation,
                self.model.step_seconds
            ));
        }
        let n = saved.series.len().min(self.settings.max_series);
        self.series.extend(
            saved
                .series
                .into_iter()
                .take(n)
                .map(|(k, f)| (k.clone(), Tracked::new(&k, f, true))),
        );
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Defaults with one forecaster step per sample.
    fn settings() -> ForecastSettings {
        ForecastSettings {
            step_s: 1.0,
            ..ForecastSettings::default()
        }
    }

    fn key(cg: &str) -> SeriesKey {
        SeriesKey::new(
            "container_cpu_usage_cores",
            vec![("cgroup".into(), cg.into())],
        )
    }

    #[test]
    fn forecasts_wanted_series_and_drops_vanished_ones() {
        let mut f = Forecasts::new(&settings(), 1.0).unwrap();
        let other = SeriesKey::new("container_cpu_throttled_ratio", vec![]);
        let mut rows = Vec::new();
        for i in 0..300 {
            rows = f.observe(&[
                (key("/a"), 1.0 + (i % 5) as f64 * 0.1),
                (key("/b"), 2.0),
                (other.clone(), 0.5),
            ]);
        }
        assert_eq!(f.len(), 2);
        let a = rows.iter().find(|r| *r.key == key("/a")).unwrap();
        assert!(
            a.upper >= a.point && a.upper >= 1.0 && a.upper < 3.0,
            "{a:?}"
        );
        f.observe(&[(key("/a"), 1.0)]);
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn state_round_trips_and_rejects_other_settings() {
        let mut f = Forecasts::new(&settings(), 1.0).unwrap();
        for i in 0..200 {
            f.observe(&[(key("/a"), (i % 7) as f64)]);
        }
        let bytes = f.encode();
        let mut g = Forecasts::new(&settings(), 1.0).unwrap();
        assert_eq!(g.restore(&bytes).unwrap(), 1);
        let next = [(key("/a"), 3.0)];
        let (a, b) = (f.observe(&next), g.observe(&next));
        assert_eq!(a[0].upper, b[0].upper);
        let mut other = Forecasts::new(&settings(), 2.0).unwrap();
        assert!(other.restore(&bytes).unwrap_err().contains("lead"));
        assert!(g.restore(b"{not json").is_err());
    }

    #[test]
    fn a_step_feeds_the_peak_of_its_samples() {
        let mut f = Forecasts::new(&ForecastSettings::default(), 1.0).unwrap();
        assert_eq!(f.model.step_seconds, 10.0);
        assert_eq!(f.model.lead_steps, 6);
        // The first sample is fed at once, then one step per ten samples.
        let rows = f.observe(&[(key("/a"), 1.0)]);
        assert_eq!(rows.len(), 1, "a forecast from the first sample");
        for i in 0..30 {
            let v = if i % 10 == 3 { 9.0 } else { 1.0 };
            f.observe(&[(key("/a"), v)]);
        }
        let t = &f.series[&key("/a")];
        assert_eq!(t.forecaster.observed(), 4);
        // Three steps of peak 9 after a first value of 1: the bound covers the peaks.
        let fc = t.forecaster.forecast().unwrap();
        assert!(fc.upper >= 9.0, "{fc:?}");
    }

    #[test]
    fn the_step_is_never_shorter_than_a_sample() {
        let f = Forecasts::new(&ForecastSettings::default(), 30.0).unwrap();
        assert_eq!(f.samples_per_step, 1);
        assert_eq!(f.model.step_seconds, 30.0);
        assert_eq!(f.model.lead_steps, 2);
    }
}
