"""Where a command's CPU time goes, process by process, across the whole machine: what a Ray Train fit costs
before its first step (the test suite's cost is its number of fits). Prints JSON.

    python benchmarks/cpu_by_process.py [--out FILE] -- distpose train ...   (RAY_ADDRESS: a running Ray)

Every process on the machine is looked at every `--interval` seconds while the command runs; a process's CPU time
is what it used between its first and last look (all of it, if it started after the command), grouped by its title
(a Ray actor's is `ray::<class>`). A process that ends between two looks loses at most one interval.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil


def title(process: psutil.Process) -> str:
    name = process.name()
    if name.startswith("ray::"):  # the kernel keeps 15 characters of a title; the command line has all of it
        name = process.cmdline()[0].split()[0]
    if not name.startswith("python"):
        return name.split(".")[0]  # a Ray worker's title names its current task after the dot
    words = process.cmdline()[1:3]
    return ("python " + " ".join(Path(w).name if "/" in w else w for w in words)).splitlines()[0][:60]


def measure(command: list[str], interval: float) -> dict:
    start = time.time()
    first: dict[int, float] = {}
    last: dict[int, tuple[str, float]] = {}

    def look() -> None:
        for process in psutil.process_iter():
            try:
                with process.oneshot():
                    used = sum(process.cpu_times()[:2])
                    if process.pid not in first:  # a process started during the command counts from zero
                        first[process.pid] = 0.0 if process.create_time() >= start else used
                    last[process.pid] = (title(process), used)
            except psutil.Error:
                pass

    look()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    while child.poll() is None:
        look()
        time.sleep(interval)
    look()
    wall = time.time() - start
    by_title: collections.Counter[str] = collections.Counter()
    for pid, (name, used) in last.items():
        if pid != os.getpid():
            by_title[name] += used - first[pid]
    shown = {name: round(seconds, 2) for name, seconds in by_title.most_common() if seconds >= 0.05}
    return {"command": command, "exit_code": child.returncode, "wall_s": round(wall, 2),
            "cpu_s": round(sum(shown.values()), 2), "cores_busy": round(sum(shown.values()) / wall, 2),
            "cpu_s_by_process": shown,
            "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                        "python": platform.python_version()}}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between looks (default 0.2)")
    parser.add_argument("--out", type=Path, help="also write the JSON here (atomically)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given: add -- and the command to measure")
    report = json.dumps(measure(command, args.interval), indent=1)
    print(report)
    if args.out:
        partial = args.out.with_name(args.out.name + ".partial")
        partial.write_text(report + "\n")
        partial.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
