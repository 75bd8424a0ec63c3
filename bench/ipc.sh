#!/usr/bin/env bash
# Messages between a primary and its worker, side by side in one run: ustad's library
# (crates/ustad/benches/ipc_report.rs) and Node's cluster module (bench/node/ipc-echo.js),
# each with one worker exchanging small {type, n} messages. Prints a markdown table of
# medians, the ratio ustad ÷ Node, and the targets of docs/benchmarks.md ("IPC").
#
#   bash bench/ipc.sh                          # ~2 minutes: 5 runs of each
#   RUNS=1 bash bench/ipc.sh                   # a quick look
#   IPC_BENCH_RUNTIME=current bash bench/ipc.sh    # ustad on current-thread runtimes
#
# Knobs (environment variables):
#   RUNS=5               runs; each runs ustad then Node (Node first on even runs), each in a
#                        fresh pair of processes, so drift hits both alike; medians are quoted
#   IPC_MESSAGES=500000  messages of each one-way measurement
#   IPC_ROUND_TRIPS=20000   round trips with 1 in flight (latency percentiles)
#   IPC_PIPELINED=300000    round trips with 100 and with 1,000 in flight
#   IPC_FLOOD=1000000    messages of the flood, sent while the receiver is stalled; 0 to skip
#   IPC_STALL_MS=1000    how long the receiver does not read during the flood
#   IPC_BENCH_RUNTIME=multi   ustad's tokio runtimes (both sides): multi or current
#   RESULTS=dir          where results go (default bench/results/ipc-<timestamp>)
#
# Writes RESULTS/results.jsonl (one line per run and implementation), env.txt, and
# summary.md (what it prints). Needs cargo, node and python3.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH")
RUNS=${RUNS:-5}
RESULTS=${RESULTS:-$BENCH/results/ipc-$(date -u +%Y%m%dT%H%M%SZ)}
export IPC_MESSAGES=${IPC_MESSAGES:-500000}
export IPC_ROUND_TRIPS=${IPC_ROUND_TRIPS:-20000}
export IPC_PIPELINED=${IPC_PIPELINED:-300000}
export IPC_FLOOD=${IPC_FLOOD:-1000000}
export IPC_STALL_MS=${IPC_STALL_MS:-1000}
export IPC_BENCH_RUNTIME=${IPC_BENCH_RUNTIME:-multi}
export IPC_OUT=$RESULTS/results.jsonl
export IPC_RUNS=1

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
command -v node >/dev/null || die "node is needed"
command -v python3 >/dev/null || die "python3 is needed"

mkdir -p "$RESULTS"
: >"$IPC_OUT"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/ustad-ipc-bench.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

log "building the ipc_report bench (release)"
EXE=$(cd "$ROOT" && cargo bench -p ustad --bench ipc_report --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "ipc_report" and m.get("executable"):
        print(m["executable"])')
[[ -x $EXE ]] || die "no ipc_report executable (try: cargo bench -p ustad --bench ipc_report --no-run)"
# A copy, so that a rebuild in the work tree during the run changes nothing.
cp "$EXE" "$TMP/ipc_report"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), kernel $(uname -r)"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "node: $(node --version)"
  echo "rustc: $(rustc --version 2>/dev/null || echo '?')"
  echo "ustad: $(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo '?')"
  echo "settings: RUNS=$RUNS IPC_MESSAGES=$IPC_MESSAGES IPC_ROUND_TRIPS=$IPC_ROUND_TRIPS IPC_PIPELINED=$IPC_PIPELINED IPC_FLOOD=$IPC_FLOOD IPC_STALL_MS=$IPC_STALL_MS IPC_BENCH_RUNTIME=$IPC_BENCH_RUNTIME"
} >"$RESULTS/env.txt"
cat "$RESULTS/env.txt" >&2

# Each is bounded; its workers die with it (ustad: PR_SET_PDEATHSIG; Node: the IPC channel).
run_ustad() { timeout 600 "$TMP/ipc_report" 2>>"$RESULTS/ustad.log" >/dev/null || die "ustad run failed (see $RESULTS/ustad.log)"; }
run_node() { timeout 600 node "$BENCH/node/ipc-echo.js" 2>>"$RESULTS/node.log" || die "node run failed (see $RESULTS/node.log)"; }
for ((run = 1; run <= RUNS; run++)); do
  log "run $run of $RUNS"
  if ((run % 2)); then run_ustad; run_node; else run_node; run_ustad; fi
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$RESULTS/env.txt"

python3 - "$IPC_OUT" "$RESULTS/env.txt" >"$RESULTS/summary.md" <<'EOF'
import json, statistics, sys

runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
env = dict(line.rstrip("\n").split(": ", 1) for line in open(sys.argv[2]) if ": " in line)
by = {"ustad": [r for r in runs if r["impl"] == "ustad"], "node": [r for r in runs if r["impl"] == "node"]}

def median(impl, key):
    values = [r[key] for r in by[impl] if key in r]
    return statistics.median(values) if values else None

def fmt(value, unit):
    if value is None:
        return "–"
    if unit == "/s":
        return f"{value:,.0f}"
    if unit == "MiB":
        return f"{value:,.1f}"
    if unit == "s":
        return f"{value:,.2f}"
    return f"{value:,.1f}"

settings = dict(kv.split("=", 1) for kv in env.get("settings", "").split() if "=" in kv)
flood = int(settings.get("IPC_FLOOD", "0"))
stall = settings.get("IPC_STALL_MS", "?")
rows = [
    # label, key, unit, target (check, text)
    ("one way, worker → primary (messages/s)", "w2p_per_s", "/s", (lambda v: v >= 2e6, "≥ 2,000,000")),
    ("one way, primary → worker (messages/s)", "p2w_per_s", "/s", (lambda v: v >= 2e6, "≥ 2,000,000")),
    ("round trip, 1 in flight: p50 (µs)", "rtt1_p50_us", "µs", (lambda v: v <= 15, "≤ 15")),
    ("round trip, 1 in flight: p99 (µs)", "rtt1_p99_us", "µs", None),
    ("round trips/s, 1 in flight", "rtt1_per_s", "/s", None),
    ("round trips/s, 100 in flight", "rtt100_per_s", "/s", (lambda v: v >= 1e6, "≥ 1,000,000")),
    ("round trip, 100 in flight: p50 / p99 (µs)", ("rtt100_p50_us", "rtt100_p99_us"), "µs", None),
    ("round trips/s, 1,000 in flight", "rtt1000_per_s", "/s", (lambda v: v >= 1e6, "≥ 1,000,000")),
    ("round trip, 1,000 in flight: p50 / p99 (µs)", ("rtt1000_p50_us", "rtt1000_p99_us"), "µs", None),
    ("`dispatch`, 1 in flight: p50 (µs)", "dispatch1_p50_us", "µs", None),
    ("`dispatch` overhead beyond `request`, p50 (µs)", "dispatch_overhead_us", "µs", (lambda v: v <= 5, "≤ 5")),
    ("`dispatch` tasks/s, 100 in flight", "dispatch100_per_s", "/s", None),
    (f"flood of {flood:,} with the receiver stalled {stall} ms: sender's RSS growth (MiB)", "flood_worker_mb", "MiB", (lambda v: v <= 16, "bounded")),
    ("… receiver's RSS growth (MiB)", "flood_primary_mb", "MiB", (lambda v: v <= 16, "bounded")),
    ("… time until all received (s)", "flood_s", "s", None),
    ("floor: bare socketpair ping-pong, blocking: p50 / p99 (µs)", ("floor_block_p50_us", "floor_block_p99_us"), "µs", None),
    ("floor: bare socketpair ping-pong, tokio: p50 / p99 (µs)", ("floor_tokio_p50_us", "floor_tokio_p99_us"), "µs", None),
]

n = min(len(by["ustad"]), len(by["node"])) or max(len(by["ustad"]), len(by["node"]))
print(f"IPC, {env.get('machine', '?')}; Node {env.get('node', '?')}; ustad {env.get('ustad', '?')}, "
      f"tokio runtimes: {settings.get('IPC_BENCH_RUNTIME', '?')}.")
print(f"Medians of {n} runs, ustad and Node alternating. ustad ÷ Node: higher is better for rates, "
      "lower for µs and MiB.\n")
print("| measure | ustad | Node `cluster` | ustad ÷ Node | target | met |")
print("|---|---:|---:|---:|---|---|")
for label, key, unit, target in rows:
    if isinstance(key, tuple):
        u = [median("ustad", k) for k in key]
        v = [median("node", k) for k in key]
        cell = lambda xs: " / ".join(fmt(x, unit) for x in xs) if any(x is not None for x in xs) else "–"
        ratio = " / ".join(f"{a / b:.2f}" for a, b in zip(u, v) if a is not None and b)
        print(f"| {label} | {cell(u)} | {cell(v)} | {ratio or '–'} | | |")
        continue
    u, v = median("ustad", key), median("node", key)
    if u is None and v is None:
        continue
    ratio = f"{u / v:.2f}" if u is not None and v else "–"
    goal, met = ("", "")
    if target and u is not None:
        check, goal = target
        met = "yes" if check(u) else "**no**"
    print(f"| {label} | {fmt(u, unit)} | {fmt(v, unit)} | {ratio} | {goal} | {met} |")
EOF
cat "$RESULTS/summary.md"
log "results in $RESULTS"
