"""A real Slurm cluster on this machine: munged and slurmctld here, one slurmd on each of the `Machines` (its own
address and host name), all with files in a temporary directory and ports of their own. Debian's slurm-wlm and
munge (`make test-tools` installs them)."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from helpers import free_port
from machines import Machines

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "nsenter", "unshare", "ip")
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL")
UP_S = 60


def missing_tools() -> list[str]:
    return [tool for tool in DAEMONS if shutil.which(tool) is None]


class Slurm:
    """Partition `test` over the machines, `cpus` CPUs each. `env` is what the Slurm commands need (SLURM_CONF)."""

    def __init__(self, temp: Path, machines: Machines, cpus: int):
        self.temp, self.machines, self.cpus = temp, machines, cpus
        self.conf = temp / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: list[subprocess.Popen] = []
        self.slurmd: dict[str, int] = {}  # machine -> its slurmd's pid

    def _daemon(self, name: str, command: list[str]) -> subprocess.Popen:
        with (self.temp / f"{name}.out").open("wb") as out:
            daemon = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        self.daemons.append(daemon)
        return daemon

    def start(self) -> None:
        munge = self.temp / "munge"
        munge.mkdir(parents=True)
        munge.chmod(0o711)  # munged wants its socket's directory searchable by all, writable by none
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = munge / "munge.socket"
        self._daemon("munged", ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={socket_path}",
                                f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'munged.seed'}",
                                f"--log-file={munge / 'munged.log'}"])
        deadline = time.monotonic() + UP_S
        while not socket_path.exists():
            assert time.monotonic() < deadline, (self.temp / "munged.out").read_text()
            time.sleep(0.1)
        (self.temp / "state").mkdir()
        for name in self.machines.names:
            (self.temp / "spool" / name).mkdir(parents=True)
        self.conf.write_text(self._config(socket_path))
        self._daemon("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for name in self.machines.names:  # the wrappers exec: the pid is slurmd's
            self.slurmd[name] = self._daemon(f"slurmd-{name}", self.machines.command(
                name, ["slurmd", "-D", "-N", name, "-f", str(self.conf)])).pid
        deadline = time.monotonic() + UP_S
        while (states := self.node_states()) != {name: "IDLE" for name in self.machines.names}:
            assert time.monotonic() < deadline, f"Slurm's nodes did not come up: {states}; {self.logs()}"
            time.sleep(0.5)
        for name, pid in self.slurmd.items():  # what `leftovers` relies on
            assert pid in self.machines.processes(name), f"slurmd {pid} not found on {name}"

    def _config(self, munge_socket: Path) -> str:
        t = self.temp
        lines = [
            "ClusterName=distpose",
            f"FirstJobId={random.randrange(100_000, 900_000)}",  # the script's /tmp/ray-<job id> is new
            f"SlurmctldHost={socket.gethostname().split('.')[0]}({self.machines.gateway})",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", f"AuthInfo=socket={munge_socket}", "CredType=cred/munge",
            f"SlurmctldPort={free_port()}", "SlurmdPort=6818",  # each slurmd on its own machine's address
            f"StateSaveLocation={t / 'state'}", f"SlurmdSpoolDir={t / 'spool' / '%n'}",
            f"SlurmctldPidFile={t / 'slurmctld.pid'}", f"SlurmdPidFile={t / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={t / 'slurmctld.log'}", f"SlurmdLogFile={t / 'slurmd-%n.log'}",
            # Without cgroups: processes are tracked by parentage, as on clusters that do not use cgroups.
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/backfill", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",  # the machines share this one's CPUs
            "ReturnToService=2", "MpiDefault=none", "KillWait=30",
            *(f"NodeName={name} NodeAddr={address} CPUs={self.cpus} State=UNKNOWN"
              for name, address in self.machines.addresses.items()),
            f"PartitionName=test Nodes={','.join(self.machines.names)} Default=YES MaxTime=INFINITE State=UP",
        ]
        return "\n".join(lines) + "\n"

    def run(self, *command: str, cwd: Path | None = None) -> str:
        result = subprocess.run(command, env=self.env, cwd=cwd, capture_output=True, text=True, timeout=60,
                                check=False)
        assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
        return result.stdout

    def node_states(self) -> dict[str, str]:
        out = subprocess.run(["scontrol", "show", "nodes", "-o"], env=self.env, capture_output=True, text=True,
                             timeout=60, check=False).stdout
        return {m.group(1): m.group(2) for m in re.finditer(r"NodeName=(\S+) .*?State=(\S+)", out)}

    def job(self, job_id: str) -> dict[str, str]:
        """The job's fields as `scontrol show job` gives them (Slurm keeps a finished job for MinJobAge, 300 s)."""
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (job := self.job(job_id))["JobState"] not in FINISHED:
            assert time.monotonic() < deadline, f"job {job_id} still {job['JobState']} after {timeout:g} s"
            time.sleep(1)
        return job

    def leftovers(self, within: float = 0.0) -> dict[str, list[str]]:
        """What still runs on each machine besides its slurmd (once nothing does, or after `within` s)."""
        slurmd = set(self.slurmd.values())
        return self.machines.left_running(lambda pid, _: pid in slurmd, within)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                         for p in sorted(self.temp.glob("*.log")) + sorted(self.temp.glob("*.out")))

    def stop(self) -> None:
        for daemon in reversed(self.daemons):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon.pid, signal.SIGTERM)
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()
