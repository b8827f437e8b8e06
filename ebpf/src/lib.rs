//! headroom's eBPF probes: per-request server latency per (container, local port) and run-queue
//! delay per container, measured in the kernel as bounded histograms. This crate owns the
//! compiled object (embedded, so users need no clang), decides which program types the kernel
//! allows (tp_btf, then fentry, then raw_tracepoint, then none), attaches, reads the maps and
//! maps cgroup directories to the ids the probes report. It never fails its caller for lack of
//! privilege, never sends per-event data to user space, and never writes a cgroup.

pub mod cgroup;
pub mod hist;
pub mod loader;
pub mod probes;

pub use cgroup::cgroup_id_of;
pub use hist::Histogram;
pub use loader::{LoaderError, load_in_child};
pub use probes::{
    Attach, AttachAttempt, DEFAULT_CHAIN, Options, Probes, ProgramStatus, REQUEST_LATENCY,
    RUNQUEUE_DELAY, ReadError, Reading, RequestKey,
};
