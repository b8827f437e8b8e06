//! Regenerates docs/forecasting.md and its plots from the shared real traces:
//! `forecast-report TRACES_DIR OUT.md PLOTS_DIR` (see scripts/forecast-report.sh).
//! The file I/O lives here; every computation is the library's.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use headroom_models::backtest::{MODELS, lead_steps, parse_trace, run, scored_from, summarize};
use headroom_models::report::{Comparison, compare, geo_mean_ratio, svg_plot};

const BASELINES: [&str; 5] = [
    "reactive",
    "window-max",
    "vpa",
    "koordinator",
    "seasonal-naive",
];
const TARGETS: [f64; 3] = [0.01, 0.05, 0.10];
const LEAD_SECONDS: f64 = 60.0;
/// Traces plotted (relative paths) and how many final steps to show.
const PLOTS: [(&str, usize); 4] = [
    ("nasa_http_1995/series_jul_requests_per_min.csv", 1440),
    (
        "google_cluster_2011/series_job3418442_cpu_util_5min.csv",
        576,
    ),
    (
        "alibaba_genai_2026/series_cluster_qps_generative_57s.csv",
        400,
    ),
    ("mooncake_kimi_2025/series_requests_per_3s.csv", 400),
];

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}

fn traces(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for sub in rd {
        let sub = sub.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        if !sub.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&sub).map_err(|e| format!("{}: {e}", sub.display()))? {
            let f = f.map_err(|e| format!("{}: {e}", sub.display()))?.path();
            if f.extension().is_some_and(|x| x == "csv") {
                out.push(f);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn real_main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, out_md, plots] = args.as_slice() else {
        return Err("usage: forecast-report TRACES_DIR OUT.md PLOTS_DIR".into());
    };
    let dir = PathBuf::from(dir);
    let plots = PathBuf::from(plots);
    std::fs::create_dir_all(&plots).map_err(|e| format!("{}: {e}", plots.display()))?;
    let plots_rel = plots
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let files = traces(&dir)?;
    if files.is_empty() {
        return Err(format!("{}: no */*.csv traces", dir.display()));
    }
    let mut all: Vec<Vec<Comparison>> = vec![Vec::new(); TARGETS.len()];
    let mut per_trace = String::new();
    for f in &files {
        let rel = f
            .strip_prefix(&dir)
            .unwrap_or(f)
            .to_string_lossy()
            .to_string();
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let tr = parse_trace(&text).map_err(|e| format!("{}: {e}", f.display()))?;
        let lead = lead_steps(LEAD_SECONDS, tr.step);
        let n = tr.values.len();
        let from = scored_from(n, tr.step);
        let _ = writeln!(
            per_trace,
            "\n### `{rel}`\n\n{n} points, step {} s, lead {lead} step(s), scored steps {}–{} ({}).\n",
            tr.step,
            from,
            n - 1,
            n - from
        );
        let _ = writeln!(
            per_trace,
            "| model | {} |",
            TARGETS
                .map(|t| format!("violation / slack / slack at equal risk @ {t}"))
                .join(" | ")
        );
        let _ = writeln!(per_trace, "|---|{}", "---|".repeat(TARGETS.len()));
        let mut cells: Vec<Vec<String>> = vec![Vec::new(); MODELS.len()];
        for (ti, &target) in TARGETS.iter().enumerate() {
            let r = run(&tr, lead, target, &MODELS, &mut |_, _| {})
                .map_err(|e| format!("{}: {e}", f.display()))?;
            let sums = summarize(&tr, &r);
            let c = compare(&rel, &tr.values, &r, sums, from, target, &BASELINES)
                .ok_or_else(|| format!("{rel}: no default model in run"))?;
            for (m, name) in MODELS.iter().enumerate() {
                let s = &c.summaries[m];
                let eq = c
                    .slack_of(name)
                    .map_or("–".to_string(), |v| format!("{v:.3}"));
                cells[m].push(format!(
                    "{:.3} / {:.3} / {eq}",
                    s.violation_rate, s.relative_slack
                ));
            }
            if target == 0.05
                && let Some((_, show)) = PLOTS.iter().find(|(p, _)| *p == rel)
            {
                let lo = n.saturating_sub(*show).max(from);
                let di = r.models.iter().position(|m| *m == "default").unwrap_or(0);
                let vi = r.models.iter().position(|m| *m == "vpa").unwrap_or(0);
                let bi = r
                    .models
                    .iter()
                    .position(|m| *m == c.hindsight_best)
                    .unwrap_or(0);
                let best_label = format!("{} (as published)", c.hindsight_best);
                let svg = svg_plot(
                    &format!("{rel}: last {} steps, target violation 0.05", n - lo),
                    &tr.values,
                    &[
                        ("headroom default", &r.capacity[di]),
                        ("vpa (as published)", &r.capacity[vi]),
                        (&best_label, &r.capacity[bi]),
                    ],
                    lo,
                    n,
                );
                let name = rel.replace('/', "__").replace(".csv", ".svg");
                let p = plots.join(&name);
                std::fs::write(&p, svg).map_err(|e| format!("{}: {e}", p.display()))?;
                let _ = writeln!(per_trace, "![{rel}]({plots_rel}/{name})\n");
            }
            all[ti].push(c);
        }
        for (m, name) in MODELS.iter().enumerate() {
            let _ = writeln!(per_trace, "| {name} | {} |", cells[m].join(" | "));
        }
    }

    let mut md = String::new();
    md.push_str(HEAD);
    for (ti, &target) in TARGETS.iter().enumerate() {
        let rows: Vec<&Comparison> = all[ti].iter().filter(|c| c.scored >= 500).collect();
        let _ = writeln!(md, "\n### Target violation {target}\n");
        let _ = writeln!(
            md,
            "| trace | violation | slack | VPA | Koordinator | warm-up pick | hindsight best | ÷ best |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
        for c in &rows {
            let f = |m: &str| c.slack_of(m).map_or("–".into(), |v| format!("{v:.3}"));
            let best = c.slack_of(&c.hindsight_best).unwrap_or(f64::NAN);
            let _ = writeln!(
                md,
                "| `{}` | {:.3} | {:.3} | {} | {} | {} {} | {} {} | {:.2} |",
                c.trace,
                c.default_violation,
                c.default_slack,
                f("vpa"),
                f("koordinator"),
                c.warmup_pick,
                f(&c.warmup_pick),
                c.hindsight_best,
                f(&c.hindsight_best),
                c.default_slack / best
            );
        }
        let g = |b: &dyn Fn(&Comparison) -> Option<f64>| {
            geo_mean_ratio(&rows, b).map_or("–".into(), |v| format!("{v:.2}×"))
        };
        let _ = writeln!(
            md,
            "\nGeometric mean of headroom's slack over the baseline's, at equal realised violation rate, over these {} traces: **{} VPA, {} Koordinator, {} warm-up pick, {} hindsight best**.",
            rows.len(),
            g(&|c| c.slack_of("vpa")),
            g(&|c| c.slack_of("koordinator")),
            g(&|c| c.slack_of(&c.warmup_pick)),
            g(&|c| c.slack_of(&c.hindsight_best)),
        );
    }
    md.push_str(MIDDLE);
    md.push_str(&per_trace);
    md.push_str(TAIL);
    std::fs::write(out_md, md).map_err(|e| format!("{out_md}: {e}"))?;
    eprintln!("wrote {out_md} and plots in {}", plots.display());
    Ok(())
}

const HEAD: &str = r#"# Forecasting: how headroom sizes ahead of demand, measured on real traces

<!-- Generated by scripts/forecast-report.sh; do not edit by hand. -->

Every series the agent tracks gets a `SeriesForecaster` (crate `headroom-models`). The agent feeds
it one value per forecast step (`forecast.step_s`, 10 s by default: the peak of that step's samples;
the history keeps every sample). After each step it issues, for the step one lead time ahead, an
expected demand and an **upper bound**: the capacity that demand should exceed on no more than the
operator's target share of steps. The backtests below run at each trace's own step.

How the bound is made:

- **headroom's model**: ridge regression, fitted with linfa, of the demand one lead time ahead on the
  latest value, 4/16/64-step means and the 16-step maximum, plus daily and weekly seasonal terms only
  once the history shows those cycles (autocorrelation at the period ≥ 0.3 and above the half-period,
  over two full periods). It is fitted both on the raw values and on their square root (which
  stabilises the variance of bursty counts). Each fit uses the latest 1,024 origins; refits come
  every 1,024 steps (sooner while the history is young) and early on drift.
- **Baselines**, implemented from their sources: reactive (Kubernetes HPA at 80 % target utilisation
  with its 10 % tolerance), moving-window max (HPA's 300 s scale-down stabilisation window), Kubernetes
  VPA recommender (decaying histogram, 5 % bucket growth, 24 h half-life, p90 × 1.15), Koordinator's
  peak predictor (p95 × 1.10, 12 h half-life), seasonal naive (one day back once a daily cycle is
  detected, else the latest value).
- **Calibration**: each candidate's bound is its forecast plus the conformal quantile of its own last
  200 errors (in square-root units for the baselines; one ridge variant divides errors by the local
  volatility, a state-dependent width). The level of that quantile adapts online (adaptive conformal
  inference) so the realised violation rate of the chosen bound tracks the target.
- **Selection**: per series, the candidate with the lowest recent pinball loss at the target quantile
  is in charge (a challenger must be 10 % cheaper to take over). This is the `default` model.
- Demand that only takes whole values gets its capacity rounded down to a whole value (no violation
  can fall strictly between two integers), and capacity is never negative for non-negative series.

Causality: the capacity at step s is decided from samples up to s − L only; a test replays truncated
copies of real traces and requires identical capacities.

## Protocol

`headroom backtest --input TRACE --lead-time 60 --target-violation R --model all --emit OUT.csv`,
scored over the window the project's scorer uses (`max(ceil(0.2 n), 50, 2 days)` onwards). Slack is
Σmax(c − d, 0) / Σd. **At equal risk**: each baseline is compared after scaling it by the one constant
factor, chosen with hindsight over the scored window, that brings its realised violation rate down to
headroom's; this gives the baselines an advantage no operator has. The *warm-up pick* is the baseline
with the least slack at the target rate over the first 20 % (what an operator could choose before
deploying); the *hindsight best* is the baseline with the least equal-risk slack on the scored window
itself. The headline tables cover traces with at least 500 scored steps; ÷ best is headroom's slack
over the hindsight best's.

## Headline
"#;

const MIDDLE: &str = r#"
## Every trace, every model

Cells: realised violation rate / relative slack as emitted / slack after scaling to headroom's
violation rate at that target (baselines only). `headroom-ridge` is the square-root ridge candidate
with its own conformal bound; `default` is what the agent uses. Plots show demand (grey), headroom's
capacity, and VPA's and the hindsight-best baseline's capacities as their sources define them.
"#;

const TAIL: &str = r#"
## Cost

`scripts/bench-forecast.sh` prints the cost figures on the NASA trace, on one core: training from
scratch on a week of 1-minute samples (10,080 observes including every refit), one refit (period
detection and both linfa ridge fits), one observe + forecast step with refits amortised, the
serialised state size, and the CPU share of 500 series at 1 Hz. Times are thread CPU time, so a busy
machine does not inflate them.

## Data

Traces from `../shared/data/traces` (see its README for licences): Azure LLM inference trace 2023
(Azure/AzurePublicDataset, CC-BY 4.0; Patel et al., Splitwise, ISCA 2024); Mooncake/Kimi conversation
trace 2025 (kvcache-ai/Mooncake, Apache-2.0); NASA-HTTP July 1995 logs (ITA); Google cluster data 2011
(ClusterData2011_2, CC-BY 4.0); Alibaba cluster-trace-v2026-GenAI (alibaba/clusterdata, research use;
Lin et al., SoCC'25).
"#;
