#!/usr/bin/env bash
# What connection hand-off (`round-robin` sockets: the primary accepts and passes each
# connection to a worker with SCM_RIGHTS) costs against `shared` and `reuseport`, with the
# library's hello_cluster example and 2 workers, measured with wrk side by side in one run.
#
#   bash bench/handoff.sh                 # RUNS=3 DURATION=4 CONNECTIONS=64 THREADS=2
#
# Prints a markdown table: keep-alive and new-connection req/s (medians, and the median ratio
# to `shared` in the same run), p99, and how the keep-alive connections were split between
# the workers (responses per X-Worker-Pid, in a separate run with the counting Lua script).
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH")
RUNS=${RUNS:-3}
DURATION=${DURATION:-4}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
PORT=${PORT:-18190}
LUA=$BENCH/wrk/report.lua

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
cargo build --release -q -p ustad --example hello_cluster
EXAMPLE=$ROOT/target/release/examples/hello_cluster
TMP=$(mktemp -d "${TMPDIR:-/tmp}/ustad-handoff.XXXXXX")
SERVER=""
cleanup() {
  if [[ -n $SERVER ]]; then kill -TERM -- "-$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT

start() { # MODE
  XDG_RUNTIME_DIR=$TMP HELLO_MODE=$1 HELLO_ADDR=127.0.0.1:$PORT \
    setsid "$EXAMPLE" >"$TMP/$1.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 200); do
    curl -fsS "http://127.0.0.1:$PORT/" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "hello_cluster ($1) did not come up" >&2; cat "$TMP/$1.log" >&2; exit 1
}
stop() {
  kill -TERM -- "-$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
  SERVER=""
}
field() { sed -n "s/^BENCH .*$2=\([0-9.]*\).*/\1/p" "$1" | head -1; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

MODES=(shared reuseport round-robin)
for run in $(seq "$RUNS"); do
  for mode in "${MODES[@]}"; do
    start "$mode"
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$LUA" "http://127.0.0.1:$PORT/" >"$TMP/$mode.ka.$run" 2>&1
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$LUA" -H 'Connection: close' "http://127.0.0.1:$PORT/" >"$TMP/$mode.nc.$run" 2>&1
    COUNT_PIDS=1 wrk -t"$THREADS" -c"$CONNECTIONS" -d2s -s "$LUA" "http://127.0.0.1:$PORT/" >"$TMP/$mode.bal.$run" 2>&1
    stop
  done
done

echo "| mode | keep-alive req/s | × shared | p99 ms | new-conn req/s | × shared | p99 ms | keep-alive split (responses per worker, run 1) |"
echo "|---|--:|--:|--:|--:|--:|--:|---|"
for mode in "${MODES[@]}"; do
  ka=(); nc=(); kar=(); ncr=(); kp=(); np=()
  for run in $(seq "$RUNS"); do
    a=$(field "$TMP/$mode.ka.$run" rps); b=$(field "$TMP/$mode.nc.$run" rps)
    sa=$(field "$TMP/shared.ka.$run" rps); sb=$(field "$TMP/shared.nc.$run" rps)
    ka+=("$a"); nc+=("$b")
    kar+=("$(awk -v x="$a" -v y="$sa" 'BEGIN {printf "%.3f", x/y}')")
    ncr+=("$(awk -v x="$b" -v y="$sb" 'BEGIN {printf "%.3f", x/y}')")
    kp+=("$(field "$TMP/$mode.ka.$run" p99_us)"); np+=("$(field "$TMP/$mode.nc.$run" p99_us)")
  done
  split=$(sed -n 's/^BENCH pid \([0-9]*\) \([0-9]*\)/\2/p' "$TMP/$mode.bal.1" | sort -n | paste -sd: -)
  printf "| %s | %.0f | %.2f× | %.1f | %.0f | %.2f× | %.1f | %s |\n" "$mode" \
    "$(printf '%s\n' "${ka[@]}" | median)" "$(printf '%s\n' "${kar[@]}" | median)" \
    "$(printf '%s\n' "${kp[@]}" | median | awk '{print $1/1000}')" \
    "$(printf '%s\n' "${nc[@]}" | median)" "$(printf '%s\n' "${ncr[@]}" | median)" \
    "$(printf '%s\n' "${np[@]}" | median | awk '{print $1/1000}')" "$split"
done
