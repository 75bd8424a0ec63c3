#!/usr/bin/env bash
# A crash of the primary under load, and its restart by the service manager: with and without
# systemd's file descriptor store. bench/crash.py stands in for systemd (`Type=notify`,
# `Restart=on-failure`, `RestartSec=100ms`): it runs `ustad run -w 4 -l ADDR` (the built-in
# demo worker) with a notify socket and, in the `store` configuration, `FDSTORE=64` (what
# systemd 254+ says for `FileDescriptorStoreMax=64`), keeps the sockets ustad stores there, and
# passes them back when it restarts ustad. In the middle of a wrk load run it SIGKILLs the
# primary (its guard stops the workers), then restarts it as systemd would. The `nostore`
# twin runs the same schedule without the store, side by side in the same run. It measures,
# under keep-alive and under new-connection load:
#   - refused connections (wrk's connect errors, and its write errors: a non-blocking connect
#     to a closed port on loopback fails at the first write): with the store, the listening
#     socket stays open in the service manager while no ustad runs, so there should be none;
#     without it, every connect between the crash and the new primary's bind is refused (and
#     wrk retries at once, so the count says how long the port was closed more than how many
#     clients there were);
#   - connections reset under a request (wrk's read errors): those the killed workers held;
#   - failed requests (bench/wrk/timeline.lua: sent - 200 responses + connect errors): the
#     requests in flight on the killed workers are lost either way;
#   - the time from the SIGKILL to the new primary's READY=1, and the longest request (wrk's
#     max latency): with the store, the connections that came meanwhile waited that long;
#   - how many starts the restart took (without the store, a start can find the port still
#     held by a dying worker: it exits, and is restarted 100 ms later).
# See docs/benchmarks.md ("Reliability", "A crash of the primary") for a real run.
#
#   bash bench/crash.sh                  # ~2 minutes with the defaults, plus the build
#   RUNS=1 bash bench/crash.sh           # a quick look
#
# Knobs (environment variables):
#   RUNS=5              runs; each measures store and nostore under keep-alive and
#                       new-connection load (store first in odd runs, nostore first in even)
#   LOAD_SECONDS=6      seconds of each load run; the crash comes CRASH_AT seconds in
#   CRASH_AT=2
#   WORKERS=4           ustad's -w
#   CONNECTIONS=64 THREADS=2   wrk's -c and -t
#   GRACE=1             seconds the requests in flight get at the end of a load run
#   RESTART_SEC=0.1     the service manager's RestartSec=
#   QUIET=15 QUIET_WAIT=10 QUIET_BUDGET=120   a load run starts once the machine is at most
#                       QUIET % busy (lib.sh); busier runs are flagged, not repeated
#   PORT=18480          where the workers listen (127.0.0.1; 10 higher while taken)
#   USTAD=path          a prebuilt ustad (default: cargo build --release -p ustad-cli, then a copy of it)
#   RESULTS=dir         where raw results go (default bench/results/crash-<timestamp>)
#
# Needs python3, ss (iproute2), wrk (installed with apt-get when missing) and cargo. Every
# process it starts is stopped on exit, also on Ctrl-C.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH")
LUA=$BENCH/wrk/timeline.lua
HELPER=$BENCH/crash.py

RUNS=${RUNS:-5}
LOAD_SECONDS=${LOAD_SECONDS:-6}
CRASH_AT=${CRASH_AT:-2}
WORKERS=${WORKERS:-4}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
GRACE=${GRACE:-1}
RESTART_SEC=${RESTART_SEC:-0.1}
QUIET=${QUIET:-15}
QUIET_WAIT=${QUIET_WAIT:-10}
QUIET_BUDGET=${QUIET_BUDGET:-120}
PORT=${PORT:-18480}
HOST=127.0.0.1
RESULTS=${RESULTS:-$BENCH/results/crash-$(date -u +%Y%m%dT%H%M%SZ)}

# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"
bench_results crash
bench_traps
command -v python3 >/dev/null || die "python3 is needed"
command -v ss >/dev/null || die "ss (iproute2) is needed"
bench_wrk
bench_ustad

{
  bench_machine
  echo "settings: RUNS=$RUNS LOAD_SECONDS=$LOAD_SECONDS CRASH_AT=$CRASH_AT WORKERS=$WORKERS CONNECTIONS=$CONNECTIONS THREADS=$THREADS GRACE=$GRACE RESTART_SEC=$RESTART_SEC QUIET=$QUIET QUIET_WAIT=$QUIET_WAIT QUIET_BUDGET=$QUIET_BUDGET"
} >"$RESULTS/env.txt"
cat "$RESULTS/env.txt" >&2

wait_line() { # FILE PATTERN SECONDS: true once a line of FILE matches PATTERN (grep -E)
  local deadline=$((SECONDS + $3))
  until grep -qE "$2" "$1" 2>/dev/null; do
    ((SECONDS < deadline)) || return 1
    sleep 0.05
  done
}

load_run() { # CONFIG(store|nostore) MODE(ka|nc)
  local config=$1 mode=$2 store=0 before
  local out=$RESULTS/raw/run$RUN-$mode-$config
  CONFIG=$mode-$config
  [[ $config == store ]] && store=64
  free_port
  # --control: a socket of our own, not the default one another ustad on this machine may hold.
  start_server "$out-events.txt" python3 "$HELPER" manage --store "$store" --restart-sec "$RESTART_SEC" \
    --log "$out-ustad.log" -- "$USTAD" --log-format json run -w "$WORKERS" -l "$HOST:$PORT" \
    --control "$TMP/ustad.sock"
  local manager=$SERVER
  wait_line "$out-events.txt" '^ready start=1 ' 30 || die "no READY=1 within 30 s (see $out-ustad.log)"
  quiet; before=$BUSY
  local load_started
  load_started=$(now_ms)
  load $((LOAD_SECONDS + 30)) "$mode" "$out-wrk.txt"
  sleep "$CRASH_AT"
  say "kill -USR1 $manager  # the service manager SIGKILLs ustad, then restarts it"
  kill -USR1 "$manager"
  wait_line "$out-events.txt" '^ready start=([2-9]|[1-9][0-9]) ' 30 ||
    log "  no READY=1 within 30 s of the crash (see $out-ustad.log)"
  sleep_until_ms $((load_started + LOAD_SECONDS * 1000))
  end_load
  python3 "$HELPER" record "$out-events.txt" "$out-wrk.txt" |
    while IFS=$'\t' read -r key val; do record "$key" "$val"; done
  noise load "$before"
  log "  $CONFIG: $(grep -m1 '^TIMELINE' "$out-wrk.txt" | cut -d' ' -f2-5), $(python3 "$HELPER" record "$out-events.txt" "$out-wrk.txt" | grep -E '^(gap_ms|starts_after_kill)' | tr '\t\n' '= ')"
  say "kill -TERM $manager"
  kill -TERM "$manager"
  if ! wait_gone "$manager" 30; then
    log "the service manager did not stop within 30 s: SIGKILL to its process group"
    kill -KILL -- "-$manager" 2>/dev/null || true
  fi
  forget "$manager"
}

started_at=$SECONDS
for ((RUN = 1; RUN <= RUNS; RUN++)); do
  log "run $RUN/$RUNS"
  if ((RUN % 2)); then configs=(store nostore); else configs=(nostore store); fi
  for mode in ka nc; do
    for config in "${configs[@]}"; do load_run "$config" "$mode"; done
  done
done
log "measured in $((SECONDS - started_at)) s; raw results in $RESULTS"

python3 "$HELPER" summary "$RESULTS" | tee "$RESULTS/summary.md"
