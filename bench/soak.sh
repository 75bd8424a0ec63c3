#!/usr/bin/env bash
# A long run of faults and operations under a light load, watching the primary for leaks:
# ustad's built-in demo worker, 4 workers (`ustad run -w 4 -l ADDR`), a light paced wrk load
# (bench/wrk/timeline.lua with PACE_MS), and for MINUTES minutes
#   - every second `ustad status --json`;
#   - every 2 s SIGKILL to a random worker (its pid from `ustad status --json`);
#   - every 10 s `kill -HUP` (a rolling restart of every worker);
#   - every 15 s `ustad scale web +1`, then `-1`, alternately.
# At the start and at the end of every minute (before that second's faults, so that every
# sample sees the same steady state: 5 workers, the last kill 2 s old) it records the primary's
# VmRSS, RssAnon and RssFile (/proc/PID/status), its open fds (/proc/PID/fd), its threads, and
# its zombie children (children of any of its threads in state Z; one seen is looked at again
# 1 s later), in minutes.tsv. At the end it scales the pool back to WORKERS, checks that every
# slot is ready again, and prints a summary: RSS growth from the first to the last minute, fds
# and threads (flat: no higher in the second half), zombies. See docs/benchmarks.md
# ("Reliability", "Soak") for what is measured, why, and a real run.
#
#   bash bench/soak.sh                 # 10 minutes
#   MINUTES=60 bash bench/soak.sh      # the run quoted in docs/benchmarks.md
#   MINUTES=2 bash bench/soak.sh       # a quick look
#
# Knobs (environment variables):
#   MINUTES=10          minutes of faults and operations
#   WORKERS=4           ustad's -w
#   CONNECTIONS=4 THREADS=1 PACE_MS=10   wrk's -c and -t, and the pause before each request of a
#                       connection: at most CONNECTIONS * 1000 / PACE_MS requests per second
#   GRACE=1             seconds the requests in flight get at the end of the load
#   PORT=18480          where the workers listen (127.0.0.1; 10 higher while taken)
#   SEED=               the victims' random seed (default: a new one, logged)
#   USTAD=path          a prebuilt ustad (default: cargo build --release -p ustad-cli, then a copy of it)
#   RESULTS=dir         where raw results go (default bench/results/soak-<timestamp>)
#
# Needs python3, wrk (installed with apt-get when missing) and cargo. Every process it starts
# is stopped on exit, also on Ctrl-C.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH")
LUA=$BENCH/wrk/timeline.lua
HELPER=$BENCH/reliability.py

MINUTES=${MINUTES:-10}
WORKERS=${WORKERS:-4}
CONNECTIONS=${CONNECTIONS:-4}
THREADS=${THREADS:-1}
PACE_MS=${PACE_MS:-10}
GRACE=${GRACE:-1}
PORT=${PORT:-18480}
SEED=${SEED:-$RANDOM$RANDOM}
HOST=127.0.0.1
POOL=web # the demo's pool
RESULTS=${RESULTS:-$BENCH/results/soak-$(date -u +%Y%m%dT%H%M%SZ)}
QUIET=15 QUIET_WAIT=10 QUIET_BUDGET=10 # lib.sh's load runs: one wait at the start, at most

# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"
bench_results soak
bench_traps
command -v python3 >/dev/null || die "python3 is needed"
bench_wrk
bench_ustad

{
  bench_machine
  echo "settings: MINUTES=$MINUTES WORKERS=$WORKERS CONNECTIONS=$CONNECTIONS THREADS=$THREADS PACE_MS=$PACE_MS GRACE=$GRACE SEED=$SEED"
} >"$RESULTS/env.txt"
cat "$RESULTS/env.txt" >&2

CONTROL=$TMP/ustad.sock
RUN=1
CONFIG=soak

port_taken() { [[ -n $(ss -Hltn "sport = :$1" 2>/dev/null) ]]; }
tries=0
while port_taken "$PORT"; do
  ((++tries < 10)) || die "ports up to $PORT are all in use: set PORT"
  log "port $PORT is in use by another process: taking $((PORT + 10))"
  PORT=$((PORT + 10))
done

# --control: a socket of our own, not the default one another ustad on this machine may hold.
start_server "$RESULTS/raw/ustad.log" "$USTAD" --log-format json run -w "$WORKERS" -l "$HOST:$PORT" \
  --control "$CONTROL" --color never
python3 "$HELPER" wait-ready --ustad "$USTAD" --control "$CONTROL" --size "$WORKERS" --timeout 30 \
  >/dev/null || die "the workers are not ready within 30 s (see raw/ustad.log)"

quiet
record load_busy_before "$BUSY"
load $((MINUTES * 60 + 120)) ka "$RESULTS/raw/wrk.txt"
sleep 1
started_at=$SECONDS
log "$MINUTES minutes of faults and operations; one line per minute"
say "python3 $HELPER soak-drive --ustad $USTAD --control $CONTROL --pid $SERVER --pool $POOL --minutes $MINUTES --seed $SEED --out $RESULTS/minutes.tsv"
python3 "$HELPER" soak-drive --ustad "$USTAD" --control "$CONTROL" --pid "$SERVER" --pool "$POOL" \
  --minutes "$MINUTES" --seed "$SEED" --out "$RESULTS/minutes.tsv" >"$RESULTS/raw/drive.txt"
end_load
while IFS=$'\t' read -r key val; do record "$key" "$val"; done <"$RESULTS/raw/drive.txt"
line=$(grep -m1 '^TIMELINE' "$RESULTS/raw/wrk.txt" || echo "TIMELINE")
for key in sent ok failed connect non200; do record "requests_$key" "$(value "$line" "$key")"; done
# After the faults: the pool back to its size (the drive ends on a `+1`), every slot ready again.
say "$USTAD scale --control $CONTROL $POOL $WORKERS"
"$USTAD" scale --control "$CONTROL" "$POOL" "$WORKERS" >"$RESULTS/raw/scale-after.txt" 2>&1 ||
  log "ustad scale $POOL $WORKERS failed (see raw/scale-after.txt)"
if python3 "$HELPER" wait-ready --ustad "$USTAD" --control "$CONTROL" --size "$WORKERS" --timeout 30 >/dev/null; then
  record ready_after 1
else
  record ready_after 0
  log "not every slot ready 30 s after the faults stopped (see raw/ustad.log)"
fi
"$USTAD" status --json --control "$CONTROL" >"$RESULTS/raw/status-after.json" || true
say "kill -TERM $SERVER"
kill -TERM "$SERVER"
wait_gone "$SERVER" 60 || { log "ustad did not stop within 60 s: SIGKILL"; kill -KILL -- "-$SERVER" 2>/dev/null || true; }
forget "$SERVER"
log "soaked for $((SECONDS - started_at)) s; raw results in $RESULTS"

python3 "$HELPER" soak-summary "$RESULTS" | tee "$RESULTS/summary.md"
