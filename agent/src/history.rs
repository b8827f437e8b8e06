//! Bounded history of every series the agent samples: a fine ring (one point per sample) and a
//! coarse ring (max and mean per `coarse_step_s`) per series, preallocated so memory is flat
//! whatever the node does. Gaps (the agent was down) are kept as NaN so positions stay aligned
//! with time. Serialises to a compact binary form for the state directory.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// A series' identity: its metric-style name and its labels, sorted by key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SeriesKey {
    pub name: String,
    pub labels: Vec<(String, String)>,
}

impl SeriesKey {
    pub fn new(name: &str, mut labels: Vec<(String, String)>) -> SeriesKey {
        labels.sort();
        SeriesKey {
            name: name.to_string(),
            labels,
        }
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl std::fmt::Display for SeriesKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{{", self.name)?;
        for (i, (k, v)) in self.labels.iter().enumerate() {
            if i > 0 {
                write!(f, ",")?;
            }
            write!(f, "{k}={v:?}")?;
        }
        write!(f, "}}")
    }
}

/// How a ring stores one value.
trait Cell: Copy + std::fmt::Debug + PartialEq {
    const EMPTY: Self;
    fn pack(v: f32) -> Self;
    fn unpack(self) -> f32;
}

impl Cell for f32 {
    const EMPTY: f32 = f32::NAN;
    fn pack(v: f32) -> f32 {
        v
    }
    fn unpack(self) -> f32 {
        self
    }
}

/// bfloat16: the top half of an f32 (8 bits of mantissa, about 0.4 % relative precision),
/// plenty for minute-wide buckets hours old, at half the memory.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Bf16(u16);

impl Cell for Bf16 {
    const EMPTY: Bf16 = Bf16(0x7fc0);
    fn pack(v: f32) -> Bf16 {
        if v.is_nan() {
            return Bf16::EMPTY;
        }
        let bits = v.to_bits();
        // Round to nearest, ties to even.
        let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
        Bf16((rounded >> 16) as u16)
    }
    fn unpack(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }
}

/// Fixed-capacity ring, oldest first when read.
#[derive(Debug, Clone, PartialEq)]
struct Ring<C: Cell> {
    buf: Vec<C>,
    head: usize,
    len: usize,
}

impl<C: Cell> Ring<C> {
    fn new(cap: usize) -> Ring<C> {
        // Filled, not just reserved, so the pages are committed now and RSS stays flat.
        Ring {
            buf: vec![C::EMPTY; cap.max(1)],
            head: 0,
            len: 0,
        }
    }

    fn push(&mut self, v: f32) {
        let cap = self.buf.len();
        self.buf[(self.head + self.len) % cap] = C::pack(v);
        if self.len < cap {
            self.len += 1;
        } else {
            self.head = (self.head + 1) % cap;
        }
    }

    fn iter(&self) -> impl Iterator<Item = f32> + '_ {
        let cap = self.buf.len();
        (0..self.len).map(move |i| self.buf[(self.head + i) % cap].unpack())
    }

    fn last(&self) -> Option<f32> {
        (self.len > 0).then(|| self.buf[(self.head + self.len - 1) % self.buf.len()].unpack())
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Series {
    fine: Ring<f32>,
    /// Time of the newest fine point, ms since the epoch.
    last_ms: u64,
    coarse_max: Ring<Bf16>,
    coarse_mean: Ring<Bf16>,
    /// Index (time / coarse step) of the coarse bucket being accumulated.
    bucket: u64,
    acc_sum: f64,
    acc_n: u32,
    acc_max: f32,
}

/// Points of one series, oldest first. Times are ms since the epoch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesView {
    pub fine: Vec<(u64, f32)>,
    /// `(bucket start, max, mean)` for completed coarse buckets.
    pub coarse: Vec<(u64, f32, f32)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct History {
    interval_ms: u64,
    fine_cap: usize,
    coarse_step_ms: u64,
    coarse_cap: usize,
    series: HashMap<SeriesKey, Series>,
}

/// Bytes of the smallest series in the state-file form: key length, last time, three ring
/// lengths, bucket, running sum, count and maximum (the key itself comes on top).
const MIN_SERIES_BYTES: usize = 4 + 8 + 4 + 8 + 4 + 4 + 8 + 4 + 4;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated at byte {0}")]
    Truncated(usize),
    #[error("bad series key at byte {at}: {message}")]
    Key { at: usize, message: String },
}

impl History {
    pub fn new(
        interval_ms: u64,
        fine_cap: usize,
        coarse_step_s: u64,
        coarse_cap: usize,
    ) -> History {
        History {
            interval_ms: interval_ms.max(1),
            fine_cap: fine_cap.max(1),
            coarse_step_ms: coarse_step_s.max(1) * 1000,
            coarse_cap: coarse_cap.max(1),
            series: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// Points held in all fine rings.
    pub fn points(&self) -> usize {
        self.series.values().map(|s| s.fine.len).sum()
    }

    pub fn keys(&self) -> impl Iterator<Item = &SeriesKey> {
        self.series.keys()
    }

    pub fn record(&mut self, key: &SeriesKey, t_ms: u64, v: f64) {
        let (fine_cap, coarse_cap, step) = (self.fine_cap, self.coarse_cap, self.coarse_step_ms);
        let s = match self.series.get_mut(key) {
            Some(s) => s,
            None => self.series.entry(key.clone()).or_insert_with(|| Series {
                fine: Ring::new(fine_cap),
                last_ms: 0,
                coarse_max: Ring::new(coarse_cap),
                coarse_mean: Ring::new(coarse_cap),
                bucket: t_ms / step,
                acc_sum: 0.0,
                acc_n: 0,
                acc_max: f32::NAN,
            }),
        };
        if s.fine.len > 0 {
            if t_ms <= s.last_ms {
                // Clock stepped back or a duplicate sample: keep the newest value only.
                return;
            }
            let missed = ((t_ms - s.last_ms) as f64 / self.interval_ms as f64).round() as u64;
            for _ in 1..missed.min(fine_cap as u64 + 1) {
                s.fine.push(f32::NAN);
            }
        }
        s.fine.push(v as f32);
        s.last_ms = t_ms;
        let bucket = t_ms / step;
        if bucket != s.bucket {
            if s.acc_n > 0 {
                s.coarse_max.push(s.acc_max);
                s.coarse_mean.push((s.acc_sum / s.acc_n as f64) as f32);
            }
            let gap = bucket.saturating_sub(s.bucket + 1).min(coarse_cap as u64);
            for _ in 0..gap {
                s.coarse_max.push(f32::NAN);
                s.coarse_mean.push(f32::NAN);
            }
            s.bucket = bucket;
            s.acc_sum = 0.0;
            s.acc_n = 0;
            s.acc_max = f32::NAN;
        }
        if v.is_finite() {
            s.acc_sum += v;
            s.acc_n += 1;
            s.acc_max = if s.acc_max.is_nan() {
                v as f32
            } else {
                s.acc_max.max(v as f32)
            };
        }
    }

    pub fn latest(&self, key: &SeriesKey) -> Option<(u64, f32)> {
        let s = self.series.get(key)?;
        s.fine.last().map(|v| (s.last_ms, v))
    }

    pub fn view(&self, key: &SeriesKey) -> Option<SeriesView> {
        let s = self.series.get(key)?;
        let n = s.fine.len as u64;
        let fine = s
            .fine
            .iter()
            .enumerate()
            .map(|(i, v)| {
                (
                    s.last_ms
                        .saturating_sub((n - 1 - i as u64) * self.interval_ms),
                    v,
                )
            })
            .collect();
        let m = s.coarse_max.len as u64;
        let coarse = s
            .coarse_max
            .iter()
            .zip(s.coarse_mean.iter())
            .enumerate()
            .map(|(i, (mx, mean))| {
                (
                    s.bucket.saturating_sub(m - i as u64) * self.coarse_step_ms,
                    mx,
                    mean,
                )
            })
            .collect();
        Some(SeriesView { fine, coarse })
    }

    /// Drops series whose newest point is older than `max_age_ms` (their container is gone).
    pub fn drop_stale(&mut self, now_ms: u64, max_age_ms: u64) -> usize {
        let before = self.series.len();
        self.series
            .retain(|_, s| now_ms.saturating_sub(s.last_ms) <= max_age_ms);
        before - self.series.len()
    }

    /// Drops every series labelled with one of `cgroups` (their containers are gone).
    pub fn drop_cgroups(&mut self, cgroups: &[String]) -> usize {
        if cgroups.is_empty() {
            return 0;
        }
        let before = self.series.len();
        self.series.retain(|k, _| {
            k.label("cgroup")
                .is_none_or(|c| !cgroups.iter().any(|g| g == c))
        });
        before - self.series.len()
    }

    #[cfg(test)]
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out).expect("writing to a Vec");
        out
    }

    /// Writes the state-file form of the history (read back by [`History::decode_into`]) one
    /// series at a time, so saving never holds a second copy of the whole history.
    pub fn write_to(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        w.write_all(&self.interval_ms.to_le_bytes())?;
        w.write_all(&self.coarse_step_ms.to_le_bytes())?;
        w.write_all(&(self.series.len() as u32).to_le_bytes())?;
        let mut keys: Vec<&SeriesKey> = self.series.keys().collect();
        keys.sort();
        let mut out = Vec::with_capacity((self.fine_cap + 2 * self.coarse_cap) * 4 + 256);
        for key in keys {
            let s = &self.series[key];
            out.clear();
            let k = serde_json::to_vec(key).unwrap_or_default();
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(&k);
            out.extend_from_slice(&s.last_ms.to_le_bytes());
            put_ring(&mut out, &s.fine);
            out.extend_from_slice(&s.bucket.to_le_bytes());
            put_ring(&mut out, &s.coarse_max);
            put_ring(&mut out, &s.coarse_mean);
            out.extend_from_slice(&s.acc_sum.to_le_bytes());
            out.extend_from_slice(&s.acc_n.to_le_bytes());
            out.extend_from_slice(&s.acc_max.to_le_bytes());
            w.write_all(&out)?;
        }
        Ok(())
    }

    /// Restores series from [`History::write_to`] output into this history's shape (its
    /// capacities win; the newest points are kept). A different sample interval or coarse
    /// step makes the saved tier meaningless, so that tier is dropped.
    pub fn decode_into(&mut self, bytes: &[u8]) -> Result<usize, DecodeError> {
        let mut r = Cursor { b: bytes, at: 0 };
        let interval_ms = r.u64()?;
        let coarse_step_ms = r.u64()?;
        let n = r.u32()? as usize;
        // The count is read from the file: reserve no more series than its bytes could hold,
        // or a damaged count alone would ask for terabytes.
        let mut restored = HashMap::with_capacity(n.min(bytes.len() / MIN_SERIES_BYTES));
        for _ in 0..n {
            let klen = r.u32()? as usize;
            let at = r.at;
            let key: SeriesKey =
                serde_json::from_slice(r.take(klen)?).map_err(|e| DecodeError::Key {
                    at,
                    message: e.to_string(),
                })?;
            let last_ms = r.u64()?;
            let fine = r.floats()?;
            let bucket = r.u64()?;
            let cmax = r.floats()?;
            let cmean = r.floats()?;
            let acc_sum = r.f64()?;
            let acc_n = r.u32()?;
            let acc_max = r.f32()?;
            let mut s = Series {
                fine: Ring::new(self.fine_cap),
                last_ms,
                coarse_max: Ring::new(self.coarse_cap),
                coarse_mean: Ring::new(self.coarse_cap),
                bucket,
                acc_sum,
                acc_n,
                acc_max,
            };
            if interval_ms == self.interval_ms {
                fine.iter().for_each(|v| s.fine.push(*v));
            } else {
                s.fine.push(f32::NAN);
            }
            if coarse_step_ms == self.coarse_step_ms {
                cmax.iter().for_each(|v| s.coarse_max.push(*v));
                cmean.iter().for_each(|v| s.coarse_mean.push(*v));
            } else {
                s.bucket = last_ms / self.coarse_step_ms;
                s.acc_sum = 0.0;
                s.acc_n = 0;
                s.acc_max = f32::NAN;
            }
            restored.insert(key, s);
        }
        let count = restored.len();
        self.series.extend(restored);
        Ok(count)
    }
}

fn put_ring<C: Cell>(out: &mut Vec<u8>, ring: &Ring<C>) {
    out.extend_from_slice(&(ring.len as u32).to_le_bytes());
    for v in ring.iter() {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.b.len());
        let end = end.ok_or(DecodeError::Truncated(self.at))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.arr().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.arr().map(u64::from_le_bytes)
    }
    fn f32(&mut self) -> Result<f32, DecodeError> {
        self.arr().map(f32::from_le_bytes)
    }
    fn f64(&mut self) -> Result<f64, DecodeError> {
        self.arr().map(f64::from_le_bytes)
    }
    fn floats(&mut self) -> Result<Vec<f32>, DecodeError> {
        let n = self.u32()? as usize;
        let raw = self.take(n.checked_mul(4).ok_or(DecodeError::Truncated(self.at))?)?;
        Ok(raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> SeriesKey {
        SeriesKey::new(name, vec![("cgroup".into(), "/a".into())])
    }

    /// Found by the `history` fuzz target: a series count of 2^32-1 in a 16-byte file made the
    /// decoder reserve room for four billion series and abort the agent at start-up.
    #[test]
    fn a_damaged_series_count_reserves_nothing_and_names_the_byte() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&1000u64.to_le_bytes());
        bytes.extend_from_slice(&60_000u64.to_le_bytes());
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut h = History::new(1000, 3, 60, 2);
        let e = h.decode_into(&bytes).unwrap_err();
        assert!(matches!(e, DecodeError::Truncated(20)), "{e}");
        assert!(h.is_empty());
    }

    #[test]
    fn ring_is_bounded_and_ordered() {
        let mut h = History::new(1000, 3, 60, 2);
        let k = key("x");
        for i in 0..5u64 {
            h.record(&k, 1_000_000 + i * 1000, i as f64);
        }
        let v = h.view(&k).unwrap();
        assert_eq!(
            v.fine,
            vec![(1_002_000, 2.0), (1_003_000, 3.0), (1_004_000, 4.0)]
        );
        assert_eq!(h.points(), 3);
    }

    #[test]
    fn gaps_become_nan_and_coarse_keeps_max_and_mean() {
        let mut h = History::new(1000, 10, 2, 10);
        let k = key("x");
        h.record(&k, 10_000, 1.0);
        h.record(&k, 11_000, 3.0);
        h.record(&k, 14_000, 5.0);
        let v = h.view(&k).unwrap();
        assert_eq!(v.fine.len(), 5);
        assert!(v.fine[2].1.is_nan() && v.fine[3].1.is_nan());
        assert_eq!(v.fine[4], (14_000, 5.0));
        // Bucket [10 s, 12 s) done: max 3, mean 2 (exact in bf16); [12 s, 14 s) empty.
        assert_eq!(v.coarse[0], (10_000, 3.0, 2.0));
        assert!(v.coarse[1].1.is_nan());
    }

    #[test]
    fn bf16_keeps_three_significant_digits() {
        for v in [0.0f32, 1.0, 0.3333, 123_456_789.0, -42.5, 1e-6] {
            let back = Bf16::pack(v).unpack();
            assert!((back - v).abs() <= v.abs() * 0.004, "{v} -> {back}");
        }
        assert!(Bf16::pack(f32::NAN).unpack().is_nan());
    }

    #[test]
    fn stale_series_are_dropped() {
        let mut h = History::new(1000, 10, 60, 10);
        h.record(&key("old"), 1_000, 1.0);
        h.record(&key("new"), 100_000, 1.0);
        assert_eq!(h.drop_stale(100_000, 50_000), 1);
        assert_eq!(h.keys().collect::<Vec<_>>(), vec![&key("new")]);
    }

    #[test]
    fn a_gone_containers_series_are_dropped_at_once() {
        let mut h = History::new(1000, 10, 60, 10);
        let of =
            |name: &str, cgroup: &str| SeriesKey::new(name, vec![("cgroup".into(), cgroup.into())]);
        h.record(&of("cpu", "/a"), 1_000, 1.0);
        h.record(&of("memory", "/a"), 1_000, 1.0);
        h.record(&of("cpu", "/b"), 1_000, 1.0);
        let node = SeriesKey::new("node", vec![]);
        h.record(&node, 1_000, 1.0);
        assert_eq!(h.drop_cgroups(&[]), 0);
        assert_eq!(h.drop_cgroups(&["/a".to_string()]), 2);
        let mut left: Vec<_> = h.keys().cloned().collect();
        left.sort();
        assert_eq!(left, vec![of("cpu", "/b"), node]);
    }

    #[test]
    fn encode_decode_round_trip() {
        let mut h = History::new(1000, 100, 10, 50);
        for s in 0..3 {
            let k = key(&format!("s{s}"));
            for i in 0..250u64 {
                h.record(&k, 5_000_000 + i * 1000, (i * (s + 1)) as f64);
            }
        }
        let bytes = h.encode();
        let mut back = History::new(1000, 100, 10, 50);
        assert_eq!(back.decode_into(&bytes).unwrap(), 3);
        for k in h.keys() {
            assert_eq!(format!("{:?}", back.view(k)), format!("{:?}", h.view(k)));
        }
        assert_eq!(back.encode(), bytes);
        // Smaller rings keep the newest points.
        let mut small = History::new(1000, 10, 10, 5);
        small.decode_into(&bytes).unwrap();
        let v = small.view(&key("s0")).unwrap();
        assert_eq!(v.fine.len(), 10);
        assert_eq!(v.fine.last(), Some(&(5_249_000, 249.0)));
        // Truncated input is an error, not a panic.
        for cut in [0, 5, 30, bytes.len() - 1] {
            assert!(
                History::new(1000, 10, 10, 5)
                    .decode_into(&bytes[..cut])
                    .is_err()
            );
        }
    }
}
