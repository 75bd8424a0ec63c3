#!/usr/bin/env python3
"""The no-manager limit of bench/cluster.sh: bind one listening socket, start N copies of a
command with it as fd 3 (systemd socket activation: LISTEN_FDS=1, LISTEN_PID = the copy's own
pid), then only wait. Nothing supervises, restarts or balances anything.

    launch.py [--restart] HOST:PORT N COMMAND [ARG...]

With --restart (bench/naive.sh), a copy that exits is started again at once, with no delay and
no readiness check: the fastest replacement there can be, which managers are compared with.

SIGTERM and SIGINT are passed on to the copies; it exits when they all have.
"""

import os
import signal
import socket
import subprocess
import sys


def main() -> int:
    args = sys.argv[1:]
    restart = bool(args) and args[0] == "--restart"
    if restart:
        args = args[1:]
    if len(args) < 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    address, count, command = args[0], int(args[1]), args[2:]
    host, port = address.rsplit(":", 1)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    # ustad's default backlog, so that only the manager differs.
    listener.listen(int(os.environ.get("BACKLOG", "1024")))
    if listener.fileno() != 3:
        os.dup2(listener.fileno(), 3)  # inheritable, unlike the socket itself
    os.set_inheritable(3, True)
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_FDNAMES="http")
    env.pop("LISTEN_PID", None)
    # `exec` keeps the shell's pid, so $$ is the pid of the command itself.
    wrapper = ["sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"', "sh", *command]
    start = lambda: subprocess.Popen(wrapper, pass_fds=(3,), env=env)
    children = [start() for _ in range(count)]
    stopping = False

    def forward(signum, _frame):
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    if not restart:
        return max(child.wait() for child in children)
    status = 0
    while any(child.returncode is None for child in children):
        try:
            pid, raw = os.wait()  # retried after a signal handler has run (PEP 475)
        except ChildProcessError:  # forward() reaped the last ones
            break
        for i, child in enumerate(children):
            if child.pid == pid:
                child.returncode = os.waitstatus_to_exitcode(raw)
                status = max(status, child.returncode)
                if not stopping:
                    children[i] = start()
    return status


if __name__ == "__main__":
    sys.exit(main())
