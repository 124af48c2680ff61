"""Machines for the scheduler tests, on this one: each a network namespace with its own address on a bridge, and
its own host name, which resolves to that address there. A daemon started on a machine (slurmd, sshd), and every
process it starts, sees only that machine's network; files and process ids stay shared. Needs root (the tests
that use it skip without)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _net_namespace(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    return None


class Machines:
    """`names` as machines on the subnet 10.213.N.0/24 (N drawn from this process's id): the bridge, the address
    this machine has there (`gateway`, where daemons of the root namespace listen), is .1; the machines are .11,
    .12, ..."""

    def __init__(self, names: list[str], temp: Path):
        self.names, self.temp = names, temp
        tag = os.getpid() % 10000
        subnet = f"10.213.{20 + os.getpid() % 200}"
        self.gateway = f"{subnet}.1"
        self.addresses = {name: f"{subnet}.{11 + i}" for i, name in enumerate(names)}
        self.bridge = f"dpbr{tag}"
        self.namespaces = {name: f"dp{tag}-{name}" for name in names}
        self._links = [f"dpv{tag}x{i}" for i in range(len(names))]
        self.hosts = temp / "hosts"
        self.temp.mkdir(parents=True, exist_ok=True)
        self.hosts.write_text(Path("/etc/hosts").read_text()
                              + "".join(f"{address} {name}\n" for name, address in self.addresses.items()))

    def start(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for (name, namespace), link in zip(self.namespaces.items(), self._links, strict=True):
            _ip("netns", "add", namespace)
            _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", namespace)
            _ip("link", "set", link, "master", self.bridge, "up")
            _ip("-n", namespace, "addr", "add", f"{self.addresses[name]}/24", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            # Ray finds a node's address by the route out of it.
            _ip("-n", namespace, "route", "add", "default", "via", self.gateway)

    def command(self, name: str, command: list[str], binds: dict[str, Path] | None = None,
                own_processes: bool = False) -> list[str]:
        """`command` as run on machine `name`: in its network namespace, with its host name, its /etc/hosts, and
        each of `binds` (path there -> file or directory here) mounted over what is there. With `own_processes`,
        it sees only the processes it starts (a process namespace of its own, its own /proc): `ray stop` there
        stops only that machine's Ray. (nsenter keeps /sys as it is: `ip netns exec` would remount it, hiding the
        cgroup filesystems.)"""
        mounts = [f"mount --bind {self.hosts} /etc/hosts"]
        for there, here in (binds or {}).items():
            mounts.append(f"{{ [ -e {there} ] || mkdir -p {there}; }} && mount --bind {here} {there}")
        script = f"hostname {name} && {' && '.join(mounts)} && exec \"$@\""
        processes = ["--pid", "--fork", "--mount-proc"] if own_processes else []
        return ["nsenter", f"--net=/run/netns/{self.namespaces[name]}", "unshare", "--uts", "--mount",
                "--propagation", "private", *processes, "sh", "-c", script, name, *command]

    def processes(self, name: str) -> list[int]:
        """The processes on machine `name`."""
        inode = os.stat(f"/run/netns/{self.namespaces[name]}").st_ino
        return [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _net_namespace(int(pid)) == inode]

    def left_running(self, spared: Callable[[int, str], bool], within: float = 0.0) -> dict[str, list[str]]:
        """Each machine's processes ("pid command line") but those `spared(pid, command line)` keeps: once there
        are none, or after `within` s."""
        deadline = time.monotonic() + within
        while True:
            left = {name: [f"{pid} {command[:120]}" for pid, command in self._command_lines(name).items()
                           if not spared(pid, command)] for name in self.names}
            if not any(left.values()) or time.monotonic() >= deadline:
                return left
            time.sleep(1)

    def _command_lines(self, name: str) -> dict[int, str]:
        out = {}
        for pid in self.processes(name):
            with contextlib.suppress(OSError):
                out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        return out

    def stop(self) -> None:
        """Kill every process on the machines, then remove them and the bridge."""
        for name, namespace in self.namespaces.items():
            if not Path(f"/run/netns/{namespace}").exists():
                continue
            deadline = time.monotonic() + 10
            while (pids := self.processes(name)) and time.monotonic() < deadline:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.2)
            subprocess.run(["ip", "netns", "delete", namespace], check=False, capture_output=True)
        for link in [*self._links, self.bridge]:
            subprocess.run(["ip", "link", "delete", link], check=False, capture_output=True)
