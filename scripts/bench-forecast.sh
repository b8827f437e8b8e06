#!/usr/bin/env bash
# Prints the forecasting cost figures (fit, per-step cost, state size, 500-series CPU share).
# Uses the NASA July 1995 trace in tests/data/traces (or in HEADROOM_TRACES_DIR when set).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --locked -p headroom-models --bench forecast --no-run
# One core, as the budget is stated per core.
exec taskset -c 0 cargo bench --locked -p headroom-models --bench forecast
