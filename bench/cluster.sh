#!/usr/bin/env bash
# Side by side, in one run: the same Node.js hello app (bench/node/app.js) with 2 workers
# under no manager, Node's cluster module, PM2 and ustad, plus ustad's Rust demo worker,
# measured with wrk. See docs/benchmarks.md for what is measured and a summary of a real run.
#
#   bash bench/cluster.sh                      # ~14 minutes with the defaults
#   RUNS=1 DURATION=3 bash bench/cluster.sh    # a quick look
#
# Knobs (environment variables):
#   RUNS=3              runs; every run measures every configuration once, in turn, so drift
#                       hits them alike; the summary quotes medians
#   DURATION=4          seconds of each throughput measurement (keep-alive, new connections)
#   BALANCE_DURATION=2  seconds of each balance measurement (a wrk Lua script counts the
#                       responses of each X-Worker-Pid, which slows wrk, hence separate runs)
#   CONNECTIONS=64 THREADS=2   wrk's -c and -t
#   RELOADS=5 RELOAD_GAP=1.5   rolling restarts under load, and the seconds between their starts
#   QUIET=15 QUIET_WAIT=20     a throughput measurement starts once the machine's CPU is at most
#                       QUIET % busy (waiting at most QUIET_WAIT s), and is repeated (twice at
#                       most) when it was busier right before or right after
#   KILL_TEST=1         also SIGKILL one worker of ustad shared / reuseport under new-connection
#                       load (what happens while a slot is empty); 0 to skip
#   READY=delay:300ms   ustad's --ready for the Node app (Node cannot send sd_notify itself)
#   CONFIGS="…"         a subset of: bare limit node-rr node-none pm2 ustad-shared
#                       ustad-reuseport limit-rust ustad-demo
#   PORT_BASE=18080     configuration i listens on 127.0.0.1:PORT_BASE+i
#   USTAD=path          a prebuilt ustad (default: cargo build --release -p ustad-cli, then a copy of it)
#   PM2=path            an installed pm2 (default: npm install pm2 into a temp dir)
#   RESULTS=dir         where raw results go (default bench/results/<timestamp>)
#   DRAIN=close         app.js stops with Node's http.Server#close() instead of its careful
#                       drain (see app.js), to see what that costs in rolling restarts
#
# Needs node, npm, python3, curl, wrk (installed with apt-get when missing) and cargo.
# Every process it starts is stopped on exit, also on Ctrl-C.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH")
APP=$BENCH/node/app.js
LUA=$BENCH/wrk/report.lua

RUNS=${RUNS:-3}
DURATION=${DURATION:-4}; DURATION=${DURATION%s}
BALANCE_DURATION=${BALANCE_DURATION:-2}; BALANCE_DURATION=${BALANCE_DURATION%s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
RELOADS=${RELOADS:-5}
RELOAD_GAP=${RELOAD_GAP:-1.5}
QUIET=${QUIET:-15}
QUIET_WAIT=${QUIET_WAIT:-20}
KILL_TEST=${KILL_TEST:-1}
READY=${READY:-delay:300ms}
CONFIGS=${CONFIGS:-bare limit node-rr node-none pm2 ustad-shared ustad-reuseport limit-rust ustad-demo}
PORT_BASE=${PORT_BASE:-18080}
HOST=127.0.0.1
WORKERS=2
CLK_TCK=$(getconf CLK_TCK)
RESULTS=${RESULTS:-$BENCH/results/$(date -u +%Y%m%dT%H%M%SZ)}

# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"
bench_results bench
bench_traps
bench_tools

{
  bench_versions
  echo "settings: RUNS=$RUNS DURATION=$DURATION QUIET=$QUIET QUIET_WAIT=$QUIET_WAIT BALANCE_DURATION=$BALANCE_DURATION CONNECTIONS=$CONNECTIONS THREADS=$THREADS RELOADS=$RELOADS RELOAD_GAP=$RELOAD_GAP READY=$READY KILL_TEST=$KILL_TEST"
  echo "configs: $CONFIGS"
  echo "app drain: ${DRAIN:-graceful}"
} >"$RESULTS/env.txt"
cat "$RESULTS/env.txt" >&2

# --- the configurations ------------------------------------------------------------------
SERVER=""   # the pid to stop (for PM2: none, `pm2 kill` stops it)
MANAGER=""  # the pid whose RSS is the manager's, empty without a manager
PORT=""

is_manager() { [[ $1 != bare && $1 != limit && $1 != limit-rust ]]; }

start_config() { # NAME INDEX
  local name=$1 logfile=$RESULTS/raw/$1.log
  PORT=$((PORT_BASE + $2))
  SERVER="" MANAGER=""
  echo "--- run $RUN" >>"$logfile"
  case $name in
    bare) start_server "$logfile" env PORT="$PORT" node "$APP" ;;
    limit) start_server "$logfile" python3 "$BENCH/launch.py" "$HOST:$PORT" $WORKERS node "$APP" ;;
    limit-rust)
      start_server "$logfile" python3 "$BENCH/launch.py" "$HOST:$PORT" $WORKERS "$USTAD" demo-worker ;;
    node-rr | node-none)
      start_server "$logfile" env PORT="$PORT" NODE_CLUSTER_SCHED_POLICY="${name#node-}" \
        node "$BENCH/node/cluster-primary.js"
      MANAGER=$SERVER ;;
    pm2)
      say "PM2_HOME=$TMP/pm2-home PORT=$PORT $PM2 start $APP -i $WORKERS --name bench"
      PM2_HOME=$TMP/pm2-home PORT=$PORT "$PM2" start "$APP" -i $WORKERS --name bench \
        >>"$logfile" 2>&1
      PM2_DAEMON=$(cat "$TMP/pm2-home/pm2.pid")
      MANAGER=$PM2_DAEMON ;;
    ustad-shared | ustad-reuseport)
      local flags=()
      [[ $name == ustad-reuseport ]] && flags=(--reuseport)
      start_server "$logfile" "$USTAD" run -w $WORKERS -l "$HOST:$PORT" "${flags[@]}" \
        --ready "$READY" --color never -- node "$APP"
      MANAGER=$SERVER ;;
    ustad-demo)
      start_server "$logfile" "$USTAD" run -w $WORKERS -l "$HOST:$PORT" --color never
      MANAGER=$SERVER ;;
    *) die "unknown configuration $name" ;;
  esac
  local deadline=$((SECONDS + 20))
  until curl -s -o /dev/null --max-time 2 "http://$HOST:$PORT/"; do
    ((SECONDS < deadline)) || die "$name does not answer on $HOST:$PORT (see $logfile)"
    sleep 0.1
  done
}

stop_config() { # NAME
  if [[ $1 == pm2 ]]; then
    say "PM2_HOME=$TMP/pm2-home $PM2 kill"
    PM2_HOME=$TMP/pm2-home "$PM2" kill >>"$RESULTS/raw/pm2.log" 2>&1 || true
    wait_gone "$PM2_DAEMON" 10 || { log "PM2 daemon still alive: SIGKILL"; kill -KILL "$PM2_DAEMON" || true; }
    PM2_DAEMON=""
    return
  fi
  say "kill -TERM $SERVER"
  kill -TERM "$SERVER"
  if ! wait_gone "$SERVER" 20; then
    log "$1 did not stop within 20 s: SIGKILL to its process group"
    kill -KILL -- "-$SERVER" 2>/dev/null || true
  fi
  forget "$SERVER"
}

reload() { # NAME: one rolling restart, the way each manager is told to do one
  case $1 in
    pm2)
      say "PM2_HOME=$TMP/pm2-home $PM2 reload bench"
      PM2_HOME=$TMP/pm2-home "$PM2" reload bench >>"$RESULTS/raw/pm2.log" 2>&1 ;;
    *)
      say "kill -HUP $SERVER"
      kill -HUP "$SERVER" ;;
  esac
}

workers_of() { # print the pids of the manager's workers (not ustad's guard process)
  ps -o pid=,comm= --ppid "$MANAGER" | awk '$2 != "ustad-guard" {print $1}'
}

guard_of() { # print the pid of ustad's guard: a child forked to kill what outlives a
  # SIGKILLed primary; part of the manager, so its RSS is recorded too
  ps -o pid=,comm= --ppid "$MANAGER" | awk '$2 == "ustad-guard" {print $1}'
}

# --- measurements ------------------------------------------------------------------------
record() { printf '%s\t%s\t%s\t%s\n' "$RUN" "$1" "$2" "$3" >>"$TSV"; }

field() { # FILE KEY: a value of wrk's BENCH line
  local line
  line=$(grep -m1 '^BENCH requests=' "$1") || { echo nan; return; }
  line=" $line "
  line=${line#* "$2"=}
  echo "${line%% *}"
}

errors_of() { # FILE: socket errors (connect, read, write, timeout) + non-2xx responses
  local f=$1 non2xx key sum=0 value
  grep -q '^BENCH requests=' "$f" || { echo nan; return; }
  non2xx=$(field "$f" non2xx)
  [[ $non2xx == nan ]] && non2xx=$(field "$f" status) # >= 400 only, without COUNT_PIDS
  for key in connect read write timeout; do
    value=$(field "$f" $key)
    sum=$((sum + value))
  done
  echo $((sum + non2xx))
}

rss_of() { # PID: its VmRSS in KiB, or nothing
  awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || true
}

rss_sample() { # record the manager's VmRSS (KiB), and that of ustad's guard
  [[ -n $MANAGER ]] || return 0
  local kib guard
  kib=$(rss_of "$MANAGER")
  [[ -n $kib ]] && record "$CONFIG" rss_kib "$kib"
  if [[ $CONFIG == ustad-* ]]; then
    guard=$(guard_of)
    [[ -n $guard ]] && kib=$(rss_of "$guard") && [[ -n $kib ]] && record "$CONFIG" guard_rss_kib "$kib"
  fi
  return 0
}

wrk_cmd() { # SECONDS MODE(ka|nc) COUNT(0|1) URL: the wrk command line
  local args=(wrk "-t$THREADS" "-c$CONNECTIONS" "-d${1}s" --latency -s "$LUA")
  [[ $2 == nc ]] && args+=(-H "Connection: close")
  args+=("$4")
  if [[ $3 == 1 ]]; then WRK=(env COUNT_PIDS=1 "${args[@]}"); else WRK=("${args[@]}"); fi
}

load() { # SECONDS MODE COUNT OUT: a bounded wrk run in the background; sets LOAD_PID
  wrk_cmd "$1" "$2" "$3" "http://$HOST:$PORT/"
  say "$(quote "${WRK[@]}")"
  timeout -k 5 $(($1 + 30)) "${WRK[@]}" >"$4" 2>&1 &
  LOAD_PID=$!
}

finish_load() { wait "$LOAD_PID" || log "wrk exited with $? (see the raw file)"; LOAD_PID=""; }

# A throughput measurement waits for a quiet machine (wait_quiet, lib.sh) and is repeated (at
# most 3 tries) when the machine was busy right before or right after it; what stays noisy is
# flagged.
cpu_ticks() { # PID: the user + system CPU time it has used, in clock ticks
  [[ -n $1 ]] || { echo 0; return; }
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  stat=${stat##*) }
  read -r -a stat <<<"$stat"
  echo $((stat[11] + stat[12])) # utime and stime: fields 14 and 15 of stat(5)
}

connections() { # the established connections of each worker on PORT, as "n n …", fewest first
  ss -Htnp state established "( sport = :$PORT )" 2>/dev/null |
    grep -o 'pid=[0-9]*' | sort | uniq -c | awk '{print $1}' | sort -n | tr '\n' ' ' || true
}

throughput() { # MODE(ka|nc)
  local mode=$1 out=$RESULTS/raw/run$RUN-$CONFIG-$1.txt try before after ticks conns
  for try in 1 2 3; do
    before=$(wait_quiet)
    ticks=$(cpu_ticks "$MANAGER")
    load "$DURATION" "$mode" 0 "$out"
    sleep "$(awk "BEGIN {print $DURATION / 2}")"
    rss_sample
    [[ $mode == ka ]] && conns=$(connections)
    finish_load
    ticks=$(($(cpu_ticks "$MANAGER") - ticks))
    [[ $mode == ka ]] && echo "connections per worker at mid-run: $conns" >>"$out"
    sleep 0.2
    after=$(busy_pct)
    echo "busy before ${before}%, after ${after}% (try $try)" >>"$out"
    ((before > QUIET || after > QUIET)) || break
    log "the machine was busy (${before}% before, ${after}% after; quiet is <= ${QUIET}%)"
  done
  ((before <= QUIET && after <= QUIET)) || record "$CONFIG" "${mode}_noisy" 1
  record "$CONFIG" "${mode}_tries" "$try"
  record "$CONFIG" "${mode}_rps" "$(field "$out" rps)"
  record "$CONFIG" "${mode}_p99_us" "$(field "$out" p99_us)"
  record "$CONFIG" "${mode}_errors" "$(errors_of "$out")"
  # The manager's CPU use during the run, in % of one core (its cost on the data path).
  [[ -n $MANAGER ]] && record "$CONFIG" "${mode}_manager_cpu_pct" \
    "$(awk "BEGIN {print 100 * $ticks / $CLK_TCK / $DURATION}")"
  if [[ $mode == ka && $CONFIG != bare ]]; then
    read -r -a conns <<<"$conns"
    ((${#conns[@]} >= WORKERS)) || conns=(0 "${conns[@]}")
    record "$CONFIG" ka_conns_min "${conns[0]:-0}"
    record "$CONFIG" ka_conns_max "${conns[-1]:-0}"
  fi
}

balance() { # MODE
  local mode=$1 out=$RESULTS/raw/run$RUN-$CONFIG-$1-balance.txt
  load "$BALANCE_DURATION" "$mode" 1 "$out"
  finish_load
  local pids expected=$WORKERS
  [[ $CONFIG == bare ]] && expected=1
  pids=$(field "$out" pids)
  # A worker that served nothing is not among the pids counted.
  if [[ $pids != nan ]] && ((pids < expected)); then
    record "$CONFIG" "${mode}_balance" inf
  else
    record "$CONFIG" "${mode}_balance" "$(field "$out" balance)"
  fi
  record "$CONFIG" "${mode}_pids" "$pids"
}

now() { date +%s.%N; }

restarts() { # MODE: RELOADS rolling restarts spaced RELOAD_GAP apart, under load
  local mode=$1 out=$RESULTS/raw/run$RUN-$CONFIG-$1-restarts.txt i t0 took longest=0
  load 60 "$mode" 1 "$out"
  sleep 1
  for ((i = 1; i <= RELOADS; i++)); do
    t0=$(now)
    reload "$CONFIG"
    took=$(awk "BEGIN {print $(now) - $t0}")
    longest=$(awk "BEGIN {print ($took > $longest) ? $took : $longest}")
    if ((i < RELOADS)); then sleep "$(awk "BEGIN {d = $RELOAD_GAP - $took; print (d > 0) ? d : 0}")"; fi
  done
  sleep 2 # the last rollout ends, then a little steady state
  rss_sample
  say "kill -INT <wrk>  # wrk prints its results and exits"
  kill -INT "$LOAD_PID"
  finish_load
  record "$CONFIG" "restart_${mode}_errors" "$(errors_of "$out")"
  record "$CONFIG" "restart_${mode}_pids" "$(field "$out" pids)"
  record "$CONFIG" "restart_${mode}_max_us" "$(field "$out" max_us)"
  record "$CONFIG" "reload_cmd_s" "$longest"
}

kill_test() { # SIGKILL one worker under new-connection load, 1 s in
  local out=$RESULTS/raw/run$RUN-$CONFIG-kill.txt victim secs=5
  load "$secs" nc 1 "$out"
  sleep 1
  victim=$(workers_of | head -1)
  say "kill -KILL $victim  # one worker of the ustad primary $MANAGER"
  kill -KILL "$victim"
  finish_load
  record "$CONFIG" kill_errors "$(errors_of "$out")"
  record "$CONFIG" kill_p99_us "$(field "$out" p99_us)"
  record "$CONFIG" kill_max_us "$(field "$out" max_us)"
  record "$CONFIG" kill_rps "$(field "$out" rps)"
  sleep 1 # the replacement (restart delay 1 s) is up before the next measurement
}

# --- the runs ----------------------------------------------------------------------------
read -r -a CONFIG_LIST <<<"$CONFIGS"
started_at=$SECONDS
for ((RUN = 1; RUN <= RUNS; RUN++)); do
  for index in "${!CONFIG_LIST[@]}"; do
    CONFIG=${CONFIG_LIST[$index]}
    log "run $RUN/$RUNS: $CONFIG"
    start_config "$CONFIG" "$index"
    # Warm up (JIT, connection setup), not recorded.
    wrk_cmd 1 ka 0 "http://$HOST:$PORT/"
    say "$(quote "${WRK[@]}")  # warm-up, not recorded"
    timeout -k 5 30 "${WRK[@]}" >/dev/null 2>&1 || true
    throughput ka
    throughput nc
    balance ka
    balance nc
    if is_manager "$CONFIG"; then
      if ((KILL_TEST)) && [[ $CONFIG == ustad-shared || $CONFIG == ustad-reuseport ]]; then kill_test; fi
      restarts ka
      restarts nc
    fi
    stop_config "$CONFIG"
  done
done
log "measured in $((SECONDS - started_at)) s; raw results in $RESULTS"

python3 "$BENCH/summarize.py" "$RESULTS" | tee "$RESULTS/summary.md"
