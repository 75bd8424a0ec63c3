#!/usr/bin/env python3
"""Turns the raw results of bench/naive.sh (RESULTS/results.tsv: run, config, metric, value)
into its markdown summary: medians over the runs, ratios to the launcher and to Node's cluster
measured in the same run, and the issue's targets with their misses marked.

    summarize_naive.py RESULTS_DIR
"""

import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

LABELS = {
    "launcher": "launcher: 2 × node on one inherited socket, restarted at once",
    "node-rr": "Node cluster (round-robin, the default)",
    "node-none": "Node cluster, `SCHED_POLICY=none`",
    "pm2": "PM2 cluster mode (`-i 2`)",
    "ustad": "**ustad**",
}
KILL_REFERENCE = "launcher"
RESTART_REFERENCES = ("node-rr", "node-none")  # the first one present is "Node cluster"
TARGETS = {"kill_ratio": 1.2, "worst_ratio": 0.8, "never_failed": 0}
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


def median(values):
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def runs_of(data, config, metric):
    """One value per run: the median of the run's samples (several kills in a run)."""
    runs = data.get(config, {}).get(metric, {})
    return {run: median(values) for run, values in sorted(runs.items())}


def med(data, config, metric):
    return median(runs_of(data, config, metric).values())


def ratio(ours, theirs):
    if math.isnan(ours) or math.isnan(theirs):
        return math.nan
    if theirs == 0:
        return math.inf if ours > 0 else math.nan
    return ours / theirs


def ratios(data, config, reference, metric):
    """The per-run ratios of `metric` to the reference configuration of the same run."""
    ours, theirs = runs_of(data, config, metric), runs_of(data, reference, metric)
    return [ratio(ours[r], theirs[r]) for r in ours if r in theirs]


def fmt(value, digits=0, suffix=""):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if math.isinf(value):
        return "∞"
    return f"{value:,.{digits}f}{suffix}"


def each(data, config, metric, digits=0):
    values = runs_of(data, config, metric).values()
    return " ".join(fmt(v, digits) for v in values) or "–"


def main():
    results = Path(sys.argv[1])
    data, order = load(results)
    env = (results / "env.txt").read_text() if (results / "env.txt").exists() else ""
    settings = dict(
        item.split("=", 1)
        for line in env.splitlines()
        if line.startswith("settings:")
        for item in line.split()[1:]
    )
    reloads = int(settings.get("RELOADS", 3))
    runs = max((r for c in data.values() for m in c.values() for r in m), default=0)
    ready = next((l.split(":", 1)[1].strip() for l in env.splitlines()
                  if l.startswith("ustad ready:")), "")
    labels = dict(LABELS)
    labels["ustad"] = ("**ustad**, defaults (no `--ready`)" if ready.startswith("(default")
                       else f"**ustad**, `--ready {ready}`")
    node = next((c for c in RESTART_REFERENCES if c in data), None)
    out = []
    p = out.append

    for line in env.splitlines():
        if line.split(":", 1)[0] in ("date", "machine", "node", "pm2", "wrk", "rustc", "ustad",
                                     "settings", "ustad ready", "pm2 args"):
            p(f"- {line}")
    p("")
    kills = settings.get("KILLS", "1")
    p(f"Medians of {runs} run(s) (a run's kill → answering is the median of its {kills} kills")
    p("per mode). A ratio is the median of the per-run ratios to the reference")
    p("measured in the same run (× launcher for kill → answering, × Node cluster for the worst")
    p("100 ms). ✗ marks a miss of the issue's targets (they apply to the ustad row).")
    p("")

    # --- kill -9 -> a new worker answers
    p("**kill -9 → a new worker answers** (ms from the SIGKILL; spawned = the manager has a new")
    p("child process; answers = a request on a new connection was answered by a new pid):")
    p("")
    p("| configuration | idle: spawned | idle: answers | × launcher | under load: spawned "
      "| under load: answers | × launcher | failed requests in the load run |")
    p("|---|--:|--:|--:|--:|--:|--:|--:|")
    p(f"| *target (ustad)* | | | *≤ {TARGETS['kill_ratio']}* | | | *≤ {TARGETS['kill_ratio']}* | |")
    for config in order:
        row = [labels.get(config, config)]
        for mode in ("idle", "load"):
            row.append(fmt(med(data, config, f"kill_{mode}_spawn_ms")))
            row.append(fmt(med(data, config, f"kill_{mode}_answer_ms")))
            r = median(ratios(data, config, KILL_REFERENCE, f"kill_{mode}_answer_ms"))
            mark = MISS if config == "ustad" and not r <= TARGETS["kill_ratio"] else ""
            row.append(fmt(r, 2, "×") + mark)
        row.append(fmt(med(data, config, "kill_load_failed")))
        p("| " + " | ".join(row) + " |")
    p("")

    # --- rolling restarts
    managers = [c for c in order if c != "launcher"]
    p(f"**Rolling restarts under load** ({reloads} per load run, {settings.get('RELOAD_GAP', '?')} s "
      "apart; worst 100 ms = the fewest 200 responses in one 100 ms bucket from the first restart")
    p("to the end of the last; of steady = over the median 100 ms of the second before; failed =")
    p("requests sent and not answered with a 200, plus failed connects):")
    p("")
    p("| configuration | keep-alive: worst 100 ms | of steady | × Node cluster | failed "
      "| new-conn: worst 100 ms | of steady | × Node cluster | failed "
      f"| longest silence ms, keep-alive / new-conn | rollouts done (of {reloads}), each run, keep-alive / new-conn |")
    p("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    p(f"| *target (ustad)* | | | *≥ {TARGETS['worst_ratio']}* | | | | *≥ {TARGETS['worst_ratio']}* | | | |")
    incomplete = False
    for config in managers:
        row = [labels.get(config, config)]
        for mode in ("ka", "nc"):
            # A rollout that did not happen has a fine worst 100 ms: marked, and a miss.
            short = any(v < reloads for v in runs_of(data, config, f"restart_{mode}_rollouts").values())
            incomplete |= short
            row.append(fmt(med(data, config, f"restart_{mode}_worst")) + (" †" if short else ""))
            row.append(fmt(100 * med(data, config, f"restart_{mode}_worst_frac"), 0, " %"))
            r = median(ratios(data, config, node, f"restart_{mode}_worst")) if node else math.nan
            miss = short or not r >= TARGETS["worst_ratio"]
            mark = MISS if config == "ustad" and miss else ""
            row.append(fmt(r, 2, "×") + mark)
            row.append(fmt(med(data, config, f"restart_{mode}_failed")))
        row.append(f"{fmt(med(data, config, 'restart_ka_silent_ms'))} / "
                   f"{fmt(med(data, config, 'restart_nc_silent_ms'))}")
        row.append(f"{each(data, config, 'restart_ka_rollouts')} / {each(data, config, 'restart_nc_rollouts')}")
        p("| " + " | ".join(row) + " |")
    if incomplete:
        p("")
        p(f"† Not every rollout happened: in some run fewer than {reloads} rollouts replaced both workers")
        p("before the next began, so this worst 100 ms is not that of rolling restarts (a miss for ustad).")
    p("")

    # --- never-listening rollout
    p("**Rollout to a release that never listens**, under new-connection load (failed = as above,")
    p("from the rollout's start to the end of the watch; answering at the end = 200 responses in")
    p("the watch's last second, per run):")
    p("")
    p("| configuration | failed requests (each run) | answering at the end (each run) "
      "| longest silence ms | worst 100 ms | of steady | reload command s |")
    p("|---|--:|--:|--:|--:|--:|--:|")
    p(f"| *target (ustad)* | *{TARGETS['never_failed']}* | *yes* | | | | |")
    for config in managers:
        failed = runs_of(data, config, "never_failed")
        mark = MISS if config == "ustad" and any(v != 0 for v in failed.values()) else ""
        answering = " ".join("–" if math.isnan(v) else ("yes" if v > 0 else "**no**")
                             for v in runs_of(data, config, "never_last_s").values())
        row = [labels.get(config, config), each(data, config, "never_failed") + mark,
               answering or "–", fmt(med(data, config, "never_silent_ms")),
               fmt(med(data, config, "never_worst")),
               fmt(100 * med(data, config, "never_worst_frac"), 0, " %"),
               fmt(med(data, config, "never_reload_cmd_ms") / 1000, 1)]
        p("| " + " | ".join(row) + " |")
    p("")

    # --- every run
    p("**Every run** (kill → answers ms idle / under load; worst 100 ms keep-alive / new-conn; "
      "failed in the never-listening rollout):")
    p("")
    p("| configuration | " + " | ".join(f"run {r}" for r in range(1, runs + 1)) + " |")
    p("|---|" + "--:|" * runs)
    for config in order:
        cells = []
        for r in range(1, runs + 1):
            g = lambda m: runs_of(data, config, m).get(r, math.nan)
            cell = f"{fmt(g('kill_idle_answer_ms'))} / {fmt(g('kill_load_answer_ms'))} ms"
            if config != "launcher":
                cell += (f"; {fmt(g('restart_ka_worst'))} / {fmt(g('restart_nc_worst'))}"
                         f"; {fmt(g('never_failed'))}")
            cells.append(cell)
        p(f"| {labels.get(config, config)} | " + " | ".join(cells) + " |")
    p("")

    noisy = sorted({f"{c} {m.removesuffix('_noisy')} run {r}" for c in data for m in data[c]
                    if m.endswith("_noisy") for r in data[c][m]})
    if noisy:
        p(f"Load runs on a busy machine (> {settings.get('QUIET', '?')} % CPU right before or after, "
          f"flagged, not repeated): {', '.join(noisy)}.")
    else:
        p("No load run was flagged as noisy (machine at most "
          f"{settings.get('QUIET', '?')} % busy right before and after each).")
    print("\n".join(out))


if __name__ == "__main__":
    main()
