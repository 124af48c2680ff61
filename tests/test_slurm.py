"""launch/slurm/distpose.sbatch as shipped, on a real Slurm of two nodes (tests/slurm_cluster.py): a job trains
on both and ends leaving nothing running; a job cancelled mid-run leaves nothing running, and the same command
submitted again resumes from its latest checkpoint. Each job starts a Ray head and a worker node, and the
training ranks each take a node's 2 CPUs. (~3 min: the cluster 2 s, each job about 60 s.)"""

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
from machines import Machines
from slurm_cluster import Slurm, missing_tools

from distpose.metrics_log import read_records
from distpose.train.checkpoints import FINAL_MODEL, newest_complete_checkpoint

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SBATCH = "launch/slurm/distpose.sbatch"
JOB_S = 400
STOP_S = 60  # Slurm's KillWait is 30 s


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("needs root: the test's machines are network namespaces, and Slurm's daemons run as root")
    if missing := missing_tools():
        pytest.fail(f"not installed: {', '.join(missing)} (`make test-tools` installs Slurm and munge)")
    temp = Path(tempfile.mkdtemp(prefix="distpose-slurm-", dir="/tmp"))  # short paths: Unix sockets live here
    machines = Machines(["node1", "node2"], temp / "machines")
    cluster = Slurm(temp / "slurm", machines, cpus=2)
    cluster.env["VENV"] = sys.prefix  # the script's venv: this interpreter's
    try:
        machines.start()
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        machines.stop()
        shutil.rmtree(temp, ignore_errors=True)


def submit(slurm: Slurm, synth_shards: Path, storage: Path, run: str, epochs: int) -> str:
    """The script as the docs submit it, sized by sbatch options; its venv is this interpreter's."""
    return slurm.run("sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=2",
                    f"--output={storage}/slurm-%j.log", SBATCH, "quick/cnn", f"data.shards={synth_shards}",
                    f"train.storage={storage}", f"train.run_name={run}", "train.workers=2",
                    "train.cpus_per_worker=2", f"train.epochs={epochs}", "data.batches_per_epoch=3",
                    "data.loader_workers=0", "eval.every_epochs=0", cwd=ROOT).strip()


def job_log(storage: Path, job: str) -> str:
    return (storage / f"slurm-{job}.log").read_text(errors="replace")


def test_a_job_trains_on_both_nodes_and_leaves_nothing_running(slurm, synth_shards, tmp_path):
    started = time.monotonic()
    job = submit(slurm, synth_shards, tmp_path, "two_nodes", epochs=2)
    try:
        state = slurm.wait(job, JOB_S)
        took = time.monotonic() - started
        log = job_log(tmp_path, job)
        print(f"\n[slurm] job {job}: {state['JobState']} exit {state['ExitCode']} on {state['NodeList']} in "
              f"{took:.0f} s; its log ends:\n" + "\n".join(log.splitlines()[-8:]))
        assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
        (start,) = read_records(tmp_path / "two_nodes", "start")
        print(f"[slurm] ranks' hosts: {start['hosts']}")
        assert sorted(start["hosts"]) == ["node1", "node2"]
        assert (tmp_path / "two_nodes" / FINAL_MODEL).is_file()
        discovery = Path(f"/tmp/ray-{job}/prom_metrics_service_discovery.json")
        targets = discovery.read_text()
        print(f"[slurm] {discovery}: {targets.strip()}")
        assert all(f"{address}:8080" in targets for address in slurm.machines.addresses.values())
        left = slurm.leftovers(within=STOP_S)
        print(f"[slurm] still running on the nodes after the job: {left}")
        assert not any(left.values()), left
    finally:
        shutil.rmtree(f"/tmp/ray-{job}", ignore_errors=True)


def test_a_cancelled_job_leaves_nothing_running_and_its_resubmission_resumes(slurm, synth_shards, tmp_path):
    run_dir = tmp_path / "cancelled"
    jobs = [submit(slurm, synth_shards, tmp_path, "cancelled", epochs=6)]
    try:
        deadline = time.monotonic() + JOB_S
        while newest_complete_checkpoint(str(run_dir)) is None or \
                max((r["step"] for r in read_records(run_dir, "step")), default=0) < 4:
            assert time.monotonic() < deadline and slurm.job(jobs[0])["JobState"] in ("PENDING", "RUNNING"), \
                job_log(tmp_path, jobs[0])[-4000:]
            time.sleep(0.5)
        cancelled_after = max(r["step"] for r in read_records(run_dir, "step"))
        slurm.run("scancel", jobs[0])
        state = slurm.wait(jobs[0], STOP_S)
        left = slurm.leftovers(within=STOP_S)
        print(f"\n[slurm] job {jobs[0]} cancelled after step {cancelled_after}: {state['JobState']}; still running "
              f"on the nodes: {left}")
        assert state["JobState"] == "CANCELLED"
        assert not any(left.values()), left

        jobs.append(submit(slurm, synth_shards, tmp_path, "cancelled", epochs=6))
        state = slurm.wait(jobs[1], JOB_S)
        log = job_log(tmp_path, jobs[1])
        assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
        starts = read_records(run_dir, "start")
        steps = sorted({r["step"] for r in read_records(run_dir, "step")})
        print(f"[slurm] resubmitted as job {jobs[1]}: {state['JobState']}; {starts[-1]['resumed_from']}")
        assert len(starts) == 2 and starts[1]["resumed_from"].startswith("latest checkpoint of this run")
        assert 3 <= starts[1]["step"] <= cancelled_after and steps == list(range(1, 19))
        assert (run_dir / FINAL_MODEL).is_file()
        assert not any(slurm.leftovers(within=STOP_S).values())
    finally:
        for job in jobs:
            shutil.rmtree(f"/tmp/ray-{job}", ignore_errors=True)
