#!/usr/bin/env bash
# Real-GPU check (run on a machine with an NVIDIA driver, nvidia-smi and PyTorch; no network needed):
#   scripts/real-gpu-check.sh path/to/headroom [--seconds 60] [--out DIR]
# Runs the agent against the real driver for ~60 s while a PyTorch matmul loop runs, compares its
# per-GPU utilisation and memory with nvidia-smi sampled at the same times (targets: 5 points, 1 %),
# checks the workload's PID is attributed to its cgroup, and prints a PASS/FAIL table.
# Exit status 0 only when every check passes. Finishes in under 150 s.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 BINARY [--seconds N] [--out DIR]" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
for tool in nvidia-smi python3; do
    command -v "$tool" >/dev/null || { echo "FAIL: $tool not found" >&2; exit 1; }
done
python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || { echo "FAIL: PyTorch with CUDA is not available" >&2; exit 1; }
exec timeout 150 python3 "$here/real_gpu_check.py" "$@"
