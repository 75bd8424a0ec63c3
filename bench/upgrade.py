#!/usr/bin/env python3
"""The measuring side of bench/upgrade.sh: upgrades of a running primary timed from the
outside, the workers' and the primary's pids checked after each, and the summary. The shell
script starts and stops every process; this file only talks to the primary's control socket,
runs `ustad upgrade` and `ustad status`, and reads /proc.

    upgrade.py drive --ustad U --control SOCK --pid PID --binaries A,B --upgrades N
                     [--interval 1] [--baseline]              OP lines on stdout
    upgrade.py record DRIVER_OUT WRK_OUT|- LOG                key<TAB>value lines for results.tsv
    upgrade.py summary RESULTS_DIR                            the markdown summary

Each upgrade is done one of two ways, in turn:
  cli    `ustad upgrade --wait --binary B --control SOCK`, timed from just before the client
         process starts to its exit: the client's own start-up, its `status` request before the
         upgrade, the upgrade request, and its `status` request to the new program.
  proto  the protocol written on the socket here (no client process): `{"command":"upgrade",
         "binary":B}` on one connection (timed until the primary closes it, which it does by
         executing the new program), then `{"command":"status"}` on a new connection, timed
         until the new program's whole answer is read: from the upgrade request sent to the
         new program serving the control socket.
With --baseline, the same schedule and the same status requests and checks, but no upgrade.

Times are Unix times in ms (CLOCK_REALTIME, as the shell's `date +%s%3N`, wrk's timeline.lua
and ustad's JSON log timestamps); durations are measured with time.perf_counter().
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no bench/__pycache__ from the import below
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reliability import (fmt, log_events, median, met, now_ms, num, ok_per_s,  # noqa: E402
                         read_tsv, read_wrk, sleep_until)


# --- the control protocol -------------------------------------------------------------------
def ask(control, request, timeout=10.0):
    """One request on its own connection: the reply lines (parsed) once the primary closed it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(control)
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def status_of(control, timeout=10.0):
    """The `status` object, or None."""
    for reply in ask(control, {"command": "status"}, timeout):
        if "status" in reply:
            return reply["status"]
    return None


def status_retrying(control, deadline):
    """`status`, retried while the socket cannot be reached (it should always be: the listening
    socket crosses the exec, and a connection waits in its backlog for the new program)."""
    tries = 0
    while True:
        tries += 1
        try:
            return status_of(control, timeout=max(0.1, deadline - time.perf_counter())), tries
        except (ConnectionRefusedError, FileNotFoundError, ConnectionResetError, ValueError):
            if time.perf_counter() > deadline:
                return None, tries
            time.sleep(0.001)


# --- /proc ------------------------------------------------------------------------------------
def stat_of(pid):
    """(state, ppid, start time in ticks) of PID, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return rest[0], int(rest[1]), int(rest[19])


def exe_of(pid):
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return "?"


def schedstat(pid):
    """(ns on a CPU, ns waiting on a run queue) of PID's main thread (the primary has one; the
    counts go on across an exec), or None."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            on_cpu, waiting, _ = f.read().split()
        return int(on_cpu), int(waiting)
    except (OSError, ValueError):
        return None


def pool(status):
    pools = (status or {}).get("pools") or []
    return pools[0] if pools else {}


# --- drive ----------------------------------------------------------------------------------
def upgrade_cli(a, binary):
    t0 = time.perf_counter()
    try:
        done = subprocess.run([a.ustad, "upgrade", "--wait", "--binary", binary,
                               "--control", a.control, "--color", "never"],
                              capture_output=True, text=True, timeout=60)
        rc, said = done.returncode, (done.stdout + done.stderr).strip().replace("\n", " | ")
    except subprocess.TimeoutExpired:
        rc, said = "timeout", "no exit within 60 s"
    wall = (time.perf_counter() - t0) * 1000
    return {"wall_ms": f"{wall:.1f}", "rc": rc}, said, None


def upgrade_proto(a, binary):
    t0 = time.perf_counter()
    try:
        replies = ask(a.control, {"command": "upgrade", "binary": binary}, timeout=30)
    except (OSError, ValueError) as error:
        return {"rc": "error"}, f"upgrade request: {error}", None
    t_eof = time.perf_counter()
    if replies:  # the old program answered: refused
        return {"rc": "refused"}, json.dumps(replies), None
    status, tries = status_retrying(a.control, t_eof + 30)
    t_served = time.perf_counter()
    out = {"eof_ms": f"{(t_eof - t0) * 1000:.2f}", "serve_ms": f"{(t_served - t0) * 1000:.2f}",
           "connects": tries, "rc": 0 if status else "no-status"}
    return out, "", status


def drive(a):
    binaries = a.binaries.split(",")
    primary = stat_of(a.pid)
    if primary is None:
        print(f"primary pid {a.pid} is not running", file=sys.stderr)
        return 1
    first = status_of(a.control)
    workers = {w["id"]: w["pid"] for w in pool(first).get("workers") or []}
    started = {pid: (stat_of(pid) or (None, None, None))[2] for pid in workers.values()}
    count = ((first or {}).get("upgrade") or {}).get("count", 0)
    print(f"INIT workers={len(workers)} primary_start={primary[2]} exe={exe_of(a.pid)} "
          f"count={count}", flush=True)
    t_start = now_ms()
    print(f"START {t_start:.0f}", flush=True)
    for i in range(1, a.upgrades + 1):
        sleep_until(t_start + i * a.interval * 1000)
        t_op = now_ms()
        # The copy the primary is not running, so that every upgrade changes /proc/PID/exe.
        current = exe_of(a.pid)
        binary = next((b for b in binaries if b != current), binaries[0])
        kind = "none" if a.baseline else ("cli" if i % 2 else "proto")
        said, status = "", None
        sched0 = schedstat(a.pid)
        if kind == "cli":
            out, said, status = upgrade_cli(a, binary)
        elif kind == "proto":
            out, said, status = upgrade_proto(a, binary)
        else:  # the baseline: the status request alone, timed as (b) is
            t0 = time.perf_counter()
            try:
                status = status_of(a.control)
            except (OSError, ValueError) as error:
                said = f"status: {error}"
            out = {"rc": 0, "status_ms": f"{(time.perf_counter() - t0) * 1000:.2f}"}
        t_check = time.perf_counter()
        sched1 = schedstat(a.pid)
        if status is None:
            status = status_of(a.control)
        p = pool(status)
        now = {w["id"]: w["pid"] for w in p.get("workers") or []}
        # The same processes: the same pids, each still the primary's child (not a zombie) with
        # the start time it had before the first upgrade.
        same = sum(1 for wid, pid in workers.items() if now.get(wid) == pid)
        alive = 0
        for pid in workers.values():
            st = stat_of(pid)
            if st and st[0] != "Z" and st[1] == a.pid and st[2] == started[pid]:
                alive += 1
        st = stat_of(a.pid)
        primary_same = int(st is not None and st[2] == primary[2]
                           and (status or {}).get("pid") == a.pid)
        record = (status or {}).get("upgrade") or {}
        new_count = record.get("count", 0)
        exe = exe_of(a.pid)
        if kind != "none":
            out |= {"switch_ms": record.get("switch_ms", "nan"),
                    "kept": record.get("workers_kept", "nan"),
                    "lost": record.get("workers_lost", "nan"),
                    "fallback": int(record.get("fallback") is not None),
                    "counted": int(new_count == count + 1),
                    "exe_ok": int(exe == binary)}
        if sched0 and sched1:
            # The primary's own CPU time and run-queue wait from the request to the answer.
            out |= {"cpu_ms": f"{(sched1[0] - sched0[0]) / 1e6:.2f}",
                    "runq_ms": f"{(sched1[1] - sched0[1]) / 1e6:.2f}"}
        count = new_count
        out |= {"workers_same": same, "workers_alive": alive, "workers": len(workers),
                "listed": len(now), "ready": p.get("ready", "nan"), "size": p.get("size", "nan"),
                "primary_same": primary_same, "exe": exe,
                "check_ms": f"{(time.perf_counter() - t_check) * 1000:.1f}"}
        fields = " ".join(f"{k}={v}" for k, v in out.items())
        print(f"OP i={i} kind={kind} t={t_op:.0f} binary={binary} {fields}", flush=True)
        if said:
            print(f"SAID i={i} {said}", flush=True)
    sleep_until(t_start + (a.upgrades + 1) * a.interval * 1000)
    print(f"END {now_ms():.0f}", flush=True)
    return 0


# --- record ---------------------------------------------------------------------------------
def read_driver(path):
    start = end = None
    ops = []
    with open(path) as f:
        for line in f:
            words = line.split()
            if not words:
                continue
            if words[0] == "START":
                start = float(words[1])
            elif words[0] == "END":
                end = float(words[1])
            elif words[0] == "OP":
                ops.append({k: v for k, _, v in (w.partition("=") for w in words[1:])})
    return start, end, ops


def upgrade_events(log, since_ms, until_ms):
    """(upgrade_check → upgrading ms, upgrading → upgraded ms) of each upgrade in the log
    between the two times."""
    pairs, check, upgrading = [], None, None
    for event in log_events(log):
        t = event.get("t_ms")
        if t is None or not since_ms <= t <= until_ms:
            continue
        kind = event.get("event")
        if kind == "upgrade_check":
            check, upgrading = t, None
        elif kind == "upgrading":
            upgrading = t
        elif kind == "upgraded" and check is not None and upgrading is not None:
            pairs.append((upgrading - check, t - upgrading))
            check = upgrading = None
    return pairs


def record(a):
    start, end, ops = read_driver(a.driver)
    totals, buckets = read_wrk(a.wrk) if a.wrk != "-" else ({}, {})
    ups = [o for o in ops if o.get("kind") != "none"]
    out = {
        "rps": f"{ok_per_s(buckets, start, end):.0f}" if start and end and buckets else "",
        "seconds": f"{(end - start) / 1000:.1f}" if start and end else "nan",
        "sent": totals.get("sent"), "ok": totals.get("ok"), "failed": totals.get("failed"),
        "connect_errors": totals.get("connect"), "non200": totals.get("non200"),
        "read_errors": totals.get("read"), "write_errors": totals.get("write"),
        "timeouts": totals.get("timeout"), "pids": totals.get("pids"),
        "ops": len(ops), "upgrades": len(ups),
        "upgrades_ok": sum(1 for o in ups if o.get("rc") == "0" and o.get("counted") == "1"
                           and o.get("exe_ok") == "1"),
        "workers_changed": sum(int(o["workers"]) - int(o["workers_same"]) for o in ops),
        "workers_not_alive": sum(int(o["workers"]) - int(o["workers_alive"]) for o in ops),
        "not_all_ready": sum(1 for o in ops if o.get("ready") != o.get("size")),
        "primary_changed": sum(1 for o in ops if o.get("primary_same") != "1"),
        "workers": ops[0]["workers"] if ops else "nan",
    }
    # The worst 100 ms of 200 responses from each upgrade to 500 ms after, against the median
    # bucket of the run: whether the service noticed.
    if start and end and buckets:
        inner = [buckets.get(b, 0) for b in range(int(start // 100) + 1, int(end // 100))]
        out["bucket_median"] = median(inner)
        worst = [min(buckets.get(b, 0) for b in range(int(float(o["t"]) // 100),
                                                      int(float(o["t"]) // 100) + 6))
                 for o in ops]
        out["bucket_worst_after_op"] = min(worst) if worst else "nan"
    for key, value in out.items():
        print(f"{key}\t{'' if value is None else value}")
    for o in ops:
        i = o["i"]
        for key in ("wall_ms", "eof_ms", "serve_ms", "switch_ms", "kept", "lost", "connects",
                    "status_ms", "cpu_ms", "runq_ms"):
            if key in o:
                print(f"op{i}_{o['kind']}_{key}\t{o[key]}")
    if start and end:
        for n, (check_ms, exec_ms) in enumerate(upgrade_events(a.log, start, end), 1):
            print(f"log{n}_check_ms\t{check_ms:.2f}")
            print(f"log{n}_exec_ms\t{exec_ms:.2f}")


# --- summary --------------------------------------------------------------------------------
MODES = (("nc", "new connections"), ("ka", "keep-alive"))
COLUMNS = (("idle", "no load"),) + MODES


def spread(values, digits=1):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{fmt(median(values), digits)} ({fmt(min(values), digits)}–{fmt(max(values), digits)})"


def verdict(values, limit):
    """Whether every value, or only the median, is under the limit."""
    if max(values) < limit:
        return met(True)
    if median(values) < limit:
        return "met by the median; **missed** by the worst"
    return met(False)


def summary(a):
    data = {}  # config -> {key: value}
    for _run, config, key, value in read_tsv(a.results):
        data.setdefault(config, {})[key] = value

    def ops(mode, kinds, key, run="upgrade"):
        d = data.get(f"{mode}-{run}", {})
        return [v for k, v in ((k, num(v)) for k, v in d.items())
                if v is not None and k.startswith("op") and k.endswith(f"_{key}")
                and k.split("_")[1] in kinds]

    def logged(mode, key):
        d = data.get(f"{mode}-upgrade", {})
        return [v for k, v in ((k, num(v)) for k, v in d.items())
                if v is not None and k.startswith("log") and k.endswith(f"_{key}")]

    both = ("cli", "proto")
    rows = [
        ("(b) upgrade request → the new program's whole `status` answer (protocol client)",
         lambda m: ops(m, ("proto",), "serve_ms")),
        ("  of which: request → its connection closed by the exec",
         lambda m: ops(m, ("proto",), "eof_ms")),
        ("(a) `ustad upgrade --wait`: client process start → exit",
         lambda m: ops(m, ("cli",), "wall_ms")),
        ("(c) `switch_ms`: state written → the new program's loop",
         lambda m: ops(m, both, "switch_ms")),
        ("log: `upgrade_check` → `upgrading` (the new binary's `--upgrade-check` run)",
         lambda m: logged(m, "check_ms")),
        ("log: `upgrading` → `upgraded` (exec, the new program's start-up)",
         lambda m: logged(m, "exec_ms")),
        ("the primary's CPU time during (b) (/proc/PID/schedstat)",
         lambda m: ops(m, ("proto",), "cpu_ms")),
        ("the primary's run-queue wait during (b) (/proc/PID/schedstat)",
         lambda m: ops(m, ("proto",), "runq_ms")),
        ("without upgrades: a `status` request alone (the same client, schedule and load)",
         lambda m: ops(m, ("none",), "status_ms", "base")),
        ("  the primary's CPU time during it",
         lambda m: ops(m, ("none",), "cpu_ms", "base")),
        ("  the primary's run-queue wait during it",
         lambda m: ops(m, ("none",), "runq_ms", "base")),
    ]
    print("Per upgrade, ms: median (min–max), n")
    print()
    print("| measured | " + " | ".join(label for _, label in COLUMNS) + " | under load (both) |")
    print("|---|" + "---:|" * (len(COLUMNS) + 1))
    for label, get in rows:
        cells = [f"{spread(get(mode))}, n={len(get(mode))}" for mode, _ in COLUMNS]
        loaded = [v for mode, _ in MODES for v in get(mode)]
        cells.append(f"{spread(loaded)}, n={len(loaded)}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()
    print("| load | run | seconds | req/s | sent | failed | connect errors | read errors | "
          "timeouts | non-200 | worst 100 ms after an op (median 100 ms) | upgrades done | "
          "workers kept / lost (status) | worker pids changed | primary pid changed | "
          "busy % before/after |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---:|---|")
    total = {"failed": 0, "connect": 0, "changed": 0, "primary": 0, "done": 0, "asked": 0,
             "lost_workers": 0}
    for mode, label in COLUMNS:
        for kind in ("base", "upgrade"):
            d = data.get(f"{mode}-{kind}")
            if not d:
                continue
            upgrading = kind == "upgrade"
            kept, lost = sum(ops(mode, both, "kept")), sum(ops(mode, both, "lost"))
            changed = (num(d.get("workers_changed")) or 0) + (num(d.get("workers_not_alive")) or 0)
            print(f"| {label} | {'with upgrades' if upgrading else 'without'} | "
                  f"{d.get('seconds')} | {fmt(num(d.get('rps')))} | {fmt(num(d.get('sent')))} | "
                  f"{fmt(num(d.get('failed')))} | {fmt(num(d.get('connect_errors')))} | "
                  f"{fmt(num(d.get('read_errors')))} | {fmt(num(d.get('timeouts')))} | "
                  f"{fmt(num(d.get('non200')))} | {fmt(num(d.get('bucket_worst_after_op')))} "
                  f"({fmt(num(d.get('bucket_median')))}) | "
                  f"{d.get('upgrades_ok', '–') if upgrading else '–'} | "
                  f"{f'{fmt(kept)} / {fmt(lost)}' if upgrading else '–'} | {fmt(changed)} | "
                  f"{d.get('primary_changed')} | "
                  f"{d.get('load_busy_before', '?')}/{d.get('load_busy_after', '?')} |")
            if upgrading:
                total["done"] += num(d.get("upgrades_ok")) or 0
                total["asked"] += num(d.get("upgrades")) or 0
                total["lost_workers"] += lost
                if mode != "idle":
                    total["failed"] += num(d.get("failed")) or 0
                    total["connect"] += num(d.get("connect_errors")) or 0
            total["changed"] += changed
            total["primary"] += num(d.get("primary_changed")) or 0
    print()
    print("| target | measured | |")
    print("|---|---|---|")
    print(f"| 0 requests lost during the upgrades under load | {fmt(total['failed'])} failed, "
          f"{fmt(total['connect'])} connect errors | "
          f"{met(total['failed'] + total['connect'] == 0)} |")
    print(f"| every upgrade done, the same primary and worker pids after each | "
          f"{fmt(total['done'])} of {fmt(total['asked'])} done; {fmt(total['lost_workers'])} "
          f"workers lost; {fmt(total['changed'])} worker and {fmt(total['primary'])} primary "
          f"pid changes | {met(total['done'] == total['asked'] and total['changed'] == 0 and total['primary'] == 0 and total['lost_workers'] == 0)} |")
    for key, what in (("serve_ms", "(b) request → the new program serving the control socket"),
                      ("switch_ms", "(c) `switch_ms`")):
        kinds = ("proto",) if key == "serve_ms" else both
        for label, modes in (("no load", ("idle",)), ("under load", ("nc", "ka"))):
            values = [v for mode in modes for v in ops(mode, kinds, key)]
            if values:
                print(f"| {what} < 50 ms, {label} | median {fmt(median(values), 1)} ms, worst "
                      f"{fmt(max(values), 1)} ms (n={len(values)}) | {verdict(values, 50)} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("drive")
    c.add_argument("--ustad", required=True)
    c.add_argument("--control", required=True)
    c.add_argument("--pid", type=int, required=True)
    c.add_argument("--binaries", required=True,
                   help="the new programs, comma-separated: each upgrade takes one not running")
    c.add_argument("--upgrades", type=int, required=True)
    c.add_argument("--interval", type=float, default=1.0)
    c.add_argument("--baseline", action="store_true")
    c.set_defaults(fn=drive)

    c = sub.add_parser("record")
    c.add_argument("driver")
    c.add_argument("wrk", help="wrk's output, or - for a run without load")
    c.add_argument("log")
    c.set_defaults(fn=record)

    c = sub.add_parser("summary")
    c.add_argument("results")
    c.set_defaults(fn=summary)

    a = p.parse_args()
    return a.fn(a) or 0


if __name__ == "__main__":
    sys.exit(main())
