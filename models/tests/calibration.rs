//! Calibration on real traces (`tests/data/traces`, or `$HEADROOM_TRACES_DIR`): at a 5 % target,
//! every trace there with at least 500 scored steps must realise between 3 % and 7 % violations (at most 7 % where demand is zero on more
//! than half the steps), and the default must stay close to the best baseline on each.

use std::path::PathBuf;

use headroom_models::backtest::{MODELS, lead_steps, parse_trace, run, scored_from, summarize};
use headroom_models::report::compare;

/// The repository's copy of the real traces, or `$HEADROOM_TRACES_DIR` (same layout).
fn traces_dir() -> PathBuf {
    std::env::var("HEADROOM_TRACES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/traces"))
}

#[test]
fn five_percent_target_is_met_on_every_long_trace() {
    let dir = traces_dir();
    let mut files = Vec::new();
    for sub in std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (HEADROOM_TRACES_DIR names a traces folder; unset, tests/data/traces)",
            dir.display()
        )
    }) {
        let sub = sub.map(|e| e.path()).unwrap_or_default();
        if let Ok(rd) = std::fs::read_dir(&sub) {
            files.extend(
                rd.filter_map(|f| f.ok().map(|f| f.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "csv")),
            );
        }
    }
    files.sort();
    let mut checked = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let tr = parse_trace(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let n = tr.values.len();
        let from = scored_from(n, tr.step);
        if n - from < 500 {
            continue;
        }
        let r = run(
            &tr,
            lead_steps(60.0, tr.step),
            0.05,
            &MODELS,
            &mut |_, _| {},
        )
        .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let sums = summarize(&tr, &r);
        let base = [
            "reactive",
            "window-max",
            "vpa",
            "koordinator",
            "seasonal-naive",
        ];
        let c = compare("t", &tr.values, &r, sums, from, 0.05, &base)
            .unwrap_or_else(|| panic!("no default"));
        let zeros = tr.values.iter().filter(|v| **v == 0.0).count() * 2 > n;
        let v = c.default_violation;
        assert!(
            v <= 0.07 && (zeros || v >= 0.03),
            "{}: realised violation {v:.4}",
            f.display()
        );
        let best = c.slack_of(&c.hindsight_best).unwrap_or(f64::NAN);
        assert!(
            c.default_slack <= (1.5 * best).max(best + 0.02),
            "{}: slack {:.4} vs hindsight-best {} {best:.4}",
            f.display(),
            c.default_slack,
            c.hindsight_best
        );
        checked += 1;
    }
    assert!(
        checked >= 5,
        "only {checked} traces with 500 scored steps found in {}",
        dir.display()
    );
}
