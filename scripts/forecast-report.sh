#!/usr/bin/env bash
# Regenerates docs/forecasting.md and docs/forecasting/*.svg from the shared real traces.
set -euo pipefail
cd "$(dirname "$0")/.."
traces="${HEADROOM_TRACES_DIR:-$(pwd)/../shared/data/traces}"
exec cargo run --locked --release -q -p headroom-models --example forecast-report -- \
    "$traces" docs/forecasting.md docs/forecasting
