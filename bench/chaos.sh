#!/usr/bin/env bash
# Random SIGKILLs under load: ustad's built-in demo worker, 4 workers with ustad's defaults
# (`ustad run -w 4 -l ADDR`, nothing else that changes how workers run), loaded with wrk, while
# a random live worker (its pid from `ustad status --json`) is SIGKILLed every 300 ms. Each
# chaos load run has a baseline twin with the same schedule and the same status requests, but
# no kill, measured side by side in the same run. It measures, under keep-alive and under
# new-connection load:
#   - refused connections (wrk's connect errors): the listening socket stays open in the
#     primary, so there should be none;
#   - failed requests (bench/wrk/timeline.lua: sent - 200 responses + connect errors) against
#     the connections the killed workers held when they died (each carries at most one request
#     in flight): only those may be lost;
#   - the time from the last kill until `status --json` shows every slot ready again;
#   - the throughput (200 responses per second while the kills run) against the baseline's.
# See docs/benchmarks.md ("Reliability", "Chaos") for what is measured, why, and a real run.
#
#   bash bench/chaos.sh                        # ~4 minutes with the defaults
#   RUNS=1 KILL_SECONDS=4 bash bench/chaos.sh  # a quick look, under a minute
#
# Knobs (environment variables):
#   RUNS=3              runs; each starts a fresh ustad and measures baseline and chaos under
#                       keep-alive and new-connection load (baseline first in odd runs, chaos
#                       first in even runs, so drift hits both alike); the summary quotes
#                       medians and per-run ratios
#   KILL_SECONDS=8      seconds of kills per chaos run (the baseline runs as long)
#   INTERVAL=0.3        seconds between kills
#   WORKERS=4           ustad's -w
#   CONNECTIONS=64 THREADS=2   wrk's -c and -t
#   GRACE=1             seconds the requests in flight get at the end of a load run
#   QUIET=15 QUIET_WAIT=10 QUIET_BUDGET=120   a load run starts once the machine is at most
#                       QUIET % busy (lib.sh); busier runs are flagged, not repeated
#   PORT=18380          where the workers listen (127.0.0.1; 10 higher while taken)
#   SEED=               the victims' random seed (default: a new one each run, logged)
#   USTAD=path          a prebuilt ustad (default: cargo build --release -p ustad-cli, then a copy of it)
#   RESULTS=dir         where raw results go (default bench/results/chaos-<timestamp>)
#
# Needs python3, ss (iproute2), wrk (installed with apt-get when missing) and cargo. Every
# process it starts is stopped on exit, also on Ctrl-C.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH")
LUA=$BENCH/wrk/timeline.lua
HELPER=$BENCH/reliability.py

RUNS=${RUNS:-3}
KILL_SECONDS=${KILL_SECONDS:-8}
INTERVAL=${INTERVAL:-0.3}
WORKERS=${WORKERS:-4}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
GRACE=${GRACE:-1}
QUIET=${QUIET:-15}
QUIET_WAIT=${QUIET_WAIT:-10}
QUIET_BUDGET=${QUIET_BUDGET:-120}
PORT=${PORT:-18380}
SEED=${SEED-}
HOST=127.0.0.1
RESULTS=${RESULTS:-$BENCH/results/chaos-$(date -u +%Y%m%dT%H%M%SZ)}

# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"
bench_results chaos
bench_traps
command -v python3 >/dev/null || die "python3 is needed"
command -v ss >/dev/null || die "ss (iproute2) is needed"
bench_wrk
bench_ustad

{
  bench_machine
  echo "settings: RUNS=$RUNS KILL_SECONDS=$KILL_SECONDS INTERVAL=$INTERVAL WORKERS=$WORKERS CONNECTIONS=$CONNECTIONS THREADS=$THREADS GRACE=$GRACE QUIET=$QUIET QUIET_WAIT=$QUIET_WAIT QUIET_BUDGET=$QUIET_BUDGET SEED=${SEED:-random}"
} >"$RESULTS/env.txt"
cat "$RESULTS/env.txt" >&2

CONTROL=$TMP/ustad.sock
SERVER=""

start_ustad() {
  local logfile=$RESULTS/raw/ustad.log
  free_port
  echo "--- run $RUN" >>"$logfile"
  # --control: a socket of our own, not the default one another ustad on this machine may hold;
  # it changes nothing in how workers are run.
  start_server "$logfile" "$USTAD" run -w "$WORKERS" -l "$HOST:$PORT" --control "$CONTROL" --color never
  say "python3 $HELPER wait-ready --ustad $USTAD --control $CONTROL --size $WORKERS"
  python3 "$HELPER" wait-ready --ustad "$USTAD" --control "$CONTROL" --size "$WORKERS" --timeout 30 \
    >/dev/null || die "ustad's workers are not ready within 30 s (see $logfile)"
}

stop_ustad() {
  say "kill -TERM $SERVER"
  kill -TERM "$SERVER"
  if ! wait_gone "$SERVER" 20; then
    log "ustad did not stop within 20 s: SIGKILL to its process group"
    kill -KILL -- "-$SERVER" 2>/dev/null || true
  fi
  forget "$SERVER"
}

load_run() { # MODE(ka|nc) KIND(base|chaos)
  local mode=$1 kind=$2 before seed kill=()
  local out=$RESULTS/raw/run$RUN-$mode-$kind
  CONFIG=$mode-$kind
  seed=${SEED:-$RANDOM$RANDOM}
  [[ $kind == chaos ]] && kill=(--kill)
  quiet; before=$BUSY
  load $((KILL_SECONDS + 30)) "$mode" "$out-wrk.txt"
  sleep 1 # a steady second before the first kill
  say "python3 $HELPER chaos-drive --ustad $USTAD --control $CONTROL --port $PORT --seconds $KILL_SECONDS --interval $INTERVAL --seed $seed ${kill[*]}"
  python3 "$HELPER" chaos-drive --ustad "$USTAD" --control "$CONTROL" --port "$PORT" \
    --seconds "$KILL_SECONDS" --interval "$INTERVAL" --seed "$seed" "${kill[@]}" >"$out-driver.txt"
  sleep 1 # load goes on a second after every slot is ready again
  end_load
  python3 "$HELPER" chaos-record "$out-driver.txt" "$out-wrk.txt" |
    while IFS=$'\t' read -r key val; do record "$key" "$val"; done
  record seed "$seed"
  noise load "$before"
  log "  $CONFIG: $(grep -m1 '^TIMELINE' "$out-wrk.txt" | cut -d' ' -f2-5), $(grep -c 'killed=1' "$out-driver.txt" || true) kills, $(grep -m1 '^RECOVERED' "$out-driver.txt" || echo 'no RECOVERED line')"
  # The next load run starts with every slot ready (the driver waited for it after kills).
  python3 "$HELPER" wait-ready --ustad "$USTAD" --control "$CONTROL" --size "$WORKERS" --timeout 30 \
    >/dev/null || log "not every slot ready 30 s after the chaos run (see raw/ustad.log)"
}

started_at=$SECONDS
for ((RUN = 1; RUN <= RUNS; RUN++)); do
  log "run $RUN/$RUNS"
  start_ustad
  say "wrk -t$THREADS -c$CONNECTIONS -d1s http://$HOST:$PORT/  # warm-up, not recorded"
  timeout -k 5 30 wrk "-t$THREADS" "-c$CONNECTIONS" -d1s "http://$HOST:$PORT/" >/dev/null 2>&1 || true
  for mode in ka nc; do
    if ((RUN % 2)); then kinds=(base chaos); else kinds=(chaos base); fi
    for kind in "${kinds[@]}"; do load_run "$mode" "$kind"; done
  done
  stop_ustad
done
log "measured in $((SECONDS - started_at)) s; raw results in $RESULTS"

python3 "$HELPER" chaos-summary "$RESULTS" | tee "$RESULTS/summary.md"
