#!/usr/bin/env python3
"""Turns the raw results of bench/cluster.sh (RESULTS/results.tsv: run, config, metric, value)
into the markdown summary: medians over the runs, ratios to the no-manager limit measured in
the same run, and the issue's targets with their misses marked.

    summarize.py RESULTS_DIR
"""

import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

LABELS = {
    "bare": "bare app, 1 process, no manager",
    "limit": "**limit**: 2 × node on one inherited socket, no manager",
    "node-rr": "Node cluster, round-robin (default)",
    "node-none": "Node cluster, `SCHED_POLICY=none`",
    "pm2": "PM2 cluster mode (`-i 2`)",
    "ustad-shared": "**ustad**, shared socket",
    "ustad-reuseport": "**ustad**, `--reuseport`",
    "limit-rust": "**limit**: 2 × Rust demo worker on one inherited socket, no manager",
    "ustad-demo": "**ustad**, Rust demo worker",
}
# The limit each configuration is compared with: the same app, no manager, the same run.
REFERENCE = {"limit-rust": "limit-rust", "ustad-demo": "limit-rust"}
TARGETS = {
    "ka_ratio": 0.98,  # keep-alive req/s >= 0.98 x the limit
    "nc_ratio": 0.95,  # new-connection req/s >= 0.95 x the limit
    "nc_balance": 1.2,  # max/min requests per worker under new-connection load <= 1.2
    "rss_mib": 5.0,  # primary RSS <= 5 MiB
}
MISS = " ✗"


def load(results):
    """{config: {metric: {run: [values]}}} and the configs in the order they were run."""
    data = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    order = []
    for line in (results / "results.tsv").read_text().splitlines():
        run, config, metric, value = line.split("\t")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        data[config][metric][int(run)].append(number)
        if config not in order:
            order.append(config)
    return data, order


def per_run(data, config, metric, combine=max):
    """One value per run (several samples in a run are combined), in run order."""
    runs = data.get(config, {}).get(metric, {})
    return {run: combine(values) for run, values in sorted(runs.items())}


def median(values):
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def ratios(data, config, metric):
    """The per-run ratios of `metric` to the reference limit measured in the same run."""
    reference = REFERENCE.get(config, "limit")
    ours, theirs = per_run(data, config, metric), per_run(data, reference, metric)
    return [ours[run] / theirs[run] for run in ours if run in theirs and theirs[run] > 0]


def fmt(value, digits=0):
    if math.isnan(value):
        return "–"
    if math.isinf(value):
        return "∞"
    return f"{value:,.{digits}f}"


def is_ustad(config):
    return config.startswith("ustad")


def main():
    results = Path(sys.argv[1])
    data, order = load(results)
    env = (results / "env.txt").read_text() if (results / "env.txt").exists() else ""
    runs = max((r for c in data.values() for m in c.values() for r in m), default=0)
    settings = dict(
        item.split("=", 1)
        for line in env.splitlines()
        if line.startswith("settings:")
        for item in line.split()[1:]
    )
    reloads = int(settings.get("RELOADS", 5))
    out = []
    p = out.append

    for line in env.splitlines():
        if line.startswith(("date:", "machine:", "node:", "pm2:", "wrk:", "rustc:", "ustad:",
                            "settings:", "app drain:")):
            p(f"- {line}")
    p("")
    p(f"Medians of {runs} run(s); × limit = the median of the per-run ratios to the no-manager")
    p("limit of the same app measured in the same run. ✗ marks a miss of the issue's targets")
    p("(targets apply to the ustad rows; the others are shown for comparison).")
    p("")
    p("| configuration | keep-alive req/s | × limit | p99 ms | new-conn req/s | × limit "
      "| p99 ms | balance keep-alive | balance new-conn | errors in restarts keep-alive / new-conn "
      "| primary RSS MiB | manager CPU % keep-alive / new-conn |")
    p("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    p("| *target (ustad)* | | *≥ 0.98* | | | *≥ 0.95* | | | *≤ 1.2* | *0 (Rust demo worker)* "
      "| *≤ 5* | |")
    for config in order:
        manager = config not in ("bare", "limit", "limit-rust")
        row = [LABELS.get(config, config)]
        for mode in ("ka", "nc"):
            rps = median(per_run(data, config, f"{mode}_rps").values())
            ratio = median(ratios(data, config, f"{mode}_rps"))
            p99 = median(per_run(data, config, f"{mode}_p99_us").values()) / 1000
            mark = MISS if is_ustad(config) and ratio < TARGETS[f"{mode}_ratio"] else ""
            row += [fmt(rps), fmt(ratio, 2) + "×" * (not math.isnan(ratio)) + mark, fmt(p99, 1)]
        for mode in ("ka", "nc"):
            balance = median(per_run(data, config, f"{mode}_balance").values())
            mark = ""
            if mode == "nc" and is_ustad(config) and not balance <= TARGETS["nc_balance"]:
                mark = MISS
            row.append(fmt(balance, 2) + mark)
        if manager:
            errors = []
            for mode in ("ka", "nc"):
                values = list(per_run(data, config, f"restart_{mode}_errors", sum).values())
                mark = MISS if config == "ustad-demo" and any(v != 0 for v in values) else ""
                errors.append(fmt(median(values)) + mark)
            row.append(" / ".join(errors))
            rss = median(per_run(data, config, "rss_kib").values()) / 1024
            cell = fmt(rss, 1) + (MISS if is_ustad(config) and rss > TARGETS["rss_mib"] else "")
            guard = median(per_run(data, config, "guard_rss_kib").values()) / 1024
            if not math.isnan(guard):
                cell += f" (+{fmt(guard, 1)} guard)"
            row.append(cell)
            cpu = [median(per_run(data, config, f"{m}_manager_cpu_pct").values())
                   for m in ("ka", "nc")]
            row.append(f"{fmt(cpu[0])} / {fmt(cpu[1])}")
        else:
            row += ["n/a", "n/a", "n/a"]
        p("| " + " | ".join(row) + " |")

    p("")
    p("Balance: the most requests served by one worker over the fewest, in a separate")
    p("wrk run with the counting Lua script. ∞: one worker got no request at all.")
    p("Primary RSS: VmRSS of the manager process (Node's cluster primary, PM2's God Daemon,")
    p("the ustad primary), the largest sample of a run (sampled under load); for ustad, also its")
    p("guard, a child forked from the primary that kills the workers' leftovers if the primary")
    p("is SIGKILLed (its pages are largely shared with the primary).")
    p("Manager CPU: the CPU time the manager process used during the throughput run, in % of")
    p("one core: its cost on the data path (Node's round-robin primary accepts every connection")
    p("and passes it to a worker).")

    managers = [c for c in order if c not in ("bare", "limit", "limit-rust")]
    if managers:
        p("")
        p(f"**Rolling restarts under load** ({reloads} restarts per wrk run; errors = wrk's socket "
          "errors (connect, read, write, timeout) + non-2xx responses; every run listed):")
        p("")
        p("| configuration | errors, keep-alive | errors, new-conn | workers seen "
          f"(expected {2 + 2 * reloads}) | max latency ms, keep-alive / new-conn "
          "| longest reload command s |")
        p("|---|--:|--:|--:|--:|--:|")
        for config in managers:
            cells = [LABELS.get(config, config)]
            for mode in ("ka", "nc"):
                values = list(per_run(data, config, f"restart_{mode}_errors", sum).values())
                cells.append(" ".join(fmt(v) for v in values))
            seen = [per_run(data, config, f"restart_{m}_pids", min).values() for m in ("ka", "nc")]
            cells.append(fmt(min([*seen[0], *seen[1]], default=math.nan)))
            lat = [median(per_run(data, config, f"restart_{m}_max_us").values()) / 1000
                   for m in ("ka", "nc")]
            cells.append(f"{fmt(lat[0])} / {fmt(lat[1])}")
            cells.append(fmt(median(per_run(data, config, "reload_cmd_s").values()), 2))
            p("| " + " | ".join(cells) + " |")

    killed = [c for c in order if "kill_errors" in data.get(c, {})]
    if killed:
        p("")
        p("**A slot left empty**: one worker SIGKILLed 1 s into a 5 s new-connection run "
          "(ustad replaces it after its 1 s restart delay):")
        p("")
        p("| configuration | req/s | errors (every run) | p99 ms | max latency ms |")
        p("|---|--:|--:|--:|--:|")
        for config in killed:
            errors = list(per_run(data, config, "kill_errors", sum).values())
            p("| " + " | ".join([
                LABELS.get(config, config),
                fmt(median(per_run(data, config, "kill_rps").values())),
                " ".join(fmt(v) for v in errors),
                fmt(median(per_run(data, config, "kill_p99_us").values()) / 1000, 1),
                fmt(median(per_run(data, config, "kill_max_us").values()) / 1000),
            ]) + " |")

    p("")
    p("**Every run**: req/s keep-alive / new-conn, and in brackets how the 64 keep-alive")
    p("connections were split between the workers (counted with `ss` in the middle of the")
    p("keep-alive run):")
    p("")
    p("| configuration | " + " | ".join(f"run {r}" for r in range(1, runs + 1)) + " |")
    p("|---|" + "--:|" * runs)
    for config in order:
        ka, nc = per_run(data, config, "ka_rps"), per_run(data, config, "nc_rps")
        lo, hi = per_run(data, config, "ka_conns_min"), per_run(data, config, "ka_conns_max")
        cells = []
        for r in range(1, runs + 1):
            cell = f"{fmt(ka.get(r, math.nan))} / {fmt(nc.get(r, math.nan))}"
            if hi.get(r, 0) > 0:
                cell += f" ({fmt(hi[r])}:{fmt(lo[r])})"
            cells.append(cell)
        p("| " + " | ".join([LABELS.get(config, config), *cells]) + " |")

    repeated = sum(
        v - 1 for c in order for m in ("ka_tries", "nc_tries")
        for v in per_run(data, c, m, max).values() if v > 1)
    noisy = [
        f"{c} {m.split('_')[0]} run {r}"
        for c in order for m in ("ka_noisy", "nc_noisy")
        for r in per_run(data, c, m, max)
    ]
    p("")
    p(f"Throughput measurements repeated because the shared machine was busy: {repeated}; "
      f"still busy after 3 tries: {', '.join(noisy) if noisy else 'none'}.")

    errors = [
        (config, metric, run, value)
        for config in order
        for metric in ("ka_errors", "nc_errors")
        for run, value in per_run(data, config, metric, sum).items()
        if value != 0
    ]
    if errors:
        p("")
        p("Errors in steady-state runs (should be none): " + ", ".join(
            f"{c} {m} run {r}: {fmt(v)}" for c, m, r, v in errors))
    print("\n".join(out))


if __name__ == "__main__":
    main()
