#!/usr/bin/env bash
# Makes crates/ustad-cli/hot-symbols.txt: the functions of the ustad binary that a primary
# (and the demo worker) runs, for the linker to place together (crates/ustad-cli/build.rs
# explains why: the primary's resident code, and so its RSS). It runs a release build under
# valgrind's callgrind, which records every function a process runs, through what a primary
# does in its life:
#   1. a config file with two pools (the demo worker on a shared socket, ready by notify; a
#      shell command whose output is relayed), --metrics, text logs: HTTP requests to the
#      workers and to /metrics and /healthz, `status` (text and JSON), `logs`, `reload --wait`,
#      `scale` up and down, `restart`, a worker SIGKILLed and replaced, SIGHUP, SIGTERM;
#   2. one pool from flags (-w 2 -- sh -c …, as bench/scale.sh measures), JSON logs,
#      SIGTTIN/SIGTTOU, `reload --wait`, `stop`;
#   3. the demo (no command), `upgrade --wait` to the same binary (the new program and its
#      `--upgrade-check` are traced too: valgrind follows the exec), `status`, SIGTERM.
# Workers that are not ustad (sh, sleep) are not traced. Some code runs natively only (tokio
# reaps children through pidfds, not under valgrind): when `perf` is there, run 2 is done once
# more natively (with 40 workers started and stopped three times), sampled at 40 kHz, and what
# the primary was seen running is added.
# bench/hot_symbols.py turns the records into the file. Run it again after a toolchain or dependency update, or a change to
# what the primary runs: names the binary no longer has are skipped by the linker, and the
# layout falls back towards its own.
#
#   bash bench/hot_symbols.sh              # ~2 minutes, plus the build
#
# Knobs: USTAD=path (a prebuilt release binary; default: cargo build --release -p ustad-cli),
# PORT=18620 (127.0.0.1, PORT and PORT+1), OUT=crates/ustad-cli/hot-symbols.txt.
# Needs valgrind (installed with apt-get when missing), python3, curl and nm.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH")
PORT=${PORT:-18620}
OUT=${OUT:-$ROOT/crates/ustad-cli/hot-symbols.txt}
RESULTS=$(mktemp -d "${TMPDIR:-/tmp}/ustad-hot.XXXXXX")

# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"
bench_results hot
bench_traps
trap 'cleanup; rm -rf "$RESULTS"' EXIT
command -v python3 >/dev/null || die "python3 is needed"
command -v curl >/dev/null || die "curl is needed"
if ! command -v valgrind >/dev/null; then
  log "installing valgrind from Debian packages"
  sudo=""
  ((EUID == 0)) || sudo=sudo
  $sudo apt-get update -qq && $sudo apt-get install -y -qq valgrind >/dev/null
fi
bench_ustad
RUN=1
CONTROL=$TMP/ustad.sock
SKIP='*/sh,*/dash,*/bash,*/sleep,*/true'

traced() { # LOG ARGS...: the binary under callgrind, following the programs it executes
  local logfile=$1
  shift
  start_server "$logfile" valgrind --tool=callgrind --trace-children=yes \
    --trace-children-skip="$SKIP" --callgrind-out-file="$TMP/callgrind.%p" \
    --demangle=no --dump-instr=no "$USTAD" "$@"
}

client() { "$USTAD" "$@" --control "$CONTROL"; }

wait_ready() { # N: until status --json shows N ready workers (valgrind is ~50 times slower)
  local deadline=$((SECONDS + 120))
  until client status --json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
sys.exit(0 if sum(p["ready"] for p in s["pools"]) >= int(sys.argv[1]) else 1)' "$1" 2>/dev/null; do
    ((SECONDS < deadline)) || die "not $1 ready workers within 120 s"
    sleep 0.5
  done
}

finish() { # stop the traced primary and wait for it (callgrind writes its files at exit)
  kill -TERM "$SERVER"
  wait_gone "$SERVER" 120 || die "the traced primary did not stop"
  forget "$SERVER"
}

log "1/3: a config file, two pools, metrics, text logs"
cat >"$TMP/ustad.toml" <<TOML
[sockets.web]
listen = "127.0.0.1:$PORT"

[pools.web]
command = ["$USTAD", "demo-worker"]
sockets = ["web"]
size = 2
ready = "notify"

[pools.jobs]
command = ["sh", "-c", "echo job \$USTAD_WORKER_ID up; exec sleep 1000"]
size = 1
ready = "none"
TOML
traced "$TMP/one.log" run --control "$CONTROL" --metrics "127.0.0.1:$((PORT + 1))" "$TMP/ustad.toml"
wait_ready 3
for _ in 1 2 3; do curl -sf "http://127.0.0.1:$PORT/" >/dev/null; done
curl -sf "http://127.0.0.1:$((PORT + 1))/metrics" >/dev/null
curl -sf "http://127.0.0.1:$((PORT + 1))/healthz" >/dev/null
client status >/dev/null
client status --json >/dev/null
client logs -n 20 >/dev/null
client reload --wait >/dev/null
client scale web 3 >/dev/null
wait_ready 4
client scale web 2 >/dev/null
client restart web >/dev/null
wait_ready 3
job=$(client status --json | python3 -c '
import json, sys
print(next(w["pid"] for p in json.load(sys.stdin)["pools"] if p["name"] == "jobs" for w in p["workers"]))')
kill -KILL "$job"
sleep 3
wait_ready 3
kill -HUP "$SERVER"
sleep 3
wait_ready 3
client status >/dev/null
finish

log "2/3: one pool from flags, JSON logs, SIGTTIN/SIGTTOU"
traced "$TMP/two.log" --log-format json run -w 2 --control "$CONTROL" --color never \
  -- sh -c 'echo "worker $USTAD_WORKER_ID up"; exec sleep 1000'
wait_ready 2
client status --json >/dev/null
kill -TTIN "$SERVER"
wait_ready 3
kill -TTOU "$SERVER"
sleep 2
client reload --wait >/dev/null
client status >/dev/null
client stop >/dev/null
wait_gone "$SERVER" 120 || die "the traced primary did not stop"
forget "$SERVER"

log "3/3: the demo, an upgrade"
traced "$TMP/three.log" run -w 2 -l "127.0.0.1:$PORT" --control "$CONTROL"
wait_ready 2
curl -sf "http://127.0.0.1:$PORT/" >/dev/null
client upgrade --wait >/dev/null
wait_ready 2
client status >/dev/null
client status --json >/dev/null
finish

: >"$TMP/native.txt"
if command -v perf >/dev/null; then
  log "run 2 natively, sampled by perf"
  start_server "$TMP/native.log" "$USTAD" --log-format json run -w 2 --control "$CONTROL" \
    --color never -- sh -c 'echo "worker $USTAD_WORKER_ID up"; exec sleep 1000'
  perf record -q -F 40000 -p "$SERVER" -o "$TMP/perf.data" >/dev/null 2>&1 &
  perf=$!
  wait_ready 2
  # Many spawns and exits, so that what runs once per worker is sampled too.
  for _ in 1 2 3; do
    client scale app 40 >/dev/null
    wait_ready 40
    client scale app 2 >/dev/null
    client reload --wait >/dev/null
    for _ in 1 2 3 4 5; do client status --json >/dev/null; client status >/dev/null; done
  done
  kill -INT "$perf"
  wait "$perf" || true
  finish
  perf script -i "$TMP/perf.data" -F pid,ip,sym --no-demangle 2>/dev/null |
    awk -v pid="$SERVER" '$1 == pid && $2 !~ /^ffff/ {print $3}' | sort -u >"$TMP/native.txt"
fi

ls "$TMP"/callgrind.* >/dev/null || die "callgrind wrote nothing"
python3 "$BENCH/hot_symbols.py" "$USTAD" --native "$TMP/native.txt" "$TMP"/callgrind.* >"$OUT"
log "wrote $OUT"
