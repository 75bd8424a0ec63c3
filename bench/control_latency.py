#!/usr/bin/env python3
"""How fast the primary answers `status` when it is busy: with 1,000 idle clients holding
control connections open, and while a pool is in a crash loop, against the same primary idle.

    cargo build --release -p ustad-cli
    python3 bench/control_latency.py --ustad target/release/ustad            # ~1 minute
    python3 bench/control_latency.py --ustad target/release/ustad --rounds 5 --workers 100

Each round starts a fresh primary (`ustad run` with a config of two pools: `web`, WORKERS demo
workers, and `crash`, a pool whose workers exit 1 at once, sized 0 until its phase), then
measures, in this order:

  idle        the `status` request alone, N times in a row;
  idle-clients  the same with IDLE_CLIENTS connections open to the control socket that send
              nothing (opened just before, so within the primary's 2 s request deadline);
  crash-loop  the same while `crash` (CRASHERS workers) keeps failing to start, backing off.

The request is written on the socket by this script (`{"command":"status"}`, one JSON line;
docs/control.md) and timed until the reply's last byte: no client process is started, so the
figure is the primary's. Medians and 99th percentiles per phase, and per-round ratios to the
idle phase of the same round (their median is quoted). Every process started is stopped at
the end (the primary's process group), also on Ctrl-C.
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def status_ms(path):
    """One `status` request on the control socket: the reply (parsed) and its wall time, ms."""
    start = time.perf_counter()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(b'{"command":"status"}\n')
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    elapsed = (time.perf_counter() - start) * 1000
    return json.loads(data), elapsed


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise SystemExit(f"timed out waiting for {what}")


def pools_of(reply):
    """The pools of a `{"status": {...}}` reply, by name."""
    return {pool["name"]: pool for pool in reply.get("status", {}).get("pools", [])}


def ready_count(path, pool):
    try:
        reply, _ = status_ms(path)
    except OSError:
        return 0
    found = pools_of(reply).get(pool)
    if not found:
        return 0
    return sum(1 for w in found.get("workers", []) if w.get("state") == "ready")


def rss_mib(pid):
    """The primary's VmRSS, in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def measure(path, n):
    times = []
    for _ in range(n):
        _, ms = status_ms(path)
        times.append(ms)
    return times


def one_round(a):
    work = tempfile.mkdtemp(prefix="ustad-control-bench.")
    control = os.path.join(work, "ustad.sock")
    config = os.path.join(work, "ustad.toml")
    with open(config, "w") as f:
        f.write(f"""
[sockets.http]
listen = "127.0.0.1:0"

[pools.web]
command = ["{a.ustad}", "demo-worker"]
size = {a.workers}
sockets = ["http"]
ready = "notify"

[pools.crash]
command = ["sh", "-c", "exit 1"]
size = 0
restart_delay = "100ms"
""")
    log = open(os.path.join(work, "ustad.log"), "w")
    primary = subprocess.Popen(
        [a.ustad, "--log-format", "json", "run", "--control", control, config],
        stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        wait_for(lambda: ready_count(control, "web") >= a.workers, 120, f"{a.workers} ready workers")
        time.sleep(0.5)
        phases, rss = {}, {}
        phases["idle"] = measure(control, a.requests)
        rss["idle"] = rss_mib(primary.pid)
        idle = []
        for _ in range(a.idle_clients):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(control)
            idle.append(s)
        phases["idle-clients"] = measure(control, a.requests)
        rss["idle-clients"] = rss_mib(primary.pid)
        for s in idle:
            s.close()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(control)
            s.sendall(json.dumps({"command": "scale", "pool": "crash",
                                  "size": a.crashers}).encode() + b"\n")
            reply = s.recv(1 << 16)
            if b'"done"' not in reply:
                raise SystemExit(f"scaling the crash pool failed: {reply!r}")
        time.sleep(1.0)  # the loop is under way: starts failing and backing off
        phases["crash-loop"] = measure(control, a.requests)
        rss["crash-loop"] = rss_mib(primary.pid)
        return phases, rss
    finally:
        try:
            os.killpg(primary.pid, signal.SIGTERM)
            primary.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(primary.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            primary.wait()
        log.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ustad", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--idle-clients", type=int, default=1000)
    p.add_argument("--crashers", type=int, default=8)
    p.add_argument("--requests", type=int, default=50)
    a = p.parse_args()
    a.ustad = os.path.abspath(a.ustad)
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = {"idle": [], "idle-clients": [], "crash-loop": []}
    ratios = {"idle-clients": [], "crash-loop": []}
    for number in range(1, a.rounds + 1):
        phases, rss = one_round(a)
        idle_median = statistics.median(phases["idle"])
        line = [f"round {number}:"]
        for name, times in phases.items():
            results[name].extend(times)
            line.append(f"{name} {statistics.median(times):.2f} ms (p99 {percentile(times, 99):.2f})")
            if name in ratios:
                ratios[name].append(statistics.median(times) / idle_median)
        line.append("primary VmRSS after each: " + ", ".join(f"{v:.1f}" for v in rss.values()) + " MiB")
        print(" ".join(line), flush=True)
    print()
    print(f"`status` on the control socket, {a.workers} demo workers, {a.rounds} round(s) of "
          f"{a.requests} requests per phase; {a.idle_clients} idle clients; a crash loop of "
          f"{a.crashers} workers:")
    print()
    print("| phase | median ms | p99 ms | × idle (median of rounds) |")
    print("|---|--:|--:|--:|")
    for name, times in results.items():
        ratio = f"{statistics.median(ratios[name]):.2f}×" if name in ratios else "1.00×"
        print(f"| {name} | {statistics.median(times):.2f} | {percentile(times, 99):.2f} | {ratio} |")


if __name__ == "__main__":
    main()
