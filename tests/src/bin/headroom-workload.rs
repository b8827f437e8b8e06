//! Workloads for headroom's end-to-end tests and benchmarks, as real processes:
//! `burn [THREADS]` spins, `alloc MIB` allocates and touches memory then waits,
//! `sleep` waits. Each runs until killed.
//! `burn-trace STEP_MS FILE [THREADS]` follows a demand shape: FILE holds one value per line, in
//! cores; each is held for STEP_MS, spread over THREADS (default 2) threads that each spin for
//! their share of every 20 ms slot; it exits after the last value.
//! `alloc-grow STEP_MIB EVERY_MS MAX_MIB` allocates and touches STEP_MIB every EVERY_MS up to
//! MAX_MIB, then waits.

use std::hint::black_box;
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).and_then(|s| s.parse::<u64>().ok());
    match args.first().map(String::as_str) {
        Some("burn") => {
            let threads = arg(1).unwrap_or(1).max(1);
            for _ in 1..threads {
                std::thread::spawn(spin);
            }
            spin();
        }
        Some("alloc") => {
            let mib = arg(1).unwrap_or(64) as usize;
            let mut v = vec![0u8; mib << 20];
            // Touch every page so it is resident, not just reserved.
            for i in (0..v.len()).step_by(4096) {
                v[i] = 1;
            }
            black_box(&v);
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        Some("burn-trace") => {
            let step = Duration::from_millis(arg(1).unwrap_or(250));
            let Some(path) = args.get(2) else {
                eprintln!("burn-trace needs a file of values");
                std::process::exit(2);
            };
            let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
                eprintln!("cannot read {path}: {e}");
                std::process::exit(2)
            });
            let values: Vec<f64> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
            let threads = arg(3).unwrap_or(2).max(1) as usize;
            burn_trace(&values, step, threads);
        }
        Some("alloc-grow") => {
            let step = arg(1).unwrap_or(8) as usize;
            let every = Duration::from_millis(arg(2).unwrap_or(100));
            let max = arg(3).unwrap_or(256) as usize;
            let mut chunks: Vec<Vec<u8>> = Vec::new();
            while chunks.len() * step < max {
                let mut v = vec![0u8; step << 20];
                for i in (0..v.len()).step_by(4096) {
                    v[i] = 1;
                }
                chunks.push(black_box(v));
                std::thread::sleep(every);
            }
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        Some("sleep") => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        _ => {
            eprintln!(
                "usage: headroom-workload burn [THREADS] | alloc MIB | sleep | burn-trace STEP_MS FILE [THREADS] | alloc-grow STEP_MIB EVERY_MS MAX_MIB"
            );
            std::process::exit(2);
        }
    }
}

fn spin() {
    let mut x = 0u64;
    loop {
        x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}

/// Every thread spins for `demand / threads` of each 20 ms slot, so the process asks for
/// `demand` cores; a quota below that throttles it (and the kernel counts it).
fn burn_trace(values: &[f64], step: Duration, threads: usize) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;
    // Demand is the shape's, not whatever other processes on a busy node leave over: a high
    // priority (best effort; threads inherit it) keeps CPU contention from hiding the quota.
    // Nice only ranks tasks within one cgroup (and autogroup); against other cgroups and
    // sessions the cgroup's CPU weight counts, which the policy test raises.
    // SAFETY: setpriority on the calling thread with constant arguments.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -15) };
    let share = Arc::new(AtomicU64::new(0f64.to_bits()));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slot = Duration::from_millis(20);
    let mut handles = Vec::new();
    for _ in 0..threads {
        let (share, done) = (share.clone(), done.clone());
        handles.push(std::thread::spawn(move || {
            let mut x = 0u64;
            let mut next = Instant::now();
            while !done.load(Ordering::Relaxed) {
                let f = f64::from_bits(share.load(Ordering::Relaxed)).clamp(0.0, 1.0);
                let start = Instant::now();
                let busy = slot.mul_f64(f);
                while start.elapsed() < busy {
                    x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
                next += slot;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
        }));
    }
    let t0 = Instant::now();
    for (i, v) in values.iter().enumerate() {
        share.store((v / threads as f64).to_bits(), Ordering::Relaxed);
        let until = step * (i as u32 + 1);
        let el = t0.elapsed();
        if until > el {
            std::thread::sleep(until - el);
        }
    }
    done.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
}
