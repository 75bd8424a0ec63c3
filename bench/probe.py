#!/usr/bin/env python3
"""kill -9 -> replacement answering, for bench/naive.sh: SIGKILL one worker of a manager, then
time how long until the manager has started a new worker process, and until a new worker
answers a request on the port.

    probe.py HOST:PORT VICTIM PARENT [TIMEOUT_S]

VICTIM is the worker to kill, PARENT the process whose children the workers are (the manager;
for PM2 its daemon). Every child of PARENT alive before the kill is "old"; a worker is new when
its pid is none of them.

After the kill it
- lists PARENT's children (/proc/PARENT/task/*/children) every millisecond: the first new one
  is the spawn;
- every ROUND_MS (5 ms) opens CONCURRENCY (4) new connections and sends a request on each
  (`Connection: close`), and reads the X-Worker-Pid of each answer as it comes: the first from
  a new pid is the replacement answering. All of it is non-blocking: a request that hangs (a
  connection handed to the dying worker) holds up neither the next rounds nor the spawn check;
  it fails after REQUEST_TIMEOUT_S (1 s).
It prints one line and exits 0 once a new pid has answered (1 after TIMEOUT_S, default 15):

    PROBE spawn_ms=… answer_ms=… new_pid=… rounds=… probe_failed=…

spawn_ms / answer_ms are from just before kill() (monotonic clock); probe_failed counts the
probe's own requests that failed (refused, reset, timed out, not 200) after the kill.

Why requests rather than watching the socket: it is the one measure that means the same under
every manager. Under ustad and the launcher a worker holds the listening socket from the moment
it is spawned (fd 3), whether it accepts or not; under Node's cluster and PM2 the primary holds
it and the worker never does. "A new pid answered" is what a client sees in all four. Its bias:
on a shared socket the workers race for each connection, so the new worker may lose a few
rounds after it starts accepting; sending several connections per round every 5 ms keeps that
to a few rounds at most.
"""

import errno
import os
import selectors
import signal
import socket
import sys
import time

ROUND_MS = 5
CONCURRENCY = 4
REQUEST_TIMEOUT_S = 1.0


def children(parent):
    pids = set()
    try:
        tasks = os.listdir(f"/proc/{parent}/task")
    except FileNotFoundError:
        return pids
    for task in tasks:
        try:
            with open(f"/proc/{parent}/task/{task}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except FileNotFoundError:
            pass
    return pids


class Probe:
    """Requests in flight, each on its own non-blocking connection."""

    def __init__(self, host, port):
        self.address = (host, port)
        self.request = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
        self.selector = selectors.DefaultSelector()
        self.failed = 0
        self.rounds = 0

    def send_round(self, now):
        self.rounds += 1
        for _ in range(CONCURRENCY):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            err = sock.connect_ex(self.address)
            if err not in (0, errno.EINPROGRESS):
                self.failed += 1
                sock.close()
                continue
            state = {"deadline": now + REQUEST_TIMEOUT_S, "sent": False, "data": b""}
            self.selector.register(sock, selectors.EVENT_WRITE, state)

    def _close(self, sock, failed):
        self.selector.unregister(sock)
        sock.close()
        self.failed += failed

    def poll(self, timeout):
        """Handle what is ready; return the pids that answered 200 meanwhile."""
        pids = []
        for key, _mask in self.selector.select(timeout):
            sock, state = key.fileobj, key.data
            if not state["sent"]:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    self._close(sock, 1)
                    continue
                try:
                    sock.send(self.request)  # a few dozen bytes: all of it or an error
                except OSError:
                    self._close(sock, 1)
                    continue
                state["sent"] = True
                self.selector.modify(sock, selectors.EVENT_READ, state)
                continue
            try:
                chunk = sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                self._close(sock, 1)
                continue
            state["data"] += chunk
            head, complete, _ = state["data"].partition(b"\r\n\r\n")
            if not complete and chunk:
                continue
            lines = head.decode("latin-1").split("\r\n")
            pid = None
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "x-worker-pid":
                    pid = int(value.strip())
            ok = complete and lines[0].split(" ")[1:2] == ["200"] and pid is not None
            self._close(sock, 0 if ok else 1)
            if ok:
                pids.append(pid)
        return pids

    def expire(self, now):
        for key in list(self.selector.get_map().values()):
            if now > key.data["deadline"]:
                self._close(key.fileobj, 1)

    def close(self):
        for key in list(self.selector.get_map().values()):
            self._close(key.fileobj, 0)


def main():
    if len(sys.argv) < 4:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    host, port = sys.argv[1].rsplit(":", 1)
    victim, parent = int(sys.argv[2]), int(sys.argv[3])
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 15.0
    old = children(parent) | {victim}
    probe = Probe(host, int(port))

    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    spawn_ms = answer_ms = new_pid = None
    next_round = t0
    while True:
        now = time.monotonic()
        if now - t0 >= timeout:
            break
        if spawn_ms is None and children(parent) - old:
            spawn_ms = (now - t0) * 1000
        if now >= next_round:
            probe.send_round(now)
            next_round = max(next_round + ROUND_MS / 1000, now)
        fresh = [p for p in probe.poll(0.001) if p not in old]
        if fresh:
            answer_ms = (time.monotonic() - t0) * 1000
            new_pid = fresh[0]
            if spawn_ms is None:  # spawned and answered within one check
                spawn_ms = answer_ms
            break
        probe.expire(time.monotonic())
    probe.close()

    fmt = lambda v: "nan" if v is None else f"{v:.1f}"
    print(f"PROBE spawn_ms={fmt(spawn_ms)} answer_ms={fmt(answer_ms)} new_pid={new_pid or 'none'} "
          f"rounds={probe.rounds} probe_failed={probe.failed}")
    return 0 if answer_ms is not None else 1


if __name__ == "__main__":
    sys.exit(main())
