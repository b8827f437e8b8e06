//! Adapter between the eBPF probes (`headroom-ebpf`) and the agent: loads them once, reads their
//! histograms each tick into an [`EbpfSnapshot`] (cumulative histograms for Prometheus, windowed
//! rate/p50/p99 for history), and reports which programs run and why others do not. It never
//! fails the agent: without privilege or kernel support it logs once and samples nothing. It
//! never maps cgroup ids to containers itself; callers pass that mapping in.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use headroom_ebpf::hist::coarse_bounds_ns;
use headroom_ebpf::{
    Histogram, Options, Probes, ProgramStatus, REQUEST_LATENCY, RUNQUEUE_DELAY, RequestKey,
};
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use serde::Serialize;

use crate::config::EbpfConfig;

pub use headroom_ebpf::cgroup_id_of;

/// Prometheus bucket range, as powers of two in nanoseconds: request latency 16 µs .. 34 s,
/// run-queue delay 1 µs .. 4.3 s (two bounds per power of two).
const REQUEST_EXP: (u32, u32) = (14, 35);
const RUNQUEUE_EXP: (u32, u32) = (10, 32);

/// A histogram whose count has not moved for this long is deleted from the kernel map, so the
/// bounded maps keep room as containers come and go.
const IDLE_FORGET: Duration = Duration::from_secs(15 * 60);

/// Per-program status for `/v1/status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EbpfStatus {
    pub enabled: bool,
    /// Which embedded object loaded: `local_storage`, or `compat` on kernels without
    /// task/socket storage maps; `None` when none did.
    pub object: Option<&'static str>,
    pub programs: Vec<ProgramStatus>,
    /// Events lost because a histogram map was full, per program, since start.
    pub dropped_events: HashMap<&'static str, u64>,
}

/// Rate and quantiles over the interval between two samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Window {
    pub seconds: f64,
    pub count: u64,
    pub rate_per_second: f64,
    pub p50_seconds: Option<f64>,
    pub p99_seconds: Option<f64>,
}

impl Window {
    fn of(delta: &Histogram, seconds: f64) -> Window {
        let count = delta.bucket_total();
        Window {
            seconds,
            count,
            rate_per_second: if seconds > 0.0 {
                count as f64 / seconds
            } else {
                0.0
            },
            p50_seconds: delta.quantile_seconds(0.5),
            p99_seconds: delta.quantile_seconds(0.99),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RequestRow {
    pub cgroup_id: u64,
    pub port: u16,
    /// Cumulative since the probes loaded (or since the key was last forgotten).
    #[serde(skip)]
    pub total: Histogram,
    /// Since the previous sample; `None` on the first sample of a key.
    pub window: Option<Window>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunqueueRow {
    pub cgroup_id: u64,
    #[serde(skip)]
    pub total: Histogram,
    pub window: Option<Window>,
}

/// One reading of the probes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EbpfSnapshot {
    /// Which programs run (and why others do not), and events lost to full maps.
    pub status: EbpfStatus,
    pub requests: Vec<RequestRow>,
    pub runqueue: Vec<RunqueueRow>,
    /// Why reading the maps failed this time, if it did.
    pub read_error: Option<String>,
}

/// Loads and reads the probes.
pub struct EbpfSampler {
    enabled: bool,
    probes: Probes,
    prev: Option<Instant>,
    prev_req: HashMap<RequestKey, (Histogram, Instant)>,
    prev_runq: HashMap<u64, (Histogram, Instant)>,
    dropped: (u64, u64),
    read_error_logged: bool,
}

impl std::fmt::Debug for EbpfSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfSampler")
            .field("enabled", &self.enabled)
            .field("probes", &self.probes)
            .finish()
    }
}

/// Loads through the configured loader process when there is one, in-process otherwise (and
/// when the loader process itself fails; what the kernel refuses is not such a failure).
fn load(cfg: &EbpfConfig, opts: &Options) -> Probes {
    let Some(exe) = cfg.loader.as_ref().filter(|_| cfg.enabled) else {
        return Probes::load(opts);
    };
    let mut command = std::process::Command::new(exe);
    command.arg("ebpf-loader");
    match headroom_ebpf::load_in_child(command, opts, LOADER_TIMEOUT) {
        Ok(probes) => probes,
        Err(e) => {
            tracing::warn!(error = %e, "eBPF loader process failed; loading in this process instead");
            Probes::load(opts)
        }
    }
}

/// Loading and verifying takes about a second; a loader stuck far longer than that is killed.
const LOADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl EbpfSampler {
    /// Never fails: programs the kernel refuses are logged once (by the probes crate) and
    /// reported down in [`EbpfSampler::status`].
    pub fn new(cfg: &EbpfConfig) -> EbpfSampler {
        let opts = Options {
            request_latency: cfg.enabled,
            runqueue_delay: cfg.enabled,
            ..Options::default()
        };
        if !cfg.enabled {
            tracing::info!(
                "eBPF disabled by configuration (ebpf.enabled = false); no request latency or run-queue delay"
            );
        }
        EbpfSampler {
            enabled: cfg.enabled,
            probes: load(cfg, &opts),
            prev: None,
            prev_req: HashMap::new(),
            prev_runq: HashMap::new(),
            dropped: (0, 0),
            read_error_logged: false,
        }
    }

    pub fn status(&self) -> EbpfStatus {
        EbpfStatus {
            enabled: self.enabled,
            object: self.probes.object(),
            programs: self.probes.status().to_vec(),
            dropped_events: dropped_map(self.dropped),
        }
    }

    /// Reads the maps: one walk per histogram key, no per-event work. Keys of cgroups that
    /// are not `container`s are deleted from the kernel as they are read: the agent reports
    /// nothing for them, and kept they would fill the maps (one 4 KiB histogram per port that
    /// any process on the node ever served) and the agent's memory.
    pub fn sample(&mut self, container: &dyn Fn(u64) -> bool) -> EbpfSnapshot {
        let now = Instant::now();
        let mut snap = EbpfSnapshot::default();
        let reading = match self.probes.read() {
            Ok(r) => {
                self.read_error_logged = false;
                r
            }
            Err(e) => {
                if !self.read_error_logged {
                    tracing::warn!(error = %e, "reading eBPF maps failed; request latency and run-queue delay are missing until it recovers");
                    self.read_error_logged = true;
                }
                snap.read_error = Some(e.to_string());
                snap.status = self.status();
                return snap;
            }
        };
        let since = self.prev.map(|t| now.duration_since(t).as_secs_f64());
        self.prev = Some(now);
        self.dropped = reading.dropped;
        snap.status = self.status();

        let mut forget_req = Vec::new();
        let mut next_req = HashMap::with_capacity(reading.request_latency.len());
        for (key, total) in reading.request_latency {
            if !container(key.cgroup_id) {
                forget_req.push(key);
                continue;
            }
            let (window, changed) = window_of(&total, self.prev_req.get(&key), since);
            let last_change = if changed {
                now
            } else {
                self.prev_req.get(&key).map_or(now, |p| p.1)
            };
            if now.duration_since(last_change) > IDLE_FORGET {
                forget_req.push(key);
                continue;
            }
            snap.requests.push(RequestRow {
                cgroup_id: key.cgroup_id,
                port: key.port,
                total: total.clone(),
                window,
            });
            next_req.insert(key, (total, last_change));
        }
        let mut forget_runq = Vec::new();
        let mut next_runq = HashMap::with_capacity(reading.runqueue_delay.len());
        for (id, total) in reading.runqueue_delay {
            if !container(id) {
                forget_runq.push(id);
                continue;
            }
            let (window, changed) = window_of(&total, self.prev_runq.get(&id), since);
            let last_change = if changed {
                now
            } else {
                self.prev_runq.get(&id).map_or(now, |p| p.1)
            };
            if now.duration_since(last_change) > IDLE_FORGET {
                forget_runq.push(id);
                continue;
            }
            snap.runqueue.push(RunqueueRow {
                cgroup_id: id,
                total: total.clone(),
                window,
            });
            next_runq.insert(id, (total, last_change));
        }
        self.prev_req = next_req;
        self.prev_runq = next_runq;
        if !forget_req.is_empty() || !forget_runq.is_empty() {
            match self.probes.forget(&forget_req, &forget_runq) {
                Ok(n) => tracing::debug!(
                    deleted = n,
                    "forgot eBPF histograms (idle, or of cgroups that are not containers)"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "deleting idle eBPF histograms failed; the maps may fill up")
                }
            }
        }
        snap.requests.sort_by_key(|r| (r.cgroup_id, r.port));
        snap.runqueue.sort_by_key(|r| r.cgroup_id);
        snap
    }
}

/// The window since `prev` (if any) and whether anything was added in it.
fn window_of(
    total: &Histogram,
    prev: Option<&(Histogram, Instant)>,
    since: Option<f64>,
) -> (Option<Window>, bool) {
    match (prev, since) {
        (Some((before, _)), Some(secs)) => {
            let delta = total.since(before);
            let changed = delta.bucket_total() > 0;
            (Some(Window::of(&delta, secs)), changed)
        }
        // A key that was absent at the previous sample was created since then (the maps only
        // grow between samples, or restart from zero after being forgotten): all of it is new.
        (None, Some(secs)) => (Some(Window::of(total, secs)), true),
        // The first sample after loading: what came before it has no known window.
        (_, None) => (None, true),
    }
}

fn dropped_map(d: (u64, u64)) -> HashMap<&'static str, u64> {
    HashMap::from([(REQUEST_LATENCY, d.0), (RUNQUEUE_DELAY, d.1)])
}

type Labels = Vec<(String, String)>;

fn histogram_family<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    exp: (u32, u32),
    rows: impl Iterator<Item = (Labels, &'a Histogram)>,
) -> std::fmt::Result {
    let mut rows = rows.peekable();
    if rows.peek().is_none() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in rows {
        let buckets = h.coarse_buckets(exp.0, exp.1);
        // `_count` is the bucket total, so it always equals the `+Inf` bucket.
        let count = buckets.iter().map(|b| b.1).sum();
        m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
            h.sum_ns as f64 / 1e9,
            count,
            &buckets,
            None,
        )?;
    }
    Ok(())
}

impl EbpfSnapshot {
    /// Writes `headroom_request_latency_seconds{<identity>,port}`,
    /// `headroom_runqueue_delay_seconds{<identity>}` for cgroups `ident` knows (others, such as
    /// system services and the root cgroup, are left out to bound cardinality), and
    /// `headroom_ebpf_program_up{program}`.
    pub fn encode(
        &self,
        enc: &mut DescriptorEncoder,
        ident: &dyn Fn(u64) -> Option<Vec<(String, String)>>,
    ) -> std::fmt::Result {
        debug_assert_eq!(coarse_bounds_ns(REQUEST_EXP.0, REQUEST_EXP.1).len(), 44);
        histogram_family(
            enc,
            "headroom_request_latency_seconds",
            "Time from a request's first bytes read to its response's first bytes sent, per container and local server port (eBPF).",
            REQUEST_EXP,
            self.requests.iter().filter_map(|r| {
                let mut l = ident(r.cgroup_id)?;
                l.push(("port".to_string(), r.port.to_string()));
                Some((l, &r.total))
            }),
        )?;
        histogram_family(
            enc,
            "headroom_runqueue_delay_seconds",
            "Time the container's threads spent runnable but waiting for a CPU, from wakeup or preemption to running (eBPF).",
            RUNQUEUE_EXP,
            self.runqueue
                .iter()
                .filter_map(|r| Some((ident(r.cgroup_id)?, &r.total))),
        )?;
        if self.status.enabled {
            let mut m = enc.encode_descriptor(
                "headroom_ebpf_dropped_events",
                "Events lost because a bounded eBPF histogram map was full.",
                None,
                MetricType::Counter,
            )?;
            for program in [REQUEST_LATENCY, RUNQUEUE_DELAY] {
                let n = self
                    .status
                    .dropped_events
                    .get(program)
                    .copied()
                    .unwrap_or(0);
                m.encode_family(&[("program", program)])?
                    .encode_counter::<NoLabelSet, u64, f64>(&n, None)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "headroom_ebpf_program_up",
            "1 when the eBPF program is attached, 0 when the kernel refused every way in the chain or it is disabled.",
            None,
            MetricType::Gauge,
        )?;
        for program in [REQUEST_LATENCY, RUNQUEUE_DELAY] {
            let up = self
                .status
                .programs
                .iter()
                .any(|s| s.program == program && s.up());
            m.encode_family(&[("program", program)])?
                .encode_gauge(&i64::from(up))?;
        }
        Ok(())
    }

    /// History values for containers `ident` knows: `container_request_rate_per_second`,
    /// `container_request_latency_p50_seconds`, `container_request_latency_p99_seconds` (per
    /// container and port) and `container_runqueue_delay_p99_seconds`, all over the last
    /// sampling interval. The rate is written even when zero; quantiles only when there were
    /// events.
    pub fn series(
        &self,
        ident: &dyn Fn(u64) -> Option<Vec<(String, String)>>,
    ) -> Vec<(String, Labels, f64)> {
        let mut out = Vec::new();
        for r in &self.requests {
            let (Some(w), Some(mut labels)) = (r.window, ident(r.cgroup_id)) else {
                continue;
            };
            labels.push(("port".to_string(), r.port.to_string()));
            out.push((
                "container_request_rate_per_second".to_string(),
                labels.clone(),
                w.rate_per_second,
            ));
            if let Some(p) = w.p50_seconds {
                out.push((
                    "container_request_latency_p50_seconds".to_string(),
                    labels.clone(),
                    p,
                ));
            }
            if let Some(p) = w.p99_seconds {
                out.push((
                    "container_request_latency_p99_seconds".to_string(),
                    labels,
                    p,
                ));
            }
        }
        for r in &self.runqueue {
            let (Some(w), Some(labels)) = (r.window, ident(r.cgroup_id)) else {
                continue;
            };
            if let Some(p) = w.p99_seconds {
                out.push((
                    "container_runqueue_delay_p99_seconds".to_string(),
                    labels,
                    p,
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> EbpfSnapshot {
        let total =
            Histogram::from_values((0..100).map(|i| if i < 90 { 2_000_000 } else { 50_000_000 }));
        let window = Some(Window::of(&total, 2.0));
        let attempt = |ok: bool| headroom_ebpf::AttachAttempt {
            attach: headroom_ebpf::Attach::TpBtf,
            result: if ok {
                "attached".into()
            } else {
                "refused: test".into()
            },
        };
        EbpfSnapshot {
            status: EbpfStatus {
                enabled: true,
                object: Some("local_storage"),
                programs: vec![
                    ProgramStatus {
                        program: REQUEST_LATENCY,
                        attached: Some(headroom_ebpf::Attach::TpBtf),
                        attempts: vec![attempt(true)],
                    },
                    ProgramStatus {
                        program: RUNQUEUE_DELAY,
                        attached: None,
                        attempts: vec![attempt(false)],
                    },
                ],
                dropped_events: HashMap::from([(REQUEST_LATENCY, 3)]),
            },
            requests: vec![
                RequestRow {
                    cgroup_id: 7,
                    port: 8080,
                    total: total.clone(),
                    window,
                },
                RequestRow {
                    cgroup_id: 1,
                    port: 22,
                    total: total.clone(),
                    window,
                },
            ],
            runqueue: vec![RunqueueRow {
                cgroup_id: 7,
                total,
                window,
            }],
            read_error: None,
        }
    }

    fn ident(id: u64) -> Option<Vec<(String, String)>> {
        (id == 7).then(|| vec![("cgroup".to_string(), "/pod/a".to_string())])
    }

    #[test]
    fn encodes_histograms_for_known_containers_only() {
        struct C(EbpfSnapshot);
        impl std::fmt::Debug for C {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("C")
            }
        }
        impl prometheus_client::collector::Collector for C {
            fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
                self.0.encode(&mut enc, &ident)
            }
        }
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register_collector(Box::new(C(snapshot())));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).expect("encode");
        assert!(
            text.contains("# TYPE headroom_request_latency_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains(
                r#"headroom_request_latency_seconds_count{cgroup="/pod/a",port="8080"} 100"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"headroom_request_latency_seconds_bucket{le="+Inf",cgroup="/pod/a",port="8080"} 100"#)
            || text.contains(r#"headroom_request_latency_seconds_bucket{cgroup="/pod/a",port="8080",le="+Inf"} 100"#), "{text}");
        assert!(
            !text.contains(r#"port="22""#),
            "unknown cgroup leaked: {text}"
        );
        assert!(
            text.contains(r#"headroom_runqueue_delay_seconds_count{cgroup="/pod/a"} 100"#),
            "{text}"
        );
        assert!(
            text.contains(r#"headroom_ebpf_program_up{program="request_latency"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"headroom_ebpf_program_up{program="runqueue_delay"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"headroom_ebpf_dropped_events_total{program="request_latency"} 3"#),
            "{text}"
        );
        // 90 of 100 at 2 ms: the bucket with bound 3 ms (1.5 * 2^21 ns) holds them cumulatively.
        let le = format!("{}", (3u64 << 20) as f64 / 1e9);
        assert!(
            text.lines()
                .any(|l| l.starts_with("headroom_request_latency_seconds_bucket")
                    && l.contains(&format!("le=\"{le}\""))
                    && l.contains("8080")
                    && l.ends_with(" 90")),
            "{text}"
        );
    }

    #[test]
    fn series_carry_rate_and_quantiles_per_container_and_port() {
        let s = snapshot().series(&ident);
        let get = |name: &str| {
            s.iter()
                .find(|(n, _, _)| n == name)
                .map(|(_, l, v)| (l.clone(), *v))
        };
        let (labels, rate) = get("container_request_rate_per_second").expect("rate");
        assert_eq!(rate, 50.0);
        assert!(labels.contains(&("port".to_string(), "8080".to_string())));
        let (_, p50) = get("container_request_latency_p50_seconds").expect("p50");
        assert!((p50 - 0.002).abs() < 0.002 / 16.0, "{p50}");
        let (_, p99) = get("container_request_latency_p99_seconds").expect("p99");
        assert!((p99 - 0.050).abs() < 0.050 / 16.0, "{p99}");
        assert!(get("container_runqueue_delay_p99_seconds").is_some());
        assert_eq!(
            s.iter()
                .filter(|(n, _, _)| n == "container_request_rate_per_second")
                .count(),
            1,
            "unknown cgroup leaked"
        );
    }

    #[test]
    fn disabled_sampler_reports_programs_down_and_samples_nothing() {
        let mut s = EbpfSampler::new(&EbpfConfig {
            enabled: false,
            loader: None,
        });
        let snap = s.sample(&|_| true);
        assert!(snap.requests.is_empty() && snap.runqueue.is_empty());
        assert!(snap.status.programs.is_empty());
        assert!(!snap.status.enabled);
        assert!(!s.status().enabled);
    }
}
