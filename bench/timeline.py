#!/usr/bin/env python3
"""Reads the output of a wrk run with bench/wrk/timeline.lua (bench/naive.sh) and prints what
happened in a window of it, as `key=value` pairs on one line.

    timeline.py WRK_OUTPUT WINDOW_FROM_MS WINDOW_TO_MS [STEADY_MS]

Times are Unix times in ms (the script's `date +%s%3N`, wrk's CLOCK_REALTIME). The window holds
the 100 ms buckets from the one WINDOW_FROM_MS falls in to the last one that ends by
WINDOW_TO_MS; buckets with no 200 response in them count as 0. The steady state is the STEADY_MS
(default 1000) of buckets that end by WINDOW_FROM_MS.

    worst=…      fewest 200 responses in one 100 ms bucket of the window
    worst_at_ms=…  when that bucket starts, from WINDOW_FROM_MS
    steady=…     the median 200 responses per 100 ms in the steady state
    worst_frac=… worst / steady
    silent_ms=…  the longest run of buckets with no 200 response in the window, in ms
    last_s=…     200 responses in the window's last second (0: no longer answering)
    failed=… sent=… ok=… non200=… connect=… read=… write=… pids=…   from the TIMELINE line (whole run)
"""

import statistics
import sys


def parse(path):
    totals, buckets = {}, {}
    with open(path, errors="replace") as f:
        for line in f:
            words = line.split()
            if not words:
                continue
            if words[0] == "TIMELINE":
                totals = dict(w.split("=", 1) for w in words[1:])
            elif words[0] == "BUCKET" and len(words) == 3:
                buckets[int(words[1])] = int(words[2])
    return totals, buckets


def main():
    if len(sys.argv) < 4:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    totals, buckets = parse(sys.argv[1])
    start, end = int(sys.argv[2]), int(sys.argv[3])
    steady_ms = int(sys.argv[4]) if len(sys.argv) > 4 else 1000
    out = {}
    if not totals:  # wrk did not finish: every figure unknown
        print("failed=nan worst=nan steady=nan worst_frac=nan silent_ms=nan last_s=nan pids=nan")
        return 1

    first, last = start // 100, end // 100 - 1  # the last bucket ends by `end`
    window = [buckets.get(k, 0) for k in range(first, last + 1)]
    steady_buckets = [buckets.get(k, 0) for k in range(start // 100 - steady_ms // 100, start // 100)]
    steady = statistics.median(steady_buckets) if steady_buckets else float("nan")
    if window:
        worst = min(window)
        out["worst"] = worst
        out["worst_at_ms"] = (first + window.index(worst)) * 100 - start
        out["steady"] = steady
        out["worst_frac"] = f"{worst / steady:.3f}" if steady else "nan"
        longest = run = 0
        for n in window:
            run = run + 1 if n == 0 else 0
            longest = max(longest, run)
        out["silent_ms"] = longest * 100
        out["last_s"] = sum(window[-10:])
    for key in ("failed", "sent", "ok", "non200", "connect", "read", "write", "pids"):
        out[key] = totals.get(key, "nan")
    print(" ".join(f"{k}={v}" for k, v in out.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
