"""A worker in Python for a ustad library primary, speaking docs/protocol.md with the
standard library only; the tests in foreign_workers.rs run it as a pool's `command`.

It answers `req {"type":"echo","value":X}` with `{"type":"echoed","value":X,"pid":…,
"lang":"python"}`, a `msg {"type":"ping"}` with a `msg {"type":"pong","pid":…}`, and
`req {"type":"ask_primary"}` by asking the primary a question of its own (`req
{"type":"question"}`) and answering with the primary's reply. `stop`, the stop signal or the
end of the channel ends it with exit code 0.
"""

import json
import os
import signal
import socket
import struct
import sys

PID = os.getpid()
MAX_FRAME = int(os.environ.get("USTAD_IPC_MAX_FRAME", 1024 * 1024))
channel = socket.socket(fileno=int(os.environ["USTAD_IPC_FD"]))


def send(envelope):
    body = json.dumps(envelope, separators=(",", ":")).encode()
    channel.sendall(struct.pack("<I", len(body)) + body)


def frames():
    """Yields envelopes as they arrive: a read may hold part of a frame, or several."""
    buffer = bytearray()
    while True:
        while len(buffer) >= 4:
            (length,) = struct.unpack_from("<I", buffer)
            if length == 0 or length > MAX_FRAME:
                sys.exit(f"echo_worker.py: the primary sent a frame of {length} bytes")
            if len(buffer) < 4 + length:
                break
            body = bytes(buffer[4 : 4 + length])
            del buffer[: 4 + length]
            yield json.loads(body)
        data = channel.recv(65536)
        if not data:
            return
        buffer += data


# The stop signal comes right after the `stop` frame, often first: both mean "finish and exit".
# Work here is synchronous, so between two frames nothing is in flight.
idle = True
stopping = False


def on_stop_signal(_signum, _frame):
    global stopping
    stopping = True
    if idle:
        sys.exit(0)


signal.signal(signal.SIGTERM, on_stop_signal)
signal.signal(signal.SIGINT, on_stop_signal)

next_id = 1
asked = {}  # id of our question to the primary -> id of the request it answers

send({"t": "ready"})
for envelope in frames():
    idle = False
    kind, body = envelope["t"], envelope.get("body")
    what = body.get("type") if isinstance(body, dict) else None
    if kind == "stop":
        break
    if kind == "msg" and what == "ping":
        send({"t": "msg", "body": {"type": "pong", "pid": PID}})
    elif kind == "req" and what == "echo":
        echoed = {"type": "echoed", "value": body.get("value"), "pid": PID, "lang": "python"}
        send({"t": "rep", "id": envelope["id"], "body": echoed})
    elif kind == "req" and what == "ask_primary":
        asked[next_id] = envelope["id"]
        send({"t": "req", "id": next_id, "body": {"type": "question"}})
        next_id += 1
    elif kind == "req":
        send({"t": "err", "id": envelope["id"], "message": "unknown request " + json.dumps(body)})
    elif kind in ("rep", "err") and envelope["id"] in asked:
        original = asked.pop(envelope["id"])
        if kind == "rep":
            send({"t": "rep", "id": original, "body": body})
        else:
            send({"t": "err", "id": original, "message": envelope.get("message", "")})
    idle = True
    if stopping:
        break
sys.exit(0)
