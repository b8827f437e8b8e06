#!/usr/bin/env bash
# Policy benchmark (simulation, no cgroups): the acceptance scenario replayed over several
# shared traces. Each trace's first POINTS points are scaled onto 0.1..PEAK cores and replayed
# against a static quota (at the peak and at the 90th percentile), the reactive rule, and the
# predictive policy fed by the built-in window forecast and by the models crate's forecaster.
# Prints throttled-time equivalent (core-seconds of demand above the quota) and mean quota.
#
# Usage: scripts/bench-policy.sh [TRACES_DIR]   (env: POINTS=600 PEAK=1.6 STEP_S=1)
# Traces: Azure LLM inference 2023 (CC-BY 4.0, Patel et al.), Mooncake/Kimi 2025 (Apache-2.0),
# NASA HTTP 1995, Google cluster data 2011 (CC-BY 4.0), Alibaba GenAI 2026 (Lin et al., SoCC'25).
set -euo pipefail
cd "$(dirname "$0")/.."
traces="${1:-}"
if [[ -z "$traces" ]]; then
  for d in ../shared/data/traces /work/shared/data/traces; do
    [[ -d "$d" ]] && traces="$d" && break
  done
fi
[[ -d "${traces:-}" ]] || { echo "bench-policy: no traces directory (give one as the first argument)" >&2; exit 2; }
files=(
  "$traces/azure_llm_2023/series_code_tokens_per_10s.csv"
  "$traces/azure_llm_2023/series_conv_tokens_per_10s.csv"
  "$traces/mooncake_kimi_2025/series_input_tokens_per_3s.csv"
  "$traces/mooncake_kimi_2025/series_requests_per_3s.csv"
  "$traces/nasa_http_1995/series_jul_requests_per_min.csv"
  "$traces/google_cluster_2011/series_job3418442_cpu_util_5min.csv"
  "$traces/alibaba_genai_2026/series_cluster_qps_generative_57s.csv"
  "$traces/alibaba_genai_2026/series_lora_requests_per_1min.csv"
)
cargo build --release --locked -q -p headroom-agent --example policy-sim
exec target/release/examples/policy-sim --points "${POINTS:-600}" --peak "${PEAK:-1.6}" \
  --step-s "${STEP_S:-1}" "${files[@]}"
