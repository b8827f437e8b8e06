#!/usr/bin/env python3
"""Replica advice on a real LLM trace: headroom's queue forecasts against a utilisation threshold.

Replays a window of the Azure LLM inference trace 2023 (requests and tokens per 10 s bin, from
`tests/data/traces` or HEADROOM_TRACES_DIR; CC-BY 4.0, Patel et al., Splitwise, ISCA 2024),
compressed in time, as streaming completions against llama.cpp `llama-server` replicas (SmolLM2-135M,
each alone in a cgroup, built by tests/llm/build-llama-server.sh), behind a least-outstanding
router. Requests arrive as a Poisson process at the bin's rate; each asks for a number of tokens
that follows the bin's tokens per request. Twice, from a fresh agent and aggregator each time:

  headroom     the agent (engines discovered, no engine endpoint configured; forecasts with a lead
               time equal to the replica start-up delay) posts hints to a real aggregator; advice is
               the aggregator's desired replicas for the workload (engine_queue, target
               --waiting-per-replica waiting requests per replica; with --concurrency-per-replica
               also engine_concurrency; KV and tokens targets off).
  utilisation  HPA's rule on CPU utilisation (the agent's container_cpu_usage_cores of the active
               replicas, one core per replica): ceil(active * mean utilisation / --util-target).

The same controller applies either: scale-up takes --startup seconds (a replica counts, and
costs, from the decision), scale-down waits for the advice to stay lower for --stabilise seconds;
1 to --max-replicas replicas. Reported side by side: requests over the TTFT SLO, TTFT p50/p95,
replica-seconds, and how far ahead of each queue-growth episode (engines' own requests_deferred
summed, crossing --queue-threshold) the advice had moved up.

All replicas share this machine's cores: with 2 cores a third replica adds little capacity; the
advice and its timing are what is compared, not absolute throughput.
Needs root (cgroups), `cargo build --release --locked -p headroom`, python3, cmake, g++.
usage: sudo scripts/bench-llm-replay.py [--trace code|conv] [--start-bin 100] [--bins 90] [--speed 5]
"""
import argparse, json, math, os, random, signal, socket, subprocess, sys, tempfile, threading, time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CG = "/sys/fs/cgroup"
WORKLOAD = "bench/Deployment/llm"


def controllers():
    if os.path.exists(f"{CG}/cgroup.controllers"):
        return [CG]
    out = []
    for c in ("cpu", "cpuacct", "memory", "pids"):
        p = f"{CG}/{c}"
        if os.path.exists(f"{p}/cgroup.procs") and os.path.realpath(p) not in map(os.path.realpath, out):
            out.append(p)
    return out


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def get(url, timeout=5):
    return urllib.request.urlopen(url, timeout=timeout).read().decode()


def prom_value(text, name, labels=()):
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in "{ "):
            if all(f'{k}="{v}"' in line for k, v in labels):
                total += float(line.rsplit(" ", 1)[1]); found = True
    return total if found else None


def read_series(path):
    rows = open(path).read().split("\n")[1:]
    return [float(r.split(",")[1]) for r in rows if r.strip()]


class Replicas:
    def __init__(self, n, server, model):
        self.ctrls, self.dirs, self.procs, self.ports, self.cgroups = controllers(), [], [], [], []
        for i in range(n):
            name = f"headroom-bench-llm-{os.getpid()}-{i}"
            dirs = [f"{c}/{name}" for c in self.ctrls]
            for d in dirs:
                os.makedirs(d, exist_ok=True)
            self.dirs += dirs
            self.cgroups.append("/" + name)
            port = free_port()
            join = "".join(f"echo $$ > {d}/cgroup.procs; " for d in dirs)
            cmd = [server, "-m", model, "--metrics", "-np", "2", "-c", "2048", "--host", "127.0.0.1",
                   "--port", str(port), "-t", "1", "--threads-http", "32"]
            self.procs.append(subprocess.Popen(["/bin/sh", "-c", join + 'exec "$0" "$@"'] + cmd,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            self.ports.append(port)
        for port in self.ports:
            deadline = time.time() + 120
            while True:
                try:
                    get(f"http://127.0.0.1:{port}/health"); break
                except OSError:
                    if time.time() > deadline:
                        raise SystemExit(f"llama-server on {port} not healthy")
                    time.sleep(0.5)

    def deferred(self):
        out = []
        for p in self.ports:
            try:
                out.append(prom_value(get(f"http://127.0.0.1:{p}/metrics", 2), "llamacpp:requests_deferred") or 0.0)
            except OSError:
                out.append(0.0)
        return out

    def stop(self):
        for p in self.procs:
            p.kill(); p.wait()
        for d in self.dirs:
            for _ in range(50):
                try:
                    os.rmdir(d); break
                except OSError:
                    time.sleep(0.05)


class Headroom:
    """A fresh aggregator and agent for one run."""

    def __init__(self, agent_bin, args, cgroup_glob):
        self.tmp = tempfile.mkdtemp(prefix="headroom-bench-llm-")
        token = f"{self.tmp}/token"
        open(token, "w").write("bench-token\n")
        self.agg_port, self.agent_port = free_port(), free_port()
        self.agg = subprocess.Popen([agent_bin, "aggregator", "--listen", f"127.0.0.1:{self.agg_port}",
                                     "--grpc-listen", f"127.0.0.1:{free_port()}", "--token-file", token,
                                     "--node-ttl", "10"],
                                    stdout=subprocess.DEVNULL, stderr=open(f"{self.tmp}/aggregator.log", "w"))
        cfg = f"{self.tmp}/agent.toml"
        open(cfg, "w").write(f"""sample_interval_s = 1.0
hostname = "bench-node"
[ebpf]
enabled = false
[forecast]
lead_time_s = {args.startup}
step_s = 1.0
target_violation = 0.1
[aggregator]
endpoints = ["http://127.0.0.1:{self.agg_port}"]
token_file = "{token}"
window_s = 30
[[aggregator.workloads]]
cgroup = "{cgroup_glob}"
namespace = "bench"
kind = "Deployment"
name = "llm"
[engines.targets]
waiting_per_replica = {args.waiting_per_replica}
kv_cache_ratio = 0.0
tokens_per_second = 0.0
concurrency_per_replica = {args.concurrency_per_replica}
""")
        self.agent = subprocess.Popen([agent_bin, "agent", "--config", cfg, "--listen", f"127.0.0.1:{self.agent_port}",
                                       "--state-dir", f"{self.tmp}/state", "--include-cgroup", cgroup_glob],
                                      stdout=subprocess.DEVNULL, stderr=open(f"{self.tmp}/agent.log", "w"))
        deadline = time.time() + 60
        while True:
            try:
                st = json.loads(get(f"http://127.0.0.1:{self.agent_port}/v1/status"))
                if len([e for e in st["engines"]["engines"] if e["up"]]) == args.max_replicas:
                    break
            except (OSError, KeyError, TypeError, ValueError):
                pass
            if time.time() > deadline:
                raise SystemExit(f"agent did not find the replicas; log in {self.tmp}")
            time.sleep(0.5)

    def advice(self):
        try:
            v = json.loads(get(f"http://127.0.0.1:{self.agg_port}/v1/workloads/{WORKLOAD}"))
            return v["desired_replicas"]
        except (OSError, KeyError, ValueError):
            return None

    def cpu(self, cgroup):
        try:
            m = get(f"http://127.0.0.1:{self.agent_port}/metrics")
        except OSError:
            return None
        return prom_value(m, "headroom_container_cpu_usage_cores", [("cgroup", cgroup)])

    def stop(self):
        for p in (self.agent, self.agg):
            p.send_signal(signal.SIGTERM); p.wait()


def schedule(args):
    base = os.environ.get("HEADROOM_TRACES_DIR", f"{ROOT}/../shared/data/traces")
    d = f"{base}/azure_llm_2023"
    reqs = read_series(f"{d}/series_{args.trace}_requests_per_10s.csv")[args.start_bin:args.start_bin + args.bins]
    toks = read_series(f"{d}/series_{args.trace}_tokens_per_10s.csv")[args.start_bin:args.start_bin + args.bins]
    bin_s = 10.0 / args.speed
    scale = args.peak_rps / (max(reqs) / bin_s)
    per_req = [t / r if r else 0.0 for r, t in zip(reqs, toks)]
    top = max(per_req) or 1.0
    rng = random.Random(args.seed)
    arrivals = []
    for i, (r, tpr) in enumerate(zip(reqs, per_req)):
        rate = r / bin_s * scale
        t = i * bin_s
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= (i + 1) * bin_s:
                break
            arrivals.append((t, int(16 + 48 * tpr / top)))
    return arrivals, len(reqs) * bin_s, scale


def replay(args, policy, reps, hr, arrivals, duration):
    active = 1
    pending = []  # activation times of replicas being started
    outstanding = [0] * len(reps.ports)
    lock = threading.Lock()
    results = []
    timeline = []  # (t, active incl. pending, advice, total deferred)
    lower_since = None
    t0 = time.time()
    stop = threading.Event()

    def request(t_arr, n):
        with lock:
            i = min(range(active), key=lambda k: outstanding[k])
            outstanding[i] += 1
        body = json.dumps({"prompt": "Summarise the following request and answer it briefly: " + "word " * 20,
                           "n_predict": n, "stream": True, "cache_prompt": False, "temperature": 0.7}).encode()
        ttft = None
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{reps.ports[i]}/completion", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                for line in r:
                    if line.startswith(b"data:") and ttft is None:
                        ttft = time.time() - (t0 + t_arr)
        except OSError:
            pass
        finally:
            with lock:
                outstanding[i] -= 1
                results.append((t_arr, ttft))

    def control():
        nonlocal active, lower_since
        while not stop.is_set():
            now = time.time() - t0
            with lock:
                while pending and pending[0] <= now:
                    pending.pop(0); active += 1
                running = active
            if policy == "hold":
                adv = 1
            elif policy == "headroom":
                adv = hr.advice()
            else:
                utils = [hr.cpu(c) for c in reps.cgroups[:running]]
                utils = [u for u in utils if u is not None]
                adv = math.ceil(running * (sum(utils) / len(utils)) / args.util_target) if utils else None
            total = running + len(pending)
            want = total if adv is None else max(1, min(args.max_replicas, adv))
            if want > total:
                with lock:
                    pending.extend([now + args.startup] * (want - total))
                lower_since = None
            elif want < total:
                lower_since = lower_since if lower_since is not None else now
                if now - lower_since >= args.stabilise:
                    with lock:
                        if pending:
                            pending.pop()
                        elif active > 1:
                            active -= 1
                    lower_since = None
            else:
                lower_since = None
            q = sum(reps.deferred())
            with lock:
                timeline.append((now, active + len(pending), adv, q))
            stop.wait(1.0)

    ctl = threading.Thread(target=control); ctl.start()
    threads = []
    for t_arr, n in arrivals:
        delay = t0 + t_arr - time.time()
        if delay > 0:
            time.sleep(delay)
        th = threading.Thread(target=request, args=(t_arr, n)); th.start(); threads.append(th)
    while time.time() - t0 < duration:
        time.sleep(0.2)
    for th in threads:
        th.join()
    stop.set(); ctl.join()
    return results, timeline


def summarise(results, timeline, args):
    ttfts = sorted(t for _, t in results if t is not None)
    failed = sum(1 for _, t in results if t is None)
    over = sum(1 for _, t in results if t is None or t > args.slo)
    pct = lambda p: ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))] if ttfts else float("nan")
    rs = sum(a for _, a, _, _ in timeline)  # one point per second
    # Queue-growth episodes: the engines' deferred sum crosses the threshold after >= 5 s below it.
    leads, below_since = [], None
    for k, (t, _, _, q) in enumerate(timeline):
        if q <= args.queue_threshold:
            below_since = below_since if below_since is not None else t
            continue
        if below_since is not None and t - below_since >= 5:
            # The last time the replica count (decided by the advice) went up, within 60 s before.
            ups = [timeline[j][0] for j in range(1, k + 1)
                   if timeline[j][1] > timeline[j - 1][1] and t - 60 <= timeline[j][0]]
            later = [timeline[j][0] for j in range(k + 1, len(timeline))
                     if timeline[j][1] > timeline[j - 1][1]]
            leads.append(t - ups[-1] if ups else (-(later[0] - t) if later else None))
        below_since = None
    return {"requests": len(results), "over_slo": over, "failed": failed, "p50": pct(0.5), "p95": pct(0.95),
            "replica_s": rs, "episodes": len(leads), "leads": leads}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", default="code", choices=["code", "conv"])
    ap.add_argument("--start-bin", type=int, default=100)
    ap.add_argument("--bins", type=int, default=90)
    ap.add_argument("--speed", type=float, default=5.0, help="trace seconds per replay second")
    ap.add_argument("--peak-rps", type=float, default=2.5, help="replayed requests per second at the window's busiest bin")
    ap.add_argument("--max-replicas", type=int, default=3)
    ap.add_argument("--startup", type=float, default=5.0)
    ap.add_argument("--stabilise", type=float, default=15.0)
    ap.add_argument("--slo", type=float, default=2.0, help="TTFT SLO, seconds")
    ap.add_argument("--waiting-per-replica", type=float, default=2.0)
    ap.add_argument("--concurrency-per-replica", type=float, default=0.0,
                    help="engine_concurrency target (requests in flight per replica; 0: off)")
    ap.add_argument("--util-target", type=float, default=0.6)
    ap.add_argument("--queue-threshold", type=float, default=2.0)
    ap.add_argument("--warmup", type=float, default=40.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--agent", default=f"{ROOT}/target/release/headroom")
    ap.add_argument("--policies", default="headroom,utilisation")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (creates cgroups)")
    out = subprocess.run([f"{ROOT}/tests/llm/build-llama-server.sh"], check=True, capture_output=True, text=True).stdout
    paths = dict(l.split("=", 1) for l in out.split())
    arrivals, duration, scale = schedule(args)
    print(f"Azure LLM 2023 '{args.trace}' bins {args.start_bin}..{args.start_bin + args.bins} (10 s each) at {args.speed}x: "
          f"{len(arrivals)} requests in {duration:.0f} s (rate x{scale:.3f}); SLO TTFT {args.slo} s; "
          f"start-up {args.startup} s; 1..{args.max_replicas} replicas", flush=True)
    reps = Replicas(args.max_replicas, paths["server"], paths["model"])
    summary = {}
    try:
        for policy in args.policies.split(","):
            hr = Headroom(args.agent, args, f"/headroom-bench-llm-{os.getpid()}-*")
            try:
                # Light load so history, forecasts and confidence exist before the replay.
                warm = [(i * 2.0, 16) for i in range(int(args.warmup / 2))]
                replay(args, "hold", reps, hr, warm, args.warmup)
                results, timeline = replay(args, policy, reps, hr, arrivals, duration)
            finally:
                hr.stop()
            s = summarise(results, timeline, args)
            summary[policy] = s
            print(f"  {policy}: {s['requests']} requests, {s['over_slo']} over the SLO ({s['failed']} failed), "
                  f"TTFT p50 {s['p50']:.2f} s p95 {s['p95']:.2f} s, {s['replica_s']:.0f} replica-seconds, "
                  f"leads {s['leads']}", flush=True)
            json.dump({"timeline": timeline, "results": results}, open(f"/tmp/bench-llm-{policy}.json", "w"))
    finally:
        reps.stop()
    print("\n| | " + " | ".join(summary) + " |\n|---|" + "---|" * len(summary))
    for key, label in [("requests", "requests"), ("over_slo", "over the TTFT SLO"), ("p50", "TTFT p50 (s)"),
                       ("p95", "TTFT p95 (s)"), ("replica_s", "replica-seconds"), ("episodes", "queue-growth episodes")]:
        vals = [summary[p][key] for p in summary]
        print(f"| {label} | " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in vals) + " |")
    fmt = lambda ls: ", ".join("never" if l is None else f"{l:+.0f}" for l in ls) or "—"
    print("| advice moved up before the queue grew (s; negative: after) | " + " | ".join(fmt(summary[p]["leads"]) for p in summary) + " |")


if __name__ == "__main__":
    main()
