//! Writes the seed inputs of the fuzz targets (`fuzz/seeds/`): one valid example of each format,
//! made by the agent's own encoders, so the fuzzer starts inside every decoder instead of
//! having to discover a checksum or a forecaster's JSON. Run after a format changes:
//! `cargo run -p headroom-agent --example fuzz_seeds -- fuzz/seeds`.

use std::path::{Path, PathBuf};

use headroom_agent::config::ForecastSettings;
use headroom_agent::forecast::Forecasts;
use headroom_agent::history::{History, SeriesKey};

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
    let f = d.join(name);
    std::fs::write(&f, bytes).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
}

/// The state-file target reads its first byte as the kind (0 history, 1 forecasts, 2 originals,
/// 3 resizes) and the rest as the payload.
fn state(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![kind];
    v.extend_from_slice(payload);
    v
}

fn main() {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/seeds".into()),
    );
    let key =
        |name: &str, cgroup: &str| SeriesKey::new(name, vec![("cgroup".into(), cgroup.into())]);

    // Same capacities as the targets: 32 fine points, 16 coarse buckets of 60 s.
    let mut h = History::new(1000, 32, 60, 16);
    for i in 0..100u64 {
        h.record(
            &key("container_cpu_usage_cores", "/a"),
            1_700_000_000_000 + i * 1000,
            (i % 7) as f64,
        );
        h.record(
            &key("node_memory_used_bytes", ""),
            1_700_000_000_000 + i * 1000,
            1e9 + i as f64,
        );
    }
    let mut history = Vec::new();
    h.write_to(&mut history).expect("writing to a Vec");
    write(&dir, "history", "two-series", &history);
    write(&dir, "state_file", "history", &state(0, &history));

    let settings = ForecastSettings::default();
    let mut f = Forecasts::new(&settings, 1.0).expect("default forecast settings");
    for i in 0..400u32 {
        let v = f64::from(i % 30) / 10.0;
        f.observe(&[
            (key("container_cpu_usage_cores", "/a"), v),
            (key("gpu_utilization_ratio", "/b"), v / 3.0),
        ]);
    }
    write(&dir, "state_file", "forecasts", &state(1, &f.encode()));

    write(
        &dir,
        "state_file",
        "originals",
        &state(2, br#"{"/sys/fs/cgroup/a/cpu.max":"max 100000\n","/sys/fs/cgroup/a/memory.high":"max\n"}"#),
    );
    write(
        &dir,
        "state_file",
        "resizes",
        &state(
            3,
            br#"{"uid-1/app":{"namespace":"shop","pod":"web-1","uid":"uid-1","container":"app","cpu_limit_millis":500}}"#,
        ),
    );

    write(
        &dir,
        "hint_batch",
        "one-hint",
        br#"{"schema":"headroom.hints/v1","node":"node-a","epoch":7,"seq":3,"time":1700000000.5,"interval_s":10.0,"hints":[{"workload":{"namespace":"ml","kind":"Deployment","name":"llm"},"resource":"gpu","replicas":2,"capacity":2.0,"usage":1.5,"forecast":{"horizon_s":60.0,"quantiles":[{"q":0.5,"value":1.2},{"q":0.9,"value":1.8},{"q":0.99,"value":2.4}]},"local_headroom":0.5,"desired_capacity":2.4,"replica_delta":0.2,"confidence":0.8,"reason":"forecast (ridge)"}]}"#,
    );
    println!("seeds written under {}", dir.display());
}
