"""A Ray cluster of several nodes on this machine (`ray start --head` with no CPUs, and `ray start --address`
worker nodes of one CPU each): one `distpose train --address` over two nodes, scraped by a real Prometheus
server that finds every node's metrics endpoint through the head's service-discovery file, and a node killed
mid-run, with a fixed and with an elastic number of workers; and a cluster with token authentication on. (~4.5 min:
the cluster 20 s, the fixed run 70 s, the elastic run 120 s, the token cluster and its runs 45 s.)"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from exactness import largest_difference, step_losses
from helpers import free_port
from prometheus_server import Prometheus

from distpose.config import load_config
from distpose.data.passes import instance_digest, split_instances
from distpose.metrics_log import read_records
from distpose.train.batches import TrainingBatches

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).parent / "ray")


def node_ip() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # a routable address; nothing is sent
        probe.connect(("10.255.255.255", 1))
        return probe.getsockname()[0]


class Nodes:
    """A head node with no CPUs (the GCS, the driver's node and so Ray Train's controller) and worker nodes
    of one CPU each, every one a `ray start --block` in its own process group: killing the group kills the
    node, its raylet and its workers, as a preempted machine would go."""

    def __init__(self, temp: Path, env: dict[str, str]):
        self.temp, self.env, self.ip = temp, env, node_ip()
        self.address = f"{self.ip}:{free_port()}"
        self.processes: list[subprocess.Popen] = []
        self.targets: dict[int, str] = {}  # node pid -> its metrics endpoint

    def start(self, workers: int) -> None:
        # A dead node is declared dead after 2 missed health checks 1 s apart (Ray's default: 5 x 3 s), and
        # metrics reach the endpoints every second (Ray's default: 10 s).
        config = ('--system-config={"health_check_period_ms": 1000, "health_check_failure_threshold": 2, '
                  '"metrics_report_interval_ms": 1000}')
        self.head = self._start(["--head", f"--port={self.address.rsplit(':', 1)[1]}", "--num-cpus=0",
                                 f"--dashboard-port={free_port()}", config])
        for _ in range(workers):
            self.add_worker()

    def _start(self, options: list[str]) -> subprocess.Popen:
        metrics = free_port()
        # The dashboard agent's port too: Ray's default for it, 52365, lies in the range free_port draws from,
        # and a metrics port drawn there made the head exit at once.
        command = [RAY, "start", "--block", "--disable-usage-stats", f"--temp-dir={self.temp}",
                   f"--node-ip-address={self.ip}", f"--metrics-export-port={metrics}",
                   f"--dashboard-agent-listen-port={free_port()}", *options]
        self.temp.mkdir(parents=True, exist_ok=True)
        log = self.temp / f"node{len(self.processes)}.log"  # removed with the rest of the temp directory
        with log.open("wb") as out:
            node = subprocess.Popen(command, env=self.env, start_new_session=True, stdout=out,
                                    stderr=subprocess.STDOUT)
        self.processes.append(node)
        self.targets[node.pid] = f"{self.ip}:{metrics}"
        deadline = time.monotonic() + 120
        while not answers(f"{self.ip}:{metrics}"):
            assert time.monotonic() < deadline and node.poll() is None, \
                f"node {command} did not start: {log.read_text()[-2000:]}"
            time.sleep(0.5)
        return node

    def add_worker(self) -> subprocess.Popen:
        return self._start([f"--address={self.address}", "--num-cpus=1"])

    def kill(self, node: subprocess.Popen) -> None:
        """SIGKILL the node's every process at once (its raylet starts workers in sessions of their own)."""
        processes = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(processes, timeout=10)
        node.wait()

    def stop(self) -> None:
        for node in reversed(self.processes):
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.wait(timeout=5)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
        shutil.rmtree(self.temp, ignore_errors=True)


@contextlib.contextmanager
def running_nodes(name: str, workers: int, **env: str) -> Iterator[Nodes]:
    """A head and `workers` worker nodes, with this environment less Ray's address and authentication settings,
    plus `env`; stopped, and their temporary directory removed, however they end (a head that never starts too)."""
    ignored = ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
               "RAY_AUTH_TOKEN_PATH")
    cluster = Nodes(Path("/tmp") / f"ray-distpose-{name}-{os.getpid()}",
                    {**{k: v for k, v in os.environ.items() if k not in ignored}, **env})
    try:
        cluster.start(workers)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def nodes():
    with running_nodes("nodes", workers=2, RAY_AUTH_MODE="disabled") as cluster:
        yield cluster


def answers(target: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=5):
            return True
    except OSError:
        return False


def ranks_training(prometheus: Prometheus, run: str) -> dict[str, set[str]]:
    """Endpoint (Prometheus's instance label) -> the ranks whose samples it exports."""
    out: dict[str, set[str]] = defaultdict(set)
    for r in prometheus.query(f'ray_distpose_train_samples_total{{run="{run}"}} > 0'):
        out[r["metric"]["instance"]].add(r["metric"]["rank"])
    return out


EVERY = 7
EXACT = [f"train.checkpoint_every_steps={EVERY}"]  # a lost node then costs at most this many steps


def train_command(nodes: Nodes, synth_shards: Path, storage: Path, run: str, *extra: str) -> list[str]:
    """`distpose train` of a tiny CNN on `nodes`, one CPU a rank; `extra` overrides."""
    return [sys.executable, "-m", "distpose", "train", "model.backbone=cnn_small", "data.input_size=[64,48]",
            "data.heatmap_size=[16,12]", "data.loader_workers=0", f"data.shards={synth_shards}",
            f"train.storage={storage}", f"train.run_name={run}", "train.cpus_per_worker=1", "data.batch_size=8",
            "eval.every_epochs=0", "train.start_timeout_s=120", *extra, "--address", nodes.address]


def train_losing_a_node(nodes: Nodes, synth_shards: Path, tmp_path: Path, run: str, workers: str, *extra: str,
                        join_when, epochs: int = 4, per_epoch: int = 10, prometheus: Prometheus | None = None,
                        stop_when=None) -> dict:
    """Train on the two worker nodes; once an epoch-1 checkpoint is registered and the next epoch is under way
    (and, with `prometheus`, once it has scraped a rank's samples from each worker node's endpoint), kill the
    node of a rank (not the head: it holds the controller); a replacement node joins once
    `join_when(seconds since the kill, records since the kill)` says so. With `stop_when(records since the kill)`,
    the run is stopped by Ctrl-C (SIGINT) once that holds, instead of training to its end: its length then need
    not outlast Ray's resize decisions. Returns what happened, from rank 0's metrics.jsonl and the endpoints."""
    command = train_command(nodes, synth_shards, tmp_path, run, f"train.workers={workers}", f"train.epochs={epochs}",
                            f"data.batches_per_epoch={per_epoch}", "train.max_failures=3", *extra)
    log, run_dir = tmp_path / "train.log", tmp_path / run
    with log.open("w") as out:
        trainer = subprocess.Popen(command, env={**nodes.env, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"},
                                   stdout=out, stderr=subprocess.STDOUT)
    seen: dict[str, set[str]] = defaultdict(set)  # scraped endpoint -> ranks whose samples it exported
    workers_of = {nodes.targets[n.pid] for n in nodes.processes[1:] if n.poll() is None}

    def ready() -> bool:
        if not any(r["kind"] == "step" and r["step"] >= per_epoch + 3 for r in read_records(run_dir)):
            return False
        if prometheus is not None:
            for target, ranks in ranks_training(prometheus, run).items():
                seen[target] |= ranks
            return set(seen) == workers_of
        return True

    try:
        deadline = time.monotonic() + 300
        while not ready():
            assert trainer.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        alive = [n for n in nodes.processes[1:] if n.poll() is None]
        victim = alive[0]
        killed_at, before = time.time(), len(read_records(run_dir))
        nodes.kill(victim)
        while not join_when(time.time() - killed_at, read_records(run_dir)[before:]):
            assert trainer.poll() is None and time.time() - killed_at < 180, log.read_text()[-3000:]
            time.sleep(0.2)
        joined_at = time.time()
        nodes.add_worker()
        if stop_when is not None:
            while not stop_when(read_records(run_dir)[before:]):
                assert trainer.poll() is None and time.time() - joined_at < 300, log.read_text()[-3000:]
                time.sleep(0.2)
            trainer.send_signal(signal.SIGINT)
        trainer.wait(timeout=300)
    finally:
        if trainer.poll() is None:
            trainer.kill()
    assert trainer.returncode == (0 if stop_when is None else 130), log.read_text()[-3000:]
    lines = read_records(run_dir)
    starts = [i for i, r in enumerate(lines) if r["kind"] == "start"]
    steps = [r for r in lines if r["kind"] == "step"]
    last = epochs * per_epoch if stop_when is None else max(r["step"] for r in steps)
    assert sorted({r["step"] for r in steps}) == list(range(1, last + 1))
    restart = lines[starts[1]]
    # The last step on record before the restart: a step can still finish between a look at the log and the kill.
    killed_after = max(r["step"] for r in lines[: starts[1]] if r["kind"] == "step")
    first_after = next(r for r in lines[starts[1]:] if r["kind"] == "step")
    return {"starts": [lines[i] for i in starts], "killed_after": killed_after, "killed_at": killed_at,
            "joined_at": joined_at, "redone": len(steps) - last, "restart": restart,
            "recovery_s": first_after["time"] - killed_at, "steps": steps, "lines": lines, "seen": dict(seen),
            "workers": workers_of}


def test_a_run_over_two_nodes_is_discovered_and_waits_for_a_replacement_of_a_lost_node(nodes, synth_shards, tmp_path):
    """Two ranks on two worker nodes, scraped by a Prometheus server that follows the head's discovery file: each
    worker node's endpoint exports one rank's samples. A fixed-size run (train.workers=2) that loses a node waits
    for a replacement and resumes from the latest checkpoint, redoing at most train.checkpoint_every_steps steps,
    and ends bit for bit where the same run never killed ends; once it is done, the driver's node (the head)
    exports the finished state. ~110 s."""
    discovery = (nodes.temp / "session_latest").resolve() / "prom_metrics_service_discovery.json"
    prometheus = Prometheus(tmp_path / "prometheus", discovery)
    try:
        seen = train_losing_a_node(nodes, synth_shards, tmp_path, "fixed", "2", *EXACT, join_when=lambda s, _: s > 8,
                                   per_epoch=40, epochs=4, prometheus=prometheus)
        deadline = time.monotonic() + 30
        while not (finished := prometheus.query('ray_distpose_run_state{run="fixed", state="finished"} == 1')):
            assert time.monotonic() < deadline, "the finished state never reached Prometheus"
            time.sleep(0.5)
        targets = {t["labels"]["instance"]: t["health"] for t in prometheus.targets()}
    finally:
        prometheus.stop()
    print(f"\n[prometheus] targets discovered: {targets}; endpoint -> ranks seen training there: {seen['seen']}")
    assert set(seen["seen"]) == seen["workers"], seen["seen"]
    assert sorted(r for ranks in seen["seen"].values() for r in ranks) == ["0", "1"]
    assert nodes.targets[nodes.head.pid] in targets, "the head's endpoint was never discovered"
    exported_by = [r["metric"]["instance"] for r in finished]
    assert exported_by == [nodes.targets[nodes.head.pid]], f"not exported by the driver's node: {exported_by}"

    worlds = [s["world_size"] for s in seen["starts"]]
    print(f"\n[node lost, train.workers=2] killed a node after step {seen['killed_after']}; world sizes {worlds}; "
          f"resumed at step {seen['restart']['step']} when the replacement joined "
          f"({seen['joined_at'] - seen['killed_at']:.1f} s after the kill); steps redone: {seen['redone']}; "
          f"recovery (kill -> first step after): {seen['recovery_s']:.1f} s")
    assert worlds == [2, 2]
    assert seen["restart"]["resumed_from"].startswith("latest checkpoint of this run")
    # It waited for the replacement: no step ran between the kill and the join.
    assert seen["recovery_s"] > seen["joined_at"] - seen["killed_at"]
    assert 0 <= seen["redone"] <= seen["killed_after"] - seen["restart"]["step"]
    assert seen["redone"] <= EVERY

    # The same run never killed, on the same nodes: the resumed run ends bit for bit where it ends.
    unkilled = subprocess.run(train_command(nodes, synth_shards, tmp_path, "unkilled", "train.workers=2",
                                            "train.epochs=4", "data.batches_per_epoch=40", *EXACT),
                              env=nodes.env, capture_output=True, text=True, timeout=300, check=False)
    assert unkilled.returncode == 0, unkilled.stdout[-3000:] + unkilled.stderr[-3000:]
    difference = largest_difference(tmp_path / "fixed", tmp_path / "unkilled", 160, tmp_path)
    ours, theirs = step_losses(tmp_path / "fixed"), step_losses(tmp_path / "unkilled")
    print(f"[node lost, train.workers=2] against the unkilled run: largest weight/optimizer difference {difference}; "
          f"steps whose losses differ: {sorted(s for s in ours if ours[s] != theirs[s])}")
    assert difference == 0.0 and ours == theirs


def pass_digests(shards: Path, batch: int, per_epoch: int, epochs: int) -> list[tuple[int, int]]:
    """(instances, instance digest) of each epoch of the pass order, drawn here on one rank."""
    cfg = load_config(None, [f"data.shards={shards}", "data.order=pass", f"data.batch_size={batch}",
                             f"data.batches_per_epoch={per_epoch}", "data.loader_workers=0", "train.workers=1"])
    batches = TrainingBatches(cfg, 0, 1, 0)
    epochs_drawn = [[next(batches) for _ in range(per_epoch)] for _ in range(epochs)]
    batches.loader.close()
    return [(sum(len(b["instance_id"]) for b in bs), sum(instance_digest(b["image_id"], b["instance_id"]) for b in bs))
            for bs in epochs_drawn]


def test_an_elastic_run_goes_on_without_the_lost_node_and_grows_back(nodes, synth_shards, tmp_path):
    """ZeRO 2, train.workers=[1, 2], the pass order, a checkpoint every 5 steps in epochs of 13: on the surviving
    node without waiting for a replacement (its state resharded 2 -> 1 rank, 2 micro-batches accumulated per
    step), then back on two nodes (1 -> 2) once a node joins. Every epoch, the ones resumed within included,
    trains on the instances the pass order gives it, each once; a step redone on 1 rank trains on the batch the
    2 ranks trained on, from the same weights, so its loss is theirs. Ray Train sizes an elastic group from its
    autoscaling coordinator's view of the nodes, refreshed every 20 s: until then a start may ask for the lost node
    and wait train.start_timeout_s. ~100 s."""
    batch = 4
    per_epoch = sum(s.instances for s in split_instances(str(synth_shards), "train")) // batch

    def on_one_rank(_, since_kill: list[dict]) -> bool:
        # A step after the 1-rank start: a 2-rank step that ended as the node was killed is on record after it.
        starts = [i for i, r in enumerate(since_kill) if r["kind"] == "start" and r["world_size"] == 1]
        return bool(starts) and any(r["kind"] == "step" for r in since_kill[starts[0]:])

    def back_on_two_ranks_for_an_epoch(since_kill: list[dict]) -> bool:
        starts = [i for i, r in enumerate(since_kill) if r["kind"] == "start"]
        return len(starts) >= 2 and since_kill[starts[-1]]["world_size"] == 2 and any(
            r["kind"] == "epoch" for r in since_kill[starts[-1]:])

    # Long enough for any resize delay (a 400-step run once ended on 1 rank before Ray grew it back); stopped by
    # Ctrl-C once it has ended an epoch on 2 ranks again.
    seen = train_losing_a_node(nodes, synth_shards, tmp_path, "elastic", "[1,2]", "train.zero_stage=2",
                               "train.elastic_resize_interval_s=3", "train.start_timeout_s=10",
                               "train.max_failures=6", "data.order=pass", f"data.batch_size={batch}",
                               "train.checkpoint_every_steps=5", join_when=on_one_rank, epochs=100,
                               per_epoch=per_epoch, stop_when=back_on_two_ranks_for_an_epoch)
    starts = seen["starts"]
    worlds = [(s["world_size"], s["grad_accum"], s["micro_batch"]) for s in starts]
    shrink_s = next(r["time"] for r in seen["lines"][seen["lines"].index(starts[1]):] if r["kind"] == "step") \
        - seen["killed_at"]
    print(f"\n[node lost, train.workers=[1,2]] killed a node after step {seen['killed_after']}; (world size, "
          f"accumulation, micro-batch) per start {worlds}; first step on 1 rank {shrink_s:.1f} s after the kill; "
          f"steps redone: {seen['redone']}; resumed from: {[s['resumed_from'] for s in starts[1:]]}")
    assert worlds[:3] == [(2, 1, 2), (1, 2, 2), (2, 1, 2)], worlds  # 4 samples a step at every size
    assert shrink_s < seen["joined_at"] - seen["killed_at"]  # it went on before any node joined
    print(f"[node lost, train.workers=[1,2]] the replacement joined {seen['joined_at'] - seen['killed_at']:.1f} s "
          f"after the kill; back on 2 ranks at step {starts[2]['step']}")
    assert "resharded for 1" in starts[1]["resumed_from"] and "resharded for 2" in starts[2]["resumed_from"]
    assert all(r["samples_per_s"] > 0 for r in seen["steps"])

    within = [s["step"] for s in starts[1:] if s["step"] % per_epoch]
    epochs = {r["epoch"]: r for r in seen["lines"] if r["kind"] == "epoch"}  # an epoch redone: its last record
    expected = pass_digests(synth_shards, batch, per_epoch, max(epochs))
    print(f"[node lost, train.workers=[1,2]] epochs of {per_epoch} steps; resumed within an epoch at step(s) "
          f"{within}; epochs whose instances differ from the pass order's: "
          f"{[e for e, r in epochs.items() if (r['instances'], r['instance_digest']) != expected[e - 1]]} "
          f"of {sorted(epochs)}")
    assert within, "no resume came from a checkpoint within an epoch"
    assert all((r["instances"], r["instance_digest"]) == expected[e - 1] for e, r in epochs.items())
    assert all(n == per_epoch * batch for n, _ in expected)

    # The steps the 1-rank attempt redid: the same global batch, cut into 2 micro-batches instead of 2 ranks.
    cut = seen["lines"].index(starts[1])
    before = {r["step"]: r["loss"] for r in seen["lines"][:cut] if r["kind"] == "step"}
    after = {r["step"]: r["loss"] for r in seen["lines"][cut:] if r["kind"] == "step"}
    redone = sorted(set(before) & set(after))
    print(f"[node lost, train.workers=[1,2]] steps redone on 1 rank: {redone}; their losses on 2 ranks and on 1: "
          f"{[(before[s], after[s]) for s in redone]}")
    assert all(abs(before[s] - after[s]) <= 1e-4 * abs(before[s]) for s in redone)


def test_a_driver_joins_a_token_cluster_with_the_token_and_fails_in_one_line_without(synth_shards, tmp_path):
    """A cluster with Ray's token authentication on (`ray start --head` turns it on wherever a token exists, as
    ~/.ray/auth_token does after any local Ray; joining nodes need RAY_AUTH_MODE=token). A driver with the token in
    ~/.ray/auth_token trains there; without a token, with a wrong one (RAY_AUTH_TOKEN), or with
    RAY_AUTH_MODE=disabled, it stops at once with one line naming the fix (Ray itself would retry for about 20 s,
    printing raw gcs_client lines). (tests/test_slurm.py's jobs join with RAY_AUTH_TOKEN.) ~45 s."""
    head_home, driver_home = tmp_path / "head-home", tmp_path / "driver-home"
    driver_home.mkdir()
    subprocess.run([RAY, "get-auth-token", "--generate"], env={**os.environ, "HOME": str(head_home)}, check=True,
                   capture_output=True)
    token = (head_home / ".ray" / "auth_token").read_text().strip()
    with running_nodes("token", workers=1, HOME=str(head_home), RAY_AUTH_MODE="token") as cluster:
        command = train_command(cluster, synth_shards, tmp_path, "token", "train.workers=1", "train.epochs=1",
                                "data.batches_per_epoch=2")
        driver = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"} | {"HOME": str(driver_home)}
        for case, env, reason in [("no token", {}, "this machine has none"),
                                  ("a wrong token", {"RAY_AUTH_TOKEN": "0" * len(token)}, "rejected"),
                                  ("RAY_AUTH_MODE=disabled", {"HOME": str(head_home), "RAY_AUTH_MODE": "disabled"},
                                   "RAY_AUTH_MODE=disabled here")]:
            started = time.monotonic()
            result = subprocess.run(command, check=False, env={**driver, **env}, capture_output=True, text=True,
                                    timeout=60)
            took = time.monotonic() - started
            print(f"\n[token auth] {case}: exit {result.returncode} after {took:.1f} s: {result.stderr.strip()}")
            assert result.returncode == 2, result.stderr[-3000:]
            assert result.stderr.count("\n") == 1 and reason in result.stderr, result.stderr
            assert "ray get-auth-token" in result.stderr and "gcs_client" not in result.stdout + result.stderr
            assert took < 10, "Ray's own retries (about 20 s) ran"
        (driver_home / ".ray").mkdir()
        (driver_home / ".ray" / "auth_token").write_text(token)
        result = subprocess.run(command, check=False, env=driver, capture_output=True, text=True, timeout=300)
        print(f"[token auth] the token in ~/.ray/auth_token: exit {result.returncode}: "
              f"{result.stderr.strip().splitlines()[-1:]}")
        assert result.returncode == 0, result.stderr[-3000:]
        assert (tmp_path / "token" / "final.pt").is_file()
