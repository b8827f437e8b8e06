//! Samplers: where bytes from the node (NVML, procfs, cgroups, eBPF) enter the agent.

pub mod gpu;
