#!/usr/bin/env python3
"""A stand-in for systemd, for bench/crash.sh: runs ustad as a `Type=notify`,
`Restart=on-failure` service would, with or without a file descriptor store.

    crash.py manage --store N --restart-sec 0.1 --log FILE -- USTAD run ARGS...
    crash.py record EVENTS WRK      the key/value pairs of one load run, tab-separated
    crash.py summary RESULTS        the medians of results.tsv, as markdown

It gives ustad a notify socket (NOTIFY_SOCKET) and, with --store N > 0, says it keeps N fds
(FDSTORE=N, as systemd 254+ does for FileDescriptorStoreMax=N); it keeps every fd ustad sends
with FDSTORE=1 under its FDNAME (a copy of an fd it keeps already is ignored) and drops those
named by FDSTOREREMOVE=1. On SIGUSR1 it SIGKILLs ustad, waits for it to exit, waits
--restart-sec (systemd's RestartSec=, 100 ms by default) and starts it again, with the stored
fds as fds 3, 4, ... named in LISTEN_FDNAMES (LISTEN_PID set by a shell that execs ustad, as
bench tests do); a start that exits before READY=1 is restarted the same way. On SIGTERM it
sends SIGTERM to ustad and exits when ustad has.

Prints key=value lines on stdout, each with the Unix time in ms:
    ready at=... start=N        READY=1 from start N (1 = the first)
    killed at=...               SIGKILL sent
    exited at=... start=N code=...   a start that exited (before or after READY=1)
    started at=... start=N fds=K     a start, with K fds from the store
"""

import argparse
import array
import fcntl
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time


def now_ms():
    return int(time.time() * 1000)


def say(text):
    print(f"{text} at={now_ms()}", flush=True)


class Manager:
    def __init__(self, args):
        self.args = args
        self.dir = tempfile.mkdtemp(prefix="ustad-crash-")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        # Short: an exit is noticed within 10 ms (systemd learns of it from SIGCHLD at once).
        self.sock.settimeout(0.01)
        self.store = []  # (name, fd), in the order stored
        self.proc = None
        self.starts = 0
        self.ready = False
        self.crash = False
        self.stop = False
        self.log = open(args.log, "ab")

    def same(self, a, b):
        sa, sb = os.fstat(a), os.fstat(b)
        return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)

    def receive(self):
        try:
            data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
        except (socket.timeout, BlockingIOError, InterruptedError):
            return
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % fds.itemsize
                fds.frombytes(payload[:usable])
        lines = data.decode(errors="replace").splitlines()
        name = next((l[len("FDNAME="):] for l in lines if l.startswith("FDNAME=")), "stored")
        if "FDSTORE=1" in lines and self.args.store > 0:
            for fd in fds:
                if any(self.same(fd, kept) for _, kept in self.store) or len(self.store) >= self.args.store:
                    os.close(fd)
                else:
                    self.store.append((name, fd))
        else:
            for fd in fds:
                os.close(fd)
        if "FDSTOREREMOVE=1" in lines:
            for kept_name, fd in [entry for entry in self.store if entry[0] == name]:
                os.close(fd)
            self.store = [entry for entry in self.store if entry[0] != name]
        if "READY=1" in lines and not self.ready:
            self.ready = True
            say(f"ready start={self.starts}")

    def start(self):
        self.starts += 1
        self.ready = False
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("LISTEN_") and k not in ("NOTIFY_SOCKET", "FDSTORE")}
        env["NOTIFY_SOCKET"] = self.path
        if self.args.store > 0:
            env["FDSTORE"] = str(self.args.store)
        # Copies far above 3, close-on-exec: the child puts them at 3, 4, ... (dup2 clears
        # close-on-exec on the copy), and the high ones close at its exec.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 200) for _, fd in self.store]
        if self.store:
            env["LISTEN_FDS"] = str(len(self.store))
            env["LISTEN_FDNAMES"] = ":".join(name for name, _ in self.store)

        def place():
            for i, fd in enumerate(high):
                os.dup2(fd, 3 + i)

        self.proc = subprocess.Popen(
            ["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$0" "$@"'] + self.args.command,
            env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
            close_fds=False, preexec_fn=place)
        for fd in high:
            os.close(fd)
        say(f"started start={self.starts} fds={len(self.store)}")

    def run(self):
        signal.signal(signal.SIGUSR1, lambda *_: setattr(self, "crash", True))
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stop", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "stop", True))
        self.start()
        restart_at = None
        while True:
            self.receive()
            if self.stop:
                if self.proc and self.proc.poll() is None:
                    self.proc.terminate()
                    try:
                        self.proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait()
                return 0
            if self.crash and self.proc and self.proc.poll() is None:
                self.crash = False
                self.proc.send_signal(signal.SIGKILL)
                say("killed")
            if self.proc and restart_at is None:
                code = self.proc.poll()
                if code is not None:
                    say(f"exited start={self.starts} code={code}")
                    self.proc = None
                    restart_at = time.monotonic() + self.args.restart_sec
            if restart_at is not None and time.monotonic() >= restart_at:
                restart_at = None
                if self.starts >= self.args.max_starts:
                    print(f"gave up after {self.starts} starts", file=sys.stderr, flush=True)
                    return 1
                self.start()


def record(events_path, wrk_path):
    """The load run's numbers: wrk's TIMELINE, and the crash's times from the events."""
    timeline = {}
    with open(wrk_path) as wrk:
        for line in wrk:
            if line.startswith("TIMELINE "):
                timeline = dict(part.split("=", 1) for part in line.split()[1:])
    events = []
    with open(events_path) as lines:
        for line in lines:
            words = line.split()
            if words and all("=" in w for w in words[1:]):
                events.append((words[0], dict(w.split("=", 1) for w in words[1:])))
    killed = [int(e["at"]) for kind, e in events if kind == "killed"]
    out = {k: timeline.get(k, "nan") for k in ("sent", "ok", "failed", "max_us")}
    # A refused connect shows in wrk as a connect error, or (a non-blocking connect on
    # loopback) as a write error on the socket that never connected; a read error is a
    # connection reset or closed under a request: those the killed workers held.
    try:
        out["refused"] = int(timeline["connect"]) + int(timeline["write"])
        out["reset"] = int(timeline["read"])
    except (KeyError, ValueError):
        out["refused"] = out["reset"] = "nan"
    if killed:
        readies = [int(e["at"]) for kind, e in events
                   if kind == "ready" and int(e["at"]) > killed[-1]]
        starts = [e for kind, e in events if kind == "started" and int(e["at"]) > killed[-1]]
        out["gap_ms"] = readies[0] - killed[-1] if readies else "nan"
        out["starts_after_kill"] = len(starts)
        out["fds_passed"] = starts[-1]["fds"] if starts else "nan"
    for key, value in out.items():
        print(f"{key}\t{value}")


def summary(results):
    import statistics
    rows = {}
    with open(os.path.join(results, "results.tsv")) as tsv:
        for line in tsv:
            run, config, key, value = line.rstrip("\n").split("\t")
            try:
                rows.setdefault((config, key), []).append(float(value))
            except ValueError:
                pass
    configs = sorted({config for config, _ in rows})
    keys = [("refused", "refused connections"), ("reset", "connections reset under a request"),
            ("failed", "failed requests"),
            ("gap_ms", "kill → READY=1 (ms)"), ("max_us", "longest request (ms)"),
            ("starts_after_kill", "starts after the kill"), ("ok", "200 responses")]
    print("| | " + " | ".join(configs) + " |")
    print("|---|" + "---|" * len(configs))
    for key, label in keys:
        cells = []
        for config in configs:
            values = rows.get((config, key), [])
            if not values:
                cells.append("–")
                continue
            if key == "max_us":
                values = [v / 1000 for v in values]
            median = statistics.median(values)
            low, high = min(values), max(values)
            cells.append(f"{median:,.0f} ({low:,.0f}–{high:,.0f})" if len(values) > 1 else f"{median:,.0f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()
    print("Medians over the runs, (lowest–highest) in brackets.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="what", required=True)
    manage = commands.add_parser("manage", help="run ustad as systemd would")
    manage.add_argument("--store", type=int, default=0, help="FileDescriptorStoreMax= (0: none)")
    manage.add_argument("--restart-sec", type=float, default=0.1, help="RestartSec=, in seconds")
    manage.add_argument("--max-starts", type=int, default=20, help="give up after this many starts")
    manage.add_argument("--log", required=True, help="where ustad's output goes")
    manage.add_argument("command", nargs="+", help="ustad and its arguments")
    rec = commands.add_parser("record", help="one load run's numbers")
    rec.add_argument("events")
    rec.add_argument("wrk")
    summ = commands.add_parser("summary", help="the medians of results.tsv")
    summ.add_argument("results")
    args = parser.parse_args()
    if args.what == "manage":
        return Manager(args).run()
    if args.what == "record":
        return record(args.events, args.wrk)
    return summary(args.results)


if __name__ == "__main__":
    sys.exit(main())
