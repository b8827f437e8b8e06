//! A replayable trace: a `timestamp_s,value` series with a fixed step, read once and looked up by
//! trace time (looping at the end). Parsing only; it never reads a clock or a file it was not given.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot read trace {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("trace {origin}, line {line}: {what}")]
    Parse {
        origin: String,
        line: usize,
        what: String,
    },
    #[error("trace {origin}: {what}")]
    Shape { origin: String, what: String },
}

#[derive(Debug, Clone)]
pub struct Trace {
    pub name: String,
    /// Seconds between points.
    pub step_s: f64,
    pub values: Vec<f64>,
    /// The 99th percentile of the values: what "full load" means when the series is scaled.
    pub p99: f64,
}

impl Trace {
    pub fn from_file(path: &Path) -> Result<Trace, TraceError> {
        let text = std::fs::read_to_string(path).map_err(|source| TraceError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "trace".into());
        Trace::parse(&name, &path.display().to_string(), &text)
    }

    /// Parses `timestamp_s,value` lines (a header line is allowed); `origin` names the source in
    /// errors.
    pub fn parse(name: &str, origin: &str, text: &str) -> Result<Trace, TraceError> {
        let mut times = Vec::new();
        let mut values = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || (i == 0 && line.starts_with("timestamp")) {
                continue;
            }
            let err = |what: String| TraceError::Parse {
                origin: origin.to_string(),
                line: i + 1,
                what,
            };
            let (t, v) = line
                .split_once(',')
                .ok_or_else(|| err(format!("expected `timestamp_s,value`, found {line:?}")))?;
            let t: f64 = t
                .trim()
                .parse()
                .map_err(|_| err(format!("timestamp {t:?} is not a number")))?;
            let v: f64 = v
                .trim()
                .parse()
                .map_err(|_| err(format!("value {v:?} is not a number")))?;
            if !t.is_finite() || !v.is_finite() {
                return Err(err("timestamp and value must be finite".into()));
            }
            times.push(t);
            values.push(v.max(0.0));
        }
        let shape = |what: &str| TraceError::Shape {
            origin: origin.to_string(),
            what: what.to_string(),
        };
        if values.len() < 2 {
            return Err(shape("needs at least two points"));
        }
        let step_s = times[1] - times[0];
        if step_s <= 0.0 {
            return Err(shape("timestamps must increase"));
        }
        let mut sorted = values.clone();
        sorted.sort_by(f64::total_cmp);
        let p99 = sorted[((sorted.len() - 1) as f64 * 0.99).round() as usize];
        Ok(Trace {
            name: name.to_string(),
            step_s,
            values,
            p99: if p99 > 0.0 { p99 } else { 1.0 },
        })
    }

    /// Length of one loop, seconds of trace time.
    #[cfg(test)]
    pub fn span_s(&self) -> f64 {
        self.step_s * self.values.len() as f64
    }

    /// Value at trace time `t` seconds from the start, looping; linear between points so an
    /// accelerated replay does not jump in steps.
    pub fn at(&self, t: f64) -> f64 {
        let n = self.values.len();
        let pos = (t / self.step_s).rem_euclid(n as f64);
        let i = (pos.floor() as usize).min(n - 1);
        let frac = pos - i as f64;
        let a = self.values[i];
        let b = self.values[(i + 1) % n];
        a + (b - a) * frac
    }

    /// Value at `t` relative to the trace's 99th percentile (about 0..1, above 1 at peaks).
    pub fn load(&self, t: f64) -> f64 {
        self.at(t) / self.p99
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_loops_and_interpolates() {
        let t = Trace::parse("x", "x.csv", "timestamp_s,value\n100,0\n110,10\n120,20\n").unwrap();
        assert_eq!(t.step_s, 10.0);
        assert_eq!(t.span_s(), 30.0);
        assert_eq!(t.at(0.0), 0.0);
        assert_eq!(t.at(5.0), 5.0);
        assert_eq!(t.at(20.0), 20.0);
        // Past the last point it runs back to the first, then loops.
        assert_eq!(t.at(25.0), 10.0);
        assert_eq!(t.at(35.0), 5.0);
        assert_eq!(t.p99, 20.0);
    }

    #[test]
    fn bad_input_names_file_and_line() {
        let e = Trace::parse("x", "x.csv", "0,1\n1,abc\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "trace x.csv, line 2: value \"abc\" is not a number"
        );
        let e = Trace::parse("x", "x.csv", "0,1\n").unwrap_err();
        assert!(e.to_string().contains("at least two points"), "{e}");
        let e = Trace::parse("x", "x.csv", "5,1\n5,2\n").unwrap_err();
        assert!(e.to_string().contains("increase"), "{e}");
    }
}
