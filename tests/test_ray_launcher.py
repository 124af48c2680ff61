"""launch/ray/onprem.yaml brought up for real by Ray's cluster launcher: two machines on this one (tests/machines.py),
each running sshd with a key the test makes, the checkout bind-mounted at /shared/distpose as the file says. `ray up`
starts the head over SSH, whose autoscaler starts the worker over SSH; `ray job submit` runs `distpose train` on
both and is followed to its end; `ray down` stops the head, and `ray stop` on the worker what `ray down` leaves
there, leaving nothing but sshd. The commands are docs/clusters.md's,
run on a copy of the file with the addresses and the SSH user and key replaced by the test's. (~2 min.)"""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from machines import Machines

from distpose.metrics_log import read_records
from distpose.train.checkpoints import FINAL_MODEL

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
CLUSTER_FILE = "launch/ray/onprem.yaml"
# docs/clusters.md's commands: the test gives them its copy of the file, fills in HEAD_IP and the job's arguments.
UP = "RAY_UP_enable_autoscaler_v2=0 ray up -y launch/ray/onprem.yaml"
SUBMIT = ('RAY_AUTH_MODE=token ray job submit --address http://HEAD_IP:8265 -- bash -c "cd /shared/distpose && '
          '.venv/bin/distpose train')
DOWN = "ray down -y launch/ray/onprem.yaml"
STOP_WORKER = "ssh WORKER_IP ray stop"
COMMAND_S = 600
UP_S = 30
SETTLE_S = 30


class SSHMachines:
    """sshd on each machine, on its own address, admitting root with one key. Each machine has its own processes
    (`ray stop` on one must not stop another's Ray), a home directory of its own for root (its /etc/passwd says so:
    ssh reads `~` from there), a temporary directory of its own (sshd's SetEnv), and the checkout at
    /shared/distpose."""

    def __init__(self, temp: Path, names: list[str]):
        self.temp = temp
        self.machines = Machines(names, temp / "machines")
        self.key = temp / "id_ed25519"
        self.daemons: list[subprocess.Popen] = []
        # The mount points the binds create on this machine's filesystem, removed at the end.
        self.created = [p for p in (Path("/shared"), Path("/shared/distpose")) if not p.exists()]

    def start(self) -> None:
        self.machines.start()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        (self.temp / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        for name, address in self.machines.addresses.items():
            home, tmp = self.temp / name / "home", self.temp / name / "tmp"
            home.mkdir(parents=True)
            tmp.mkdir()
            host_key = self.temp / name / "host_key"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
            passwd = self.temp / name / "passwd"
            passwd.write_text("".join(
                ":".join([*fields[:5], str(home), *fields[6:]]) if fields[0] == "root" else line
                for line in Path("/etc/passwd").read_text().splitlines(keepends=True)
                for fields in [line.split(":")]))
            config = self.temp / name / "sshd_config"
            config.write_text("\n".join([
                f"ListenAddress {address}", "Port 22", f"HostKey {host_key}", f"PidFile {self.temp / name}/sshd.pid",
                "PermitRootLogin prohibit-password", "PasswordAuthentication no", "UsePAM no", "StrictModes no",
                f"AuthorizedKeysFile {self.temp / 'authorized_keys'}", "MaxStartups 100", "MaxSessions 100",
                f"SetEnv TMPDIR={tmp} RAY_TMPDIR={tmp}"]) + "\n")
            with (self.temp / name / "sshd.log").open("wb") as out:
                self.daemons.append(subprocess.Popen(
                    self.machines.command(name, ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                                          binds={"/shared/distpose": ROOT, "/etc/passwd": passwd},
                                          own_processes=True),
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        for (name, address), daemon in zip(self.machines.addresses.items(), self.daemons, strict=True):
            deadline = time.monotonic() + UP_S
            while self.ssh(address, "true").returncode != 0:
                assert daemon.poll() is None and time.monotonic() < deadline, \
                    (self.temp / name / "sshd.log").read_text()
                time.sleep(0.5)

    def ssh(self, address: str, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", "-i", str(self.key), "-o", "StrictHostKeyChecking=no", "-o",
                               "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
                               f"root@{address}", command], capture_output=True, text=True, check=False, timeout=60)

    def leftovers(self, within: float = 0.0) -> dict[str, list[str]]:
        """What runs on each machine besides its sshd and the sessions it serves (once nothing does, or after
        `within` s)."""
        sshd = {d.pid for d in self.daemons}
        return self.machines.left_running(lambda pid, command: pid in sshd or "sshd" in command, within)

    def stop(self) -> None:
        self.machines.stop()
        for daemon in self.daemons:
            daemon.wait(timeout=10)
        for path in reversed(self.created):
            with contextlib.suppress(OSError):
                path.rmdir()


def cluster_file(machines: SSHMachines, out: Path) -> Path:
    """The shipped file with the test's addresses and SSH user and key, and nothing else changed."""
    config = yaml.safe_load((ROOT / CLUSTER_FILE).read_text())
    addresses = list(machines.machines.addresses.values())
    config["provider"].update(head_ip=addresses[0], worker_ips=addresses[1:])
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(machines.key)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def run(command: str, env: dict[str, str], log: Path, timeout: float = COMMAND_S) -> subprocess.CompletedProcess:
    """A documented command, as a shell runs it, its `ray` this interpreter's; its output kept in `log`."""
    started = time.monotonic()
    result = subprocess.run(["bash", "-c", command], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, check=False)
    with log.open("a") as out:
        out.write(f"$ {command}\n{result.stdout}{result.stderr}\n")
    print(f"\n[ray launcher] {command[:110]}... exit {result.returncode} in {time.monotonic() - started:.0f} s")
    return result


def test_ray_up_runs_a_job_on_both_machines_and_ray_down_stops_them(synth_shards, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root: the test's machines are network namespaces with their own sshd")
    for tool in ("sshd", "rsync", "ssh", "nsenter"):
        if shutil.which(tool) is None:
            pytest.fail(f"not installed: {tool} (`make test-tools` installs openssh-server and rsync)")
    if Path(sys.prefix) != ROOT / ".venv":
        pytest.skip(f"the cluster file runs /shared/distpose/.venv, and these tests run {sys.prefix}")
    docs = (ROOT / "docs" / "clusters.md").read_text()
    assert all(c in docs for c in (UP, SUBMIT, DOWN, STOP_WORKER)), "docs/clusters.md lacks a command run here"

    temp = Path(tempfile.mkdtemp(prefix="distpose-ssh-", dir="/tmp"))
    machines = SSHMachines(temp, ["head", "worker"])
    launcher_home = temp / "launcher"
    # The launcher's Ray files (the cluster's state) where the head's are: the launcher copies the state file to
    # the head at the same path, which on separate machines is /tmp/ray on both.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(launcher_home),
           "RAY_TMPDIR": str(temp / "head" / "tmp")}
    launcher_home.mkdir(parents=True)
    log = tmp_path / "commands.log"
    head = None
    try:
        machines.start()
        head = machines.machines.addresses["head"]
        assert run("ray get-auth-token --generate", env, log).returncode == 0
        down_command = DOWN.replace(CLUSTER_FILE, str(cluster_file(machines, temp / "onprem.yaml")))
        up = run(UP.replace(CLUSTER_FILE, str(temp / "onprem.yaml")), env, log)
        assert up.returncode == 0, log.read_text()[-5000:]
        job = (SUBMIT.replace("HEAD_IP", head) + f" quick/cnn data.shards={synth_shards} train.storage={tmp_path} "
               "train.run_name=launched train.workers=2 train.cpus_per_worker=2 train.epochs=2 "
               'data.batches_per_epoch=3 data.loader_workers=0 eval.every_epochs=0 train.start_timeout_s=300"')
        submitted = run(job, env, log)
        print("\n".join(submitted.stdout.splitlines()[-6:]))
        assert submitted.returncode == 0, log.read_text()[-5000:]
        assert "succeeded" in submitted.stdout, submitted.stdout[-3000:]
        (start,) = read_records(tmp_path / "launched", "start")
        print(f"[ray launcher] ranks' hosts: {start['hosts']}")
        assert sorted(start["hosts"]) == ["head", "worker"]
        assert (tmp_path / "launched" / FINAL_MODEL).is_file()
        down = run(down_command, env, log)
        assert down.returncode == 0, log.read_text()[-5000:]
        left = machines.leftovers(within=SETTLE_S)
        print(f"[ray launcher] still running on the machines {SETTLE_S} s after `ray down`: {left}")
        assert not left["head"], left
        # `ray down` stops the head's Ray only: an on-premises worker's raylet exits with the head, its helpers
        # do not. The docs' next step (STOP_WORKER, with the test's key) stops them.
        for address in list(machines.machines.addresses.values())[1:]:
            stopped = machines.ssh(address, "ray stop")
            assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        left = machines.leftovers(within=SETTLE_S)
        print(f"[ray launcher] still running after `ray stop` on the worker: {left}")
        assert not any(left.values()), left
    finally:
        if head is not None and any(machines.leftovers().values()):
            run(down_command, env, log, timeout=120)
        machines.stop()
        shutil.rmtree(temp, ignore_errors=True)
