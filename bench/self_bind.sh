#!/usr/bin/env bash
# The Node app that binds its own port (bench/node/app.js: server.listen(PORT, HOST)), with 2
# workers, under Node's cluster module, PM2 and ustad (its bind gets ustad's socket through the
# preload library), side by side in one run, plus ustad with the same app taking fd 3, with and
# without the library, for reference. Measured with wrk: throughput (keep-alive and new connections), balance between
# the workers (X-Worker-Pid counts), and errors during rolling restarts under load. Every run
# measures every configuration once, in turn; the summary quotes medians and ratios. Besides
# requests per second, it records the CPU time the manager and its workers spent per request
# (from /proc), which the other load of a shared machine disturbs far less.
#
#   bash bench/self_bind.sh                       # ~12 minutes with the defaults
#   RUNS=1 DURATION=2 bash bench/self_bind.sh     # a quick look
#
# Knobs: RUNS=3 DURATION=4 (seconds per throughput measurement) BALANCE_DURATION=2
# CONNECTIONS=64 THREADS=2 RELOADS=3 RELOAD_GAP=2 (rolling restarts under load, seconds apart)
# CONFIGS="node-rr pm2 ustad-self ustad-self-rp ustad-fd3 ustad-fd3-off" (ustad-self-rp: with
# --reuseport, each worker's bind gets its slot's socket; ustad-fd3-off: the fd-3 app without
# the preload library, --no-preload, for what loading it costs) PORT_BASE=18180 USTAD=path
# PM2=path
# RESULTS=dir (default bench/results/self_bind-<timestamp>).
#
# Under ustad the app is started as `sh -c 'unset LISTEN_FDS LISTEN_PID LISTEN_FDNAMES; exec
# node app.js'`: app.js takes fd 3 when LISTEN_FDS is set, and otherwise binds HOST:PORT as it
# does under Node's cluster and PM2, which is the case measured here.
#
# Needs node, npm, python3, curl, wrk and cargo. Every process it starts is stopped on exit.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH")
APP=$BENCH/node/app.js
LUA=$BENCH/wrk/report.lua

RUNS=${RUNS:-3}
DURATION=${DURATION:-4}
BALANCE_DURATION=${BALANCE_DURATION:-2}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
RELOADS=${RELOADS:-3}
RELOAD_GAP=${RELOAD_GAP:-2}
CONFIGS=${CONFIGS:-node-rr pm2 ustad-self ustad-self-rp ustad-fd3 ustad-fd3-off}
PORT_BASE=${PORT_BASE:-18180}
HOST=127.0.0.1
WORKERS=2
RESULTS=${RESULTS:-$BENCH/results/self_bind-$(date -u +%Y%m%dT%H%M%SZ)}

mkdir -p "$RESULTS/raw"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/ustad-self-bind.XXXXXX")
TSV=$RESULTS/results.tsv
COMMANDS=$RESULTS/commands.txt
: >"$TSV"
: >"$COMMANDS"

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
say() { printf '%s\n' "$*" >>"$COMMANDS"; }

SERVER=""      # the process group of the running configuration (not PM2's)
PM2_DAEMON=""
LOAD_PID=""

alive() { [[ -e /proc/$1 ]] && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }
wait_gone() { local deadline=$((SECONDS + $2)); while alive "$1"; do ((SECONDS < deadline)) || return 1; sleep 0.1; done; }

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  set +e
  [[ -n $LOAD_PID ]] && kill -TERM -- "-$LOAD_PID" 2>/dev/null
  if [[ -n $PM2_DAEMON ]]; then
    PM2_HOME=$TMP/pm2-home "$PM2" kill >/dev/null 2>&1
    wait_gone "$PM2_DAEMON" 5 || kill -KILL "$PM2_DAEMON" 2>/dev/null
  fi
  if [[ -n $SERVER ]]; then
    kill -TERM -- "-$SERVER" 2>/dev/null
    wait_gone "$SERVER" 15 || kill -KILL -- "-$SERVER" 2>/dev/null
  fi
  wait 2>/dev/null
  rm -rf "$TMP"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for tool in node npm python3 curl wrk; do command -v $tool >/dev/null || die "$tool is needed"; done
if [[ -z ${USTAD:-} ]]; then
  log "building ustad (cargo build --release)"
  (cd "$ROOT" && cargo build --release --quiet -p ustad-cli)
  cp "$ROOT/target/release/ustad" "$TMP/ustad"
  USTAD=$TMP/ustad
fi
if [[ -z ${PM2:-} ]]; then
  log "installing pm2 with npm into $TMP/pm2"
  npm install --prefix "$TMP/pm2" --no-audit --no-fund --loglevel=error pm2 >/dev/null
  PM2=$TMP/pm2/node_modules/.bin/pm2
fi
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "node: $(node --version), pm2: $("$PM2" --version 2>/dev/null | tail -1), wrk: $(wrk -v 2>&1 | head -1 | cut -d' ' -f2)"
  echo "ustad: $("$USTAD" --version) ($(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo '?'))"
  echo "settings: RUNS=$RUNS DURATION=$DURATION BALANCE_DURATION=$BALANCE_DURATION CONNECTIONS=$CONNECTIONS THREADS=$THREADS RELOADS=$RELOADS RELOAD_GAP=$RELOAD_GAP"
  echo "configs: $CONFIGS"
} | tee "$RESULTS/env.txt" >&2

PORT=""
start_config() { # NAME INDEX
  local name=$1 logfile=$RESULTS/raw/$1.log
  PORT=$((PORT_BASE + $2))
  SERVER=""
  local self="unset LISTEN_FDS LISTEN_PID LISTEN_FDNAMES; exec node $APP"
  case $name in
    node-rr)
      say "HOST=$HOST PORT=$PORT WORKERS=$WORKERS node $BENCH/node/cluster-primary.js"
      HOST=$HOST PORT=$PORT WORKERS=$WORKERS setsid node "$BENCH/node/cluster-primary.js" >>"$logfile" 2>&1 &
      SERVER=$! ;;
    pm2)
      say "PM2_HOME=… HOST=$HOST PORT=$PORT pm2 start $APP -i $WORKERS --name bench"
      HOST=$HOST PORT=$PORT PM2_HOME=$TMP/pm2-home "$PM2" start "$APP" -i $WORKERS --name bench >>"$logfile" 2>&1
      PM2_DAEMON=$(cat "$TMP/pm2-home/pm2.pid") ;;
    ustad-self | ustad-self-rp)
      local flags=()
      [[ $name == ustad-self-rp ]] && flags=(--reuseport)
      say "ustad run -w $WORKERS -l $HOST:$PORT ${flags[*]} -e HOST=$HOST -- sh -c '$self'"
      setsid "$USTAD" run --name "bench-$PORT" -w $WORKERS -l "$HOST:$PORT" "${flags[@]}" -e HOST=$HOST --color never -- sh -c "$self" >>"$logfile" 2>&1 &
      SERVER=$! ;;
    ustad-fd3 | ustad-fd3-off)
      local flags=()
      [[ $name == ustad-fd3-off ]] && flags=(--no-preload)
      say "ustad run -w $WORKERS -l $HOST:$PORT ${flags[*]} -- node $APP"
      setsid "$USTAD" run --name "bench-$PORT" -w $WORKERS -l "$HOST:$PORT" "${flags[@]}" --color never -- node "$APP" >>"$logfile" 2>&1 &
      SERVER=$! ;;
    *) die "unknown configuration $name" ;;
  esac
  local deadline=$((SECONDS + 20))
  until curl -s -o /dev/null --max-time 2 "http://$HOST:$PORT/"; do
    ((SECONDS < deadline)) || die "$name does not answer on $HOST:$PORT (see $logfile)"
    sleep 0.1
  done
  sleep 1 # every worker up (the first to answer may be alone)
}

stop_config() { # NAME
  if [[ $1 == pm2 ]]; then
    PM2_HOME=$TMP/pm2-home "$PM2" kill >>"$RESULTS/raw/pm2.log" 2>&1 || true
    wait_gone "$PM2_DAEMON" 10 || kill -KILL "$PM2_DAEMON" || true
    PM2_DAEMON=""
    return
  fi
  kill -TERM "$SERVER"
  wait_gone "$SERVER" 20 || kill -KILL -- "-$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
  SERVER=""
}

reload() { # NAME: one rolling restart, as each manager is told to do one
  if [[ $1 == pm2 ]]; then
    PM2_HOME=$TMP/pm2-home "$PM2" reload bench >>"$RESULTS/raw/pm2.log" 2>&1
  else
    kill -HUP "$SERVER"
  fi
}

record() { printf '%s\t%s\t%s\t%s\n' "$RUN" "$CONFIG" "$1" "$2" >>"$TSV"; }

field() { # FILE KEY: a value of wrk's BENCH line, or nan
  local line
  line=$(grep -m1 '^BENCH requests=' "$1") || { echo nan; return; }
  line=" $line "
  [[ $line == *" $2="* ]] || { echo nan; return; }
  line=${line#* "$2"=}
  echo "${line%% *}"
}

errors_of() { # FILE: socket errors, and non-2xx responses (counted with COUNT_PIDS; else
  # wrk's status errors, >= 400 only)
  local f=$1 sum=0 key value
  grep -q '^BENCH requests=' "$f" || { echo nan; return; }
  for key in connect read write timeout; do sum=$((sum + $(field "$f" $key))); done
  value=$(field "$f" non2xx)
  [[ $value == nan ]] && value=$(field "$f" status)
  echo $((sum + value))
}

wrk_run() { # SECONDS MODE(ka|nc) COUNT(0|1) OUT [background]
  local args=(wrk "-t$THREADS" "-c$CONNECTIONS" "-d${1}s" --latency -s "$LUA")
  [[ $2 == nc ]] && args+=(-H "Connection: close")
  args+=("http://$HOST:$PORT/")
  [[ $3 == 1 ]] && args=(env COUNT_PIDS=1 "${args[@]}")
  ((RUN > 1)) || say "$(printf '%q ' "${args[@]}")"
  if [[ ${5:-} == background ]]; then
    setsid timeout -k 5 $(($1 + 60)) "${args[@]}" >"$4" 2>&1 &
    LOAD_PID=$!
  else
    timeout -k 5 $(($1 + 30)) "${args[@]}" >"$4" 2>&1 || log "wrk exited with $?"
  fi
}

CLK_TCK=$(getconf CLK_TCK)

tree_ticks() { # PID: CPU time (user + system, clock ticks) of PID and every descendant alive
  python3 - "$1" <<'PY'
import os, sys
stats = {}
for name in os.listdir("/proc"):
    if name.isdigit():
        try:
            fields = open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
root, total, todo = int(sys.argv[1]), 0, [int(sys.argv[1])]
while todo:
    pid = todo.pop()
    total += stats.get(pid, (0, 0))[1]
    todo += [child for child, (ppid, _) in stats.items() if ppid == pid]
print(total)
PY
}

root_pid() { [[ $CONFIG == pm2 ]] && echo "$PM2_DAEMON" || echo "$SERVER"; }

busy_pct() { # the machine's CPU use over half a second, in %
  local a b
  read -r _ a1 a2 a3 a4 a5 a6 a7 a8 _ </proc/stat
  sleep 0.5
  read -r _ b1 b2 b3 b4 b5 b6 b7 b8 _ </proc/stat
  a=$((a1 + a2 + a3 + a6 + a7 + a8)); b=$((b1 + b2 + b3 + b6 + b7 + b8))
  echo $((100 * (b - a) / (b - a + b4 + b5 - a4 - a5 + 1)))
}

measure() {
  local out=$RESULTS/raw/run$RUN-$CONFIG
  wrk_run 1 ka 0 /dev/null # warm-up
  for mode in ka nc; do
    record "${mode}_busy_before_pct" "$(busy_pct)"
    local ticks
    ticks=$(tree_ticks "$(root_pid)")
    wrk_run "$DURATION" $mode 0 "$out-$mode.txt"
    ticks=$(($(tree_ticks "$(root_pid)") - ticks))
    # CPU time of the manager and its workers per request: what the other load of a shared
    # machine changes least.
    record "${mode}_cpu_us_per_req" "$(awk "BEGIN {print 1e6 * $ticks / $CLK_TCK / $(field "$out-$mode.txt" requests)}")"
    record "${mode}_rps" "$(field "$out-$mode.txt" rps)"
    record "${mode}_p99_us" "$(field "$out-$mode.txt" p99_us)"
    record "${mode}_errors" "$(errors_of "$out-$mode.txt")"
  done
  wrk_run "$BALANCE_DURATION" nc 1 "$out-balance.txt"
  record nc_balance "$(field "$out-balance.txt" balance)"
  record nc_pids "$(field "$out-balance.txt" pids)"
  for mode in ka nc; do
    wrk_run 60 $mode 1 "$out-$mode-restarts.txt" background
    sleep 1
    for ((i = 1; i <= RELOADS; i++)); do
      ((RUN > 1 || i > 1)) || say "$( [[ $CONFIG == pm2 ]] && echo "pm2 reload bench" || echo "kill -HUP <manager>")  # under load, $RELOADS times, ${RELOAD_GAP}s apart"
      reload "$CONFIG"
      sleep "$RELOAD_GAP"
    done
    sleep 2
    kill -INT -- "-$LOAD_PID" 2>/dev/null || true
    wait "$LOAD_PID" 2>/dev/null || true
    LOAD_PID=""
    record "restart_${mode}_errors" "$(errors_of "$out-$mode-restarts.txt")"
    record "restart_${mode}_requests" "$(field "$out-$mode-restarts.txt" requests)"
    record "restart_${mode}_pids" "$(field "$out-$mode-restarts.txt" pids)"
  done
}

read -r -a CONFIG_LIST <<<"$CONFIGS"
for ((RUN = 1; RUN <= RUNS; RUN++)); do
  for index in "${!CONFIG_LIST[@]}"; do
    CONFIG=${CONFIG_LIST[$index]}
    log "run $RUN/$RUNS: $CONFIG"
    start_config "$CONFIG" "$index"
    measure
    stop_config "$CONFIG"
  done
done

python3 - "$TSV" "$CONFIGS" <<'EOF' | tee "$RESULTS/summary.md"
import collections, statistics, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1])]
configs = sys.argv[2].split()
values = collections.defaultdict(list)
for run, config, key, value in rows:
    try:
        values[(config, key)].append(float(value))
    except ValueError:
        values[(config, key)].append(float("inf"))
def med(config, key):
    v = values.get((config, key))
    return statistics.median(v) if v else float("nan")
def total(config, key):
    return sum(values.get((config, key), []))
base = "node-rr" if "node-rr" in configs else configs[0]
print(f"medians of {len(set(r[0] for r in rows))} runs; ratios to {base}\n")
print("| | keep-alive req/s | ratio | CPU µs/req | ratio | new-conn req/s | ratio | CPU µs/req | ratio | balance max/min (new conn) | errors in rolling restarts (ka + nc, all runs) | requests during them |")
print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
for c in configs:
    cells = []
    for mode in ("ka", "nc"):
        rps, cpu = med(c, f"{mode}_rps"), med(c, f"{mode}_cpu_us_per_req")
        cells += [f"{rps:,.0f}", f"{rps / med(base, f'{mode}_rps'):.2f}", f"{cpu:.1f}", f"{cpu / med(base, f'{mode}_cpu_us_per_req'):.2f}"]
    print(f"| {c} | " + " | ".join(cells) + f" | {med(c, 'nc_balance'):.2f} | "
          f"{total(c, 'restart_ka_errors') + total(c, 'restart_nc_errors'):.0f} | "
          f"{total(c, 'restart_ka_requests') + total(c, 'restart_nc_requests'):,.0f} |")
busy = [v for (c, k), vs in values.items() if k.endswith("busy_before_pct") for v in vs]
print(f"\nmachine busy before the throughput measurements: median {statistics.median(busy):.0f}%, max {max(busy):.0f}%")
EOF
log "raw results in $RESULTS"
