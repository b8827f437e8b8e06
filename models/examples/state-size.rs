//! Heap held by forecasters in their steady state: builds N forecasters at a given step and
//! lead, feeds each `steps` noisy values, and prints the heap in use per forecaster (glibc
//! mallinfo2) after warm-up and at the end.
//!
//!   cargo run --release -p headroom-models --example state-size -- [N] [steps] [step_s] [lead_steps]

use headroom_models::{ForecastConfig, Forecaster, SeriesForecaster};

fn heap_bytes() -> usize {
    // SAFETY: mallinfo2 only reads allocator statistics.
    unsafe { libc::mallinfo2().uordblks }
}

fn main() {
    let arg = |i: usize, d: f64| {
        std::env::args()
            .nth(i)
            .map_or(Ok(d), |a| a.parse::<f64>())
            .unwrap_or_else(|e| {
                eprintln!("state-size: argument {i}: {e}");
                std::process::exit(2)
            })
    };
    let (n, steps, step_s, lead) = (
        arg(1, 200.0) as usize,
        arg(2, 5000.0) as usize,
        arg(3, 10.0),
        arg(4, 6.0) as u32,
    );
    let cfg = ForecastConfig::new(lead, 0.05, step_s);
    let base = heap_bytes();
    let mut fs: Vec<SeriesForecaster> = (0..n)
        .map(|_| SeriesForecaster::new(cfg.clone()).expect("valid config"))
        .collect();
    let mut x: u64 = 88172645463325252;
    for s in 0..steps {
        for (i, f) in fs.iter_mut().enumerate() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let noise = (x % 1000) as f64 / 1000.0;
            let v = 2.0 + (s as f64 / 360.0 + i as f64).sin() + noise;
            f.observe(v);
            let _ = f.forecast();
        }
        if s + 1 == 300 || s + 1 == steps {
            let per = (heap_bytes() - base) / n;
            println!("after {:>6} steps: {:>6} bytes per forecaster", s + 1, per);
        }
    }
}
