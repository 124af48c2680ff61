"""Exact resume: a run killed at a random step, in each way a run dies, and resumed, ends bit for bit where the run
that was never killed ends. Compared: the final model's weights, every tensor of the last checkpoint (DeepSpeed's
weights and optimizer state, each rank's ZeRO partition) and every step's loss, the redone steps' included.

The runs stream the synthetic shards through a loader worker a rank, 2 ranks on gloo, and save every 3 steps as well
as at the end of each 20-step epoch: kills land mid-epoch, between checkpoints, and during a checkpoint's write. One
case runs the pass order (data.order=pass), whose stream is not restarted at saves. A driver attached to a cluster is
stopped by Ctrl-C and, in another case, SIGKILLed. Each case prints the step it was killed after, the steps redone
and the largest difference. Then one run meets five faults in a random order (seven on S3, with the server paused
twice), and last, one meets an S3 outage longer than the storage clients' waits. Node loss is in
tests/test_cluster.py (it needs a cluster of several nodes). About 13 minutes here.
"""

import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from exactness import largest_difference, step_losses

from distpose.config import load_config
from distpose.metrics_log import read_records
from distpose.train.checkpoints import PARTIAL_CHECKPOINT_PREFIX
from distpose.train.driver import run_dir, train

pytestmark = pytest.mark.integration

EPOCHS, PER_EPOCH, EVERY = 2, 20, 3
TOTAL = EPOCHS * PER_EPOCH
# Kill after one of these (drawn at random): the newest checkpoint is then one within the first epoch (3 ... 12), even
# if the kill lands a step late or during the next save, so the resume is from a mid-epoch stream restart; and the
# 28 or more steps left (10 s here) outlast a Ctrl-C's stop, so an interrupted run cannot finish first.
KILL_AFTER = [4, 5, 7, 8, 10, 11]


def overrides(shards: Path | str, storage: Path | str, name: str, stage: int) -> list[str]:
    return ["model.backbone=cnn_small", "data.input_size=[64,48]", "data.heatmap_size=[16,12]", f"data.shards={shards}",
            "data.loader_workers=1", "data.batch_size=8", "eval.every_epochs=0", "train.log_every=1000",
            "train.cpus_per_worker=1", "train.workers=2", f"train.zero_stage={stage}", f"train.epochs={EPOCHS}",
            f"data.batches_per_epoch={PER_EPOCH}", f"train.checkpoint_every_steps={EVERY}",
            "train.keep_checkpoints=100", "train.max_failures=2", f"train.storage={storage}", f"train.run_name={name}"]


# The pass order (data.order=pass) with batches small enough for 20-step epochs of one pass over the synthetic
# split: its stream goes on through saves instead of restarting at them.
PASS_ORDER = ("data.order=pass", "data.batch_size=2")


def command(shards: Path, storage: Path, name: str, stage: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "distpose", "train", *overrides(shards, storage, name, stage), *extra]


@pytest.fixture(scope="module")
def reference(ray_session, synth_shards, tmp_path_factory) -> Callable[..., Path]:
    """The run directory of the run never killed, at a ZeRO stage and with `extra` overrides (trained on first
    use)."""
    runs: dict[tuple[int, tuple[str, ...]], Path] = {}

    def at(stage: int, extra: tuple[str, ...] = ()) -> Path:
        if (stage, extra) not in runs:
            storage = tmp_path_factory.mktemp(f"reference{stage}")
            start = time.perf_counter()
            outcome = train(load_config(None, [*overrides(synth_shards, storage, "reference", stage), *extra]))
            print(f"\n[exact] reference at ZeRO {stage} {' '.join(extra)}: {time.perf_counter() - start:.1f} s")
            assert outcome.trained
            runs[stage, extra] = Path(outcome.run_dir)
        return runs[stage, extra]

    return at


def check_exact(label: str, run: Path, reference: Path, killed_after: int | None, kills: int = 1) -> None:
    """The `run`, killed `kills` times and resumed, equals `reference`; prints what was redone. With one kill,
    `killed_after` (the last step before it) bounds where it resumed."""
    starts = read_records(run, "start")
    assert len(starts) == kills + 1, f"{label}: {len(starts)} starts for {kills} kill(s)"
    resumed_at = [s["step"] for s in starts[1:]]  # 0 after a kill before the first checkpoint: a fresh start, rightly
    steps = read_records(run, "step")
    redone = len(steps) - TOTAL
    difference = largest_difference(run, reference, TOTAL, run.parent)
    ours, theirs = step_losses(run), step_losses(reference)
    print(f"[exact] {label}: killed after step {killed_after}; resumed at step(s) {resumed_at}; steps redone: "
          f"{redone}; largest weight/optimizer difference: {difference}")
    assert sorted(ours) == list(range(1, TOTAL + 1))
    assert {s: v for s, v in ours.items() if v != theirs[s]} == {}, "losses differ from the unkilled run's"
    assert difference == 0.0
    assert 0 <= redone <= EVERY * kills
    if killed_after is not None:
        assert killed_after - EVERY <= resumed_at[0] <= killed_after
        assert resumed_at[0] % PER_EPOCH != 0, "resumed at an epoch end: a mid-epoch resume was not tested"


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen | None, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process is None or process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} in {seconds} s"
        time.sleep(0.005)


def _last_step(run: Path | str) -> int:
    steps = read_records(run, "step")
    return steps[-1]["step"] if steps else 0


def _saving(scratch: Path, since: float = 0.0) -> bool:
    """Whether a rank is writing a checkpoint into `scratch` (a partial one changed after `since`, on the clock of
    time.time(): a killed rank's partial checkpoint stays until the driver's next start)."""
    for partial in scratch.glob(PARTIAL_CHECKPOINT_PREFIX + "*"):
        try:
            if partial.stat().st_mtime > since:
                return True
        except FileNotFoundError:
            pass
    return False


@pytest.mark.parametrize(("stage", "when", "extra"), [(3, "step", ()), (0, "save", ()), (0, "step", PASS_ORDER)],
                         ids=["zero3-step", "zero0-save", "zero0-step-pass-order"])
def test_a_killed_worker_resumes_bit_for_bit(reference, synth_shards, tmp_path, stage, when, extra):
    """SIGKILL rank 0 at a random step, or while it writes a checkpoint; Ray Train restarts the workers."""
    at = random.choice(KILL_AFTER)
    cfg = load_config(None, [*overrides(synth_shards, tmp_path, "killed", stage), *extra])
    run = tmp_path / "killed"
    killed: list[int] = []

    def killer() -> None:
        if when == "step":
            _wait_for(lambda: _last_step(run) >= at, None, 300, f"step {at}")
        else:
            _wait_for(lambda: _last_step(run) >= at and _saving(run), None, 300, "checkpoint write")
        killed.append(_last_step(run))
        os.kill(read_records(run, "start")[0]["pid"], signal.SIGKILL)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    assert train(cfg).trained
    thread.join(5)
    assert killed, "the killer never fired"
    failures = read_records(run, "failure")
    print(f"\n[exact] the failure on record: {failures}")
    assert len(failures) == 1 and 0 in failures[0]["ranks"]
    check_exact(f"rank 0 SIGKILLed ({when}), ZeRO {stage} {' '.join(extra)}", run, reference(stage, extra), killed[0])


def test_a_killed_driver_leaves_nothing_running_and_a_rerun_resumes_bit_for_bit(reference, synth_shards, tmp_path):
    """SIGKILL `distpose train` (its own local Ray): within seconds no process of it is left, nothing more is
    written to the run, and the same command resumes it."""
    stage, at = 2, random.choice(KILL_AFTER)
    argv, run = command(synth_shards, tmp_path, "orphaned", stage), tmp_path / "orphaned"
    temporary = Path(tempfile.gettempdir())
    folders_before = set(temporary.glob("distpose-ray-tmp-*"))
    with (tmp_path / "first.log").open("w") as log:
        driver = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for(lambda: _last_step(run) >= at, driver, 300, f"step {at}")
            descendants = psutil.Process(driver.pid).children(recursive=True)
            driver.kill()
            driver.wait()
            killed_at, killed_after = time.monotonic(), _last_step(run)
        finally:
            if driver.poll() is None:
                driver.kill()
    _, alive = psutil.wait_procs(descendants, timeout=10)
    gone_s = time.monotonic() - killed_at
    written = ((run / "metrics.jsonl").stat().st_size, sorted(p.name for p in run.iterdir()))
    time.sleep(3)
    print(f"\n[exact] driver SIGKILLed after step {killed_after}: its {len(descendants)} descendants gone "
          f"{gone_s:.1f} s later; {len(alive)} left")
    assert not alive, [p.pid for p in alive]
    assert ((run / "metrics.jsonl").stat().st_size, sorted(p.name for p in run.iterdir())) == written
    left = set(temporary.glob("distpose-ray-tmp-*")) - folders_before
    assert not left, f"the killed driver's temporary folder is left: {left}"
    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    check_exact(f"driver SIGKILLed, rerun, ZeRO {stage}", run, reference(stage), killed_after)


def _training_processes() -> list[psutil.Process]:
    """The processes of Ray Train controllers and ranks on this machine (Ray titles them `ray::<class>`): the
    state API calls an actor dead before its process has stopped."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        title = " ".join(process.info["cmdline"] or [])
        if title.startswith(("ray::RayTrainWorker", "ray::TrainController")):
            found.append(process)
    return found


@pytest.mark.parametrize("how", ["Ctrl-C", "SIGKILL"])
def test_a_driver_attached_to_a_cluster_stopped_and_rerun_resumes_bit_for_bit(reference, ray_session, synth_shards,
                                                                               tmp_path, how):
    """Ctrl-C, or SIGKILL, on `distpose train` attached to a cluster (`--address`), then the same command again. A
    SIGKILLed driver runs none of its exit code: the cluster ends its job once the driver's connection drops, and
    kills the job's actors, the controller and the ranks; nothing is written to the run after they are gone."""
    stage, at = 0, random.choice(KILL_AFTER)
    address = ray_session.get_runtime_context().gcs_address
    argv, run = command(synth_shards, tmp_path, "interrupted", stage, "--address", address), tmp_path / "interrupted"
    with (tmp_path / "first.log").open("w") as log:
        driver = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for(lambda: _last_step(run) >= at, driver, 300, f"step {at}")
            if how == "Ctrl-C":
                driver.send_signal(signal.SIGINT)
                assert driver.wait(timeout=60) == 130
            else:
                assert _training_processes(), "no training process found to watch"
                driver.kill()
                driver.wait()
                killed_at = time.monotonic()
                _wait_for(lambda: not _training_processes(), None, 60, "end of the job's training processes")
                gone_s = time.monotonic() - killed_at
                written = ((run / "metrics.jsonl").stat().st_size, sorted(p.name for p in run.iterdir()))
                time.sleep(3)
                print(f"\n[exact] attached driver SIGKILLed after step {_last_step(run)}: the processes of its "
                      f"controller and ranks gone {gone_s:.2f} s later")
                assert ((run / "metrics.jsonl").stat().st_size, sorted(p.name for p in run.iterdir())) == written
            killed_after = _last_step(run)
            assert killed_after < TOTAL and not (run / "final.pt").exists(), "the run finished before it was stopped"
        finally:
            if driver.poll() is None:
                driver.kill()
    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    check_exact(f"{how} (attached), rerun, ZeRO {stage}", run, reference(stage), killed_after)


# ---------------------------------------------------------------------------------------------
# chaos

FAULTS = ["kill at a step", "kill mid-save", "kill mid-save", "kill at a step", "kill at a step"]
S3_FAULTS = ["storage paused mid-save", "storage paused mid-read"]
PAUSE_S = 4.0  # shorter than the S3 clients' timeouts: a stall to sit out, not an outage


def _attempt_under_way(run: Path | str, attempt: int, since_step: int) -> bool:
    """Whether the `attempt`-th start of the run has trained past `since_step`."""
    return len(read_records(run, "start")) >= attempt and _last_step(run) > since_step


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_a_run_meeting_random_faults_ends_bit_for_bit(reference, object_store, synth_shards, tmp_path, storage):
    """One run meets faults in a random order at random steps: rank 0 SIGKILLed at a step or while it writes a
    checkpoint (Ray Train restarts the workers from the newest complete checkpoint) and, on object storage, the S3
    server paused (SIGSTOP, then SIGCONT) while a checkpoint is uploaded and while shards are read. It ends bit
    for bit where the unkilled run ends, and no incomplete checkpoint was resumed."""
    stage = 2
    faults = FAULTS + (S3_FAULTS if storage == "s3" else [])
    random.shuffle(faults)
    if storage == "s3":
        client = object_store.client()
        for path in synth_shards.iterdir():
            client.upload_file(str(path), object_store.bucket, f"chaos-shards/{path.name}")
        shards, store = object_store.uri("chaos-shards"), object_store.uri(f"chaos-{random.getrandbits(32):08x}")
        scratch = Path(tempfile.gettempdir()) / "distpose-runs" / "chaos"
    else:
        shards, store, scratch = str(synth_shards), str(tmp_path), tmp_path / "chaos"
    kills = sum(f.startswith("kill") for f in faults)
    cfg = load_config(None, [*overrides(shards, store, "chaos", stage), f"train.max_failures={kills}"])
    run = run_dir(cfg)
    met: list[str] = []

    def chaos() -> None:
        attempt = 1
        for fault in faults:
            since = _last_step(run)
            _wait_for(lambda a=attempt, s=since: _attempt_under_way(run, a, s), None, 300, "progress")
            if fault == "kill at a step":
                target = _last_step(run) + random.randint(1, EVERY)
                _wait_for(lambda t=target: _last_step(run) >= t, None, 300, f"step {target}")
            elif fault.endswith("mid-save"):
                now = time.time()
                _wait_for(lambda n=now: _saving(scratch, n), None, 300, "a checkpoint write")
            if fault.startswith("kill"):
                os.kill(read_records(run, "start")[-1]["pid"], signal.SIGKILL)
                attempt += 1
            else:
                os.kill(object_store.pid, signal.SIGSTOP)
                time.sleep(PAUSE_S)
                os.kill(object_store.pid, signal.SIGCONT)
            met.append(f"{fault} after step {_last_step(run)}")

    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    try:
        start = time.perf_counter()
        assert train(cfg).trained
    finally:
        os.kill(object_store.pid, signal.SIGCONT)
    thread.join(5)
    print(f"\n[chaos] {storage}: {len(met)} faults in {time.perf_counter() - start:.0f} s: {'; '.join(met)}")
    assert len(met) == len(faults), f"only {met} of {faults}: the run ended first"
    local = tmp_path / "copy" / "chaos"
    if storage == "s3":  # compared as local files
        prefix = run.split("/", 3)[3] + "/"
        for key in (o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=object_store.bucket, Prefix=prefix) for o in page.get("Contents", [])):
            if not key.endswith("/"):  # not a folder's marker
                target = local / key[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(object_store.bucket, key, str(target))
    else:
        local = Path(run)
    check_exact(f"chaos on {storage} storage, ZeRO {stage}", local, reference(stage), None, kills)


OUTAGE_S = 30.0  # longer than any one wait on S3: curl gives up on a request after 3 s without a byte, pyarrow retries


def test_an_s3_outage_longer_than_the_clients_waits_ends_bit_for_bit(reference, object_store, synth_shards, tmp_path):
    """The S3 server paused for 30 s mid-run (storage and shards on it). No wait on it outlasts its bound: a rank's
    read or upload fails, Ray Train restarts the workers from the newest complete checkpoint (train.max_failures=4)
    until storage answers again, or the run rides the outage out; either way it ends bit for bit where the unkilled
    run ends."""
    stage = 2
    client = object_store.client()
    for path in synth_shards.iterdir():
        client.upload_file(str(path), object_store.bucket, f"outage-shards/{path.name}")
    store = object_store.uri(f"outage-{random.getrandbits(32):08x}")
    cfg = load_config(None, [*overrides(object_store.uri("outage-shards"), store, "outage", stage),
                             "train.max_failures=4"])
    run = run_dir(cfg)
    paused: list[int] = []

    def outage() -> None:
        _wait_for(lambda: _last_step(run) >= random.choice(KILL_AFTER), None, 300, "the outage's step")
        paused.append(_last_step(run))
        os.kill(object_store.pid, signal.SIGSTOP)
        time.sleep(OUTAGE_S)
        os.kill(object_store.pid, signal.SIGCONT)

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        assert train(cfg).trained
    finally:
        os.kill(object_store.pid, signal.SIGCONT)
    thread.join(5)
    assert paused, "the run ended before the outage"
    local = tmp_path / "copy" / "outage"
    prefix = run.split("/", 3)[3] + "/"
    for key in (o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=object_store.bucket, Prefix=prefix) for o in page.get("Contents", [])):
        if not key.endswith("/"):
            target = local / key[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(object_store.bucket, key, str(target))
    restarts = len(read_records(local, "start")) - 1
    print(f"\n[outage] S3 paused {OUTAGE_S:.0f} s after step {paused[0]}: the run ended in "
          f"{time.perf_counter() - start:.0f} s after {restarts} restart(s)")
    check_exact(f"S3 outage of {OUTAGE_S:.0f} s, ZeRO {stage}", local, reference(stage), None, restarts)
