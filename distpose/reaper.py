"""The local Ray's processes die with the driver that started them.

A driver killed outright (SIGKILL, the OOM killer) runs none of its exit code: Ray's training workers went on for
steps after it, writing to the run, and Ray's node agents stayed for more than a minute (they wait on the dead
GCS). `python -m distpose.reaper` is started by the driver before its local Ray, in a session of its own (a Ctrl-C
to the terminal does not reach it). It keeps a list of the driver's descendants, and reads a pipe that only the
driver holds open. A driver that ends normally writes DONE first, and the reaper leaves. If the pipe closes without
it, the driver died, and the reaper kills every descendant it saw, then removes the folder named by its argument
(the temporary files of the driver and its Ray's processes, which the driver would have removed). Descendants are
known by their parents while the driver lives: Ray's processes overwrite their environment and command line with
their titles, and once the driver is gone their parent is init.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

DONE = b"done\n"
LOOK_EVERY_S = 0.5
GIVE_UP_S = 5.0  # processes that keep appearing (a dying raylet's last workers) are chased this long


def processes() -> dict[int, tuple[int, int]]:
    """Every process: pid -> (parent pid, start time in clock ticks, which tells a reused pid apart)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
        found[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return found


def descendants(root: int, table: dict[int, tuple[int, int]]) -> dict[int, int]:
    """The descendants of `root` in `table`: pid -> start time."""
    children = defaultdict(list)
    for pid, (parent, _) in table.items():
        children[parent].append(pid)
    found, queue = {}, list(children[root])
    while queue:
        pid = queue.pop()
        found[pid] = table[pid][1]
        queue.extend(children[pid])
    return found


def kill_all(seen: dict[int, int]) -> None:
    """SIGKILL each process in `seen` that still runs (same pid, same start time) and whatever it started since,
    until none is left or GIVE_UP_S passed."""
    deadline = time.monotonic() + GIVE_UP_S
    while time.monotonic() < deadline:
        table = processes()
        alive = {pid for pid, start in seen.items() if pid != os.getpid() and table.get(pid, (0, -1))[1] == start}
        for pid in list(alive):
            alive |= set(descendants(pid, table))
        if not alive:
            break
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            seen.setdefault(pid, table[pid][1])
        time.sleep(0.05)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    driver, seen = os.getppid(), {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(LOOK_EVERY_S):
            seen.update(descendants(driver, processes()))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    said = sys.stdin.buffer.read()  # returns once the driver's end of the pipe is closed
    stop.set()
    watcher.join()
    if said != DONE:
        kill_all(seen)
        if len(sys.argv) > 1:
            shutil.rmtree(sys.argv[1], ignore_errors=True)


if __name__ == "__main__":
    main()
