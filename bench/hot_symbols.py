#!/usr/bin/env python3
"""The functions of the ustad binary that its processes ran, from callgrind's output files, as
a symbol ordering file for the linker (crates/ustad-cli/hot-symbols.txt; see
bench/hot_symbols.sh and crates/ustad-cli/build.rs).

    python3 bench/hot_symbols.py BINARY [--native NAMES_FILE] CALLGRIND_FILE... > hot-symbols.txt

First every function a primary (or an upgrade's check) ran, those that more of the traced
processes ran first (what every primary runs ends up in the fewest pages, what only some
features run after it), then those only a demo worker ran; within each, in the order the
linker had placed them in BINARY (callers next to their callees, as it laid them out). Names are the mangled symbols of BINARY (`nm`); callgrind's recursion
suffixes (`'2`) are dropped. NAMES_FILE (one symbol per line: what `perf` sampled in a
primary run natively) adds what a primary runs natively but not under valgrind, as if every
traced primary had run it. The summary goes to stderr.
"""

import re
import subprocess
import sys

FUNCTION = re.compile(r"^c?fn=\(\d+\) (.*)$")

# Code every primary runs natively that it does not run under valgrind, added by name: tokio
# reaps children through pidfds, and falls back to SIGCHLD under valgrind.
NATIVE_ONLY = ("pidfd_reaper",)


def symbols(binary):
    """Code symbols of `binary`: name -> (address, size)."""
    out = subprocess.run(
        ["nm", "--defined-only", "-S", binary], check=True, capture_output=True, text=True
    ).stdout
    found = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[2] in "tTwW":
            found[fields[3]] = (int(fields[0], 16), int(fields[1], 16))
    return found


def ran(path):
    """(whether the process was a demo worker, the function names it ran) of one file."""
    worker = False
    names = set()
    with open(path, errors="replace") as file:
        for line in file:
            if line.startswith("cmd:"):
                worker = "demo-worker" in line
            match = FUNCTION.match(line.rstrip("\n"))
            if match:
                names.add(re.sub(r"'\d+$", "", match.group(1)))
    return worker, names


def main():
    args = sys.argv[1:]
    native = set()
    if len(args) > 2 and args[1] == "--native":
        with open(args[2]) as file:
            native = {line.strip() for line in file}
        args = [args[0]] + args[3:]
    if len(args) < 2:
        sys.exit(__doc__)
    code = symbols(args[0])
    runs, worker = {}, set()
    for path in args[1:]:
        is_worker, names = ran(path)
        names = {n for n in names if n in code}
        if is_worker:
            worker |= names
        else:
            for name in names:
                runs[name] = runs.get(name, 0) + 1
    every = max(runs.values(), default=1)
    added = {n for n in code if n in native or any(p in n for p in NATIVE_ONLY)} - set(runs)
    for name in added:
        runs[name] = every
    primary = set(runs)
    worker -= primary
    for name in sorted(primary, key=lambda n: (-runs[n], code[n][0])):
        print(name)
    for name in sorted(worker, key=lambda n: code[n][0]):
        print(name)
    kib = lambda names: sum(code[n][1] for n in names) // 1024
    print(
        f"{len(primary)} functions of the primary ({kib(primary)} KiB; {len(added)} seen "
        f"natively only), then {len(worker)} "
        f"of the demo worker only ({kib(worker)} KiB), of {len(code)} ({kib(code)} KiB)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
