//! `headroom backtest`: replay a recorded `timestamp_s,value` series through the forecasters the
//! agent runs, write the capacity each model would have set at every step after the warm-up, and
//! print how each did. This module owns only the file and terminal edges; the replay and scoring
//! live in `headroom_models::backtest`, which never does I/O.

use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Context;
use headroom_models::backtest::{self, MODELS};

/// Replay a series and emit each model's capacities.
#[derive(clap::Args, Debug, Clone)]
pub struct BacktestArgs {
    /// Series to replay: CSV `timestamp_s,value` with a header and a fixed step.
    #[arg(long, value_name = "FILE.csv")]
    pub input: PathBuf,
    /// Lead time a scale-up needs, in seconds; L = max(1, round(SECONDS / step)) steps.
    #[arg(long = "lead-time", value_name = "SECONDS")]
    pub lead_time: f64,
    /// Accepted share of steps with demand above capacity, e.g. 0.05.
    #[arg(long = "target-violation", value_name = "R")]
    pub target_violation: f64,
    /// Model to emit: a model name, `default` (what the agent uses) or `all`.
    #[arg(long, value_name = "NAME|default|all", default_value = "default")]
    pub model: String,
    /// Output CSV: `timestamp_s,model,capacity`, a row per model for each step from 20 % of the
    /// series to its end.
    #[arg(long, value_name = "OUT.csv")]
    pub emit: PathBuf,
}

/// Bad input (file, flag value): the binary exits with status 2 on it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

pub fn run(args: &BacktestArgs) -> anyhow::Result<()> {
    let path = args.input.display().to_string();
    let bad = |msg: String| anyhow::Error::new(InputError(msg));
    if !(args.lead_time.is_finite() && args.lead_time > 0.0) {
        return Err(bad(format!(
            "--lead-time must be a positive number of seconds, got {}",
            args.lead_time
        )));
    }
    if !(args.target_violation > 0.0 && args.target_violation <= 0.5) {
        return Err(bad(format!(
            "--target-violation must be in (0, 0.5], got {}",
            args.target_violation
        )));
    }
    let models: Vec<&'static str> = match args.model.as_str() {
        "all" => MODELS.to_vec(),
        name => match MODELS.iter().find(|m| **m == name) {
            Some(m) => vec![*m],
            None => {
                return Err(bad(format!(
                    "--model {name:?} is unknown; expected `all` or one of {MODELS:?}"
                )));
            }
        },
    };
    let text = std::fs::read_to_string(&args.input)
        .map_err(|e| bad(format!("{path}: cannot read: {e}")))?;
    let trace = backtest::parse_trace(&text).map_err(|e| bad(format!("{path}: {e}")))?;
    let lead = backtest::lead_steps(args.lead_time, trace.step);

    let show = std::io::stderr().is_terminal();
    let mut last_pct = usize::MAX;
    let mut progress = |done: usize, total: usize| {
        if !show {
            return;
        }
        let pct = done * 100 / total.max(1);
        if pct != last_pct {
            last_pct = pct;
            eprint!("\rbacktest {path}: {pct:3}% ({done}/{total} steps)");
            if done >= total {
                eprintln!();
            }
        }
    };
    let run = backtest::run(&trace, lead, args.target_violation, &models, &mut progress)
        .map_err(|e| bad(format!("{path}: {e}")))?;

    let out = args.emit.display().to_string();
    let file = File::create(&args.emit).with_context(|| format!("{out}: cannot create"))?;
    let mut w = BufWriter::new(file);
    let werr = |e: std::io::Error| anyhow::anyhow!("{out}: write failed: {e}");
    writeln!(w, "timestamp_s,model,capacity").map_err(werr)?;
    for s in run.first..trace.values.len() {
        for (m, name) in run.models.iter().enumerate() {
            let c = run.capacity[m][s];
            anyhow::ensure!(
                c.is_finite(),
                "{path}: model {name} produced no capacity for step {s}"
            );
            writeln!(w, "{},{},{}", trace.timestamps[s], name, c).map_err(werr)?;
        }
    }
    w.flush().map_err(werr)?;

    let summaries = backtest::summarize(&trace, &run);
    // Which candidate the default model put in charge, as shares of the emitted steps.
    let mut selection = std::collections::BTreeMap::<&str, f64>::new();
    let emitted = (trace.values.len() - run.first).max(1) as f64;
    for m in &run.chosen[run.first..] {
        *selection.entry(m).or_default() += 1.0 / emitted;
    }
    let doc = serde_json::json!({
        "input": path,
        "step_seconds": trace.step,
        "lead_steps": lead,
        "target_violation": args.target_violation,
        "emitted_from_index": run.first,
        "models": summaries,
        "default_selection": selection,
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}
