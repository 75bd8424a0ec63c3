#!/usr/bin/env bash
# The primary with many workers: 2, 100 and 1,000 cheap workers (`sh -c 'echo …; exec sleep …'`:
# each prints one line of about 128 bytes, relayed by the primary, then sleeps), no sockets, so
# ustad's default readiness for a command is `none`: a worker is ready once it is spawned, and
# what is timed is the primary's own work. For each size it measures
#   - the time from the start of `ustad run` to every worker ready (the last `ready` event of the
#     JSON log), and to the first `spawned` event;
#   - a rolling restart (`kill -USR2`): the time to its `rollout_finished` event;
#   - the primary's VmRSS, RssAnon and RssFile (/proc/PID/status) before and 1 s after the
#     rollout, its threads and open fds;
#   - `ustad status --json`: the median wall time of 20 (the client process included), and of
#     the same request sent on the control socket without a client process;
#   - the primary's CPU time (utime + stime, /proc/PID/stat) over 10 s of idleness, from 6 s
#     after the rollout finished (a replacement counts as served after min_uptime, 5 s).
# See docs/benchmarks.md ("Reliability", "Scale") for what is measured, why, and a real run.
#
#   bash bench/scale.sh                          # ~3 minutes with the defaults
#   RUNS=1 SIZES="2 100" bash bench/scale.sh     # a quick look
#
# Knobs (environment variables):
#   RUNS=3              runs; each runs every size once, in turn; the summary quotes medians
#   SIZES="2 100 1000"  the pool sizes (-w)
#   IDLE=10             seconds of idleness the CPU time is measured over
#   STATUS_N=20         status requests timed per size
#   USTAD=path          a prebuilt ustad (default: cargo build --release -p ustad-cli, then a copy of it)
#   RESULTS=dir         where raw results go (default bench/results/scale-<timestamp>)
#
# Needs python3 and cargo. Every process it starts is stopped on exit, also on Ctrl-C.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH")
HELPER=$BENCH/reliability.py

RUNS=${RUNS:-3}
SIZES=${SIZES:-2 100 1000}
IDLE=${IDLE:-10}
STATUS_N=${STATUS_N:-20}
RESULTS=${RESULTS:-$BENCH/results/scale-$(date -u +%Y%m%dT%H%M%SZ)}

# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"
bench_results scale
bench_traps
command -v python3 >/dev/null || die "python3 is needed"
bench_ustad

max_size=0
for size in $SIZES; do ((size > max_size)) && max_size=$size; done
# Each worker holds a few of the primary's fds (its output pipes, a pidfd), twice during a
# rollout's step: make sure the primary may open them.
need=$((max_size * 4 + 256))
if (($(ulimit -n) < need)); then
  ulimit -n "$need" 2>/dev/null || die "ulimit -n is $(ulimit -n); $max_size workers need about $need"
fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), kernel $(uname -r), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
  echo "ustad: $("$USTAD" --version) ($(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo '?'))"
  echo "settings: RUNS=$RUNS SIZES=\"$SIZES\" IDLE=$IDLE STATUS_N=$STATUS_N; ulimit -n $(ulimit -n)"
} >"$RESULTS/env.txt"
cat "$RESULTS/env.txt" >&2

CONTROL=$TMP/ustad.sock
# One line of about 128 bytes per worker start, so that a rollout of 1,000 workers relays
# 2,000 lines (the primary keeps the last 1,000 lines or 256 KiB of a pool for `ustad logs`).
PAD=$(printf '%*s' 80 '' | tr ' ' '.')
WORKER="echo \"worker \$USTAD_WORKER_ID (slot \$USTAD_WORKER_INDEX) up $PAD\"; exec sleep 3600"

measure() { # SIZE
  local size=$1 logfile=$RESULTS/raw/run$RUN-$1.log launch
  CONFIG=$size
  rm -f "$CONTROL"
  launch=$(date +%s%3N)
  # --log-format json: the events are timed from their timestamps. --control: a socket of our
  # own, not the default one another ustad on this machine may hold.
  start_server "$logfile" "$USTAD" --log-format json run -w "$size" --control "$CONTROL" \
    --color never -- sh -c "$WORKER"
  say "python3 $HELPER wait-ready --ustad $USTAD --control $CONTROL --size $size"
  python3 "$HELPER" wait-ready --ustad "$USTAD" --control "$CONTROL" --size "$size" \
    --timeout 120 --poll 0.05 >/dev/null || die "$size workers not ready within 120 s (see $logfile)"
  say "python3 $HELPER scale-measure --ustad $USTAD --control $CONTROL --pid $SERVER --log $logfile --launch-ms $launch --size $size --status-n $STATUS_N --idle $IDLE  # kill -USR2 $SERVER inside"
  python3 "$HELPER" scale-measure --ustad "$USTAD" --control "$CONTROL" --pid "$SERVER" \
    --log "$logfile" --launch-ms "$launch" --size "$size" --status-n "$STATUS_N" --idle "$IDLE" \
    >"$RESULTS/raw/run$RUN-$size-measure.txt"
  while IFS=$'\t' read -r key val; do record "$key" "$val"; done <"$RESULTS/raw/run$RUN-$size-measure.txt"
  log "  $size workers: $(awk -F'\t' '$1 ~ /^(ready_ms|rollout_ms|after_VmRSS_kib|status_ms|idle_ticks)$/ {printf "%s=%s ", $1, $2}' "$RESULTS/raw/run$RUN-$size-measure.txt")"
  say "kill -TERM $SERVER"
  kill -TERM "$SERVER"
  if ! wait_gone "$SERVER" 60; then
    log "ustad did not stop within 60 s: SIGKILL to its process group"
    kill -KILL -- "-$SERVER" 2>/dev/null || true
  fi
  forget "$SERVER"
}

started_at=$SECONDS
for ((RUN = 1; RUN <= RUNS; RUN++)); do
  for size in $SIZES; do
    log "run $RUN/$RUNS: $size workers"
    measure "$size"
  done
done
log "measured in $((SECONDS - started_at)) s; raw results in $RESULTS"

python3 "$HELPER" scale-summary "$RESULTS" | tee "$RESULTS/summary.md"
