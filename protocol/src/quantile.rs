//! How a forecast's quantiles are read at any probability level. The agent uses it to put its own
//! forecasts on the wire's fixed levels and the aggregator to sum demand across nodes at its risk
//! level; one definition keeps both sides reading a forecast the same way.

use crate::schema::Quantile;

/// Value of a forecast at probability `q`, interpolating linearly between the quantiles given and
/// holding the end values outside them (the agent chose its range; extrapolating tails invents data).
pub fn quantile_at(quantiles: &[Quantile], q: f64) -> f64 {
    let Some(first) = quantiles.first() else {
        return 0.0;
    };
    if q <= first.q {
        return first.value;
    }
    for w in quantiles.windows(2) {
        let (a, b) = (w[0], w[1]);
        if q <= b.q {
            let t = (q - a.q) / (b.q - a.q);
            // Clamped: `a + 1.0 * (b - a)` can round one ulp past `b`, and a value past the next
            // quantile makes the sequence decrease (the aggregator then refuses the batch).
            let (lo, hi) = (a.value.min(b.value), a.value.max(b.value));
            return (a.value + t * (b.value - a.value)).clamp(lo, hi);
        }
    }
    quantiles.last().map_or(0.0, |l| l.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_interpolates_and_holds_ends() {
        let qs = [
            Quantile {
                q: 0.5,
                value: 10.0,
            },
            Quantile {
                q: 0.9,
                value: 20.0,
            },
        ];
        assert_eq!(quantile_at(&qs, 0.5), 10.0);
        assert!((quantile_at(&qs, 0.7) - 15.0).abs() < 1e-9);
        assert_eq!(quantile_at(&qs, 0.99), 20.0);
        assert_eq!(quantile_at(&qs, 0.1), 10.0);
        assert_eq!(quantile_at(&[], 0.5), 0.0);
        // At a given level the value is exactly the one given: 0.70148... + 1.0 * (4.77375... -
        // 0.70148...) rounds one ulp above 4.77375..., which put q=0.95 above q=0.99.
        let (a, b) = (0.7014887154027867, 4.773750119720533);
        let qs = [
            Quantile { q: 0.5, value: a },
            Quantile { q: 0.95, value: b },
        ];
        let at: Vec<f64> = [0.5, 0.9, 0.95, 0.99]
            .iter()
            .map(|&q| quantile_at(&qs, q))
            .collect();
        assert_eq!(at[2], b);
        assert!(at.windows(2).all(|w| w[0] <= w[1]), "{at:?}");
    }
}
