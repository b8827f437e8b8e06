#!/usr/bin/env bash
# Prints the forecasting cost figures (fit, per-step cost, state size, 500-series CPU share).
# Uses the shared NASA trace when HEADROOM_TRACES_DIR (or ../shared/data/traces) has it.
set -euo pipefail
cd "$(dirname "$0")/.."
export HEADROOM_TRACES_DIR="${HEADROOM_TRACES_DIR:-$(pwd)/../shared/data/traces}"
cargo bench --locked -p headroom-models --bench forecast --no-run
# One core, as the budget is stated per core.
exec taskset -c 0 cargo bench --locked -p headroom-models --bench forecast
