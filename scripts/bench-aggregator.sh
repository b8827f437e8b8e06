#!/usr/bin/env bash
# Aggregator benchmark (prints figures, asserts nothing):
#   - hints ingested per second with 10,000 simulated nodes, the aggregator pinned to one core
#     (target >= 50,000 hints/s);
#   - KEDA GetMetrics p50/p99 over gRPC at that load (target p99 <= 1 ms);
#   - time from a step in one node's load (sampled every 1 s, sent by the real hint client) to the
#     changed value at GetMetrics (target <= 2 s).
# One saturated window, then --runs paced windows (default 3 at 50,000 hints/s); each window
# reports the ingest rate reached while GetMetrics was measured, p50/p99/p999/max, the CPU of each
# thread, and the CPU other processes on the host took meanwhile (high values spoil the tail).
# Extra arguments go to the bench: --nodes N --workloads N --seconds S --connections N
#   --server-cpu N --steps N --runs N --paced-hints-per-s N --no-saturation
#   --scaler-rt-priority N (the aggregator's opt-in SCHED_FIFO scaler thread; needs root)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q -p headroom-aggregator --example bench
echo "host: $(nproc) cpus, load average $(cut -d' ' -f1-3 /proc/loadavg)"
exec target/release/examples/bench "$@"
