//! Cost of rendering the status page over a full day of history (the history lock is held that
//! long): `cargo run --release -p headroom-agent --example page_cost -- [CONTAINERS]`.
use headroom_agent::history::{History, SeriesKey};
use headroom_agent::report::page::{Header, Options, render};
use std::time::Instant;

fn main() {
    let containers: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    // Defaults: 900 fine points at 1 s, a day of one-minute buckets.
    let mut h = History::new(1000, 900, 60, 1440);
    let t0 = 1_700_000_000_000u64;
    let names = [
        "container_cpu_usage_cores",
        "container_memory_working_set_bytes",
        "forecast_upper_container_cpu_usage_cores",
        "container_cpu_quota_cores",
    ];
    let keys: Vec<SeriesKey> = (0..containers)
        .flat_map(|c| {
            names
                .iter()
                .map(move |n| SeriesKey::new(n, vec![("cgroup".into(), format!("/c{c}"))]))
        })
        .collect();
    let steps = 86_400u64 + 900;
    for i in (0..steps).step_by(1) {
        let t = t0 + i * 1000;
        // Only the last 900 s at full rate; before that, one point a minute is enough to fill the coarse tier.
        if i + 900 < steps && i % 60 != 0 {
            continue;
        }
        for (j, k) in keys.iter().enumerate() {
            h.record(k, t, ((i + j as u64) % 100) as f64 / 10.0);
        }
    }
    let now = t0 + steps * 1000;
    for hours in [1.0, 6.0, 24.0] {
        let t = Instant::now();
        let html = render(
            &Header::default(),
            &h,
            None,
            &[],
            &Options {
                hours,
                max_containers: 24,
            },
            now,
        );
        println!(
            "{containers} containers, {hours} h: {:.1} ms, {} KiB",
            t.elapsed().as_secs_f64() * 1e3,
            html.len() / 1024
        );
    }
}
