//! Workloads for headroom's end-to-end tests and benchmarks, as real processes:
//! `burn [THREADS]` spins, `alloc MIB` allocates and touches memory then waits,
//! `sleep` waits. Each runs until killed.

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
        Some("sleep") => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        _ => {
            eprintln!("usage: headroom-workload burn [THREADS] | alloc MIB | sleep");
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
