#!/usr/bin/env bash
# Runs each fuzz target (fuzz/README.md) for a bounded time, from its committed seeds plus the
# corpus earlier runs left in fuzz/corpus/. Fails on the first crash; the input that crashed is
# left in fuzz/artifacts/<target>/.
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default: 60 s each, every target)
# Installs the nightly toolchain and cargo-fuzz when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(hint_batch history state_file)

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# All targets at once, so the shared dependencies compile once (with sanitizer flags).
cargo +nightly fuzz build
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" fuzz/target
  log="fuzz/target/$t.log"
  echo "fuzz: $t for ${seconds} s (log: $log)"
  rc=0
  cargo +nightly fuzz run "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
    -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1 || rc=$?
  # The last progress line (coverage, corpus) and the final statistics (executions).
  grep -E '^#[0-9]+' "$log" | tail -1 || true
  grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "$log" || true
  if [ "$rc" -ne 0 ]; then
    tail -60 "$log" >&2
    echo "fuzz: $t failed (exit $rc); a crashing input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
