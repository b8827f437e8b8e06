#!/usr/bin/env bash
# Overhead and accuracy of the eBPF request-latency/run-queue probes, against a real nginx and wrk
# on loopback.
#
# Overhead: RUNS pairs of wrk runs against nginx serving a static page over keep-alive, alternating
# without and with the probes (order flips every pair so drift hits both sides). Both sides run the
# real agent (release build) with nginx's cgroup included, started the same way and idle during
# the run alike; "without" has `[ebpf] enabled = false`, so the probes are the only difference.
# Prints requests/s and p99 of every run and the with/without throughput ratio (target >= 0.97).
# Probes that another process keeps attached to the same tracepoints (another headroom agent on
# this machine) would run in the "without" runs too: the script lists them and refuses to start
# unless ALLOW_FOREIGN_PROBES=1.
# Accuracy: for every run with the agent, the p50/p99 and count the agent reports for nginx's
# container and port next to wrk --latency's for the same run. The agent samples once per
# DURATION + 3 s and the run is placed inside one sampling window, so its history p50/p99
# (container_request_latency_p50/p99_seconds) cover exactly that run. The two measure different
# intervals: wrk from request write to response read on the client (including the time a request
# waits in the socket before nginx reads it, and wrk's own scheduling), the agent from nginx's
# read of the request to its write of the response.
#
# CPU per request: nginx's cgroup CPU time (cpu.stat usage_usec) over the requests wrk completed,
# per run. On a machine shared with other load, throughput swings far more than the probes cost;
# nginx's own CPU per request is much less exposed to that and gives the throughput ratio a
# CPU-bound nginx would see (without/with).
#
# Cost per event: one more run with probes and kernel.bpf_stats_enabled=1 prints the kernel's own
# run-time accounting per program (ns per run, runs per second, share of one CPU); it is kept
# out of the alternating runs because the accounting itself costs two clock reads per run.
#
# Noise: on a small shared machine other load moves throughput far more than the probes do; every
# run's load average is printed, and the per-pair ratios' spread (min..max) next to their median.
#
# Needs root, nginx, wrk, cargo (bpftool, if present, for the foreign-probe check). Env: RUNS (10),
# DURATION (5s), CONNECTIONS (32), THREADS (1), ALLOW_FOREIGN_PROBES (0).
# Writes everything under bench-out/ebpf/ (raw wrk output, summary.txt).
set -euo pipefail

RUNS="${RUNS:-10}"
DURATION="${DURATION:-5s}"
CONNECTIONS="${CONNECTIONS:-32}"
THREADS="${THREADS:-1}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$repo/bench-out/ebpf"
mkdir -p "$out"

[ "$(id -u)" -eq 0 ] || { echo "bench-ebpf: needs root (eBPF, cgroups)" >&2; exit 1; }
for tool in nginx wrk cargo curl python3; do
    command -v "$tool" >/dev/null || { echo "bench-ebpf: $tool not found (apt-get install nginx wrk)" >&2; exit 1; }
done

if [ -f /sys/fs/cgroup/unified/cgroup.procs ]; then v2=/sys/fs/cgroup/unified; else v2=/sys/fs/cgroup; fi
cg="$v2/headroom-bench-$$"
work="$(mktemp -d /tmp/headroom-bench-nginx.XXXXXX)"
port=$((20000 + $$ % 20000))

cleanup() {
    [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
    [ -n "${hold_pid:-}" ] && kill "$hold_pid" 2>/dev/null || true
    [ -n "${agent_pid:-}" ] && kill "$agent_pid" 2>/dev/null || true
    sleep 0.5
    rmdir "$cg" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Other processes' programs on the tracepoints the probes use (names as in ebpf/bpf/headroom.bpf.c).
foreign_probes() {
    command -v bpftool >/dev/null || return 0
    bpftool prog show 2>/dev/null | grep -E '^[0-9]+: (tracing|raw_tracepoint) +name (tp|fe|raw)_(sock|sched)_' || true
}
foreign="$(foreign_probes)"
if [ -n "$foreign" ]; then
    echo "bench-ebpf: probes of another process are attached, so runs 'without' would not be without:" >&2
    echo "$foreign" >&2
    [ "${ALLOW_FOREIGN_PROBES:-0}" = 1 ] || exit 1
fi

(cd "$repo" && cargo build --release -p headroom -p headroom-ebpf --bin headroom --example hold >&2)
hold="$repo/target/release/examples/hold"
agent="$repo/target/release/headroom"
agent_port=$((40000 + $$ % 20000))
window_s=$(( ${DURATION%s} + 3 ))

status_field() { curl -sf "http://127.0.0.1:$agent_port/v1/status" | python3 -c "import json,sys; print(json.load(sys.stdin).get('$1'))"; }

# Starts the agent (with its probes when $1 is "on", with eBPF disabled otherwise), runs wrk inside
# one of its sampling windows, and prints "p50 p99 count" as the agent reports them for nginx's
# container and port ("- - -" without probes).
run_with_agent() {
    local mode="$1" f="$2" log="$3" state
    state="$(mktemp -d /tmp/headroom-bench-state.XXXXXX)"
    local config=()
    if [ "$mode" = off ]; then
        printf '[ebpf]\nenabled = false\n' > "$state/config.toml"
        config=(--config "$state/config.toml")
    fi
    "$agent" agent "${config[@]}" --listen "127.0.0.1:$agent_port" --state-dir "$state" \
        --sample-interval "$window_s" --include-cgroup "/$(basename "$cg")" 2>"$log" &
    agent_pid=$!
    for _ in $(seq 100); do [ "$(status_field ready 2>/dev/null)" = True ] && break; sleep 0.1; done
    [ "$(status_field ready)" = True ] || { echo "bench-ebpf: agent not ready: $(cat "$log")" >&2; exit 1; }
    local first; first="$(status_field last_sample_at)"
    run_wrk "$f"
    while [ "$(status_field last_sample_at)" = "$first" ]; do sleep 0.1; done
    curl -sf "http://127.0.0.1:$agent_port/v1/history?name=container_request_latency_p50_seconds&port=$port" > "$state/p50.json"
    curl -sf "http://127.0.0.1:$agent_port/v1/history?name=container_request_latency_p99_seconds&port=$port" > "$state/p99.json"
    curl -sf "http://127.0.0.1:$agent_port/metrics" > "$state/metrics.txt"
    kill "$agent_pid"; wait "$agent_pid" || true; agent_pid=
    if [ "$mode" = off ]; then
        echo "- - -"
        rm -rf "$state"
        return
    fi
    python3 - "$state" "$port" <<'PY'
import json, re, sys
state, port = sys.argv[1], sys.argv[2]
def newest(name):
    s = json.load(open(f"{state}/{name}.json"))["series"]
    pts = [p for p in s[0]["fine"] if p[1] is not None] if s else []
    return pts[-1][1] if pts else float("nan")
count = next((float(l.rsplit(" ", 1)[1]) for l in open(f"{state}/metrics.txt")
              if l.startswith("headroom_request_latency_seconds_count{") and f'port="{port}"' in l), 0)
print(f"{newest('p50'):.9f} {newest('p99'):.9f} {count:.0f}")
PY
    rm -rf "$state"
}

mkdir -p "$work/html" "$work/logs"
head -c 4096 /dev/zero | tr '\0' 'x' > "$work/html/index.html"
cat > "$work/nginx.conf" <<CONF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/logs/error.log;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path $work/tmp;
    proxy_temp_path $work/tmp;
    fastcgi_temp_path $work/tmp;
    uwsgi_temp_path $work/tmp;
    scgi_temp_path $work/tmp;
    server {
        listen 127.0.0.1:$port;
        root $work/html;
    }
}
CONF
mkdir -p "$work/tmp" "$cg"
# Start nginx from a shell already in the test cgroup so master and worker are both in it.
sh -c "echo \$\$ > $cg/cgroup.procs && exec nginx -c $work/nginx.conf -p $work" 
for _ in $(seq 50); do [ -f "$work/nginx.pid" ] && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$port/" >/dev/null 2>&1 || wrk -t1 -c1 -d1s "http://127.0.0.1:$port/" >/dev/null

# wrk latency figure ("1.23ms", "456.00us", "1.02s") in seconds.
to_s() { awk '{ v=$1; if (v ~ /us$/) { sub(/us$/,"",v); print v/1e6 } else if (v ~ /ms$/) { sub(/ms$/,"",v); print v/1e3 } else { sub(/s$/,"",v); print v+0 } }'; }
wrk_rps() { awk '/^Requests\/sec:/ { print $2 }' "$1"; }
wrk_n() { awk '/ requests in / { print $1 }' "$1"; }
wrk_pct() { awk -v p="$2%" '$1 == p { print $2 }' "$1" | to_s; }

nginx_usec() { awk '$1 == "usage_usec" { print $2 }' "$cg/cpu.stat"; }
# Runs wrk; leaves nginx's CPU microseconds during the run in $cpu_usec.
run_wrk() {
    local c0; c0=$(nginx_usec)
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "http://127.0.0.1:$port/" > "$1"
    cpu_usec=$(( $(nginx_usec) - c0 ))
    echo "$cpu_usec" > "$1.cpu_usec"
}

summary="$out/summary.txt"
: > "$summary"
printf '%-4s %-8s %12s %10s %10s %9s %8s | %11s %11s %9s %6s\n' run probes req/s wrk_p50 wrk_p99 wrk_n us/req agent_p50 agent_p99 agent_n load1 | tee -a "$summary"
for i in $(seq 1 "$RUNS"); do
    if [ $((i % 2)) -eq 1 ]; then order="off on"; else order="on off"; fi
    for mode in $order; do
        f="$out/wrk-$i-$mode.txt"
        run_with_agent "$mode" "$f" "$out/agent-$i-$mode.log" > "$out/agent-$i-$mode.result"
        read -r p50 p99 count < "$out/agent-$i-$mode.result"
        us_req=$(awk -v c="$(cat "$f.cpu_usec")" -v n="$(wrk_n "$f")" 'BEGIN { printf "%.3f", c / n }')
        printf '%-4s %-8s %12s %10s %10s %9s %8s | %11s %11s %9s %6s\n' "$i" "$mode" "$(wrk_rps "$f")" \
            "$(wrk_pct "$f" 50)" "$(wrk_pct "$f" 99)" "$(wrk_n "$f")" "$us_req" "$p50" "$p99" "$count" \
            "$(cut -d' ' -f1 /proc/loadavg)" | tee -a "$summary"
    done
done
foreign="$(foreign_probes)"
[ -z "$foreign" ] || printf 'WARNING: probes of another process were attached by the end of the runs:\n%s\n' "$foreign" | tee -a "$summary"

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
col() { awk -v m="$1" -v c="$2" '$2 == m { print $c }' "$summary"; }
awk '
    $2 == "off" { off += $3; n_off++; p99_off += $5 }
    $2 == "on"  { on  += $3; n_on++;  p99_on  += $5 }
    END {
        printf "\nmean req/s without probes %.0f, with %.0f: ratio %.4f (target >= 0.97)\n", off/n_off, on/n_on, (on/n_on)/(off/n_off)
        printf "mean wrk p99 without probes %.6f s, with %.6f s\n", p99_off/n_off, p99_on/n_on
    }' "$summary" | tee -a "$summary"
awk '$2 == "on" { n++; if ($6 == $11) same++; d = $11 - $6; if (d < 0) d = -d; if (d > worst) worst = d }
    END { printf "agent request count equal to wrk'"'"'s completed requests in %d of %d runs (largest difference %d; up to one per connection is still in flight when wrk stops)\n", same, n, worst }' "$summary" | tee -a "$summary"
# Each pair ran back to back, so its ratio is the least exposed to drift in other load.
pair_ratios() { awk -v c="$1" -v inv="$2" '$2 == "off" { off[$1] = $c } $2 == "on" { on[$1] = $c }
    END { for (r in on) if (r in off) print (inv ? off[r] / on[r] : on[r] / off[r]) }' "$summary" | sort -g; }
pair_ratios 3 0 | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    printf "median of per-pair throughput ratios (with/without): %.4f (spread %.4f..%.4f over %d pairs)\n", m, v[1], v[NR], NR }' | tee -a "$summary"
awk -v a="$(col off 7 | median)" -v b="$(col on 7 | median)" 'BEGIN {
    printf "median nginx CPU per request without probes %.3f us, with %.3f us: CPU-bound throughput ratio %.4f (target >= 0.97)\n", a, b, a / b
}' | tee -a "$summary"
pair_ratios 7 1 | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    printf "median of per-pair nginx CPU ratios (without/with): %.4f (spread %.4f..%.4f over %d pairs)\n", m, v[1], v[NR], NR }' | tee -a "$summary"
med_off=$(col off 3 | median); med_on=$(col on 3 | median)
awk -v a="$med_off" -v b="$med_on" -v pa="$(col off 5 | median)" -v pb="$(col on 5 | median)" -v l="$(cut -d' ' -f1-3 /proc/loadavg)" 'BEGIN {
    printf "median req/s without probes %.0f, with %.0f: ratio %.4f; median wrk p99 %.6f s vs %.6f s (load average %s)\n", a, b, b/a, pa, pb, l
}' | tee -a "$summary"

# Cost per event, from the kernel's accounting (the probes alone, through the benchmark helper).
old_stats="$(cat /proc/sys/kernel/bpf_stats_enabled)"
echo 1 > /proc/sys/kernel/bpf_stats_enabled
coproc HOLD { "$hold" "$cg" "$port" 2>"$out/hold-stats.err"; }
hold_pid=$HOLD_PID
read -r ready <&"${HOLD[0]}"
start_ns=$(date +%s%N)
run_wrk "$out/wrk-stats.txt"
end_ns=$(date +%s%N)
echo done >&"${HOLD[1]}"
read -r result <&"${HOLD[0]}"
wait "$hold_pid" || true
hold_pid=
echo "$old_stats" > /proc/sys/kernel/bpf_stats_enabled
echo "$result" > "$out/stats.json"
{
    echo
    echo "per-program cost during one more ${DURATION} run ($(nproc) CPUs, kernel bpf_stats):"
    grep -o '{"program":[^}]*}' <<<"$result" | sed -E 's/.*"program":"([^"]*)","run_ns":([0-9]+),"runs":([0-9]+).*/\1 \2 \3/' |
        awk -v wall_ns=$((end_ns - start_ns)) '{
            printf "  %-22s %9.0f ns/run %10.0f runs/s %7.3f %% of one CPU\n", $1, $2/$3, $3/(wall_ns/1e9), 100*$2/wall_ns
            t += $2 }
            END { printf "  %-22s %7.3f %% of one CPU in total\n", "all programs", 100*t/wall_ns }'
} | tee -a "$summary"
echo "bench-ebpf: raw output and summary in $out" >&2
