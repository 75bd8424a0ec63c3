#!/usr/bin/env bash
# What relaying a worker's output costs the primary: one worker (`ustad run -w 1 --ready none`)
# writes LINES lines of 80 bytes as fast as `yes | head` can, the primary prefixes each, keeps
# it for `ustad logs` and writes it to its stdout (a file here); the primary's CPU time (user
# + system, every thread, /proc/PID/stat) divided by the lines is the cost of one line. With
# BASELINE=path (another ustad binary), both run alternately, RUNS times each, side by side.
# See docs/benchmarks.md ("Relaying workers' output") for a real run.
#
#   bash bench/relay.sh                               # ~1 minute, plus the build
#   BASELINE=/path/to/old/ustad bash bench/relay.sh   # before and after
#
# Knobs (environment variables):
#   RUNS=5 LINES=1000000
#   USTAD=path      a prebuilt ustad (default: cargo build --release -p ustad-cli, then a copy of it)
#   BASELINE=path   a second ustad to compare with (optional)
#   RESULTS=dir     where raw results go (default bench/results/relay-<timestamp>)
#
# Needs python3 and cargo. Every process it starts is stopped on exit, also on Ctrl-C.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH")
RUNS=${RUNS:-5}
LINES=${LINES:-1000000}
BASELINE=${BASELINE:-}
RESULTS=${RESULTS:-$BENCH/results/relay-$(date -u +%Y%m%dT%H%M%SZ)}

# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"
bench_results relay
bench_traps
bench_ustad
{
  bench_machine
  [[ -n $BASELINE ]] && echo "baseline: $("$BASELINE" --version)"
  echo "settings: RUNS=$RUNS LINES=$LINES"
} >"$RESULTS/env.txt"
cat "$RESULTS/env.txt" >&2

LINE='GET /api/v1/items?page=3 200 1.234ms user=alice agent=Mozilla/5.0 (X11; Linux x86_64)'

relay_run() { # CONFIG BINARY: one run, its ns per line recorded
  local config=$1 binary=$2 out=$RESULTS/raw/run$RUN-$1
  local control=$TMP/ustad-$RUN-$config.sock
  CONFIG=$config
  # The worker says DONE after the last line, then waits to be stopped.
  start_server "$out.err" "$binary" run -w 1 --ready none --control "$control" --color never -- \
    sh -c "yes '$LINE' | head -n $LINES; echo DONE; exec sleep 1000"
  local primary=$SERVER deadline=$((SECONDS + 300))
  # start_server sends stdout to the same file as stderr: the lines go there, the DONE last
  # (the primary logs nothing meanwhile). Only the end of the file is read.
  until tail -c 200 "$out.err" 2>/dev/null | grep -q '| DONE$'; do
    ((SECONDS < deadline)) || die "the worker's lines were not relayed within 300 s (see $out.err)"
    sleep 0.1
  done
  local stat ticks hz
  stat=$(cat "/proc/$primary/stat")
  stat=${stat##*) }
  read -r -a fields <<<"$stat"
  ticks=$((fields[11] + fields[12])) # utime + stime, fields 14 and 15 of stat
  hz=$(getconf CLK_TCK)
  record ns_per_line "$(awk "BEGIN {printf \"%.0f\", $ticks * 1e9 / $hz / $LINES}")"
  record relayed "$(grep -c '^app.0 *| GET' "$out.err" || true)"
  log "  $config: $(awk "BEGIN {printf \"%.0f\", $ticks * 1e9 / $hz / $LINES}") ns of the primary's CPU per line"
  say "$binary stop --control $control"
  "$binary" stop --control "$control" >/dev/null 2>&1 || true
  wait_gone "$primary" 30 || kill -KILL -- "-$primary" 2>/dev/null || true
  forget "$primary"
  rm -f "$out.err" # the relayed lines: LINES of them
}

for ((RUN = 1; RUN <= RUNS; RUN++)); do
  log "run $RUN/$RUNS"
  if [[ -n $BASELINE ]]; then
    if ((RUN % 2)); then
      relay_run baseline "$BASELINE"; relay_run ustad "$USTAD"
    else
      relay_run ustad "$USTAD"; relay_run baseline "$BASELINE"
    fi
  else
    relay_run ustad "$USTAD"
  fi
done

python3 - "$RESULTS/results.tsv" <<'EOF' | tee "$RESULTS/summary.md"
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    run, config, key, value = line.rstrip("\n").split("\t")
    rows.setdefault((config, key), []).append(float(value))
configs = sorted({c for c, _ in rows}, key=lambda c: c != "baseline")
print("| | " + " | ".join(configs) + " |")
print("|---|" + "--:|" * len(configs))
for key, label in [("ns_per_line", "primary CPU per line (ns), median (lowest–highest)"),
                   ("relayed", "lines relayed, median")]:
    cells = []
    for c in configs:
        v = rows.get((c, key), [])
        if key == "relayed":
            cells.append(f"{statistics.median(v):,.0f}")
        else:
            cells.append(f"{statistics.median(v):,.0f} ({min(v):,.0f}–{max(v):,.0f})")
    print(f"| {label} | " + " | ".join(cells) + " |")
if "baseline" in configs and "ustad" in configs:
    pairs = [b / u for b, u in zip(rows[("baseline", "ns_per_line")], rows[("ustad", "ns_per_line")])]
    print(f"\nbaseline / ustad per run: median {statistics.median(pairs):.2f}× "
          f"({min(pairs):.2f}–{max(pairs):.2f})")
EOF
