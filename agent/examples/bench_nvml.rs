//! Benchmark: CPU cost of one NVML sampling cycle, run against the fake `libnvidia-ml`
//! (`scripts/bench-nvml.sh` builds it and writes the script). Prints figures; asserts nothing.
//!
//! Usage: bench_nvml LIB PROC_ROOT [CYCLES]

use std::path::PathBuf;

use headroom_agent::sample::gpu::measure_cycle_cost;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(lib), Some(proc_root)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: bench_nvml LIB PROC_ROOT [CYCLES]");
    };
    let cycles: u32 = match args.next() {
        Some(c) => c
            .parse()
            .map_err(|e| anyhow::anyhow!("CYCLES {c:?}: {e}"))?,
        None => 500,
    };
    let c = measure_cycle_cost(&PathBuf::from(&lib), &PathBuf::from(&proc_root), cycles)
        .map_err(|e| anyhow::anyhow!("NVML from {lib}: {e}"))?;
    let us = |d: std::time::Duration| d.as_secs_f64() * 1e6;
    println!("gpus                       {}", c.gpus);
    println!("processes (all GPUs)       {}", c.processes);
    println!("cycles                     {}", c.cycles);
    println!("cpu per cycle, total       {:9.1} us", us(c.cpu_per_cycle));
    println!("inside NVML (library)      {:9.1} us", us(c.nvml_per_cycle));
    println!(
        "agent's own code per cycle {:9.1} us  (PID cgroups cached)",
        us(c.agent_cpu_per_cycle)
    );
    println!(
        "same, all cgroups re-read  {:9.1} us  (first cycle only)",
        us(c.agent_cpu_per_cycle_uncached)
    );
    // Cached PIDs are re-read every 5-10 s (spread by PID): at a 1 s period at most ~1/5 per cycle.
    let steady = c.agent_cpu_per_cycle
        + (c.agent_cpu_per_cycle_uncached
            .saturating_sub(c.agent_cpu_per_cycle))
            / 5;
    println!(
        "steady state, worst cycle  {:9.1} us  (target <= 1000 us)",
        us(steady)
    );
    println!(
        "encode /metrics per scrape {:9.1} us",
        us(c.encode_per_scrape)
    );
    Ok(())
}
