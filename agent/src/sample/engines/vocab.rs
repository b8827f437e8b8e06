//! One vocabulary over the inference engines' own metrics: which engine a `/metrics` body comes
//! from, the families each engine's signals are read from, and the interval arithmetic
//! (counter deltas as rates, histogram deltas as quantiles) between two scrapes.
//! `docs/engines.md` is the human-readable form of [`MAPPINGS`]; keep them together.

use serde::Serialize;

use super::prom::{self, Histogram};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    #[serde(rename = "llamacpp")]
    LlamaCpp,
    Vllm,
    Sglang,
    Tgi,
    Triton,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::LlamaCpp => "llamacpp",
            EngineKind::Vllm => "vllm",
            EngineKind::Sglang => "sglang",
            EngineKind::Tgi => "tgi",
            EngineKind::Triton => "triton",
        }
    }
}

/// A gauge or counter read as the sum of samples named `.0` whose labels hold `.1`.
type Sample = (&'static str, &'static [(&'static str, &'static str)]);

/// Where one engine's signals are. Each entry lists alternatives, first present wins (engines
/// renamed families between versions).
pub struct Mapping {
    pub kind: EngineKind,
    /// Family-name prefix that identifies the engine in a body.
    pub prefix: &'static str,
    pub waiting: &'static [Sample],
    pub running: &'static [Sample],
    /// KV-cache usage as a ratio in [0, 1]; `kv_used_of` reads it as used / total instead.
    pub kv_ratio: &'static [Sample],
    pub kv_used_of: Option<(Sample, Sample)>,
    pub prompt_tokens: &'static [Sample],
    pub generated_tokens: &'static [Sample],
    pub preemptions: &'static [Sample],
    /// Histogram base names and the factor that turns their bounds into seconds.
    pub ttft: &'static [(&'static str, f64)],
    pub itl: &'static [(&'static str, f64)],
}

const NONE: &[Sample] = &[];

pub const MAPPINGS: [Mapping; 5] = [
    Mapping {
        kind: EngineKind::Vllm,
        prefix: "vllm:",
        waiting: &[("vllm:num_requests_waiting", &[])],
        running: &[("vllm:num_requests_running", &[])],
        // `_perc` is a ratio in [0, 1] despite its name; V1 renamed it.
        kv_ratio: &[
            ("vllm:kv_cache_usage_perc", &[]),
            ("vllm:gpu_cache_usage_perc", &[]),
        ],
        kv_used_of: None,
        prompt_tokens: &[("vllm:prompt_tokens_total", &[])],
        generated_tokens: &[("vllm:generation_tokens_total", &[])],
        preemptions: &[("vllm:num_preemptions_total", &[])],
        ttft: &[("vllm:time_to_first_token_seconds", 1.0)],
        itl: &[
            ("vllm:inter_token_latency_seconds", 1.0),
            ("vllm:time_per_output_token_seconds", 1.0),
        ],
    },
    Mapping {
        kind: EngineKind::LlamaCpp,
        prefix: "llamacpp:",
        waiting: &[("llamacpp:requests_deferred", &[])],
        running: &[("llamacpp:requests_processing", &[])],
        kv_ratio: &[("llamacpp:kv_cache_usage_ratio", &[])],
        kv_used_of: None,
        prompt_tokens: &[("llamacpp:prompt_tokens_total", &[])],
        generated_tokens: &[("llamacpp:tokens_predicted_total", &[])],
        preemptions: NONE,
        // llama-server exports no latency histogram.
        ttft: &[],
        itl: &[],
    },
    Mapping {
        kind: EngineKind::Sglang,
        prefix: "sglang:",
        waiting: &[("sglang:num_queue_reqs", &[])],
        running: &[("sglang:num_running_reqs", &[])],
        kv_ratio: &[("sglang:token_usage", &[])],
        kv_used_of: None,
        prompt_tokens: &[("sglang:prompt_tokens_total", &[])],
        generated_tokens: &[("sglang:generation_tokens_total", &[])],
        preemptions: NONE,
        ttft: &[("sglang:time_to_first_token_seconds", 1.0)],
        itl: &[
            ("sglang:inter_token_latency_seconds", 1.0),
            ("sglang:time_per_output_token_seconds", 1.0),
        ],
    },
    Mapping {
        kind: EngineKind::Tgi,
        prefix: "tgi_",
        waiting: &[("tgi_queue_size", &[])],
        running: &[("tgi_batch_current_size", &[])],
        kv_ratio: NONE,
        kv_used_of: None,
        // Histogram sums: they grow when a request finishes, not token by token.
        prompt_tokens: &[("tgi_request_input_length_sum", &[])],
        generated_tokens: &[("tgi_request_generated_tokens_sum", &[])],
        preemptions: NONE,
        ttft: &[],
        // A histogram of each request's mean time per token.
        itl: &[("tgi_request_mean_time_per_token_duration", 1.0)],
    },
    Mapping {
        kind: EngineKind::Triton,
        prefix: "nv_inference_",
        waiting: &[("nv_inference_pending_request_count", &[])],
        running: NONE,
        kv_ratio: NONE,
        // The TensorRT-LLM backend's KV blocks.
        kv_used_of: Some((
            (
                "nv_trt_llm_kv_cache_block_metrics",
                &[("kv_cache_block_type", "used")],
            ),
            (
                "nv_trt_llm_kv_cache_block_metrics",
                &[("kv_cache_block_type", "max")],
            ),
        )),
        prompt_tokens: NONE,
        generated_tokens: NONE,
        preemptions: NONE,
        ttft: &[("nv_inference_first_response_histogram_ms", 1e-3)],
        itl: &[],
    },
];

/// The engine a body comes from: the first line (sample or metadata) that starts with one of
/// the engines' prefixes names it; the rest of the body is not read. `None`: not an inference
/// engine (or one this agent does not know).
pub fn detect(body: &str) -> Option<EngineKind> {
    body.lines().find_map(|line| {
        let name = line
            .strip_prefix("# TYPE ")
            .or_else(|| line.strip_prefix("# HELP "))
            .unwrap_or(line);
        MAPPINGS
            .iter()
            .find(|m| name.starts_with(m.prefix))
            .map(|m| m.kind)
    })
}

pub fn mapping(kind: EngineKind) -> &'static Mapping {
    // MAPPINGS holds every kind exactly once.
    MAPPINGS
        .iter()
        .find(|m| m.kind == kind)
        .unwrap_or(&MAPPINGS[0])
}

/// One scrape in the common vocabulary: gauges as read, counters and histograms cumulative.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    pub waiting: Option<f64>,
    pub running: Option<f64>,
    pub kv_cache_usage_ratio: Option<f64>,
    pub prompt_tokens: Option<f64>,
    pub generated_tokens: Option<f64>,
    pub preemptions: Option<f64>,
    pub ttft: Option<Histogram>,
    pub itl: Option<Histogram>,
}

impl Reading {
    pub fn parse(kind: EngineKind, body: &str) -> Reading {
        let m = mapping(kind);
        let e = prom::parse(body, |name| wanted(m, name));
        let first = |alts: &[Sample]| alts.iter().find_map(|(n, l)| e.sum(n, l));
        let hist = |alts: &[(&str, f64)]| alts.iter().find_map(|(n, s)| e.histogram(n, *s));
        let kv = first(m.kv_ratio).or_else(|| {
            let ((un, ul), (tn, tl)) = m.kv_used_of?;
            let (used, total) = (e.sum(un, ul)?, e.sum(tn, tl)?);
            (total > 0.0).then(|| used / total)
        });
        Reading {
            waiting: first(m.waiting),
            running: first(m.running),
            kv_cache_usage_ratio: kv.map(|v| v.clamp(0.0, 1.0)),
            prompt_tokens: first(m.prompt_tokens),
            generated_tokens: first(m.generated_tokens),
            preemptions: first(m.preemptions),
            ttft: hist(m.ttft),
            itl: hist(m.itl),
        }
    }
}

fn wanted(m: &Mapping, name: &str) -> bool {
    let plain = |alts: &[Sample]| alts.iter().any(|(n, _)| *n == name);
    let hist = |alts: &[(&str, f64)]| {
        alts.iter().any(|(base, _)| {
            name.strip_prefix(base)
                .is_some_and(|s| s == "_bucket" || s == "_sum" || s == "_count")
        })
    };
    plain(m.waiting)
        || plain(m.running)
        || plain(m.kv_ratio)
        || m.kv_used_of
            .is_some_and(|((u, _), (t, _))| u == name || t == name)
        || plain(m.prompt_tokens)
        || plain(m.generated_tokens)
        || plain(m.preemptions)
        || hist(m.ttft)
        || hist(m.itl)
}

/// Quantile levels reported for the latency histograms.
pub const QUANTILES: [f64; 3] = [0.5, 0.9, 0.99];

/// What one interval between two scrapes says, in the common vocabulary.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Signals {
    pub requests_waiting: Option<f64>,
    pub requests_running: Option<f64>,
    pub kv_cache_usage_ratio: Option<f64>,
    pub prompt_tokens_per_second: Option<f64>,
    pub generated_tokens_per_second: Option<f64>,
    pub preemptions_per_second: Option<f64>,
    /// The engine's own cumulative counters, as last read.
    pub prompt_tokens_total: Option<f64>,
    pub generated_tokens_total: Option<f64>,
    pub preemptions_total: Option<f64>,
    /// Quantiles at [`QUANTILES`] of the requests whose first token (or whose tokens, for ITL)
    /// came in this interval; `None` when none did.
    pub ttft_seconds: Option<[f64; 3]>,
    pub itl_seconds: Option<[f64; 3]>,
    /// Observations behind those quantiles.
    pub ttft_observations: f64,
    pub itl_observations: f64,
}

/// Increase of a counter; a decrease is an engine restart, whose new count all happened since.
fn increase(now: Option<f64>, before: Option<f64>) -> Option<f64> {
    let now = now?;
    let before = before?;
    Some(if now >= before { now - before } else { now })
}

fn quantiles(h: &Histogram) -> Option<[f64; 3]> {
    Some([
        h.quantile(QUANTILES[0])?,
        h.quantile(QUANTILES[1])?,
        h.quantile(QUANTILES[2])?,
    ])
}

/// The interval from `before` to `now`, `dt` seconds apart. Without `before` (the first scrape)
/// only gauges and totals are known.
pub fn signals(now: &Reading, before: Option<&Reading>, dt: f64) -> Signals {
    let rate = |n: Option<f64>, b: Option<f64>| {
        before
            .and(increase(n, b))
            .filter(|_| dt > 0.0)
            .map(|d| d / dt)
    };
    let b = before.cloned().unwrap_or_default();
    let delta = |n: &Option<Histogram>, b: &Option<Histogram>| match (n, b) {
        (Some(n), Some(b)) => n.since(b),
        _ => None,
    };
    let ttft = before.and_then(|_| delta(&now.ttft, &b.ttft));
    let itl = before.and_then(|_| delta(&now.itl, &b.itl));
    Signals {
        requests_waiting: now.waiting,
        requests_running: now.running,
        kv_cache_usage_ratio: now.kv_cache_usage_ratio,
        prompt_tokens_per_second: rate(now.prompt_tokens, b.prompt_tokens),
        generated_tokens_per_second: rate(now.generated_tokens, b.generated_tokens),
        preemptions_per_second: rate(now.preemptions, b.preemptions),
        prompt_tokens_total: now.prompt_tokens,
        generated_tokens_total: now.generated_tokens,
        preemptions_total: now.preemptions,
        ttft_seconds: ttft.as_ref().and_then(quantiles),
        itl_seconds: itl.as_ref().and_then(quantiles),
        ttft_observations: ttft.as_ref().map_or(0.0, Histogram::count),
        itl_observations: itl.as_ref().map_or(0.0, Histogram::count),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMACPP: &str = include_str!("fixtures/llamacpp.txt");
    const VLLM_A: &str = include_str!("fixtures/vllm_a.txt");
    const VLLM_B: &str = include_str!("fixtures/vllm_b.txt");
    const SGLANG: &str = include_str!("fixtures/sglang.txt");
    const TGI: &str = include_str!("fixtures/tgi.txt");
    const TRITON: &str = include_str!("fixtures/triton.txt");

    #[test]
    fn engines_are_told_apart() {
        assert_eq!(detect(LLAMACPP), Some(EngineKind::LlamaCpp));
        assert_eq!(detect(VLLM_A), Some(EngineKind::Vllm));
        assert_eq!(detect(SGLANG), Some(EngineKind::Sglang));
        assert_eq!(detect(TGI), Some(EngineKind::Tgi));
        assert_eq!(detect(TRITON), Some(EngineKind::Triton));
        assert_eq!(
            detect(
                "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 3\nhttp_requests_total 4\n"
            ),
            None
        );
        assert_eq!(detect("garbage\u{0}\u{1}{{{"), None);
    }

    #[test]
    fn llamacpp_maps_its_gauges_and_counters() {
        let r = Reading::parse(EngineKind::LlamaCpp, LLAMACPP);
        assert_eq!(r.waiting, Some(4.0));
        assert_eq!(r.running, Some(2.0));
        assert_eq!(r.kv_cache_usage_ratio, Some(0.123));
        assert_eq!(r.prompt_tokens, Some(1234.0));
        assert_eq!(r.generated_tokens, Some(5678.0));
        assert_eq!(r.preemptions, None);
        assert_eq!(r.ttft, None);
    }

    #[test]
    fn vllm_interval_rates_and_latency_quantiles() {
        let a = Reading::parse(EngineKind::Vllm, VLLM_A);
        let b = Reading::parse(EngineKind::Vllm, VLLM_B);
        assert_eq!(b.waiting, Some(7.0));
        assert_eq!(b.running, Some(12.0));
        assert_eq!(b.kv_cache_usage_ratio, Some(0.62));
        let s = signals(&b, Some(&a), 2.0);
        assert_eq!(s.generated_tokens_per_second, Some(400.0));
        assert_eq!(s.prompt_tokens_per_second, Some(1000.0));
        assert_eq!(s.preemptions_per_second, Some(0.5));
        // Ten first tokens in the interval: 4 in (0.02, 0.04] s, 4 in (0.04, 0.06], 2 in (0.06, 0.08]. The
        // lifetime histogram (mostly fast requests) would say otherwise.
        assert_eq!(s.ttft_observations, 10.0);
        let [p50, p90, p99] = s.ttft_seconds.expect("ttft");
        assert!((p50 - 0.045).abs() < 1e-9, "{p50}");
        assert!((p90 - 0.07).abs() < 1e-9, "{p90}");
        assert!((p99 - 0.079).abs() < 1e-9, "{p99}");
        let lifetime = b.ttft.as_ref().expect("ttft").quantile(0.5).expect("q");
        assert!(lifetime < 0.04, "{lifetime}");
        assert!(s.itl_seconds.is_some());
        let first = signals(&a, None, 0.0);
        assert_eq!(first.generated_tokens_per_second, None);
        assert_eq!(first.generated_tokens_total, Some(1000.0));
        assert_eq!(first.ttft_seconds, None);
    }

    #[test]
    fn sglang_tgi_triton_map() {
        let s = Reading::parse(EngineKind::Sglang, SGLANG);
        assert_eq!((s.waiting, s.running), (Some(3.0), Some(8.0)));
        assert_eq!(s.kv_cache_usage_ratio, Some(0.41));
        assert_eq!(s.generated_tokens, Some(9000.0));
        assert!(s.ttft.is_some() && s.itl.is_some());
        let t = Reading::parse(EngineKind::Tgi, TGI);
        assert_eq!((t.waiting, t.running), (Some(5.0), Some(4.0)));
        assert_eq!(t.kv_cache_usage_ratio, None);
        assert_eq!(t.generated_tokens, Some(2048.0));
        assert_eq!(t.prompt_tokens, Some(512.0));
        assert!(t.itl.is_some());
        let n = Reading::parse(EngineKind::Triton, TRITON);
        assert_eq!(n.waiting, Some(6.0), "summed over models");
        assert_eq!(n.kv_cache_usage_ratio, Some(0.25));
        let ttft = n.ttft.expect("first-response histogram");
        assert_eq!(ttft.buckets[0].0, 0.1, "milliseconds read as seconds");
    }

    #[test]
    fn counter_reset_counts_from_zero() {
        let before = Reading {
            generated_tokens: Some(500.0),
            ..Default::default()
        };
        let now = Reading {
            generated_tokens: Some(30.0),
            ..Default::default()
        };
        let s = signals(&now, Some(&before), 1.0);
        assert_eq!(s.generated_tokens_per_second, Some(30.0));
    }
}
