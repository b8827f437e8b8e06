#!/usr/bin/env python3
"""Cost of scraping inference engines: the agent with and without `[engines]`, side by side.

Starts N engines (default 8), each alone in a cgroup of its own, then runs the agent (tracking
those cgroups, 1 s sample interval) alternately with `[engines] enabled = true` and `false`,
ROUNDS times each, and reports per run:
  - the agent's CPU over the window, as % of a core: time on CPU of all its threads from
    /proc/<pid>/task/*/schedstat (nanoseconds; utime + stime, which count whole clock ticks, beside it);
  - the CPU of its `headroom-engines` worker thread alone (its schedstat);
  - scrapes done in the window (from /v1/status) and the mean scrape duration.
The engines answer with a vLLM-sized /metrics body (the vLLM fixture plus ten more histogram
families of 16 buckets, about 34 KB, the order of a real vLLM server's with one model; with
--label-sets 3 each family has three label sets, about 83 KB) unless --llama is given, which runs
real llama-server processes (tests/llm/build-llama-server.sh; a body of about 1.5 KB).

Needs root (creates cgroups) and a built agent (`cargo build --release --locked -p headroom`;
--agent PATH picks another binary, e.g. target/debug/headroom).
usage: sudo scripts/bench-engines.py [--engines 8] [--seconds 60] [--rounds 2] [--llama] [--agent PATH]
"""
import argparse, json, os, signal, socket, subprocess, sys, tempfile, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CG = "/sys/fs/cgroup"
TPS = os.sysconf("SC_CLK_TCK")


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


def cpu_seconds(path):
    f = open(path).read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TPS


def sched_seconds(task_dir):
    """Time on CPU in ns from schedstat: exact, where utime/stime count whole clock ticks."""
    return int(open(f"{task_dir}/schedstat").read().split()[0]) / 1e9


def process_sched_seconds(pid):
    total = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            total += sched_seconds(f"/proc/{pid}/task/{tid}")
        except OSError:
            pass  # a thread that ended (its time is lost; only short-lived helpers)
    return total


def worker_tid(pid):
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            # comm holds 15 characters: "headroom-engine".
            if open(f"/proc/{pid}/task/{tid}/comm").read().strip().startswith("headroom-engine"):
                return tid
        except OSError:
            pass
    return None


def get(port, path):
    return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).read().decode()


def vllm_body(reasons):
    base = open(f"{ROOT}/agent/src/sample/engines/fixtures/vllm_b.txt").read()
    extra = []
    les = ["0.3", "0.5", "0.8", "1.0", "1.5", "2.0", "2.5", "5.0", "10.0", "15.0", "20.0", "30.0", "40.0", "50.0", "60.0", "+Inf"]
    for fam in ["e2e_request_latency_seconds", "request_queue_time_seconds", "request_inference_time_seconds",
                "request_prefill_time_seconds", "request_decode_time_seconds", "request_prompt_tokens",
                "request_generation_tokens", "request_params_n", "request_max_num_generation_tokens",
                "iteration_tokens_total"]:
        for finished in ["stop", "length", "abort"][:reasons]:
            lab = f'engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct",finished_reason="{finished}"'
            extra.append(f"# HELP vllm:{fam} Histogram of {fam}.\n# TYPE vllm:{fam} histogram")
            for i, le in enumerate(les):
                extra.append(f'vllm:{fam}_bucket{{{lab},le="{le}"}} {10 * (i + 1)}.0')
            extra.append(f"vllm:{fam}_count{{{lab}}} {10 * len(les)}.0\nvllm:{fam}_sum{{{lab}}} 1234.5")
    return base + "\n".join(extra) + "\n"


SERVER = r'''
import http.server, sys
body = open(sys.argv[2], "rb").read()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as vLLM's uvicorn and llama-server's httplib
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''


class Engines:
    def __init__(self, n, llama, reasons=1):
        self.ctrls, self.dirs, self.procs = controllers(), [], []
        tmp = tempfile.mkdtemp(prefix="headroom-bench-engines-")
        if llama:
            out = subprocess.run([f"{ROOT}/tests/llm/build-llama-server.sh"], check=True,
                                 capture_output=True, text=True).stdout
            paths = dict(l.split("=", 1) for l in out.split())
        else:
            body = f"{tmp}/metrics.txt"
            open(body, "w").write(vllm_body(reasons))
            self.body_bytes = os.path.getsize(body)
        for i in range(n):
            name = f"headroom-bench-engine-{os.getpid()}-{i}"
            dirs = [f"{c}/{name}" for c in self.ctrls]
            for d in dirs:
                os.makedirs(d, exist_ok=True)
            self.dirs += dirs
            port = free_port()
            join = "".join(f"echo $$ > {d}/cgroup.procs; " for d in dirs)
            if llama:
                cmd = [paths["server"], "-m", paths["model"], "--metrics", "-np", "2", "-c", "1024",
                       "--host", "127.0.0.1", "--port", str(port), "-t", "1"]
            else:
                cmd = [sys.executable, "-c", SERVER, str(port), body]
            self.procs.append(subprocess.Popen(["/bin/sh", "-c", join + 'exec "$0" "$@"'] + cmd,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            self.port = port
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                self.body_bytes = len(get(self.port, "/metrics"))
                break
            except OSError:
                time.sleep(0.5)

    def stop(self):
        for p in self.procs:
            p.kill(); p.wait()
        for d in self.dirs:
            for _ in range(50):
                try:
                    os.rmdir(d); break
                except OSError:
                    time.sleep(0.05)


def run(agent, enabled, seconds, n):
    state = tempfile.mkdtemp(prefix="headroom-bench-state-")
    cfg = f"{state}/headroom.toml"
    open(cfg, "w").write(f"sample_interval_s = 1.0\n[ebpf]\nenabled = false\n[engines]\nenabled = {str(enabled).lower()}\n")
    port = free_port()
    p = subprocess.Popen([agent, "agent", "--config", cfg, "--listen", f"127.0.0.1:{port}",
                          "--state-dir", f"{state}/state", "--include-cgroup", "/headroom-bench-engine-*"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                st = json.loads(get(port, "/v1/status"))
                found = len([e for e in (st.get("engines") or {}).get("engines", []) if e.get("up")])
                if st.get("ready") and (not enabled or found == n):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit(f"agent not ready with {n} engines")
        time.sleep(5)  # past start-up work
        tid = worker_tid(p.pid)
        scrapes = lambda: sum(e["scrapes"] for e in (json.loads(get(port, "/v1/status")).get("engines") or {}).get("engines", []))
        s0, c0, k0 = scrapes(), process_sched_seconds(p.pid), cpu_seconds(f"/proc/{p.pid}/stat")
        w0 = sched_seconds(f"/proc/{p.pid}/task/{tid}") if tid else 0.0
        t0 = time.time()
        time.sleep(seconds)
        wall = time.time() - t0
        c1, k1 = process_sched_seconds(p.pid), cpu_seconds(f"/proc/{p.pid}/stat")
        w1 = sched_seconds(f"/proc/{p.pid}/task/{tid}") if tid else 0.0
        s1 = scrapes()
        st = json.loads(get(port, "/v1/status"))
        durs = [e["last_scrape_duration_seconds"] for e in (st.get("engines") or {}).get("engines", [])]
        return {"cpu": (c1 - c0) / wall * 100, "ticks": (k1 - k0) / wall * 100,
                "worker": (w1 - w0) / wall * 100, "scrapes": s1 - s0,
                "wall": wall, "scrape_ms": (sum(durs) / len(durs) * 1e3) if durs else 0.0}
    finally:
        p.send_signal(signal.SIGTERM); p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--llama", action="store_true")
    ap.add_argument("--label-sets", type=int, default=1, choices=[1, 2, 3],
                    help="label sets per extra histogram family in the vLLM-sized body (3: about 83 KB)")
    ap.add_argument("--agent", default=f"{ROOT}/target/release/headroom")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (creates cgroups)")
    engines = Engines(a.engines, a.llama, a.label_sets)
    try:
        print(f"{a.engines} engines ({'llama-server' if a.llama else 'vLLM-sized body'}, {engines.body_bytes} bytes of /metrics), "
              f"agent {a.agent}, 1 s interval, {a.seconds:.0f} s per run")
        rows = {True: [], False: []}
        for r in range(a.rounds):
            for enabled in (True, False):
                res = run(a.agent, enabled, a.seconds, a.engines)
                rows[enabled].append(res)
                print(f"  round {r + 1} engines {'on ' if enabled else 'off'}: agent {res['cpu']:.3f} % of a core "
                      f"({res['ticks']:.3f} by utime+stime), "
                      f"engine worker {res['worker']:.3f} %, {res['scrapes']} scrapes "
                      f"({res['scrapes'] / res['wall']:.2f}/s), last scrape {res['scrape_ms']:.2f} ms", flush=True)
        mean = lambda xs: sum(xs) / len(xs)
        on, off = mean([x["cpu"] for x in rows[True]]), mean([x["cpu"] for x in rows[False]])
        worker = mean([x["worker"] for x in rows[True]])
        print(f"\n| | engines on | engines off | difference |\n|---|---|---|---|\n"
              f"| agent CPU, % of a core | {on:.3f} | {off:.3f} | {on - off:+.3f} |\n"
              f"| engine worker thread, % of a core | {worker:.3f} | — | |")
    finally:
        engines.stop()


if __name__ == "__main__":
    main()
