//! One parser per cgroup file format. Each takes the file's text and the name to give in an
//! error; none reads a file or allocates unless the text is malformed.

/// A file whose text is not in the format its name promises.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file} holds {found:?}: {what}")]
pub struct Malformed {
    pub file: String,
    /// The offending text (the line, where the format is line by line), cut to 80 bytes.
    pub found: String,
    pub what: &'static str,
}

fn malformed(file: &str, found: &str, what: &'static str) -> Malformed {
    let mut end = found.len().min(80);
    while !found.is_char_boundary(end) {
        end -= 1;
    }
    Malformed {
        file: file.to_string(),
        found: found[..end].to_string(),
        what,
    }
}

/// A v1 limit at or above this is the kernel's "unlimited" (`PAGE_COUNTER_MAX` in bytes is
/// just under 2^63); no machine has 4 EiB of memory.
pub const UNLIMITED_BYTES: u64 = 1 << 62;

/// The kernel refuses a CFS quota below 1 ms.
pub const MIN_QUOTA_US: u64 = 1000;

/// One unsigned number (`memory.current`, `cpuacct.usage`, `pids.current`, `cpu.weight`, ...).
pub fn number(file: &str, text: &str) -> Result<u64, Malformed> {
    let t = text.trim();
    t.parse()
        .map_err(|_| malformed(file, t, "expected one unsigned integer"))
}

/// A byte limit (`memory.max`, `memory.high`, `memory.limit_in_bytes`, ...): `None` when
/// unlimited, written `max` on v2 and as a number at or above [`UNLIMITED_BYTES`] on v1.
pub fn limit(file: &str, text: &str) -> Result<Option<u64>, Malformed> {
    let t = text.trim();
    if t == "max" {
        return Ok(None);
    }
    let v: u64 = t
        .parse()
        .map_err(|_| malformed(file, t, "expected `max` or an unsigned integer"))?;
    Ok((v < UNLIMITED_BYTES).then_some(v))
}

/// A CPU limit: quota (`None` = unlimited) per period, both in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuLimit {
    pub quota_us: Option<u64>,
    pub period_us: u64,
}

impl CpuLimit {
    /// `cores` per period, rounded to a microsecond and raised to the kernel's minimum.
    pub fn from_cores(cores: f64, period_us: u64) -> CpuLimit {
        let quota = ((cores * period_us as f64).round() as u64).max(MIN_QUOTA_US);
        CpuLimit {
            quota_us: Some(quota),
            period_us,
        }
    }

    /// The quota in cores; `None` when unlimited.
    pub fn cores(&self) -> Option<f64> {
        self.quota_us.map(|q| q as f64 / self.period_us as f64)
    }
}

/// v2 `cpu.max`: `<quota|max> <period>`.
pub fn cpu_max(text: &str) -> Result<CpuLimit, Malformed> {
    let file = super::v2::CPU_MAX;
    let t = text.trim();
    let mut it = t.split_ascii_whitespace();
    let (Some(quota), Some(period), None) = (it.next(), it.next(), it.next()) else {
        return Err(malformed(file, t, "expected `<quota|max> <period>`"));
    };
    let period_us = period_of(file, t, period)?;
    let quota_us = match quota {
        "max" => None,
        q => Some(
            q.parse()
                .map_err(|_| malformed(file, t, "the quota is neither `max` nor an integer"))?,
        ),
    };
    Ok(CpuLimit {
        quota_us,
        period_us,
    })
}

/// v1 `cpu.cfs_quota_us`: microseconds, or -1 (any value below 1) for no limit.
pub fn cfs_quota(text: &str) -> Result<Option<u64>, Malformed> {
    let t = text.trim();
    let q: i64 = t.parse().map_err(|_| {
        malformed(
            super::v1::CPU_CFS_QUOTA_US,
            t,
            "expected an integer (-1: no limit)",
        )
    })?;
    Ok((q > 0).then_some(q as u64))
}

/// v1 `cpu.cfs_period_us`: microseconds, above zero.
pub fn cfs_period(text: &str) -> Result<u64, Malformed> {
    let t = text.trim();
    period_of(super::v1::CPU_CFS_PERIOD_US, t, t)
}

fn period_of(file: &str, found: &str, period: &str) -> Result<u64, Malformed> {
    match period.parse::<u64>() {
        Ok(p) if p > 0 => Ok(p),
        Ok(_) => Err(malformed(file, found, "the period is zero")),
        Err(_) => Err(malformed(
            file,
            found,
            "the period is not an unsigned integer",
        )),
    }
}

/// A flat keyed file (`cpu.stat`, `memory.stat`, `memory.events`, `memory.oom_control`): one
/// `<key> <unsigned integer>` per line. Sets `out[i]` to the value of `keys[i]` (keys absent
/// from the text are left alone; kernels differ in which they have) and reads every line even
/// past a malformed one, which is then the error returned.
pub fn keyed(
    file: &str,
    text: &str,
    keys: &[&str],
    out: &mut [Option<u64>],
) -> Result<(), Malformed> {
    let mut first_error = None;
    for line in text.lines() {
        let mut it = line.split_ascii_whitespace();
        let (k, v) = match (it.next(), it.next(), it.next()) {
            (None, ..) => continue,
            (Some(k), Some(v), None) => (k, v),
            _ => {
                first_error
                    .get_or_insert_with(|| malformed(file, line, "expected `<key> <value>`"));
                continue;
            }
        };
        if let Some(i) = keys.iter().position(|key| *key == k) {
            match v.parse() {
                Ok(n) => out[i] = Some(n),
                Err(_) => {
                    first_error.get_or_insert_with(|| {
                        malformed(file, line, "the value is not an unsigned integer")
                    });
                }
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Stall totals of a pressure (PSI) file, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Psi {
    pub some_us: u64,
    /// Absent from `cpu.pressure` before Linux 5.13.
    pub full_us: Option<u64>,
}

/// A PSI file (`cpu.pressure`, `/proc/pressure/memory`, ...): a `some` line and, for most
/// resources, a `full` line, each `avg10=.. avg60=.. avg300=.. total=<usec>`. Other lines are
/// skipped, as later kernels may add some.
pub fn pressure(file: &str, text: &str) -> Result<Psi, Malformed> {
    let (mut some, mut full) = (None, None);
    for line in text.lines() {
        let mut it = line.split_ascii_whitespace();
        let slot = match it.next() {
            Some("some") => &mut some,
            Some("full") => &mut full,
            _ => continue,
        };
        let total = it
            .find_map(|f| f.strip_prefix("total="))
            .and_then(|t| t.parse::<u64>().ok())
            .ok_or_else(|| malformed(file, line, "no `total=<unsigned integer>`"))?;
        *slot = Some(total);
    }
    let some_us = some.ok_or_else(|| malformed(file, text.trim(), "no `some` line"))?;
    Ok(Psi {
        some_us,
        full_us: full,
    })
}
