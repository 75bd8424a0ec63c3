# Helpers shared by the bench/*.sh scripts: logging, the exact commands, process handling and
# the cleanup on exit, the tools (wrk, ustad, PM2), the quiet-machine check, and load runs (wrk
# with bench/wrk/timeline.lua) and their results.
#
# Source it after setting BENCH, ROOT and RESULTS, then call bench_results (which sets TMP, a
# temp dir removed on exit, TSV and COMMANDS, the commands log), bench_traps and bench_tools. RUN (0 before the first run) makes `say`
# print the commands of the first run. bench_wrk and bench_ustad set up only those two tools.

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- processes ---------------------------------------------------------------------------
# Every server is started with setsid, so its pid is also its process group: cleanup can end
# the group (a launcher's children included) by that id.
STARTED=()     # pids (= process groups) of servers still running
PM2_DAEMON=""  # pid of PM2's God Daemon while it runs
LOAD_PID=""    # a wrk in the background
RUN=0

alive() { # PID: running and not a zombie
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat%% *} != Z ]]
}

wait_gone() { # PID SECONDS: true when PID has exited within SECONDS
  local deadline=$((SECONDS + $2))
  while alive "$1"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.1
  done
}

forget() { # PID: drop from STARTED and reap
  local pid=$1 rest=() p
  for p in "${STARTED[@]}"; do [[ $p == "$pid" ]] || rest+=("$p"); done
  STARTED=("${rest[@]}")
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local status=$? pid
  trap - EXIT INT TERM
  set +e
  # `timeout` puts itself and its wrk in a process group of their own.
  if [[ -n $LOAD_PID ]] && alive "$LOAD_PID"; then kill -TERM -- "-$LOAD_PID" 2>/dev/null; fi
  if [[ -n $PM2_DAEMON ]]; then
    PM2_HOME=$TMP/pm2-home "$PM2" kill >/dev/null 2>&1 || true
    wait_gone "$PM2_DAEMON" 5 || kill -KILL "$PM2_DAEMON" 2>/dev/null || true
  fi
  for pid in "${STARTED[@]}"; do
    alive "$pid" && kill -TERM -- "-$pid" 2>/dev/null
  done
  for pid in "${STARTED[@]}"; do
    wait_gone "$pid" 15 || kill -KILL -- "-$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$TMP"
  exit "$status"
}

bench_traps() { # stop every process started, on exit, Ctrl-C or SIGTERM
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

start_server() { # LOG COMMAND...: start in the background, in its own process group; sets SERVER
  local logfile=$1
  shift
  say "$*"
  setsid "$@" >>"$logfile" 2>&1 &
  SERVER=$!
  STARTED+=("$SERVER")
}

say() { # the exact commands, printed in the first run, all logged in $COMMANDS
  printf '%s\n' "$*" >>"$COMMANDS"
  if ((RUN <= 1)); then printf '  $ %s\n' "$*" >&2; fi
}

quote() { local a out=""; for a in "$@"; do [[ $a == *" "* ]] && a="'$a'"; out+="$a "; done; echo "${out% }"; }

port_taken() { # PORT: true when something listens on TCP PORT (needs ss, from iproute2)
  [[ -n $(ss -Hltn "sport = :$1" 2>/dev/null) ]]
}

free_port() { # move PORT up by 10 while something else listens on it, 10 tries at most
  local tries=0
  while port_taken "$PORT"; do
    ((++tries < 10)) || die "ports up to $PORT are all in use: set PORT"
    log "port $PORT is in use by another process: taking $((PORT + 10))"
    PORT=$((PORT + 10))
  done
}

# --- tools -------------------------------------------------------------------------------
bench_tools() { # check node, python3, curl; install wrk and PM2, build ustad, when not given
  command -v node >/dev/null || die "node is needed"
  command -v python3 >/dev/null || die "python3 is needed"
  command -v curl >/dev/null || die "curl is needed"
  bench_wrk
  bench_ustad
  if [[ -z ${PM2:-} ]]; then
    log "installing pm2 with npm into $TMP/pm2"
    npm install --prefix "$TMP/pm2" --no-audit --no-fund --loglevel=error pm2 >/dev/null
    PM2=$TMP/pm2/node_modules/.bin/pm2
  fi
  PM2_VERSION=$(node -p "require('$(dirname "$(readlink -f "$PM2")")/../package.json').version")
}

bench_wrk() { # install wrk with apt-get when it is missing
  if ! command -v wrk >/dev/null; then
    log "installing wrk from Debian packages"
    local sudo=""
    ((EUID == 0)) || sudo=sudo
    $sudo apt-get update -qq && $sudo apt-get install -y -qq wrk >/dev/null
  fi
}

bench_ustad() { # build ustad and set USTAD to a copy of it, unless USTAD is given
  if [[ -z ${USTAD:-} ]]; then
    # -p ustad-cli: the binary `cargo install --path crates/ustad-cli` installs. A plain
    # `cargo build --release` also builds the library crate (a default member), whose tokio
    # features (rt-multi-thread) then go into the binary too: ~60 KiB more code and libm.
    log "building ustad (cargo build --release -p ustad-cli)"
    (cd "$ROOT" && cargo build --release --quiet -p ustad-cli)
    # A copy, so that a rebuild in the work tree during the run changes nothing.
    cp "$ROOT/target/release/ustad" "$TMP/ustad"
    USTAD=$TMP/ustad
  fi
}

bench_results() { # NAME: RESULTS/raw, an empty results.tsv (TSV) and commands.txt (COMMANDS), TMP
  mkdir -p "$RESULTS/raw"
  TMP=$(mktemp -d "${TMPDIR:-/tmp}/ustad-$1.XXXXXX")
  TSV=$RESULTS/results.tsv
  COMMANDS=$RESULTS/commands.txt
  : >"$TSV"
  : >"$COMMANDS"
}

bench_machine() { # the date, machine, wrk (when there is one) and ustad lines of env.txt
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), kernel $(uname -r)"
  if command -v wrk >/dev/null; then echo "wrk: $(wrk -v 2>&1 | head -1 | cut -d' ' -f2)"; fi
  echo "ustad: $("$USTAD" --version) ($(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo '?'))"
}

bench_versions() { # env.txt's lines for the scripts that run Node and PM2 too
  bench_machine
  echo "node: $(node --version)"
  echo "pm2: $PM2_VERSION"
  echo "rustc: $(rustc --version 2>/dev/null || echo '?')"
}

# --- a quiet machine ---------------------------------------------------------------------
# The machine is shared: a build that starts next to a measurement halves it. So measurements
# wait for a quiet machine (at most QUIET_WAIT s) and note how busy it was before and after.
cpu_sample() { # busy and idle jiffies of the whole machine so far
  local cpu user nice sys idle iowait irq softirq steal rest
  read -r cpu user nice sys idle iowait irq softirq steal rest </proc/stat
  echo "$((user + nice + sys + irq + softirq + steal)) $((idle + iowait))"
}

busy_pct() { # percentage of the machine's CPU time in use over half a second
  local b1 i1 b2 i2
  read -r b1 i1 <<<"$(cpu_sample)"
  sleep 0.5
  read -r b2 i2 <<<"$(cpu_sample)"
  echo $((100 * (b2 - b1) / (b2 - b1 + i2 - i1 + 1)))
}

wait_quiet() { # print the busy percentage once it is at most QUIET, or after QUIET_WAIT s
  local deadline=$((SECONDS + QUIET_WAIT)) busy
  busy=$(busy_pct)
  while ((busy > QUIET && SECONDS < deadline)); do
    sleep 1
    busy=$(busy_pct)
  done
  echo "$busy"
}

# --- load runs and results ---------------------------------------------------------------
# A script that uses these sets TSV (results.tsv), RUN and CONFIG (the first two columns of
# each result), HOST, PORT, THREADS, CONNECTIONS, LUA (bench/wrk/timeline.lua), GRACE, and
# QUIET, QUIET_WAIT, QUIET_BUDGET; PACE_MS (timeline.lua) when it wants a paced load.
record() { printf '%s\t%s\t%s\t%s\n' "$RUN" "$CONFIG" "$1" "$2" >>"$TSV"; }

now_ms() { date +%s%3N; }

sleep_until_ms() { # T: sleep until Unix time T in ms
  local left=$(($1 - $(now_ms)))
  ((left <= 0)) || sleep "$(awk "BEGIN {print $left / 1000}")"
}

STOP=""
load() { # SECONDS MODE(ka|nc) OUT: a bounded wrk run with timeline.lua in the background
  local args=(wrk "-t$THREADS" "-c$CONNECTIONS" "-d${1}s" -s "$LUA")
  [[ $2 == nc ]] && args+=(-H "Connection: close")
  args+=("http://$HOST:$PORT/")
  STOP=$TMP/stop-$RANDOM
  rm -f "$STOP"
  say "STOP_FILE=$STOP${PACE_MS:+ PACE_MS=$PACE_MS} $(quote "${args[@]}")"
  STOP_FILE=$STOP PACE_MS=${PACE_MS:-0} timeout -k 5 $(($1 + 30)) "${args[@]}" >"$3" 2>&1 &
  LOAD_PID=$!
}

end_load() { # let the requests in flight finish (GRACE s, nothing more is sent), then stop wrk
  say "touch $STOP; sleep $GRACE; kill -INT <wrk>  # wrk prints its results and exits"
  touch "$STOP"
  sleep "$GRACE"
  kill -INT "$LOAD_PID" 2>/dev/null || true
  wait "$LOAD_PID" || log "wrk exited with $? (see the raw file)"
  LOAD_PID=""
}

QUIET_SPENT=0
BUSY=0
quiet() { # wait_quiet (above) within what is left of QUIET_BUDGET; sets BUSY, the busy %
  # (not a $(…) function: the time spent must be counted in this shell)
  local started=$SECONDS left=$((QUIET_BUDGET - QUIET_SPENT))
  ((left > 0)) || left=0
  BUSY=$(QUIET_WAIT=$((QUIET_WAIT < left ? QUIET_WAIT : left)) wait_quiet)
  QUIET_SPENT=$((QUIET_SPENT + SECONDS - started))
}

noise() { # PREFIX BEFORE: record how busy the machine was before and right after a load run
  local after
  after=$(busy_pct)
  record "$1_busy_before" "$2"
  record "$1_busy_after" "$after"
  ((${2} <= QUIET && after <= QUIET)) || { record "$1_noisy" 1; log "busy machine during $1 ($2% before, $after% after)"; }
}

value() { # LINE KEY: the value of KEY=… in a line of key=value pairs
  local line=" $1 "
  line=${line#* "$2"=}
  [[ $line == " $1 " ]] && { echo nan; return; }
  echo "${line%% *}"
}
