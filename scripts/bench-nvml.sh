#!/usr/bin/env bash
# NVML sampling cost per cycle with 8 fake GPUs x 32 processes each (release build).
# Target: <= 1 ms of CPU per cycle in the agent's own code, excluding the library's time.
# The processes' PIDs resolve through a proc tree of real files (one cgroup file per PID).
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS=${GPUS:-8}
PROCS=${PROCS:-32}
CYCLES=${CYCLES:-500}
cargo build --release -q -p fake-nvml
cargo build --release -q -p headroom-agent --example bench_nvml
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp target/release/libnvidia_ml_fake.so "$work/libnvidia-ml.so.1"
python3 - "$work" "$GPUS" "$PROCS" <<'PY'
import json, os, sys
work, gpus, procs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
proc_root = os.path.join(work, "proc")
script = {"gpus": []}
for g in range(gpus):
    ps = []
    for k in range(procs):
        pid = 100000 + g * 1000 + k
        d = os.path.join(proc_root, str(pid))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "cgroup"), "w") as f:
            f.write(f"4:memory:/x\n0::/kubepods.slice/pod{g}-{k % 8}/cri-{k}.scope\n")
        ps.append({"pid": pid, "memory_used": 1_000_000 * (k + 1), "sm_util": k % 100, "mem_util": k % 50})
    script["gpus"].append({
        "uuid": f"GPU-{g:08d}-0000-0000-0000-000000000000",
        "pci_bus_id": f"00000000:{0x19 + g:02X}:00.0",
        "memory_used": 40_000_000_000, "utilization": 50, "memory_utilization": 30,
        "gpm": {"sm_util": 40, "tensor_util": 20, "sm_occupancy": 30, "dram_bw_util": 50},
        "processes": ps,
    })
with open(os.path.join(work, "fake-nvml.json"), "w") as f:
    json.dump(script, f)
PY
echo "NVML sampling cost: $GPUS fake GPUs x $PROCS processes, $CYCLES cycles"
target/release/examples/bench_nvml "$work/libnvidia-ml.so.1" "$work/proc" "$CYCLES"
