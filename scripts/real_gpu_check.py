#!/usr/bin/env python3
"""Real-GPU check: the headroom agent against the real NVIDIA driver while a PyTorch matmul loop runs.

Starts `BINARY agent`, starts a CUDA workload (put in its own cgroup when the cgroup tree is writable),
then every ~2 s samples /metrics and `nvidia-smi --query-gpu` at the same moment and compares per-GPU
utilisation (target: within 5 points) and memory used (target: within 1 %), and checks that the
workload's PID and memory are attributed to its cgroup. Prints a PASS/FAIL table, nvidia-smi, the
driver version and the NVML calls the agent found unsupported. Saves every /metrics snapshot.
Uses only the Python standard library, torch and nvidia-smi; finishes in under 150 s.
"""

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

UTIL_TOL_POINTS = 5.0
MEM_TOL_FRACTION = 0.01

WORKLOAD = r"""
import os, sys, time, torch
dur = float(sys.argv[1])
dev = torch.device("cuda:0")
a = torch.randn(8192, 8192, device=dev)
b = torch.randn(8192, 8192, device=dev)
hold = torch.ones(1024 * 1024 * 1024, dtype=torch.float32, device=dev)  # 4 GiB held for the run
torch.cuda.synchronize()
print("READY", os.getpid(), flush=True)
end = time.time() + dur
n = 0
while time.time() < end:
    c = a @ b
    n += 1
    if n % 8 == 0:
        torch.cuda.synchronize()
torch.cuda.synchronize()
print("DONE", n, "matmuls", flush=True)
"""

LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text):
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = LINE.match(line)
        if not m:
            continue
        labels = dict(LABEL.findall(m.group(2) or ""))
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.append((m.group(1), labels, value))
    return out


def pick(metrics, name, **want):
    return [(l, v) for (n, l, v) in metrics if n == name and all(l.get(k) == w for k, w in want.items())]


def container_key(pid):
    """The agent's rule: cgroup v2 path unless it is '/', else the v1 cpu/cpuacct line, else memory."""
    try:
        text = open(f"/proc/{pid}/cgroup").read()
    except OSError as e:
        return None, str(e)
    v2 = cpu = mem = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, ctrls, path = parts
        names = ctrls.split(",")
        if hid == "0" and ctrls == "":
            v2 = path
        elif "cpu" in names or "cpuacct" in names:
            cpu = path
        elif "memory" in names:
            mem = path
    if v2 and v2 != "/":
        return v2, text
    return cpu or mem or v2, text


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def smi(*args, timeout=20):
    r = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=timeout)
    return r.stdout.strip() if r.returncode == 0 else f"(nvidia-smi {' '.join(args)} failed: {r.stderr.strip()})"


def smi_gpus():
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,uuid,utilization.gpu,memory.used,memory.total",
         "--format=csv,noheader,nounits"],
        capture_output=True, text=True, timeout=20, check=True).stdout
    rows = {}
    for line in out.strip().splitlines():
        idx, uuid, util, used, total = [x.strip() for x in line.split(",")]
        rows[uuid] = {"index": idx, "util": float(util), "used_mib": float(used), "total_mib": float(total)}
    return rows


def fetch(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def make_cgroup():
    """A cgroup v2 (or v1 cpu) directory for the workload; None when the tree is not writable."""
    for base in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/cpu"):
        if not os.path.exists(os.path.join(base, "cgroup.procs")):
            continue
        path = os.path.join(base, f"headroom-gpu-check-{os.getpid()}")
        try:
            os.mkdir(path)
            return path
        except OSError as e:
            print(f"note: cannot create a cgroup under {base}: {e}")
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--out", default=os.environ.get("OUT") or tempfile.mkdtemp(prefix="headroom-gpu-check-"))
    args = ap.parse_args()
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    snaps = os.path.join(args.out, "metrics")
    os.makedirs(snaps, exist_ok=True)

    print("=" * 100)
    print(smi())
    print("=" * 100)
    print("driver version:", (smi("--query-gpu=driver_version", "--format=csv,noheader").splitlines() or ["?"])[0])
    print("binary:", args.binary, "| output:", args.out)

    port = free_port()
    state = tempfile.mkdtemp(prefix="headroom-state-")
    agent_log = open(os.path.join(args.out, "agent.log"), "w")
    agent_cmd = [args.binary, "agent", "--listen", f"127.0.0.1:{port}", "--state-dir", state]
    print("agent:", " ".join(agent_cmd))
    agent = subprocess.Popen(agent_cmd, stdout=agent_log, stderr=subprocess.STDOUT,
                             env={**os.environ, "NO_COLOR": "1"})
    url = f"http://127.0.0.1:{port}/metrics"
    workload = None
    cg = None
    results = []
    failures = []
    try:
        deadline = time.time() + 20
        text = None
        while time.time() < deadline:
            if agent.poll() is not None:
                break
            try:
                text = fetch(url)
                if "headroom_gpu_nvml_up" in text:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        if agent.poll() is not None or text is None:
            agent_log.flush()
            print(open(os.path.join(args.out, "agent.log")).read()[-4000:])
            print(f"FAIL: agent did not serve {url} (exit code {agent.poll()})")
            return 1
        print(f"agent up after {time.time() - t_start:.1f} s")

        cg = make_cgroup()
        def enter_cgroup():
            if cg:
                with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
        workload = subprocess.Popen(
            [sys.executable, "-c", WORKLOAD, str(args.seconds)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=enter_cgroup if cg else None)
        first = workload.stdout.readline().split()
        if not first or first[0] != "READY":
            print("FAIL: workload did not start:", " ".join(first), workload.stdout.read()[-3000:])
            return 1
        pid = int(first[1])
        key, cgtext = container_key(pid)
        print(f"workload pid {pid}, cgroup key {key!r} (created: {cg or 'no, using its existing cgroup'})")
        print("  /proc/%d/cgroup: %s" % (pid, " | ".join(cgtext.splitlines()) if cgtext else cgtext))
        t_ready = time.time()
        n = 0
        last_metrics = None
        while workload.poll() is None and time.time() < t_ready + args.seconds - 1:
            t0 = time.time()
            try:
                g = smi_gpus()
                text = fetch(url)
            except Exception as e:  # noqa: BLE001 - report and continue sampling
                print("sample failed:", e)
                time.sleep(args.interval)
                continue
            n += 1
            with open(os.path.join(snaps, f"{n:03d}.txt"), "w") as f:
                f.write(text)
            m = parse_metrics(text)
            last_metrics = m
            for uuid, row in g.items():
                u = pick(m, "headroom_gpu_utilization_ratio", UUID=uuid)
                used = pick(m, "headroom_gpu_memory_used_bytes", UUID=uuid)
                res = pick(m, "headroom_gpu_memory_reserved_bytes", UUID=uuid)
                results.append({
                    "t": t0 - t_ready, "uuid": uuid, "gpu": row["index"],
                    "smi_util": row["util"], "agent_util": u[0][1] * 100 if u else None,
                    "smi_used": row["used_mib"], "total": row["total_mib"],
                    "agent_used": used[0][1] / 2**20 if used else None,
                    "agent_reserved": res[0][1] / 2**20 if res else 0.0,
                })
            time.sleep(max(0.0, args.interval - (time.time() - t0)))

        # Comparison table
        print()
        print(f"{'t/s':>6} {'gpu':>3} {'smi util':>8} {'agent':>6} {'d':>5}  {'smi MiB':>9} {'agent MiB':>10} {'d %':>6}")
        util_ok = mem_ok = 0
        util_n = mem_n = 0
        mem_def = set()
        for r in results:
            du = None if r["agent_util"] is None else r["agent_util"] - r["smi_util"]
            dm = None
            if r["agent_used"] is not None and r["smi_used"] > 0:
                # nvidia-smi's "used" includes driver-reserved memory on some drivers; accept either.
                d_plain = (r["agent_used"] - r["smi_used"]) / r["smi_used"]
                d_res = (r["agent_used"] + r["agent_reserved"] - r["smi_used"]) / r["smi_used"]
                if abs(d_res) < abs(d_plain):
                    dm = d_res
                    mem_def.add("used+reserved")
                else:
                    dm = d_plain
                    mem_def.add("used")
            steady = r["t"] > 4
            if steady:
                util_n += 1
                mem_n += 1
                util_ok += du is not None and abs(du) <= UTIL_TOL_POINTS
                mem_ok += dm is not None and abs(dm) <= MEM_TOL_FRACTION
            print(f"{r['t']:6.1f} {r['gpu']:>3} {r['smi_util']:8.0f} "
                  f"{'-' if r['agent_util'] is None else format(r['agent_util'], '6.0f'):>6} "
                  f"{'-' if du is None else format(du, '+5.0f'):>5}  {r['smi_used']:9.0f} "
                  f"{'-' if r['agent_used'] is None else format(r['agent_used'], '10.0f'):>10} "
                  f"{'-' if dm is None else format(dm * 100, '+6.2f'):>6}{'' if steady else '  (warm-up)'}")
        diffs = [abs(r["agent_util"] - r["smi_util"]) for r in results if r["agent_util"] is not None and r["t"] > 4]
        print()
        print(f"memory 'used' definition that matched nvidia-smi: {sorted(mem_def)}")
        checks = []
        want_n = int(0.6 * args.seconds / args.interval)
        checks.append((f"samples taken (>= {want_n})", n >= want_n, f"{n}"))
        checks.append((f"GPU utilisation within {UTIL_TOL_POINTS:.0f} points (>= 90% of steady samples)",
                       util_n > 0 and util_ok >= 0.9 * util_n,
                       f"{util_ok}/{util_n}, median |d| {statistics.median(diffs) if diffs else float('nan'):.1f}"))
        checks.append((f"memory used within {MEM_TOL_FRACTION:.0%} (>= 90% of steady samples)",
                       mem_n > 0 and mem_ok >= 0.9 * mem_n, f"{mem_ok}/{mem_n}"))
        m = last_metrics or []
        procs = pick(m, "headroom_gpu_process_memory_used_bytes", pid=str(pid))
        nvml_pids = sorted({l.get("pid") for l, _ in pick(m, "headroom_gpu_process_memory_used_bytes")})
        checks.append(("workload PID reported with GPU memory",
                       bool(procs) and all(v > 0 for _, v in procs),
                       f"{[(l.get('gpu'), v / 2**20) for l, v in procs]} MiB; NVML PIDs {nvml_pids}; "
                       f"nvidia-smi apps: {smi('--query-compute-apps=pid,used_memory', '--format=csv,noheader')!r}"))
        checks.append(("workload PID attributed to its cgroup",
                       bool(procs) and all(l.get("cgroup") == key for l, _ in procs),
                       f"expected {key!r}, got {[l.get('cgroup') for l, _ in procs]}"))
        cont = pick(m, "headroom_gpu_container_memory_used_bytes", cgroup=key or "")
        pmem = sum(v for _, v in procs)
        checks.append(("container series sums the workload's memory",
                       bool(cont) and sum(v for _, v in cont) >= pmem > 0,
                       f"{[(l.get('gpu'), v / 2**20) for l, v in cont]} MiB"))
        health = pick(m, "headroom_gpu_healthy")
        checks.append(("every GPU healthy", bool(health) and all(v == 1.0 for _, v in health),
                       f"{[(l.get('gpu'), v) for l, v in health]}"))
        print()
        print(f"{'check':<68} {'result':<6} detail")
        for name, ok, detail in checks:
            print(f"{name:<68} {'PASS' if ok else 'FAIL':<6} {detail}")
            if not ok:
                failures.append(name)
        print()
        unsupported = sorted({(l.get("gpu"), l.get("call")) for l, _ in pick(m, "headroom_gpu_nvml_call_unsupported")})
        print("NVML calls unsupported (gpu, call):", unsupported or "none")
        for name in ("headroom_gpu_gpm_sm_activity_ratio", "headroom_gpu_gpm_tensor_activity_ratio",
                     "headroom_gpu_power_watts", "headroom_gpu_temperature_celsius",
                     "headroom_gpu_sm_clock_hertz", "headroom_gpu_energy_joules_total"):
            print(f"  {name}: {[(l.get('gpu'), v) for l, v in pick(m, name)]}")
        print("workload output:", workload.communicate(timeout=30)[0].strip()[-300:] if workload.poll() is not None
              else "(still running)")
    finally:
        if workload and workload.poll() is None:
            workload.kill()
            workload.wait()
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        agent_log.close()
        if cg:
            try:
                os.rmdir(cg)
            except OSError as e:
                print(f"note: could not remove {cg}: {e}")
        shutil.rmtree(state, ignore_errors=True)
    log = open(os.path.join(args.out, "agent.log")).read().splitlines()
    print()
    print("agent log (GPU lines):")
    for line in log:
        if "GPU" in line or "NVML" in line or "nvml" in line:
            print("  ", line[:300])
    print()
    print(f"elapsed {time.time() - t_start:.0f} s; /metrics snapshots in {snaps}")
    print("RESULT:", "PASS" if not failures else "FAIL (" + "; ".join(failures) + ")")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
