//! The kernel matrix: the release agent and the in-guest check runner (`tests/guest/runner.rs`)
//! booted on Debian's cloud kernels 5.10 (bullseye), 6.1 (bookworm) and 6.12 (trixie) under
//! qemu's software emulation by `tests/guest/kernels.sh`, one guest after another. Every check
//! must pass on every kernel: request latency (exact count, p50, p99 bucket), run-queue delay
//! (starved against idle), cgroup v2 sampling against the kernel's counters, and enforcement with
//! its restores. Prints one table per kernel. Needs root (the kernels are cached under
//! `/var/cache/headroom/kernels`), qemu-system-x86_64, cpio and busybox-static; skips with a
//! reason otherwise unless `HEADROOM_REQUIRE_PRIVILEGED_TESTS=1`.
//! `HEADROOM_KERNEL_SUITES=bookworm,trixie` runs a subset.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use headroom_tests::{require_root, require_tool, skip_or_fail, workspace_root};
use serde_json::Value;

const SUITES: [&str; 3] = ["bullseye", "bookworm", "trixie"];
const CHECKS: [&str; 5] = ["request_latency", "runqueue", "cgroup", "enforce", "cost"];

/// The release agent (`HEADROOM_BIN` overrides): the binary users install, and the one small
/// enough to carry into an initramfs.
fn release_agent() -> PathBuf {
    if let Some(p) = std::env::var_os("HEADROOM_BIN") {
        return PathBuf::from(p);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    // `cargo test` gives this process the test crate's CARGO_PKG_*, CARGO_MANIFEST_* and so on;
    // build scripts that watch such variables (ring's does) would see a change and rebuild the
    // whole TLS stack, so the nested build gets the environment a plain `cargo build` has.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_")
            && key != "CARGO_HOME"
            && key != "CARGO_TARGET_DIR"
            && !key.starts_with("CARGO_TERM_")
        {
            build.env_remove(key.as_ref());
        }
    }
    let status = build
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "headroom",
            "--bin",
            "headroom",
        ])
        .current_dir(workspace_root())
        .status()
        .expect("run cargo build --release for the agent");
    assert!(status.success(), "building the release agent failed");
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("release")
        .join("headroom")
}

/// The `HEADROOM-GUEST` result lines of one guest's console, by check.
fn results(console: &str) -> Vec<Value> {
    console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("HEADROOM-GUEST "))
        .map(|j| serde_json::from_str(j).unwrap_or_else(|e| panic!("result line {j}: {e}")))
        .collect()
}

#[test]
fn kernel_matrix_bullseye_bookworm_trixie() {
    let test = "kernel_matrix_bullseye_bookworm_trixie";
    if !require_root(test)
        || !require_tool(test, "qemu-system-x86_64")
        || !require_tool(test, "cpio")
        || !require_tool(test, "busybox")
    {
        return;
    }
    let suites: Vec<String> = match std::env::var("HEADROOM_KERNEL_SUITES") {
        Ok(s) => s.split(',').map(str::to_string).collect(),
        Err(_) => SUITES.iter().map(|s| s.to_string()).collect(),
    };
    for s in &suites {
        assert!(
            SUITES.contains(&s.as_str()),
            "HEADROOM_KERNEL_SUITES: unknown suite {s:?} (one of {SUITES:?})"
        );
    }
    let script = workspace_root().join("tests/guest/kernels.sh");
    let fetched = Command::new(&script)
        .arg("fetch")
        .args(&suites)
        .status()
        .expect("run kernels.sh fetch");
    if !fetched.success() {
        skip_or_fail(
            test,
            "the kernels could not be fetched (no Debian registry?)",
        );
        return;
    }
    let agent = release_agent();
    let runner = env!("CARGO_BIN_EXE_headroom-guest");
    let workload = env!("CARGO_BIN_EXE_headroom-workload");

    let t_all = Instant::now();
    let mut failures = Vec::new();
    for suite in &suites {
        let t0 = Instant::now();
        let out = Command::new(&script)
            .args(["run", suite])
            .env("HEADROOM_BIN", &agent)
            .env("HEADROOM_GUEST_BIN", runner)
            .env("HEADROOM_WORKLOAD_BIN", workload)
            .output()
            .expect("run kernels.sh run");
        let console = String::from_utf8_lossy(&out.stdout);
        let kernel = console
            .lines()
            .find_map(|l| l.split("HEADROOM-GUEST-START kernel=").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        let got = results(&console);
        println!(
            "== {suite} (kernel {kernel}): guest ran {:.0} s",
            t0.elapsed().as_secs_f64()
        );
        if !out.status.success() {
            failures.push(format!(
                "{suite}: the guest did not run to its end: {}\n{console}",
                String::from_utf8_lossy(&out.stderr)
            ));
            continue;
        }
        for check in CHECKS {
            match got.iter().find(|r| r["check"] == check) {
                Some(r) => {
                    println!("   {check}: {r}");
                    if r["ok"] != Value::Bool(true) {
                        failures.push(format!("{suite} ({kernel}): {check} failed: {r}"));
                    }
                }
                None => failures.push(format!("{suite} ({kernel}): {check} reported nothing")),
            }
        }
    }
    println!(
        "kernel matrix: {} guests in {:.0} s",
        suites.len(),
        t_all.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
