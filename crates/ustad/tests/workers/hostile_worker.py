"""A worker that breaks docs/protocol.md, once per slot, for foreign_workers.rs: the primary
must cut it off and replace it. Its replacement (same slot) finds the slot's marker in
HOSTILE_DIR and becomes echo_worker.py (after HOSTILE_SUCCESSOR_DELAY seconds, if set), so the
test can see the slot serve again.

HOSTILE_MODES lists what the first worker of each slot (USTAD_WORKER_INDEX) does:
  garbage    after `ready`, a well-framed body that is not JSON;
  oversized  after `ready`, a frame longer than USTAD_IPC_MAX_FRAME;
  truncated  after `ready`, a frame whose header promises more than it sends, as a writer that
             drops the rest of a short write would, followed by the next frame, whose bytes
             the primary takes for the rest of the first one;
  early      garbage before `ready`.
Then it waits, reading its channel, until it is stopped, and records in HOSTILE_DIR/slot-N.eof
whether it saw its channel end ("yes") or was stopped first ("no").
"""

import json
import os
import signal
import socket
import struct
import sys
import time

slot = int(os.environ["USTAD_WORKER_INDEX"])
mode = os.environ["HOSTILE_MODES"].split(",")[slot]
marker = os.path.join(os.environ["HOSTILE_DIR"], f"slot-{slot}")
if os.path.exists(marker):
    time.sleep(float(os.environ.get("HOSTILE_SUCCESSOR_DELAY", "0")))
    echo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "echo_worker.py")
    os.execvp(sys.executable, [sys.executable, echo])
with open(marker, "w") as f:
    f.write(str(os.getpid()))

channel = socket.socket(fileno=int(os.environ["USTAD_IPC_FD"]))
max_frame = int(os.environ["USTAD_IPC_MAX_FRAME"])


def send(data):
    """Writes, not caring whether the primary still listens: only the primary may end this."""
    try:
        channel.sendall(data)
    except OSError:
        pass


def frame(envelope):
    body = json.dumps(envelope, separators=(",", ":")).encode()
    return struct.pack("<I", len(body)) + body


def on_stop_signal(_signum, _frame):
    sys.exit(0)


signal.signal(signal.SIGTERM, on_stop_signal)

garbage = b"this is not json"
garbage = struct.pack("<I", len(garbage)) + garbage

if mode == "early":
    send(garbage)
send(frame({"t": "ready"}))
if mode == "garbage":
    send(garbage)
elif mode == "oversized":
    body = json.dumps({"t": "msg", "body": "x" * max_frame}).encode()
    send(struct.pack("<I", len(body)) + body)
elif mode == "truncated":
    heartbeat = frame({"t": "heartbeat"})
    send(heartbeat[: len(heartbeat) // 2])
    send(frame({"t": "msg", "body": {"type": "after the short write"}}))


saw_end = False
try:
    while channel.recv(65536):
        pass
    saw_end = True
except OSError:
    saw_end = True
finally:
    with open(marker + ".eof", "w") as f:
        f.write("yes" if saw_end else "no")
signal.pause()
