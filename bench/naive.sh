#!/usr/bin/env bash
# Apps that know nothing of ustad: the naive Node app (bench/node/naive.js: no SIGTERM handler,
# no drain, no sd_notify) with 2 workers under ustad's defaults, Node's cluster, PM2 and a bare
# launcher that restarts a dead worker at once, side by side in one run. It measures
#   - kill -9 -> a new worker answers, idle and under new-connection load;
#   - the worst 100 ms of throughput during rolling restarts, under keep-alive and under
#     new-connection load, and the failed requests during them;
#   - a rollout to a release that never listens (bench/node/never-listens.js) under load:
#     failed requests, and whether the service still answers.
# See docs/benchmarks.md ("Unmodified apps") for what is measured, why, and a real run.
#
#   bash bench/naive.sh                        # 11-14 minutes with the defaults
#   RUNS=1 DURATION=2 bash bench/naive.sh      # a quick look, 4-6 minutes
#
# Knobs (environment variables):
#   RUNS=3              runs; every run measures every configuration once, in turn, so drift
#                       hits them alike; the summary quotes medians and per-run ratios
#   DURATION=4          seconds of the new-connection load a worker is killed in (1 s in)
#   KILLS=2             kill -9 measurements per run, idle and under load each (the oldest
#                       worker each time); a run's value is their median
#   RELOADS=3 RELOAD_GAP=3   rolling restarts per load run, and the seconds between their starts
#                       (the next starts when a blocking `pm2 reload` has returned, if later)
#   NEVER_WATCH=8       seconds watched after the rollout to the never-listening release starts
#                       (and at least 2 s after `pm2 reload` returns); PM2 gives up waiting for
#                       each worker after its listen_timeout, 3 s by default
#   GRACE=1             seconds the requests in flight get to be answered at the end of a load
#                       run (bench/wrk/timeline.lua); one still unanswered then has failed
#   MIN_AGE=6           a worker is killed only once it has been up this many seconds, so that no
#                       manager counts its death as a failed start (ustad's min-uptime is 5 s,
#                       PM2's 1 s)
#   CONNECTIONS=64 THREADS=2   wrk's -c and -t
#   QUIET=15 QUIET_WAIT=10 QUIET_BUDGET=120   a load run starts once the machine's CPU is at
#                       most QUIET % busy, waiting at most QUIET_WAIT s, and at most QUIET_BUDGET s
#                       in the whole run (so a busy machine cannot stretch it past ~14 minutes);
#                       busier runs are flagged, not repeated
#   USTAD_READY=        empty: ustad's defaults (no --ready flag); else passed as --ready, e.g.
#                       `none` (ustad's old default, the "before" numbers) or `delay:300ms`
#   PM2_ARGS=           more flags for `pm2 start` (e.g. `--listen-timeout 10000`); none by default
#   CONFIGS="launcher node-rr pm2 ustad"   a subset, in order; node-none (Node's cluster with
#                       SCHED_POLICY=none) is available too
#   PORT_BASE=18280     configuration i listens on 127.0.0.1:PORT_BASE+i, or 10, 20, … higher
#                       when another process holds that port (the machine is shared)
#   USTAD=path          a prebuilt ustad (default: cargo build --release -p ustad-cli, then a copy of it)
#   PM2=path            an installed pm2 (default: npm install pm2 into a temp dir)
#   RESULTS=dir         where raw results go (default bench/results/naive-<timestamp>)
#
# Needs node, npm, python3, curl, wrk (installed with apt-get when missing) and cargo.
# Every process it starts is stopped on exit, also on Ctrl-C.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH")
NAIVE=$BENCH/node/naive.js
NEVER=$BENCH/node/never-listens.js
LUA=$BENCH/wrk/timeline.lua

RUNS=${RUNS:-3}
DURATION=${DURATION:-4}; DURATION=${DURATION%s}
KILLS=${KILLS:-2}
RELOADS=${RELOADS:-3}
RELOAD_GAP=${RELOAD_GAP:-3}
NEVER_WATCH=${NEVER_WATCH:-8}
GRACE=${GRACE:-1}
MIN_AGE=${MIN_AGE:-6}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
QUIET=${QUIET:-15}
QUIET_WAIT=${QUIET_WAIT:-10}
QUIET_BUDGET=${QUIET_BUDGET:-120}
USTAD_READY=${USTAD_READY-}
PM2_ARGS=${PM2_ARGS-}
CONFIGS=${CONFIGS:-launcher node-rr pm2 ustad}
PORT_BASE=${PORT_BASE:-18280}
HOST=127.0.0.1
WORKERS=2
RESULTS=${RESULTS:-$BENCH/results/naive-$(date -u +%Y%m%dT%H%M%SZ)}
ms() { awk "BEGIN {print int($1 * 1000)}"; } # seconds, maybe fractional, in whole ms
DURATION_MS=$(ms "$DURATION") GAP_MS=$(ms "$RELOAD_GAP") WATCH_MS=$(ms "$NEVER_WATCH")

# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"
bench_results naive
bench_traps
bench_tools

{
  bench_versions
  echo "settings: RUNS=$RUNS DURATION=$DURATION KILLS=$KILLS RELOADS=$RELOADS RELOAD_GAP=$RELOAD_GAP NEVER_WATCH=$NEVER_WATCH GRACE=$GRACE MIN_AGE=$MIN_AGE CONNECTIONS=$CONNECTIONS THREADS=$THREADS QUIET=$QUIET QUIET_WAIT=$QUIET_WAIT QUIET_BUDGET=$QUIET_BUDGET"
  echo "ustad ready: ${USTAD_READY:-(default: no --ready flag)}"
  echo "pm2 args: ${PM2_ARGS:-(none)}"
  echo "configs: $CONFIGS"
} >"$RESULTS/env.txt"
cat "$RESULTS/env.txt" >&2

# --- the configurations ------------------------------------------------------------------
# Each configuration runs the app through a symlink of its own, $TMP/app-<config>/app.js, pointing
# at naive.js. The never-listening rollout points it at never-listens.js, so the next worker
# any manager starts (ustad's SIGHUP, `pm2 reload`, the Node primary's fork) runs the broken
# release: Node resolves the symlink when a process loads it.
SERVER=""  # the pid to stop (for PM2: none, `pm2 kill` stops it)
PARENT=""  # the process whose children the workers are
PORT=""
APPLINK=""

ours() { # true when the server on PORT answers, from one of our manager's workers
  local pid
  pid=$(curl -s -o /dev/null -D - --max-time 2 "http://$HOST:$PORT/" |
    tr -d '\r' | awk -F': ' 'tolower($1) == "x-worker-pid" {print $2}') || return 1
  [[ -n $pid && " $(workers) " == *" $pid "* ]]
}

start_config() { # NAME INDEX
  local name=$1 logfile=$RESULTS/raw/$1.log tries=0
  PORT=$((PORT_BASE + $2))
  while port_taken "$PORT"; do
    ((++tries < 10)) || die "ports $((PORT_BASE + $2)) to $PORT are all in use: set PORT_BASE"
    log "port $PORT is in use by another process: $name takes $((PORT + 10))"
    PORT=$((PORT + 10))
  done
  SERVER="" PARENT=""
  APPLINK=$TMP/app-$name/app.js
  mkdir -p "$TMP/app-$name"
  ln -sfn "$NAIVE" "$APPLINK"
  echo "--- run $RUN" >>"$logfile"
  case $name in
    launcher)
      start_server "$logfile" python3 "$BENCH/launch.py" --restart "$HOST:$PORT" $WORKERS node "$APPLINK" ;;
    node-rr | node-none)
      start_server "$logfile" env PORT="$PORT" NODE_CLUSTER_SCHED_POLICY="${name#node-}" \
        APP="$APPLINK" RESTART_DELAY_MS=0 node "$BENCH/node/cluster-primary.js" ;;
    pm2)
      local args
      read -r -a args <<<"$PM2_ARGS"
      say "PM2_HOME=$TMP/pm2-home PORT=$PORT $PM2 start $APPLINK -i $WORKERS --name naive ${args[*]}"
      PM2_HOME=$TMP/pm2-home PORT=$PORT "$PM2" start "$APPLINK" -i $WORKERS --name naive "${args[@]}" \
        >>"$logfile" 2>&1
      PM2_DAEMON=$(cat "$TMP/pm2-home/pm2.pid")
      PARENT=$PM2_DAEMON ;;
    ustad)
      local ready=()
      [[ -n $USTAD_READY ]] && ready=(--ready "$USTAD_READY")
      # --control: a socket of its own, not the default /tmp/ustad-UID/app.sock another ustad
      # on this machine may hold; it changes nothing in how workers are run.
      start_server "$logfile" "$USTAD" run -w $WORKERS -l "$HOST:$PORT" "${ready[@]}" \
        --control "$TMP/ustad.sock" --color never -- node "$APPLINK" ;;
    *) die "unknown configuration $name" ;;
  esac
  [[ -n $PARENT ]] || PARENT=$SERVER
  local deadline=$((SECONDS + 20))
  until ours; do
    alive "$PARENT" || die "$name exited at start (see $logfile)"
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

has_rollout() { [[ $1 != launcher ]]; }

reload() { # NAME: one rolling restart, the way each manager is told to do one (bounded)
  case $1 in
    pm2)
      say "PM2_HOME=$TMP/pm2-home $PM2 reload naive"
      PM2_HOME=$TMP/pm2-home timeout -k 5 60 "$PM2" reload naive >>"$RESULTS/raw/pm2.log" 2>&1 ||
        log "pm2 reload failed ($?)" ;;
    *)
      say "kill -HUP $SERVER"
      kill -HUP "$SERVER" ;;
  esac
}

oldest_worker() { # print the pid of the worker that has been up longest (not ustad's guard)
  { ps -o pid=,etimes=,comm= --ppid "$PARENT" || true; } |
    awk '$3 != "ustad-guard" {print $2, $1}' | sort -k1,1nr -k2,2n | awk 'NR == 1 {print $2}'
}

age_of() { ps -o etimes= -p "$1" 2>/dev/null | tr -d ' ' || echo 0; }

workers() { # print the manager's worker pids (not ustad's guard), space-separated
  { ps -o pid=,comm= --ppid "$PARENT" || true; } | awk '$2 != "ustad-guard" {printf "%s ", $1}'
}

replaced() { # BEFORE AFTER: true when AFTER is WORKERS pids, none of them in BEFORE
  local pid n=0
  for pid in $2; do
    [[ " $1 " == *" $pid "* ]] && return 1
    n=$((n + 1))
  done
  ((n == WORKERS))
}

# --- measurements ------------------------------------------------------------------------
kill_test() { # MODE(idle|load) N: SIGKILL the oldest worker; time until a new one answers
  local mode=$1 out=$RESULTS/raw/run$RUN-$CONFIG-kill-$1-$2.txt wrk_out victim line before t0
  wrk_out=${out%.txt}-wrk.txt
  victim=$(oldest_worker)
  [[ -n $victim ]] || die "$CONFIG: no worker to kill (did the manager exit? see raw/$CONFIG.log)"
  while (($(age_of "$victim") < MIN_AGE)); do sleep 0.2; done
  if [[ $mode == load ]]; then
    quiet; before=$BUSY
    load $((DURATION_MS / 1000 + 30)) nc "$wrk_out"
    t0=$(now_ms)
    sleep 1
  fi
  say "python3 $BENCH/probe.py $HOST:$PORT $victim $PARENT 15  # kill -KILL $victim, then probe"
  python3 "$BENCH/probe.py" "$HOST:$PORT" "$victim" "$PARENT" 15 >"$out" 2>&1 ||
    log "$CONFIG: no new worker answered within 15 s of kill -9 (see $out)"
  line=$(grep -m1 '^PROBE' "$out" || echo "PROBE")
  record "kill_${mode}_spawn_ms" "$(value "$line" spawn_ms)"
  record "kill_${mode}_answer_ms" "$(value "$line" answer_ms)"
  if [[ $mode == load ]]; then
    sleep_until_ms $((t0 + DURATION_MS))
    end_load
    record kill_load_failed "$(value "$(grep -m1 '^TIMELINE' "$wrk_out" || echo)" failed)"
    noise kill_load "$before"
  fi
  sleep 0.5
}

analyse() { # PREFIX OUT FROM_MS TO_MS: record the timeline's figures for the window
  local prefix=$1 line key
  line=$(python3 "$BENCH/timeline.py" "$2" "$3" "$4" || true)
  echo "WINDOW from_ms=$3 to_ms=$4 $line" >>"$2"
  for key in worst worst_frac steady silent_ms last_s failed pids; do
    record "${prefix}_$key" "$(value "$line" $key)"
  done
}

# A rollout is done when, by the time the next one starts, both workers are new: the workers
# are listed before the first restart and at the end of each gap. (Which pids answered is no
# proof: under keep-alive load a short-lived worker may get no connection at all.)
restarts() { # MODE(ka|nc): RELOADS rolling restarts RELOAD_GAP s apart, under load
  local mode=$1 out=$RESULTS/raw/run$RUN-$CONFIG-restarts-$1.txt i t0 t_first took longest=0 before
  local previous current complete=0
  quiet; before=$BUSY
  load 120 "$mode" "$out"
  sleep 1.3 # a steady second before the first restart
  previous=$(workers)
  t_first=$(now_ms)
  for ((i = 1; i <= RELOADS; i++)); do
    t0=$(now_ms)
    reload "$CONFIG"
    took=$(($(now_ms) - t0))
    ((took > longest)) && longest=$took
    sleep_until_ms $((t0 + (took > GAP_MS ? took : GAP_MS)))
    current=$(workers)
    echo "ROLLOUT $i workers before: $previous after: $current" >>"$out.rollouts"
    replaced "$previous" "$current" && complete=$((complete + 1))
    previous=$current
  done
  local t_end
  t_end=$(now_ms)
  end_load
  analyse "restart_$mode" "$out" "$t_first" "$t_end"
  record "restart_${mode}_rollouts" "$complete"
  record reload_cmd_ms "$longest"
  noise "restart_$mode" "$before"
}

never_listening() { # the rollout to a release that never listens, under new-connection load
  local out=$RESULTS/raw/run$RUN-$CONFIG-never.txt t_first took t_end before
  quiet; before=$BUSY
  load 120 nc "$out"
  sleep 1.3
  # The switch comes right before the rollout, so that only the rollout starts the broken
  # release (a worker replaced for another reason in between would start it too).
  say "ln -sfn $NEVER $APPLINK"
  ln -sfn "$NEVER" "$APPLINK"
  t_first=$(now_ms)
  reload "$CONFIG"
  took=$(($(now_ms) - t_first))
  record never_reload_cmd_ms "$took"
  # Watch NEVER_WATCH s from the start, and at least 2 s after the reload command returned.
  sleep_until_ms $((t_first + (WATCH_MS > took + 2000 ? WATCH_MS : took + 2000)))
  t_end=$(now_ms)
  end_load
  analyse never "$out" "$t_first" "$t_end"
  noise never "$before"
  ln -sfn "$NAIVE" "$APPLINK"
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
    say "wrk -t$THREADS -c$CONNECTIONS -d1s http://$HOST:$PORT/  # warm-up, not recorded"
    timeout -k 5 30 wrk "-t$THREADS" "-c$CONNECTIONS" -d1s "http://$HOST:$PORT/" >/dev/null 2>&1 || true
    for ((k = 1; k <= KILLS; k++)); do kill_test idle $k; done
    for ((k = 1; k <= KILLS; k++)); do kill_test load $k; done
    if has_rollout "$CONFIG"; then
      restarts ka
      restarts nc
      never_listening
    fi
    stop_config "$CONFIG"
  done
done
log "measured in $((SECONDS - started_at)) s; raw results in $RESULTS"

python3 "$BENCH/summarize_naive.py" "$RESULTS" | tee "$RESULTS/summary.md"
