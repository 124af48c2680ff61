"""A two-node Ray cluster on this machine (`ray start --head` and `ray start --address`, two raylets with
one CPU each), one `distpose train --address` over both, and Prometheus-style discovery of both nodes'
metrics endpoints through the head's service-discovery file."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest

from distpose.monitor.metrics import scrape

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # a routable address; nothing is sent
        probe.connect(("10.255.255.255", 1))
        return probe.getsockname()[0]


@pytest.fixture
def two_nodes(tmp_path):
    """(GCS address, head temp dir, environment, the two nodes' metrics targets) of a head and a worker node,
    returned once both nodes' metrics agents answer; both nodes are stopped afterwards."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env["RAY_AUTH_MODE"] = "disabled"  # the same on every machine, whether or not ~/.ray holds a token
    temp = Path("/tmp") / f"ray-distpose-{os.getpid()}-{tmp_path.name[-8:]}"  # socket paths must stay short
    gcs_port, head_metrics, worker_metrics = free_port(), free_port(), free_port()
    ip = node_ip()
    address = f"{ip}:{gcs_port}"
    targets = {f"{ip}:{head_metrics}", f"{ip}:{worker_metrics}"}
    common = ["--block", "--num-cpus=1", "--disable-usage-stats", f"--temp-dir={temp}", f"--node-ip-address={ip}"]
    head = [RAY, "start", "--head", f"--port={gcs_port}", f"--dashboard-port={free_port()}",
            f"--metrics-export-port={head_metrics}", '--system-config={"metrics_report_interval_ms": 1000}', *common]
    worker = [RAY, "start", f"--address={address}", f"--metrics-export-port={worker_metrics}", *common]
    nodes = [subprocess.Popen(head, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT)]
    try:
        nodes.append(subprocess.Popen(worker, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.STDOUT))  # it waits for the head's GCS by itself
        deadline = time.monotonic() + 120
        while not all(answers(target) for target in targets):
            assert time.monotonic() < deadline, f"the nodes' metrics agents never answered: {targets}"
            assert all(node.poll() is None for node in nodes), "a ray start exited"
            time.sleep(1)
        yield address, temp, env, targets
    finally:
        # SIGTERM to `ray start --block` alone: the worker node drains through the GCS and stops in about a second
        # (sent to the whole group, it kills the GCS it is about to ask and waits 30 s for it). The head drains
        # for 30 s after a run, which a test need not wait for: what is left of a group after 5 s is killed.
        for node in reversed(nodes):
            node.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(timeout=5)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def discovered_targets(temp: Path) -> list[str]:
    path = temp / "prom_metrics_service_discovery.json"  # where launch/prometheus.yml points, for this temp dir
    if not path.is_file():
        return []
    return [t for group in json.loads(path.read_text()) for t in group["targets"]]


def answers(target: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=5):
            return True
    except OSError:
        return False


def samples_at(target: str) -> list:
    try:
        return scrape(f"http://{target}/metrics", timeout=5)
    except OSError:  # the dashboard's own target, or a node going away
        return []


def ranks_training_at(target: str, run: str) -> set[str]:
    return {s.labels["rank"] for s in samples_at(target)
            if s.name == "ray_distpose_train_samples_total" and s.labels.get("run") == run and s.value > 0}


def test_one_run_trains_on_both_nodes_and_both_are_discovered(two_nodes, synth_shards, tmp_path):
    address, temp, env, node_targets = two_nodes
    run = "two_nodes"
    command = [sys.executable, "-m", "distpose", "train", "model.backbone=cnn_small", "data.input_size=[64,48]",
               "data.heatmap_size=[16,12]", "data.loader_workers=0", f"data.shards={synth_shards}",
               f"train.storage={tmp_path}", f"train.run_name={run}", "train.workers=2", "train.cpus_per_worker=1",
               "data.batch_size=8", "train.epochs=2", "data.batches_per_epoch=60", "eval.every_epochs=0",
               "--address", address]
    log = tmp_path / "train.log"
    with log.open("w") as out:  # a file, not a pipe nobody reads while polling
        trainer = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    seen: dict[str, set[str]] = defaultdict(set)  # discovered endpoint -> ranks whose samples it exported
    while trainer.poll() is None:
        for target in discovered_targets(temp):
            seen[target] |= ranks_training_at(target, run)
        time.sleep(1)
    assert trainer.returncode == 0, log.read_text()[-3000:]
    # The driver left the cluster only once its node's endpoint showed the run finished.
    finished = [t for t in node_targets if any(s.name == "ray_distpose_run_state" and s.labels.get("run") == run
                                               and s.labels["state"] == "finished" and s.value == 1
                                               for s in samples_at(t))]
    assert len(finished) == 1, f"the finished state is not exported by the driver's node: {finished}"

    print(f"\nendpoints discovered -> ranks seen training there: {dict(seen)}")
    training = {target: ranks for target, ranks in seen.items() if ranks}
    assert set(training) == node_targets, f"expected the two nodes' endpoints to export one rank each: {dict(seen)}"
    assert sorted(r for ranks in training.values() for r in ranks) == ["0", "1"]
