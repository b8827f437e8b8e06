//! `headroom backtest` end to end: the real binary on real traces and on broken inputs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository's copy of the real traces, or `$HEADROOM_TRACES_DIR` (same layout).
fn traces_dir() -> PathBuf {
    std::env::var("HEADROOM_TRACES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/traces"))
}

fn backtest(input: &Path, emit: &Path, model: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_headroom"))
        .arg("backtest")
        .arg("--input")
        .arg(input)
        .args([
            "--lead-time",
            "60",
            "--target-violation",
            "0.05",
            "--model",
            model,
            "--emit",
        ])
        .arg(emit)
        .output()
        .unwrap_or_else(|e| panic!("running headroom: {e}"))
}

fn read_caps(p: &Path) -> HashMap<(i64, String), String> {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("timestamp_s,model,capacity"));
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), 3, "bad row {l:?}");
            (
                (
                    f[0].parse().unwrap_or_else(|e| panic!("{l}: {e}")),
                    f[1].to_string(),
                ),
                f[2].to_string(),
            )
        })
        .collect()
}

#[test]
fn truncated_input_gives_identical_capacities() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    for rel in [
        "google_cluster_2011/series_job3418442_cpu_util_5min.csv",
        "mooncake_kimi_2025/series_output_tokens_per_3s.csv",
        "alibaba_genai_2026/series_cluster_qps_generative_57s.csv",
    ] {
        let src = traces_dir().join(rel);
        let text = std::fs::read_to_string(&src).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (HEADROOM_TRACES_DIR names a traces folder; unset, tests/data/traces)",
                src.display()
            )
        });
        let lines: Vec<&str> = text.lines().collect();
        let cut = tmp.path().join("cut.csv");
        std::fs::write(&cut, lines[..lines.len() * 7 / 10].join("\n") + "\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let (a, b) = (tmp.path().join("a.csv"), tmp.path().join("b.csv"));
        let out = backtest(&src, &a, "all");
        assert!(
            out.status.success(),
            "{rel}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{rel}: stdout is not JSON: {e}"));
        let models = summary["models"].as_array().map_or(0, Vec::len);
        assert_eq!(models, 7, "{rel}: one summary per model");
        let out = backtest(&cut, &b, "all");
        assert!(
            out.status.success(),
            "{rel} cut: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (full, part) = (read_caps(&a), read_caps(&b));
        let mut shared = 0;
        for (k, v) in &part {
            if let Some(w) = full.get(k) {
                assert_eq!(w, v, "{rel}: capacity at {k:?} differs after truncation");
                shared += 1;
            }
        }
        // The cut run emits from 20 % of its own length; the overlap is the rest of it.
        assert!(shared * 2 > part.len(), "{rel}: only {shared} shared rows");
        // Every step from 20 % on has a capacity for every model.
        let n = lines.len() - 1;
        assert_eq!(full.len(), (n - n / 5) * 7, "{rel}: rows emitted");
    }
}

#[test]
fn bad_input_exits_2_naming_file_and_line() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let emit = tmp.path().join("out.csv");
    let mut rows = String::from("timestamp_s,value\n");
    for i in 0..100 {
        rows.push_str(&format!("{},{}\n", i * 10, i % 7));
    }
    let cases = [
        ("irregular.csv", rows.replace("\n500,", "\n505,"), "line 52"),
        ("text.csv", rows.replace("\n500,1", "\n500,abc"), "line 52"),
        (
            "short.csv",
            rows.lines().take(8).collect::<Vec<_>>().join("\n"),
            "too short",
        ),
    ];
    for (name, body, want) in cases {
        let p = tmp.path().join(name);
        std::fs::write(&p, body).unwrap_or_else(|e| panic!("{e}"));
        let out = backtest(&p, &emit, "default");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(name) && err.contains(want), "{name}: {err}");
    }
    let missing = tmp.path().join("missing.csv");
    let out = backtest(&missing, &emit, "default");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.csv"));
    let good = tmp.path().join("good.csv");
    std::fs::write(&good, &rows).unwrap_or_else(|e| panic!("{e}"));
    let out = backtest(&good, &emit, "no-such-model");
    assert_eq!(out.status.code(), Some(2));
    assert!(backtest(&good, &emit, "default").status.success());
}
