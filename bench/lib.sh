# Helpers shared by the bench/*.sh scripts: logging, the exact commands, process
# handling and the cleanup on exit, the tools (wrk, ustad, PM2) and the quiet-machine check.
#
# Source it after setting BENCH, ROOT, TMP (a temp dir, removed on exit) and COMMANDS (the
# commands log), then call bench_traps and bench_tools. RUN (0 before the first run) makes `say`
# print the commands of the first run.

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
    log "building ustad (cargo build --release)"
    (cd "$ROOT" && cargo build --release --quiet)
    # A copy, so that a rebuild in the work tree during the run changes nothing.
    cp "$ROOT/target/release/ustad" "$TMP/ustad"
    USTAD=$TMP/ustad
  fi
}

bench_versions() { # the machine and tool lines of env.txt
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), kernel $(uname -r)"
  echo "node: $(node --version)"
  echo "pm2: $PM2_VERSION"
  echo "wrk: $(wrk -v 2>&1 | head -1 | cut -d' ' -f2)"
  echo "rustc: $(rustc --version 2>/dev/null || echo '?')"
  echo "ustad: $("$USTAD" --version) ($(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo '?'))"
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
