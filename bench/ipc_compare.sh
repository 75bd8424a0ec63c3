#!/usr/bin/env bash
# Two versions of the IPC channel side by side in one run: the ipc_report bench built at each
# git revision (in a worktree of its own, release), run alternately RUNS times each, medians.
#
#   bash bench/ipc_compare.sh 711cab3 HEAD                  # 5 runs, multi-thread runtimes
#   RUNS=3 IPC_BENCH_RUNTIME=current bash bench/ipc_compare.sh 711cab3 HEAD
#
# Knobs: RUNS (5), and ipc_report's own (IPC_MESSAGES=300000, IPC_PIPELINED=200000,
# IPC_ROUND_TRIPS=10000, IPC_FLOOD=0, IPC_ONLY, IPC_BENCH_RUNTIME). Prints a markdown table.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH")
RUNS=${RUNS:-5}
(($# >= 2)) || { echo "usage: $0 REV REV [REV…]" >&2; exit 2; }
export IPC_RUNS=1 IPC_FLOOD=${IPC_FLOOD:-0} IPC_MESSAGES=${IPC_MESSAGES:-300000}
export IPC_PIPELINED=${IPC_PIPELINED:-200000} IPC_ROUND_TRIPS=${IPC_ROUND_TRIPS:-10000}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/ustad-ipc-compare.XXXXXX")
cleanup() {
  for dir in "$TMP"/tree-*; do
    [[ -d $dir ]] && git -C "$ROOT" worktree remove --force "$dir" >/dev/null 2>&1
  done
  rm -rf "$TMP"
}
trap cleanup EXIT

names=()
for rev in "$@"; do
  name=$(git -C "$ROOT" rev-parse --short "$rev")
  tree=$TMP/tree-$name
  git -C "$ROOT" worktree add -q --detach "$tree" "$rev"
  echo "building ipc_report at $name" >&2
  # A target dir per revision, kept under target/ so that a second comparison builds nothing.
  exe=$(cd "$tree" && CARGO_TARGET_DIR=$ROOT/target/ipc-compare/$name cargo bench -q -p ustad --bench ipc_report \
    --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "ipc_report" and m.get("executable"):
        print(m["executable"])')
  cp "$exe" "$TMP/ipc_report-$name"
  names+=("$name")
done

for ((run = 1; run <= RUNS; run++)); do
  echo "run $run of $RUNS" >&2
  for name in "${names[@]}"; do
    IPC_OUT=$TMP/$name.jsonl timeout 300 "$TMP/ipc_report-$name" >/dev/null 2>>"$TMP/$name.log" ||
      echo "$name: run $run failed (see its log)" >&2
  done
done

python3 - "$TMP" "${names[@]}" <<'EOF'
import json, os, statistics, sys
out, names = sys.argv[1], sys.argv[2:]
keys = [
    ("w2p_per_s", "one way, worker → primary (messages/s)"),
    ("p2w_per_s", "one way, primary → worker (messages/s)"),
    ("rtt1_p50_us", "round trip, 1 in flight: p50 (µs)"),
    ("rtt1_p99_us", "round trip, 1 in flight: p99 (µs)"),
    ("rtt100_per_s", "round trips/s, 100 in flight"),
    ("rtt1000_per_s", "round trips/s, 1,000 in flight"),
    ("dispatch100_per_s", "`dispatch` tasks/s, 100 in flight"),
    ("floor_block_p50_us", "floor, blocking: p50 (µs)"),
]
runs = {}
for name in names:
    path = f"{out}/{name}.jsonl"
    runs[name] = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
print(f"IPC_BENCH_RUNTIME={os.environ.get('IPC_BENCH_RUNTIME', 'multi')}; medians of "
      f"{min(len(r) for r in runs.values())} alternating runs.\n")
print("| measure | " + " | ".join(f"`{n}`" for n in names) + f" | `{names[-1]}` ÷ `{names[0]}` |")
print("|---|" + "---:|" * (len(names) + 1))
for key, label in keys:
    medians = []
    for name in names:
        values = [r[key] for r in runs[name] if key in r]
        medians.append(statistics.median(values) if values else None)
    cells = ["–" if m is None else (f"{m:,.0f}" if m >= 1000 else f"{m:,.1f}") for m in medians]
    ratio = f"{medians[-1] / medians[0]:.2f}" if medians[0] and medians[-1] is not None else "–"
    print(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")
EOF
