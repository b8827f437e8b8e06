//! The histogram layout shared with `bpf/headroom.bpf.c`, and the arithmetic on it: bucket bounds,
//! differences between two cumulative readings, quantiles and coarse Prometheus buckets. Pure: no
//! I/O, no kernel.
//!
//! Values are nanoseconds. 0..15 ns get a bucket each; above that every power of two `[2^e, 2^(e+1))`
//! is cut into [`SUBS`] equal linear sub-buckets, so no bucket is wider than 1/16 of its lower bound.
//! A quantile is found in its bucket by linear interpolation on rank. Error bound: the true quantile
//! and the estimate lie in the same bucket, so the estimate is off by less than one bucket width,
//! i.e. by less than 1/16 (6.25 %) of the value; when the samples inside that bucket are spread
//! evenly (or, for a point mass, on average over its position in the bucket) the error is half that,
//! 3.1 %. Values of 2^36 ns (~68.7 s) and above share the last bucket.

/// Linear sub-buckets per power of two (must match `SUBS` in the C source).
pub const SUBS: usize = 16;
const SUB_BITS: u32 = 4;
/// Largest exponent with its own buckets (must match `MAX_EXP` in the C source).
pub const MAX_EXP: u32 = 35;
/// Number of buckets in one kernel histogram (must match `NBUCKETS` in the C source).
pub const NBUCKETS: usize = (MAX_EXP as usize - SUB_BITS as usize + 2) * SUBS;

/// Index of the bucket holding `ns`, exactly as the kernel side computes it.
pub fn bucket_of(ns: u64) -> usize {
    if ns < SUBS as u64 {
        return ns as usize;
    }
    let e = 63 - ns.leading_zeros();
    if e > MAX_EXP {
        return NBUCKETS - 1;
    }
    let sub = ((ns >> (e - SUB_BITS)) as usize) & (SUBS - 1);
    (e - SUB_BITS + 1) as usize * SUBS + sub
}

/// `[lower, upper)` bounds of bucket `idx` in nanoseconds. The last bucket's upper bound is its
/// nominal one although it also holds everything larger.
pub fn bucket_bounds(idx: usize) -> (u64, u64) {
    if idx < SUBS {
        return (idx as u64, idx as u64 + 1);
    }
    let e = (idx / SUBS) as u32 + SUB_BITS - 1;
    let sub = (idx % SUBS) as u64;
    let width = 1u64 << (e - SUB_BITS);
    let lower = (SUBS as u64 + sub) * width;
    (lower, lower + width)
}

/// One cumulative histogram as read from a map, or the difference of two readings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    /// Number of values: the sum of `buckets` (the kernel keeps no separate count).
    pub count: u64,
    pub sum_ns: u64,
    pub buckets: Vec<u64>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            count: 0,
            sum_ns: 0,
            buckets: vec![0; NBUCKETS],
        }
    }
}

impl Histogram {
    /// Builds a histogram from raw values (tests and benchmarks use it to state the truth).
    pub fn from_values(values_ns: impl IntoIterator<Item = u64>) -> Histogram {
        let mut h = Histogram::default();
        for v in values_ns {
            h.buckets[bucket_of(v)] += 1;
            h.count += 1;
            h.sum_ns = h.sum_ns.wrapping_add(v);
        }
        h
    }

    /// What was added between `earlier` and `self` (both cumulative readings of one key). The
    /// kernel updates bucket and sum with separate atomic adds, so a reading may be caught
    /// between them; differences are therefore clamped at zero.
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        Histogram {
            count: self.count.saturating_sub(earlier.count),
            sum_ns: self.sum_ns.saturating_sub(earlier.sum_ns),
            buckets: self
                .buckets
                .iter()
                .zip(earlier.buckets.iter().chain(std::iter::repeat(&0)))
                .map(|(now, then)| now.saturating_sub(*then))
                .collect(),
        }
    }

    /// Sum of the bucket counts (equals `count` for readings and their differences).
    pub fn bucket_total(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The `q` quantile (0..=1) in seconds, interpolated linearly inside its bucket; `None` when
    /// the histogram is empty or `q` is out of range.
    pub fn quantile_seconds(&self, q: f64) -> Option<f64> {
        if !(0.0..=1.0).contains(&q) {
            return None;
        }
        let total = self.bucket_total();
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let mut below = 0u64;
        for (idx, &n) in self.buckets.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if (below + n) as f64 >= rank {
                let (lo, hi) = bucket_bounds(idx);
                let frac = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
                return Some((lo as f64 + frac * (hi - lo) as f64) / 1e9);
            }
            below += n;
        }
        // Rounding put the rank past the last sample: answer with the top of the last bucket used.
        let last = self.buckets.iter().rposition(|&n| n > 0)?;
        Some(bucket_bounds(last).1 as f64 / 1e9)
    }

    /// Mean in seconds, or `None` when empty.
    pub fn mean_seconds(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum_ns as f64 / self.count as f64 / 1e9)
    }

    /// Per-bucket counts folded onto coarse upper bounds (seconds) for Prometheus: two bounds per
    /// power of two (`2^e` and `1.5 * 2^e` ns) for `e` in `min_exp..=max_exp`, then `+Inf`. Each
    /// coarse bound is a fine-bucket edge, so no fine bucket straddles one.
    pub fn coarse_buckets(&self, min_exp: u32, max_exp: u32) -> Vec<(f64, u64)> {
        let bounds = coarse_bounds_ns(min_exp, max_exp);
        let mut out: Vec<(f64, u64)> = bounds.iter().map(|&b| (b as f64 / 1e9, 0)).collect();
        out.push((f64::INFINITY, 0));
        for (idx, &n) in self.buckets.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let (_, hi) = bucket_bounds(idx);
            let slot = if idx == NBUCKETS - 1 {
                bounds.len()
            } else {
                bounds.partition_point(|&b| b < hi)
            };
            out[slot].1 += n;
        }
        out
    }
}

/// Upper bounds in nanoseconds used by [`Histogram::coarse_buckets`].
pub fn coarse_bounds_ns(min_exp: u32, max_exp: u32) -> Vec<u64> {
    let mut v = Vec::new();
    for e in min_exp..=max_exp.min(MAX_EXP) {
        v.push(1u64 << e);
        v.push(3u64 << (e - 1));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_narrow() {
        let mut expected_lo = 0;
        for idx in 0..NBUCKETS {
            let (lo, hi) = bucket_bounds(idx);
            assert_eq!(
                lo,
                expected_lo,
                "bucket {idx} does not start where {} ended",
                idx.saturating_sub(1)
            );
            assert!(hi > lo);
            if lo >= SUBS as u64 {
                assert!(
                    (hi - lo) * SUBS as u64 <= lo,
                    "bucket {idx} wider than 1/16 of its lower bound"
                );
            }
            assert_eq!(bucket_of(lo), idx);
            assert_eq!(bucket_of(hi - 1), idx);
            expected_lo = hi;
        }
        assert_eq!(expected_lo, 1u64 << (MAX_EXP + 1));
        assert_eq!(bucket_of(u64::MAX), NBUCKETS - 1);
        assert_eq!(NBUCKETS, 528);
    }

    #[test]
    fn quantile_of_a_point_mass_is_within_the_documented_bound() {
        for v in [1_000u64, 20_000_000, 20_400_000, 123_456_789, 3_000_000_000] {
            let h = Histogram::from_values(std::iter::repeat_n(v, 500));
            let p50 = h.quantile_seconds(0.5).expect("non-empty");
            let err = (p50 - v as f64 / 1e9).abs() / (v as f64 / 1e9);
            assert!(err < 1.0 / 16.0, "value {v}: p50 {p50} off by {err}");
        }
    }

    #[test]
    fn quantiles_of_a_mixture_land_in_the_right_bucket() {
        // 90 % at 2 ms, 10 % at 50 ms: p50 is 2 ms, p99 is 50 ms.
        let vals = (0..1000).map(|i| if i % 10 == 0 { 50_000_000 } else { 2_000_000 });
        let h = Histogram::from_values(vals);
        let p50 = h.quantile_seconds(0.5).expect("non-empty");
        let p99 = h.quantile_seconds(0.99).expect("non-empty");
        assert_eq!(bucket_of((p50 * 1e9) as u64), bucket_of(2_000_000));
        assert_eq!(bucket_of((p99 * 1e9) as u64), bucket_of(50_000_000));
        assert!(Histogram::default().quantile_seconds(0.5).is_none());
        assert!(h.quantile_seconds(1.5).is_none());
    }

    #[test]
    fn since_subtracts_and_clamps() {
        let a = Histogram::from_values([5, 100, 100]);
        let b = Histogram::from_values([5, 100, 100, 100, 7]);
        let d = b.since(&a);
        assert_eq!(d.count, 2);
        assert_eq!(d.sum_ns, 107);
        assert_eq!(d.buckets[bucket_of(100)], 1);
        assert_eq!(d.buckets[7], 1);
        assert_eq!(a.since(&b).count, 0);
    }

    #[test]
    fn coarse_buckets_keep_every_count_on_the_right_side_of_each_bound() {
        let vals = [500u64, 8_192, 12_287, 12_288, 20_000_000, 100_000_000_000];
        let h = Histogram::from_values(vals);
        let coarse = h.coarse_buckets(13, 34);
        assert_eq!(coarse.iter().map(|b| b.1).sum::<u64>(), vals.len() as u64);
        let mut cumulative = 0;
        for (bound, n) in &coarse {
            cumulative += n;
            let truth = vals.iter().filter(|&&v| (v as f64 / 1e9) <= *bound).count() as u64;
            // Fine buckets are [lo, hi) and Prometheus bounds are inclusive: a value exactly on a
            // bound is counted in the next coarse bucket, never in an earlier one.
            assert!(cumulative <= truth, "bound {bound}: {cumulative} > {truth}");
            let strictly = vals.iter().filter(|&&v| (v as f64 / 1e9) < *bound).count() as u64;
            assert!(
                cumulative >= strictly,
                "bound {bound}: {cumulative} < {strictly}"
            );
        }
        assert!(coarse.last().is_some_and(|b| b.0.is_infinite()));
    }
}
