"""What a command that starts its own Ray leaves open and behind: its listening sockets (every one on loopback but
torch's rendezvous store) and its temporary files (none)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil

LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1")


class ListeningSockets:
    """Every listening TCP socket that a process or its descendants opened, over repeated looks, with the titles each
    process had: a Ray worker's title names the task it runs at the moment."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.seen: dict[tuple[str, int], tuple[int, str]] = {}  # (address, port) -> (pid, title)
        self.titles: dict[int, set[str]] = {}

    def look(self) -> None:
        for process in [self.root, *self.root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                name = process.name()
                sockets = [c.laddr for c in process.net_connections("tcp") if c.status == "LISTEN"]
                self.seen |= {(a.ip, a.port): (process.pid, name) for a in sockets}
                self.titles.setdefault(process.pid, set()).add(name.split(".")[0])

    def check_loopback_only(self, label: str) -> None:
        """Each socket is on 127.0.0.1 but torch.distributed's TCPStore: one per worker group, in a training worker
        (while it creates the store, the worker's title is the setup task's), on every interface (IPv6 "::", dual
        stack), whatever its host."""
        shown = ", ".join(f"{ip}:{port} ({name})" for (ip, port), (_, name) in sorted(self.seen.items()))
        print(f"\n[{label}] listening: {shown}")
        names = set().union(*self.titles.values())
        assert "ray::RayTrainWorker" in names and "raylet" in names, self.seen
        elsewhere = {where: found for where, found in self.seen.items() if where[0] not in LOOPBACK}
        stores = {where: (pid, name) for where, (pid, name) in elsewhere.items()
                  if where[0] == "::" and "ray::RayTrainWorker" in self.titles.get(pid, ())}
        assert len(stores) == 1 and elsewhere == stores, elsewhere


@contextlib.contextmanager
def watched_temporary_directory() -> Iterator[Path]:
    """A temporary directory (TMPDIR) for a command, short enough for the Unix sockets Ray keeps under it; on leaving,
    it must hold nothing but Ray's own folder of session logs. Ray ends its processes without their exit handlers:
    the dashboard's pymp-* folder and the workers' torch cache were left behind."""
    directory = Path(tempfile.mkdtemp(prefix="dp-", dir="/tmp"))
    try:
        yield directory
        left = sorted(p.name for p in directory.iterdir() if p.name != "ray")
        assert not left, f"left in the temporary directory: {left}"
    finally:
        shutil.rmtree(directory, ignore_errors=True)
