#!/usr/bin/env bash
# Fuzzes every input the primary takes from outside, one target after the other, for a set
# time each, and prints a table: executions, corpus size and crashes per target. Exits
# non-zero when a target crashed (its input is kept in fuzz/artifacts/TARGET/).
#
#   bash bench/fuzz.sh                          # every target, 60 s each
#   SECONDS_PER_TARGET=300 bash bench/fuzz.sh   # the longer run quoted in docs/benchmarks.md
#   bash bench/fuzz.sh config control           # some targets only
#
# The targets (fuzz/fuzz_targets/, see docs/benchmarks.md, "Reliability"):
#   config      ustad.toml, then a plan run with pretend processes and synthetic time
#   control     a control request line, and what the primary does with it
#   notify      an sd_notify datagram, and what the plan does with what it says
#   ipc_frame   a library worker's channel: frames and envelopes, read in any chunks
#   ipc_node    a Node worker's channel: JSON lines, read in any chunks
#
# Knobs (environment variables):
#   SECONDS_PER_TARGET=60   how long each target runs
#   FUZZ_ARGS=""            more libFuzzer flags, e.g. "-seed=1" or "-only_ascii=1"
#   RESULTS=dir             where the logs and summary go (default
#                           bench/results/fuzz-<timestamp>)
#
# Corpora grow in fuzz/corpus/TARGET/ (git-ignored) and are reused by the next run; the
# committed seeds (fuzz/seeds/TARGET/) and dictionaries (fuzz/dicts/) start them off.
# Needs the nightly toolchain (libFuzzer's instrumentation); installs cargo-fuzz if missing.
# One libFuzzer process at a time: each uses one core.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH")
FUZZ=$ROOT/fuzz
SECONDS_PER_TARGET=${SECONDS_PER_TARGET:-60}
RESULTS=${RESULTS:-$BENCH/results/fuzz-$(date -u +%Y%m%dT%H%M%SZ)}
ALL=(config control notify ipc_frame ipc_node)
if (($#)); then targets=("$@"); else targets=("${ALL[@]}"); fi

log() { printf '== %s\n' "$*" >&2; }

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  log "the nightly toolchain is missing: rustup toolchain install nightly --profile minimal"
  exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

mkdir -p "$RESULTS"
cd "$FUZZ"
# -O: optimized; -a: debug assertions (with the profile's overflow checks), so that an
# overflow is a crash here even where a release build of ustad would wrap.
log "building the targets"
cargo +nightly fuzz build -O -a >"$RESULTS/build.log" 2>&1 || {
  tail -n 30 "$RESULTS/build.log" >&2
  exit 2
}

count_files() { find "$1" -maxdepth 1 -type f 2>/dev/null | wc -l; }
findings() { find "$FUZZ/artifacts/$1" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) 2>/dev/null | sort; }

summary=$RESULTS/summary.md
{
  printf '| target | seconds | executions | exec/s | corpus | crashes |\n'
  printf '|---|---:|---:|---:|---:|---:|\n'
} >"$summary"
failed=()
for target in "${targets[@]}"; do
  if [[ ! -f fuzz_targets/$target.rs ]]; then
    log "no target $target (known: ${ALL[*]})"
    exit 2
  fi
  mkdir -p "corpus/$target" "artifacts/$target"
  before=$(findings "$target")
  dict=()
  [[ -f dicts/$target.dict ]] && dict=(-dict="dicts/$target.dict")
  log "$target: ${SECONDS_PER_TARGET}s"
  started=$(date +%s)
  status=0
  # shellcheck disable=SC2086  # FUZZ_ARGS is a list of flags
  cargo +nightly fuzz run -O -a "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 "${dict[@]}" ${FUZZ_ARGS:-} >"$RESULTS/$target.log" 2>&1 || status=$?
  # libFuzzer's own time and final stats (the wall clock also counts building and loading
  # the corpus), or its last status line when it stopped on a finding.
  elapsed=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$RESULTS/$target.log" | tail -n 1)
  elapsed=${elapsed:-$(($(date +%s) - started))}
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$RESULTS/$target.log" | tail -n 1)
  if [[ -z $runs ]]; then
    runs=$(grep -oE '^#[0-9]+' "$RESULTS/$target.log" | tail -n 1 | tr -d '#')
  fi
  runs=${runs:-0}
  new=$(comm -13 <(printf '%s\n' "$before") <(findings "$target") | sed '/^$/d')
  crashes=$(printf '%s' "$new" | grep -c . || true)
  if ((status != 0)) && ((crashes == 0)); then
    # A failure that left no input behind (a build or harness error): say so, count it.
    crashes=1
    new="(no input saved: see $RESULTS/$target.log)"
  fi
  corpus=$(count_files "corpus/$target")
  printf '| %s | %d | %d | %d | %d | %d |\n' "$target" "$elapsed" "$runs" \
    "$((runs / (elapsed > 0 ? elapsed : 1)))" "$corpus" "$crashes" >>"$summary"
  if ((crashes > 0)); then
    failed+=("$target")
    printf '%s\n' "$new" | sed "s|^|  $target: |" >&2
    grep -m 1 -A 3 -E 'panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer' "$RESULTS/$target.log" >&2 || true
  fi
done

echo
cat "$summary"
echo
echo "logs: $RESULTS"
if ((${#failed[@]})); then
  echo "crashed: ${failed[*]}; reproduce with: (cd fuzz && cargo +nightly fuzz run -O -a TARGET artifacts/TARGET/crash-…)"
  exit 1
fi
