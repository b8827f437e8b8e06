#!/usr/bin/env bash
# Aggregator benchmark (prints figures, asserts nothing):
#   - hints ingested per second with 10,000 simulated nodes, the aggregator pinned to one core
#     (target >= 50,000 hints/s);
#   - KEDA GetMetrics p50/p99 over gRPC at that load (target p99 <= 1 ms);
#   - time from a step in one node's load (sampled every 1 s, sent by the real hint client) to the
#     changed value at GetMetrics (target <= 2 s).
# Extra arguments go to the bench: --nodes N --workloads N --seconds S --connections N
#   --server-cpu N --steps N
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q -p headroom-aggregator --example bench
echo "host: $(nproc) cpus, load average $(cut -d' ' -f1-3 /proc/loadavg)"
exec target/release/examples/bench "$@"
