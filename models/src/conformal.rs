//! Split-conformal calibration over a sliding window of a model's own recent errors, plus the
//! adaptive level update (Gibbs & Candès, "Adaptive Conformal Inference Under Distribution
//! Shift", NeurIPS 2021) that keeps the long-run violation rate at the target even when the
//! errors drift. Pure arithmetic on a bounded window; no I/O.

use serde::{Deserialize, Serialize};

/// Scores kept per model: enough for a 1 % quantile to rest on a couple of errors, small enough
/// to follow changes within a few hours of 1-minute data.
pub const WINDOW: usize = 200;

/// A sliding window of scores kept sorted (to read a quantile in O(1)), each with a one-byte
/// arrival tag (to find the oldest one to evict): 5 bytes a score rather than the 8 of a second,
/// arrival-ordered copy. Tags are arrival numbers modulo 256, unique while `WINDOW` < 256.
/// Insertion is a binary search plus a short memmove; eviction adds a scan of the tags.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(from = "crate::history::Ring<f32>", into = "crate::history::Ring<f32>")]
pub struct ScoreWindow {
    sorted: Vec<f32>,
    tags: Vec<u8>,
    next_tag: u8,
}

const _: () = assert!(
    WINDOW < 256,
    "arrival tags must be unique within the window"
);

// Persisted in arrival order (the format of a `Ring<f32>`); the sorted form is rebuilt on restore.
impl From<ScoreWindow> for crate::history::Ring<f32> {
    fn from(w: ScoreWindow) -> Self {
        let mut ring = crate::history::Ring::new(WINDOW);
        for s in w.arrival_order() {
            ring.push(s);
        }
        ring
    }
}

impl From<crate::history::Ring<f32>> for ScoreWindow {
    fn from(order: crate::history::Ring<f32>) -> Self {
        let mut w = ScoreWindow::new();
        for s in order.to_vec() {
            w.push(f64::from(s));
        }
        w
    }
}

/// Two windows are equal when they hold the same scores in the same arrival order, whatever
/// their tags.
impl PartialEq for ScoreWindow {
    fn eq(&self, other: &Self) -> bool {
        self.arrival_order() == other.arrival_order()
    }
}

impl ScoreWindow {
    pub fn new() -> Self {
        // Sized once: a full window is the steady state, and growth by doubling would overshoot.
        Self {
            sorted: Vec::with_capacity(WINDOW),
            tags: Vec::with_capacity(WINDOW),
            next_tag: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// Age of the score at sorted position `i`: 0 for the newest.
    fn age(&self, i: usize) -> u8 {
        self.next_tag.wrapping_sub(self.tags[i]).wrapping_sub(1)
    }

    /// The scores, oldest first.
    fn arrival_order(&self) -> Vec<f32> {
        let mut by_age: Vec<(u8, f32)> = (0..self.sorted.len())
            .map(|i| (self.age(i), self.sorted[i]))
            .collect();
        by_age.sort_by_key(|a| std::cmp::Reverse(a.0));
        by_age.into_iter().map(|(_, s)| s).collect()
    }

    pub fn push(&mut self, s: f64) {
        if !s.is_finite() {
            return;
        }
        // Rounded up: a stored error is never smaller than the real one.
        let s = crate::history::up_f32(s);
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1);
        let j = self.sorted.partition_point(|x| *x < s);
        if self.sorted.len() < WINDOW {
            self.sorted.insert(j, s);
            self.tags.insert(j, tag);
            return;
        }
        // Replace the oldest score in place, shifting only the scores between the two slots.
        let oldest = tag.wrapping_sub(WINDOW as u8);
        let Some(i) = self.tags.iter().position(|t| *t == oldest) else {
            return;
        };
        if i < j {
            self.sorted.copy_within(i + 1..j, i);
            self.tags.copy_within(i + 1..j, i);
            self.sorted[j - 1] = s;
            self.tags[j - 1] = tag;
        } else {
            self.sorted.copy_within(j..i, j + 1);
            self.tags.copy_within(j..i, j + 1);
            self.sorted[j] = s;
            self.tags[j] = tag;
        }
    }

    /// Conformal quantile at miscoverage `alpha`: the ⌈(n+1)(1−α)⌉-th smallest score, which
    /// covers a fresh exchangeable score with probability ≥ 1−α; the largest score when the
    /// window is too small for that rank.
    pub fn quantile(&self, alpha: f64) -> Option<f64> {
        let n = self.sorted.len();
        if n == 0 {
            return None;
        }
        let rank = ((n as f64 + 1.0) * (1.0 - alpha)).ceil() as usize;
        let idx = rank.clamp(1, n) - 1;
        Some(f64::from(self.sorted[idx]))
    }
}

impl Default for ScoreWindow {
    fn default() -> Self {
        Self::new()
    }
}

/// Adaptive miscoverage level: after each outcome, `α ← α + γ (target − violated)`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AdaptiveLevel {
    pub target: f64,
    pub alpha: f64,
    gamma: f64,
}

impl AdaptiveLevel {
    pub fn new(target: f64) -> Self {
        Self {
            target,
            alpha: target,
            gamma: 0.005,
        }
    }

    pub fn update(&mut self, violated: bool) {
        let err = if violated { 1.0 } else { 0.0 };
        // Clamped so one long burst cannot push the level beyond any meaning; at 0 the bound
        // is the window's largest error.
        self.alpha = (self.alpha + self.gamma * (self.target - err)).clamp(0.0, 0.5);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_quantile_tracks_recent_scores_only() {
        let mut w = ScoreWindow::new();
        for i in 0..WINDOW {
            w.push(1000.0 + i as f64);
        }
        for i in 0..WINDOW {
            w.push(i as f64);
        }
        assert_eq!(w.len(), WINDOW);
        let q = w.quantile(0.05).unwrap_or(f64::NAN);
        // rank ceil(201 × 0.95) = 191 → the 191st smallest of 0..199 is 190.
        assert_eq!(q, 190.0);
    }

    #[test]
    fn sorted_copy_stays_the_sorted_window() {
        let mut w = ScoreWindow::new();
        let mut x: u64 = 3;
        let mut all = Vec::new();
        for _ in 0..(3 * WINDOW) {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = ((x >> 40) % 50) as f64 - 25.0; // many ties
            w.push(v);
            all.push(v as f32);
            let mut expect: Vec<f32> = all[all.len().saturating_sub(WINDOW)..].to_vec();
            expect.sort_by(f32::total_cmp);
            assert_eq!(w.sorted, expect);
        }
    }

    #[test]
    fn arrival_order_survives_eviction_and_a_round_trip() {
        let mut w = ScoreWindow::new();
        let n = 3 * WINDOW + 17;
        for i in 0..n {
            w.push(((i * 37) % 101) as f64);
        }
        let expect: Vec<f32> = (n - WINDOW..n).map(|i| ((i * 37) % 101) as f32).collect();
        assert_eq!(w.arrival_order(), expect);
        let ring: crate::history::Ring<f32> = w.clone().into();
        assert_eq!(ring.to_vec(), expect);
        let back = ScoreWindow::from(ring);
        assert_eq!(back, w);
        assert_eq!(back.sorted, w.sorted);
    }

    #[test]
    fn adaptive_level_lowers_alpha_after_violations() {
        let mut a = AdaptiveLevel::new(0.05);
        for _ in 0..10 {
            a.update(true);
        }
        assert!(a.alpha < 0.05);
        for _ in 0..1000 {
            a.update(false);
        }
        assert!(a.alpha > 0.05);
    }
}
