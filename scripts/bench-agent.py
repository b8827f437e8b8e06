#!/usr/bin/env python3
"""Agent cost benchmark, side by side with prometheus-node-exporter on the same node.

Creates N cgroups (default 100) each holding one sleeping process, runs the release agent
(tracking them) and node_exporter, then reports for both:
  - CPU seconds per scrape over M scrapes (default 1000), from /proc/<pid>/stat;
  - CPU while idle (no scrapes) over a window, as % of one core;
  - peak RSS (VmHWM);
and, with --soak SECONDS, the agent's RSS over a run in which containers churn every second.

Needs root (creates cgroups), `cargo build --release`, and Debian's prometheus-node-exporter.
With --port-churn the soak also serves a few requests on each of many short-lived ports from this
(host, not container) process, which the eBPF probes see and the agent must not keep.
usage: sudo scripts/bench-agent.py [--containers 100] [--scrapes 1000] [--idle 60] [--soak 600] [--port-churn] [--config FILE]
"""
import argparse, os, shutil, signal, socket, subprocess, sys, tempfile, threading, time, urllib.request

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


def cpu_seconds(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TPS


def status_kib(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Containers:
    def __init__(self, workload):
        self.workload, self.ctrls, self.live = workload, controllers(), {}
        self.seq = 0

    def add(self):
        name = f"headroom-bench-{os.getpid()}-{self.seq}"; self.seq += 1
        dirs = [f"{c}/{name}" for c in self.ctrls]
        for d in dirs:
            os.makedirs(d, exist_ok=True)
        script = "".join(f"echo $$ > {d}/cgroup.procs; " for d in dirs) + 'exec "$0" sleep'
        p = subprocess.Popen(["/bin/sh", "-c", script, self.workload])
        self.live[name] = (p, dirs)

    def remove(self, name):
        p, dirs = self.live.pop(name)
        p.kill(); p.wait()
        for d in dirs:
            for _ in range(50):
                try:
                    os.rmdir(d); break
                except OSError:
                    time.sleep(0.02)

    def clear(self):
        for n in list(self.live):
            self.remove(n)


def scrape(port, n):
    url = f"http://127.0.0.1:{port}/metrics"
    size = 0
    for _ in range(n):
        with urllib.request.urlopen(url) as r:
            size = len(r.read())
    return size


def churn_ports(stop, served):
    """Until `stop` is set: listen on a fresh port, serve three requests on it, close it."""
    while not stop.is_set():
        srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(8)
        port = srv.getsockname()[1]

        def serve():
            for _ in range(3):
                c, _ = srv.accept(); c.recv(100); c.sendall(b"HTTP/1.0 200 OK\r\n\r\nok"); c.close()
        t = threading.Thread(target=serve); t.start()
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port)) as c:
                c.sendall(b"GET / HTTP/1.0\r\n\r\n"); c.recv(100)
        t.join(); srv.close(); served[0] += 1
        time.sleep(0.02)


def wait_http(port, path="/metrics", timeout=30):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}").read(); return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing answered on port {port}{path}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--containers", type=int, default=100)
    ap.add_argument("--scrapes", type=int, default=1000)
    ap.add_argument("--idle", type=float, default=60)
    ap.add_argument("--soak", type=float, default=0)
    ap.add_argument("--port-churn", action="store_true", help="serve short-lived host ports during the soak")
    ap.add_argument("--config", help="agent config file (e.g. to compare with [forecast] enabled = false)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root: it creates cgroups")
    agent_bin = os.path.join(ROOT, "target/release/headroom")
    workload = os.path.join(ROOT, "target/release/headroom-workload")
    if not (os.path.exists(agent_bin) and os.path.exists(workload)):
        sys.exit("build first: cargo build --release --locked -p headroom -p headroom-tests")
    exporter = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    if not exporter:
        sys.exit("install prometheus-node-exporter (apt-get install prometheus-node-exporter)")

    cs = Containers(workload)
    procs = []
    state = tempfile.mkdtemp(prefix="headroom-bench-")
    try:
        for _ in range(a.containers):
            cs.add()
        ap_, np_ = free_port(), free_port()
        agent = subprocess.Popen([agent_bin, "agent", "--listen", f"127.0.0.1:{ap_}", "--state-dir", state,
                                  "--include-cgroup", f"/headroom-bench-{os.getpid()}-*", "--sample-interval", "1"]
                                 + (["--config", a.config] if a.config else []),
                                 stderr=subprocess.DEVNULL)
        node = subprocess.Popen([exporter, f"--web.listen-address=127.0.0.1:{np_}"], stderr=subprocess.DEVNULL)
        procs = [agent, node]
        wait_http(ap_, "/readyz"); wait_http(np_)
        time.sleep(3)
        found = [l for l in urllib.request.urlopen(f"http://127.0.0.1:{ap_}/metrics").read().decode().splitlines()
                 if l.startswith("headroom_agent_containers ")]
        print(f"containers: {a.containers} created; agent reports {found[0].split()[1] if found else '?'}")

        c0 = {p.pid: cpu_seconds(p.pid) for p in procs}
        time.sleep(a.idle)
        idle = {p.pid: (cpu_seconds(p.pid) - c0[p.pid]) / a.idle * 100 for p in procs}

        per_scrape, sizes = {}, {}
        for name, p, port in (("headroom", agent, ap_), ("node_exporter", node, np_)):
            t0, c = time.time(), cpu_seconds(p.pid)
            sizes[name] = scrape(port, a.scrapes)
            wall = time.time() - t0
            used = cpu_seconds(p.pid) - c
            # The agent also samples at 1 Hz during the scrapes; that share is its idle rate.
            net = used - (idle[p.pid] / 100 * wall if name == "headroom" else 0)
            per_scrape[name] = (used / a.scrapes, net / a.scrapes, wall)

        print(f"\n{'':24}{'headroom':>14}{'node_exporter':>16}")
        print(f"{'CPU ms per scrape':24}{per_scrape['headroom'][0]*1e3:>14.3f}{per_scrape['node_exporter'][0]*1e3:>16.3f}")
        print(f"{'  (net of 1 Hz sampling)':24}{per_scrape['headroom'][1]*1e3:>14.3f}{'':>16}")
        print(f"{'ratio headroom/node_exp':24}{per_scrape['headroom'][0]/per_scrape['node_exporter'][0]:>14.3f}   (target <= 0.5)")
        print(f"{'idle CPU % of one core':24}{idle[agent.pid]:>14.3f}{idle[node.pid]:>16.3f}   (target <= 0.5 for headroom)")
        print(f"{'peak RSS MiB (VmHWM)':24}{status_kib(agent.pid, 'VmHWM')/1024:>14.1f}{status_kib(node.pid, 'VmHWM')/1024:>16.1f}   (target <= 20)")
        print(f"{'exposition bytes':24}{sizes['headroom']:>14}{sizes['node_exporter']:>16}")
        print(f"scrapes: {a.scrapes} each; idle window {a.idle:.0f} s; {a.containers} cgroups, each with a process")

        if a.soak > 0:
            print(f"\nsoak: {a.soak:.0f} s, one container replaced every second"
                  + (", short-lived host ports served throughout" if a.port_churn else ""))
            stop, served = threading.Event(), [0]
            churner = threading.Thread(target=churn_ports, args=(stop, served))
            if a.port_churn:
                churner.start()
            t0, rss = time.time(), []
            next_report = t0
            while time.time() - t0 < a.soak:
                cs.remove(next(iter(cs.live))); cs.add()
                if time.time() >= next_report:
                    rss.append(status_kib(agent.pid, "VmRSS") / 1024)
                    next_report += 30
                time.sleep(1)
            rss.append(status_kib(agent.pid, "VmRSS") / 1024)
            if a.port_churn:
                stop.set(); churner.join()
                print(f"host ports served: {served[0]}")
            print("agent RSS MiB every 30 s: " + " ".join(f"{r:.1f}" for r in rss))
            print(f"min {min(rss):.1f}  max {max(rss):.1f}  last-minus-first {rss[-1]-rss[0]:+.1f}  peak {status_kib(agent.pid, 'VmHWM')/1024:.1f}")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        cs.clear()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
