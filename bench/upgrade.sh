#!/usr/bin/env bash
# Upgrading ustad itself under load: a primary with 100 of ustad's built-in demo workers, loaded
# with wrk, executes a new program in place (`ustad upgrade`) every second, UPGRADES times per
# load run. The new program is a copy of the same release binary: two copies, so that each
# upgrade really changes /proc/PID/exe (the one the primary is not running is taken). Each load
# run with upgrades has a twin without them (the same length, the same status requests and pid
# checks), measured side by side in the same run; and the same pair runs first without any
# load, as a reference. It measures, without load and under new-connection and keep-alive
# load:
#   - for upgrades done by `ustad upgrade --wait --binary COPY` (odd ones): the client's wall
#     time, from just before its process starts to its exit: its own start-up, a `status`
#     before, the upgrade request, and a `status` to the new program;
#   - for upgrades done by bench/upgrade.py writing the protocol on the control socket (even
#     ones): the time from the `{"command":"upgrade"}` request to the new program's whole answer
#     to `{"command":"status"}` on a new connection: the time from `ustad upgrade` to the new
#     program serving the control socket;
#   - for every upgrade: the new program's `switch_ms` (from the old program writing its state
#     to the new one starting its loop), `workers_kept`/`workers_lost` (`ustad status --json`),
#     the primary's CPU time and run-queue wait meanwhile (/proc/PID/schedstat), the times
#     between its `upgrade_check`, `upgrading` and `upgraded` log events,
#     and the check that the primary's pid and all 100 workers' pids are unchanged (the same
#     processes: each still the primary's child with the start time it had before);
#   - failed requests (bench/wrk/timeline.lua: sent - 200 responses + connect errors) and connect
#     errors over the whole load run, with and without upgrades.
# See docs/benchmarks.md ("Reliability", "Upgrading ustad itself") for a real run.
#
#   bash bench/upgrade.sh                          # ~3 minutes with the defaults, plus the build
#   UPGRADES=4 bash bench/upgrade.sh               # a quick look
#
# Knobs (environment variables):
#   UPGRADES=20         upgrades per run (no load, new connections, keep-alive), half with
#                       the client, half with the protocol
#   INTERVAL=1          seconds between upgrades
#   WORKERS=100         ustad's -w
#   CONNECTIONS=64 THREADS=2   wrk's -c and -t
#   GRACE=1             seconds the requests in flight get at the end of a load run
#   QUIET=15 QUIET_WAIT=10 QUIET_BUDGET=120   a load run starts once the machine is at most
#                       QUIET % busy (lib.sh); busier runs are flagged, not repeated
#   PORT=18580          where the workers listen (127.0.0.1; 10 higher while taken)
#   PRIMARY_NICE=       ustad's --primary-nice (default: none given, ustad's own default, -10);
#                       PRIMARY_NICE=0 runs the primary at its workers' priority, to see how much
#                       of a switch under load is waiting for a CPU among the busy workers
#   USTAD=path          a prebuilt ustad (default: cargo build --release, then a copy of it)
#   RESULTS=dir         where raw results go (default bench/results/upgrade-<timestamp>)
#
# Needs python3, ss (iproute2), wrk (installed with apt-get when missing) and cargo. Every
# process it starts is stopped on exit, also on Ctrl-C.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH")
LUA=$BENCH/wrk/timeline.lua
HELPER=$BENCH/upgrade.py
RELIABILITY=$BENCH/reliability.py

UPGRADES=${UPGRADES:-20}
INTERVAL=${INTERVAL:-1}
WORKERS=${WORKERS:-100}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
GRACE=${GRACE:-1}
QUIET=${QUIET:-15}
QUIET_WAIT=${QUIET_WAIT:-10}
QUIET_BUDGET=${QUIET_BUDGET:-120}
PORT=${PORT:-18580}
PRIMARY_NICE=${PRIMARY_NICE-}
HOST=127.0.0.1
RESULTS=${RESULTS:-$BENCH/results/upgrade-$(date -u +%Y%m%dT%H%M%SZ)}

# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"
bench_results upgrade
bench_traps
command -v python3 >/dev/null || die "python3 is needed"
command -v ss >/dev/null || die "ss (iproute2) is needed"
bench_wrk
bench_ustad

# The "new versions": copies of the binary, so that each upgrade executes another file.
NEW_A=$TMP/ustad-a
NEW_B=$TMP/ustad-b
cp "$USTAD" "$NEW_A"
cp "$USTAD" "$NEW_B"

need=$((WORKERS * 4 + 256))
if (($(ulimit -n) < need)); then
  ulimit -n "$need" 2>/dev/null || die "ulimit -n is $(ulimit -n); $WORKERS workers need about $need"
fi

{
  bench_machine
  echo "settings: UPGRADES=$UPGRADES INTERVAL=$INTERVAL WORKERS=$WORKERS CONNECTIONS=$CONNECTIONS THREADS=$THREADS GRACE=$GRACE QUIET=$QUIET QUIET_WAIT=$QUIET_WAIT QUIET_BUDGET=$QUIET_BUDGET PRIMARY_NICE=${PRIMARY_NICE:-default}; ulimit -n $(ulimit -n)"
  echo "commit: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')"
} >"$RESULTS/env.txt"
cat "$RESULTS/env.txt" >&2

CONTROL=$TMP/ustad.sock
LOGFILE=$RESULTS/raw/ustad.log
SERVER=""
RUN=1
# Seconds the driver runs: an op every INTERVAL s, UPGRADES of them, and INTERVAL s after.
DRIVE_S=$(awk -v n="$UPGRADES" -v i="$INTERVAL" 'BEGIN {s = (n + 1) * i; print (s == int(s)) ? s : int(s) + 1}')

start_ustad() {
  free_port
  # The built-in demo worker (no command), ustad's defaults. --log-format json: the upgrade
  # events are timed from their timestamps. --control: a socket of our own, not the default one
  # another ustad on this machine may hold; it changes nothing in how workers are run.
  local nice=()
  [[ -z $PRIMARY_NICE ]] || nice=(--primary-nice "$PRIMARY_NICE")
  start_server "$LOGFILE" "$USTAD" --log-format json run -w "$WORKERS" -l "$HOST:$PORT" \
    --control "$CONTROL" --color never "${nice[@]}"
  say "python3 $RELIABILITY wait-ready --ustad $USTAD --control $CONTROL --size $WORKERS"
  python3 "$RELIABILITY" wait-ready --ustad "$USTAD" --control "$CONTROL" --size "$WORKERS" \
    --timeout 60 --poll 0.1 >/dev/null || die "$WORKERS workers not ready within 60 s (see $LOGFILE)"
  say "the primary's nice: $(awk '{print $19}' "/proc/$SERVER/stat"), its workers': $(
    ps -o ni= --ppid "$SERVER" | sort -u | tr -s ' \n' ' ')"
}

stop_ustad() {
  say "kill -TERM $SERVER"
  kill -TERM "$SERVER"
  if ! wait_gone "$SERVER" 30; then
    log "ustad did not stop within 30 s: SIGKILL to its process group"
    kill -KILL -- "-$SERVER" 2>/dev/null || true
  fi
  forget "$SERVER"
}

load_run() { # MODE(idle|ka|nc) KIND(base|upgrade); idle: no load
  local mode=$1 kind=$2 before baseline=() wrk_out=-
  local out=$RESULTS/raw/$mode-$kind
  CONFIG=$mode-$kind
  [[ $kind == base ]] && baseline=(--baseline)
  quiet; before=$BUSY
  if [[ $mode != idle ]]; then
    wrk_out=$out-wrk.txt
    load $((DRIVE_S + 30)) "$mode" "$wrk_out"
    sleep 1 # a steady second before the first upgrade
  fi
  say "python3 $HELPER drive --ustad $USTAD --control $CONTROL --pid $SERVER --binaries $NEW_A,$NEW_B --upgrades $UPGRADES --interval $INTERVAL ${baseline[*]}"
  timeout -k 5 $((DRIVE_S + 120)) python3 "$HELPER" drive --ustad "$USTAD" --control "$CONTROL" \
    --pid "$SERVER" --binaries "$NEW_A,$NEW_B" --upgrades "$UPGRADES" --interval "$INTERVAL" \
    "${baseline[@]}" >"$out-driver.txt" || log "the driver exited with $? (see $out-driver.txt)"
  if [[ $mode != idle ]]; then
    sleep 1 # load goes on a second after the last upgrade
    end_load
  fi
  python3 "$HELPER" record "$out-driver.txt" "$wrk_out" "$LOGFILE" >"$out-record.tsv"
  while IFS=$'\t' read -r key val; do record "$key" "$val"; done <"$out-record.tsv"
  noise load "$before"
  log "  $CONFIG: $(grep -m1 '^TIMELINE' "$wrk_out" 2>/dev/null | cut -d' ' -f2-5); $(awk -F'\t' '$1 ~ /^(upgrades_ok|workers_changed|workers_not_alive|primary_changed)$/ {printf "%s=%s ", $1, $2}' "$out-record.tsv")"
  if grep -q '^SAID' "$out-driver.txt"; then log "  $(grep -m1 '^SAID' "$out-driver.txt")"; fi
  python3 "$RELIABILITY" wait-ready --ustad "$USTAD" --control "$CONTROL" --size "$WORKERS" \
    --timeout 30 >/dev/null || log "not every slot ready 30 s after the load run (see $LOGFILE)"
}

started_at=$SECONDS
log "one ustad with $WORKERS workers; $UPGRADES upgrades per load run, ${INTERVAL} s apart"
start_ustad
say "wrk -t$THREADS -c$CONNECTIONS -d1s http://$HOST:$PORT/  # warm-up, not recorded"
timeout -k 5 30 wrk "-t$THREADS" "-c$CONNECTIONS" -d1s "http://$HOST:$PORT/" >/dev/null 2>&1 || true
# Upgrades without load first: what the switch costs when nothing else runs. Then new-connection
# load, its baseline first, and keep-alive load, its baseline second, so that drift hits both
# kinds alike.
load_run idle base
load_run idle upgrade
load_run nc base
load_run nc upgrade
load_run ka upgrade
load_run ka base
stop_ustad
log "measured in $((SECONDS - started_at)) s; raw results in $RESULTS"

python3 "$HELPER" summary "$RESULTS" | tee "$RESULTS/summary.md"
