//! Bounded per-series history shared by every model of one series: a ring of recent raw values, a
//! ring of coarse bucket means reaching back two weeks, and the daily/weekly period detector.
//! Owns no model logic; never grows past its fixed capacities.

use serde::{Deserialize, Serialize};

/// Recent raw values kept per series. 2048 steps hold a day of 1-minute data (for the daily lag of
/// seasonal naive and for the ridge training window) while keeping the state small.
pub const RAW_CAPACITY: usize = 2048;
/// Coarse buckets kept per series: two weeks at 1/504 of a week (20 minutes) per bucket, enough
/// to detect a weekly cycle, which needs two full periods.
pub const BUCKET_CAPACITY: usize = 1008;
/// Autocorrelation a candidate period needs before the models use it.
const DETECT_MIN_ACF: f64 = 0.3;

/// Steps in a day at `step_seconds` (0 when a day is not a whole number of steps up to an hour).
pub fn day_steps(step_seconds: f64) -> u64 {
    if step_seconds > 0.0 && step_seconds <= 3600.0 {
        (86_400.0 / step_seconds).round() as u64
    } else {
        0
    }
}

/// Fixed-capacity ring buffer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(try_from = "RingRepr<T>")]
pub struct Ring<T> {
    buf: Vec<T>,
    cap: usize,
    head: usize,
}

/// Restored state is checked before use: a damaged file must not break the ring's invariants.
#[derive(Deserialize)]
struct RingRepr<T> {
    buf: Vec<T>,
    cap: usize,
    head: usize,
}

impl<T> TryFrom<RingRepr<T>> for Ring<T> {
    type Error = String;

    fn try_from(r: RingRepr<T>) -> Result<Self, String> {
        let full = r.buf.len() == r.cap;
        if r.cap == 0 || r.buf.len() > r.cap || r.head >= r.cap || (!full && r.head != 0) {
            return Err(format!(
                "inconsistent ring: {} values, capacity {}, head {}",
                r.buf.len(),
                r.cap,
                r.head
            ));
        }
        // Every ring here holds a few thousand values; a larger capacity is a damaged file, and
        // reserving it could exhaust memory.
        if r.cap > MAX_RING_CAPACITY {
            return Err(format!(
                "ring capacity {} is above the largest in use ({MAX_RING_CAPACITY})",
                r.cap
            ));
        }
        let mut buf = r.buf;
        buf.reserve_exact(r.cap - buf.len());
        Ok(Ring {
            buf,
            cap: r.cap,
            head: r.head,
        })
    }
}

/// Largest ring capacity a restored state may declare.
const MAX_RING_CAPACITY: usize = 1 << 16;

impl<T: Copy> Ring<T> {
    /// Allocated whole up front: a series' memory is then flat from its first sample instead of
    /// creeping up over the hours the ring takes to fill.
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        Self {
            buf: Vec::with_capacity(cap),
            cap,
            head: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn push(&mut self, v: T) {
        if self.buf.len() < self.cap {
            self.buf.push(v);
        } else {
            self.buf[self.head] = v;
            self.head = (self.head + 1) % self.cap;
        }
    }

    /// Value `age` steps back (0 = newest).
    pub fn back(&self, age: usize) -> Option<T> {
        let n = self.buf.len();
        if age >= n {
            return None;
        }
        let idx = if n < self.cap {
            n - 1 - age
        } else {
            // head + cap - 1 - age < 2 cap: one conditional subtraction instead of a division.
            let i = self.head + self.cap - 1 - age;
            if i >= self.cap { i - self.cap } else { i }
        };
        Some(self.buf[idx])
    }

    /// Oldest-first copy.
    pub fn to_vec(&self) -> Vec<T> {
        let n = self.buf.len();
        if n < self.cap {
            self.buf.clone()
        } else {
            let mut v = Vec::with_capacity(n);
            v.extend_from_slice(&self.buf[self.head..]);
            v.extend_from_slice(&self.buf[..self.head]);
            v
        }
    }
}

/// `v` as the smallest f32 not below it: a capacity read back from the history (moving-window
/// maximum, seasonal naive) then never falls below the sample it came from, which an ordinary
/// rounding would turn into a false violation; the cost is at most one part in 10^7 of slack.
pub fn up_f32(v: f64) -> f32 {
    let x = v as f32;
    if f64::from(x) < v { x.next_up() } else { x }
}

/// `v` as the largest f32 not above it. A stored point rounded down can only make the error
/// scored against it larger, so the bound built from those errors stays conservative.
pub fn down_f32(v: f64) -> f32 {
    let x = v as f32;
    if f64::from(x) > v { x.next_down() } else { x }
}

/// Period the detector may find, in steps.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Period {
    Day,
    Week,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct History {
    /// Steps observed so far (the index of the next sample).
    pub count: u64,
    /// Recent samples as f32 rounded up (see [`up_f32`]), which halves the state.
    pub raw: Ring<f32>,
    /// Means of completed buckets of `bucket_steps` samples (f32: they only shape features).
    pub buckets: Ring<f32>,
    pub bucket_steps: u64,
    bucket_sum: f64,
    bucket_n: u32,
    /// One day and one week in steps; 0 when the step is too coarse for the cycle to be seen.
    pub day_steps: u64,
    pub week_steps: u64,
    pub daily: bool,
    pub weekly: bool,
    /// Whether every value so far was a whole number (counts), so capacity can be rounded down.
    pub integral: bool,
    /// Whether every value so far was >= 0.
    pub nonnegative: bool,
}

impl History {
    /// History for forecasts up to `lead` steps ahead.
    /// A history of steps of `step_seconds` keeping `raw_capacity` raw values: as many as the
    /// models that read it need (the forecaster decides), at most [`RAW_CAPACITY`].
    pub fn new(step_seconds: f64, raw_capacity: usize) -> Self {
        let day = day_steps(step_seconds);
        let week = day * 7;
        let bucket_steps = if week > 0 {
            week.div_ceil((BUCKET_CAPACITY / 2) as u64).max(1)
        } else {
            1
        };
        Self {
            count: 0,
            raw: Ring::new(raw_capacity.clamp(1, RAW_CAPACITY)),
            buckets: Ring::new(BUCKET_CAPACITY),
            bucket_steps,
            bucket_sum: 0.0,
            bucket_n: 0,
            day_steps: day,
            week_steps: week,
            daily: false,
            weekly: false,
            integral: true,
            nonnegative: true,
        }
    }

    pub fn push(&mut self, v: f64) {
        self.raw.push(up_f32(v));
        self.count += 1;
        self.integral &= v.fract() == 0.0;
        self.nonnegative &= v >= 0.0;
        self.bucket_sum += v;
        self.bucket_n += 1;
        if self.count.is_multiple_of(self.bucket_steps) {
            self.buckets
                .push((self.bucket_sum / f64::from(self.bucket_n.max(1))) as f32);
            self.bucket_sum = 0.0;
            self.bucket_n = 0;
        }
    }

    /// Latest value.
    pub fn last(&self) -> Option<f64> {
        self.raw.back(0).map(f64::from)
    }

    pub fn period_steps(&self, p: Period) -> u64 {
        match p {
            Period::Day => self.day_steps,
            Period::Week => self.week_steps,
        }
    }

    /// Smoothed level of the series at absolute step `at` (< count), from the bucket means,
    /// interpolated between bucket centres. None when it is older than the buckets reach or in
    /// the bucket still filling.
    pub fn seasonal_level(&self, at: u64) -> Option<f64> {
        let k = self.bucket_steps;
        let done = self.count / k; // completed buckets
        let pos = (at as f64 + 0.5) / k as f64 - 0.5; // in bucket-index units, centres at integers
        let lo = pos.floor();
        if lo < 0.0 {
            return None;
        }
        let lo = lo as u64;
        let hi = lo + 1;
        let get = |b: u64| -> Option<f64> {
            if b >= done {
                return None;
            }
            self.buckets.back((done - 1 - b) as usize).map(f64::from)
        };
        let a = get(lo)?;
        let w = pos - lo as f64;
        match get(hi) {
            Some(b) => Some(a + (b - a) * w),
            None => Some(a),
        }
    }

    /// Re-run period detection on the bucket means (called at refits, not every step).
    pub fn detect_periods(&mut self) {
        let b: Vec<f64> = self.buckets.to_vec().into_iter().map(f64::from).collect();
        self.daily = self.detect(&b, self.day_steps);
        self.weekly = self.detect(&b, self.week_steps);
    }

    fn detect(&self, b: &[f64], period: u64) -> bool {
        if period == 0 || period < 2 * self.bucket_steps {
            return false;
        }
        let lag = (period / self.bucket_steps) as usize;
        // Two full periods must be seen before a cycle counts as detected.
        if b.len() < 2 * lag {
            return false;
        }
        let full = acf(b, lag);
        // A true cycle peaks at its period: it must beat the half-period lag, which a trend or a
        // slow drift would not.
        full >= DETECT_MIN_ACF && full > acf(b, lag / 2)
    }
}

/// Sample autocorrelation at `lag`.
fn acf(x: &[f64], lag: usize) -> f64 {
    let n = x.len();
    if lag == 0 || lag >= n {
        return 0.0;
    }
    let m = x.iter().sum::<f64>() / n as f64;
    let var: f64 = x.iter().map(|v| (v - m) * (v - m)).sum();
    if var <= 0.0 {
        return 0.0;
    }
    let cov: f64 = (lag..n).map(|i| (x[i] - m) * (x[i - lag] - m)).sum();
    cov / var
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_samples_never_round_down() {
        for v in [0.1, 22.84, 1.0 / 3.0, 123_456_789.123, -0.7] {
            assert!(f64::from(up_f32(v)) >= v, "{v}");
            assert!(f64::from(up_f32(v)) - v <= v.abs() * 1.2e-7, "{v}");
            assert!(f64::from(down_f32(v)) <= v, "{v}");
        }
    }

    #[test]
    fn ring_wraps_and_reads_back() {
        let mut r = Ring::new(3);
        for v in 1..=5 {
            r.push(v as f32);
        }
        assert_eq!(r.to_vec(), vec![3.0, 4.0, 5.0]);
        assert_eq!(r.back(0), Some(5.0));
        assert_eq!(r.back(2), Some(3.0));
        assert_eq!(r.back(3), None);
    }

    #[test]
    fn a_restored_ring_is_checked_and_sized_once() {
        let r: Ring<f32> = serde_json::from_str(r#"{"buf":[1.0,2.0],"cap":2048,"head":0}"#)
            .expect("a partial ring restores");
        assert_eq!(r.buf.capacity(), 2048);
        let huge = serde_json::from_str::<Ring<f32>>(r#"{"buf":[],"cap":1000000000000,"head":0}"#)
            .unwrap_err();
        assert!(huge.to_string().contains("above the largest"), "{huge}");
        let bad =
            serde_json::from_str::<Ring<f32>>(r#"{"buf":[1.0],"cap":4,"head":2}"#).unwrap_err();
        assert!(bad.to_string().contains("inconsistent ring"), "{bad}");
    }

    #[test]
    fn detects_a_daily_cycle_and_not_noise() {
        let mut h = History::new(300.0, RAW_CAPACITY); // 288 steps a day
        for i in 0..(288 * 4) {
            let v = 10.0 + 5.0 * (i as f64 * std::f64::consts::TAU / 288.0).sin();
            h.push(v);
        }
        h.detect_periods();
        assert!(h.daily);
        assert!(!h.weekly, "four days cannot show a weekly cycle");

        let mut flat = History::new(300.0, RAW_CAPACITY);
        let mut x: u64 = 7;
        for _ in 0..(288 * 4) {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            flat.push((x >> 33) as f64 / (1u64 << 31) as f64);
        }
        flat.detect_periods();
        assert!(!flat.daily);
    }
}
