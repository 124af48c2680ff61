"""`distpose train` end to end on the session's Ray: data-parallel equivalence under ZeRO 0/2/3,
recovery from a killed worker, Ctrl-C and resume, bf16 on the CPU, and --resume from another run.

Every TorchTrainer fit costs ~10-20 s here (Ray starting the controller and worker processes, not training),
so the runs are tiny (cnn_small at 64x48, a few dozen steps) and the 1-worker reference run is shared by the
equivalence, learning-rate, SIGINT-handler and --resume tests.
"""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch

from distpose.config import Config, load_config
from distpose.metrics_log import read_records
from distpose.models.model_file import read_model_file, save_model_file
from distpose.train.checkpoints import checkpoint_name, newest_complete_checkpoint, read_meta
from distpose.train.driver import run_dir, train
from distpose.train.modes import run_architecture, run_model

pytestmark = pytest.mark.integration


TINY = ["model.backbone=cnn_small", "data.input_size=[64,48]", "data.heatmap_size=[16,12]", "data.loader_workers=0",
        "eval.every_epochs=0", "train.log_every=1000", "train.cpus_per_worker=1"]


def tiny(storage: Path, name: str, *overrides: str) -> list[str]:
    return [*TINY, f"train.storage={storage}", f"train.run_name={name}", *overrides]


def config(storage: Path, name: str, *overrides: str) -> Config:
    return load_config(None, tiny(storage, name, *overrides))


def final_weights(directory: Path) -> dict[str, torch.Tensor]:
    return read_model_file(directory / "final.pt")["state_dict"]


def max_diffs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names) -> tuple[float, float]:
    """(largest absolute difference, largest difference relative to the reference value) over `names`."""
    absolute = max(float((a[n] - b[n]).abs().max()) for n in names)
    relative = max(float(((a[n] - b[n]).abs() / b[n].abs().clamp_min(1e-3)).max()) for n in names)
    return absolute, relative


# ---------------------------------------------------------------------------------------------
# data-parallel equivalence

# 2 workers vs 1 worker x 2 micro-batches, measured here (torch 2.13 CPU, gloo, one thread per worker): the
# losses of all 20 steps and the final weights are bitwise equal at ZeRO 0, 2 and 3 (max difference 0), so the
# test asserts equality. That is what the arithmetic predicts for two equal micro-batches: the all-reduce
# computes (g0 + g1) / 2, accumulation g0 / 2 + g1 / 2; two addends and an exact halving leave float32 no
# summation order to differ in. (More ranks or micro-batches would reassociate sums: then use the tolerances
# of the crf test below.)
DP = ["data.source=random", "data.batch_size=8", "train.epochs=2", "data.batches_per_epoch=10", "train.lr_steps=[2]"]
# 1 worker x one batch of 8 vs 2 workers x 4 sums the same products in another order (8 at once vs 4 + 4,
# then the all-reduce). With the crf loss normalised over the global batch (see the crf test) this gave, here,
# a max loss difference of 4.8e-7 (relative 1.2e-7) and weight differences up to 2.4e-7 over 6 steps.
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6
WEIGHT_RTOL, WEIGHT_ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory) -> SimpleNamespace:
    """1 worker, 2 accumulated micro-batches of 4: the samples and batch statistics of 2 workers x 4.
    Also notes the process's SIGINT handler before and after this (main-thread) train()."""
    storage = tmp_path_factory.mktemp("reference")
    cfg = config(storage, "ref", *DP, "train.workers=1", "train.grad_accum=2")
    sigint_before = signal.getsignal(signal.SIGINT)
    start = time.perf_counter()
    outcome = train(cfg)
    print(f"\n[reference] 1 worker x 2 micro-batches: {time.perf_counter() - start:.1f} s")
    sigint_after = signal.getsignal(signal.SIGINT)
    assert outcome.trained and outcome.final_model.is_file()
    return SimpleNamespace(cfg=cfg, run_dir=outcome.run_dir, sigint_before=sigint_before, sigint_after=sigint_after)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_workers_match_accumulation(reference, tmp_path, stage):
    """2 workers x micro-batch 4 train like 1 worker x 2 accumulated micro-batches of 4.

    The global batch of step s is the same 8 samples in both (data.source=random), cut into the same two
    halves: rank r of 2 workers takes half r, the single worker takes half 0 then half 1. In train mode
    BatchNorm normalises with the statistics of the batch it is given, so a worker's forward depends on
    its micro-batch as a whole: only equal micro-batches give equal activations, hence equal losses and
    gradients. (1 worker x one micro-batch of 8 would normalise over all 8 and train differently.)
    The averaged gradients then differ only in float32 summation order (all-reduce vs accumulation),
    at every ZeRO stage: partitioning changes who holds which slice, not the arithmetic.

    BatchNorm's running statistics are not compared: they are buffers, not trained, and each worker
    keeps its own (DeepSpeed does not synchronise buffers); final.pt has rank 0's, updated once per
    step from half 0, while the single worker updates its twice per step, from both halves.
    """
    ref_dir = reference.run_dir
    cfg = config(tmp_path, f"dp_zero{stage}", *DP, "train.workers=2", "train.grad_accum=1",
                 f"train.zero_stage={stage}")
    start = time.perf_counter()
    outcome = train(cfg)
    print(f"\n[zero {stage}] 2 workers: {time.perf_counter() - start:.1f} s")

    ref_steps, steps = read_records(ref_dir, "step"), read_records(outcome.run_dir, "step")
    assert [r["step"] for r in steps] == [r["step"] for r in ref_steps] == list(range(1, 21))
    ref_loss = torch.tensor([r["loss"] for r in ref_steps], dtype=torch.float64)
    loss = torch.tensor([r["loss"] for r in steps], dtype=torch.float64)
    names = [n for n, _ in run_architecture(cfg).named_parameters()]
    ref_w, w = final_weights(ref_dir), final_weights(outcome.run_dir)
    w_abs, w_rel = max_diffs(w, ref_w, names)
    print(f"[zero {stage}] max loss diff {float((loss - ref_loss).abs().max()):.3g} "
          f"(relative {float(((loss - ref_loss).abs() / ref_loss).max()):.3g}); "
          f"max weight diff {w_abs:.3g} (relative {w_rel:.3g})")
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for name in names:
        assert w[name].dtype == torch.float32
        torch.testing.assert_close(w[name], ref_w[name], rtol=0, atol=0, msg=name)
    # The weights did train (equal because both sides moved the same way, not because neither moved).
    torch.manual_seed(cfg.train.seed)
    init = run_model(cfg).state_dict()
    assert max(float((ref_w[n] - init[n]).abs().max()) for n in names) > 1e-3


def test_logged_lr_is_the_rate_each_step_trained_at(reference):
    """lr_steps=[2]: steps 1-20 (epochs 1 and 2) train at train.lr, the last one included, although
    its engine.step() has already moved the schedule on to the decayed rate."""
    steps = read_records(reference.run_dir, "step")
    assert [r["step"] for r in steps] == list(range(1, 21))
    assert all(r["lr"] == pytest.approx(reference.cfg.train.lr) for r in steps)


def test_train_restores_the_sigint_handler(reference):
    assert reference.sigint_after is reference.sigint_before


@pytest.fixture(scope="module")
def backbone_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("backbone") / "backbone.pt"
    cfg = load_config(None, TINY)
    torch.manual_seed(1)
    save_model_file(path, run_model(cfg).state_dict(), cfg)
    return path


def test_crf_mode_two_workers_match_one_big_batch(ray_session, tmp_path, backbone_checkpoint):
    """In the crf mode the backbone and its BatchNorm are frozen (eval mode), so no statistic depends on
    how the batch is cut: 2 workers x 4 must train like 1 worker x one micro-batch of 8, up to float32
    reassociation (8 products summed at once vs 4 + 4 and the all-reduce).

    crf.unary_head.bias is left out of the weight comparison: the CRF's log-marginals are invariant to a
    constant added to a joint's unary map, so its gradient is zero up to rounding noise, which Adam
    normalises into lr-sized steps of random sign (it differed by up to 8.6e-4 between the two runs
    even with the loss fixed; every other tensor agreed within 2.4e-7)."""
    common = ["train.mode=crf", f"train.backbone_checkpoint={backbone_checkpoint}", "data.source=random",
              "model.crf_window=7", "model.crf_pairwise_init=gaussian", "data.batch_size=8", "train.epochs=1",
              "data.batches_per_epoch=6", "train.grad_accum=1"]
    start = time.perf_counter()
    one = train(config(tmp_path, "crf_one", *common, "train.workers=1"))
    two = train(config(tmp_path, "crf_two", *common, "train.workers=2"))
    print(f"\n[crf] two fits: {time.perf_counter() - start:.1f} s")
    one_loss = torch.tensor([r["loss"] for r in read_records(one.run_dir, "step")], dtype=torch.float64)
    two_loss = torch.tensor([r["loss"] for r in read_records(two.run_dir, "step")], dtype=torch.float64)
    a, b = final_weights(two.run_dir), final_weights(one.run_dir)
    assert a.keys() == b.keys()
    compared = [n for n in b if b[n].is_floating_point() and n != "crf.unary_head.bias"]
    w_abs, w_rel = max_diffs(a, b, compared)
    print(f"[crf] losses 1 worker {one_loss.tolist()}\n[crf] losses 2 workers {two_loss.tolist()}\n"
          f"[crf] max loss diff {float((one_loss - two_loss).abs().max()):.3g}; max weight diff {w_abs:.3g} "
          f"(relative {w_rel:.3g})")
    assert len(one_loss) == len(two_loss) == 6
    # The frozen backbone (BatchNorm statistics included) did not move in either run.
    for name, value in read_model_file(backbone_checkpoint)["state_dict"].items():
        assert torch.equal(a[name], value) and torch.equal(b[name], value), name
    torch.testing.assert_close(two_loss, one_loss, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    for name in compared:
        torch.testing.assert_close(a[name], b[name], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=name)


# ---------------------------------------------------------------------------------------------
# fault tolerance


def committed_epoch(directory: Path) -> int:
    """The epoch of the latest checkpoint Ray Train has committed (0 if none).

    A checkpoint directory appears as soon as the workers upload it, but the controller commits it only when
    it next polls the workers (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S); a worker killed before that poll
    takes the report with it, and the restart does not see that checkpoint. The committed ones are listed in
    Ray's checkpoint_manager_snapshot.json.
    """
    try:
        snapshot = json.loads((directory / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def test_worker_killed_before_ray_registers_a_checkpoint_resumes_from_that_checkpoint(
        ray_session, synth_shards, tmp_path, monkeypatch):
    """SIGKILL rank 0 inside Ray's commit gap: its epoch-2 (or later) checkpoint is complete on storage but the
    controller has not yet registered it. The restart resumes from that checkpoint, not from the one Ray
    registered an epoch earlier (which redid a whole epoch of steps)."""
    # The controller registers a checkpoint at its next poll of the workers: a wider gap to kill inside.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1.0")
    epochs, per_epoch = 4, 6
    cfg = config(tmp_path, "faulty", "data.source=shards", f"data.shards={synth_shards}", "data.batch_size=8",
                 "train.workers=2", "train.max_failures=2", f"train.epochs={epochs}",
                 f"data.batches_per_epoch={per_epoch}", "train.keep_checkpoints=2")
    directory = run_dir(cfg)
    killed: list[dict] = []
    finished = threading.Event()

    def killer() -> None:
        deadline = time.monotonic() + 300
        while not finished.is_set() and time.monotonic() < deadline:
            starts, newest = read_records(directory, "start"), newest_complete_checkpoint(directory)
            uploaded = read_meta(newest).state.epoch if newest else 0
            committed = committed_epoch(directory)
            if starts and uploaded >= 2 and committed < uploaded:
                pid = starts[0]["pid"]
                name = " ".join(psutil.Process(pid).cmdline())
                os.kill(pid, signal.SIGKILL)
                killed.append({"pid": pid, "cmdline": name, "after_step": read_records(directory, "step")[-1]["step"],
                               "uploaded_epoch": uploaded, "committed_epoch": committed})
                return
            time.sleep(0.005)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        outcome = train(cfg)
    finally:
        finished.set()
        thread.join(5)
    wall = time.perf_counter() - start
    assert killed, "the killer never fired"
    assert "RayTrainWorker" in killed[0]["cmdline"], killed[0]

    lines = read_records(directory)
    starts = [r for r in lines if r["kind"] == "start"]
    assert len(starts) == 2, starts
    assert starts[0]["resumed_from"] == "fresh start"
    second = starts[1]
    assert second["resumed_from"].startswith("latest checkpoint of this run")
    assert f"epoch {second['epoch']}, step {second['step']}" in second["resumed_from"]
    assert second["epoch"] == killed[0]["uploaded_epoch"] > killed[0]["committed_epoch"]
    assert second["step"] == second["epoch"] * per_epoch and second["pid"] != killed[0]["pid"]

    steps = [r for r in lines if r["kind"] == "step"]
    assert steps[-1]["step"] == epochs * per_epoch and steps[-1]["epoch"] == epochs
    assert sorted({r["step"] for r in steps}) == list(range(1, epochs * per_epoch + 1))  # none missing
    assert outcome.trained and outcome.metrics["epoch"] == epochs
    assert read_model_file(outcome.final_model)["meta"]["epoch"] == epochs
    # keep_checkpoints counts the checkpoint Ray never registered too
    kept = sorted(p.name for p in directory.glob("checkpoint_*") if p.is_dir())
    assert kept == [checkpoint_name(epoch * per_epoch) for epoch in (3, 4)]

    restart = lines.index(second)
    before = [r for r in lines[:restart] if r["kind"] == "step"]
    after = [r for r in lines[restart:] if r["kind"] == "step"]
    redone = len(before) + len(after) - epochs * per_epoch
    recovery = after[0]["time"] - before[-1]["time"]
    print(f"\n[fault] killed rank 0 (pid {killed[0]['pid']}) after step {killed[0]['after_step']}, with the epoch "
          f"{killed[0]['uploaded_epoch']} checkpoint on storage and epoch {killed[0]['committed_epoch']} the latest "
          f"Ray had registered; resumed at step {second['step']} (epoch {second['epoch']}); steps redone: {redone}; "
          f"recovery (last step before the kill -> first step after the restart): {recovery:.1f} s; "
          f"fit {wall:.1f} s")
    assert redone == before[-1]["step"] - second["step"] and 0 <= redone < per_epoch

    size = (directory / "metrics.jsonl").stat().st_size
    again = train(cfg)
    assert again.trained is False and again.wall_time == 0.0
    assert (directory / "metrics.jsonl").stat().st_size == size  # not retrained


# ---------------------------------------------------------------------------------------------
# Ctrl-C and rerun


def _ray_train_processes(raylet: psutil.Process, since: float) -> list[psutil.Process]:
    """The Ray Train controllers and workers of this Ray instance (the machine may run other Ray instances)
    started since `since`."""
    found = []
    for proc in raylet.children():
        try:
            names = " ".join(proc.cmdline())
            if proc.create_time() >= since and ("RayTrainWorker" in names or "TrainController" in names):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _interrupt(process: subprocess.Popen, timeout: float) -> tuple[int, float]:
    """Ctrl-C: (exit code, seconds until it exited)."""
    start = time.perf_counter()
    process.send_signal(signal.SIGINT)
    code = process.wait(timeout=timeout)
    return code, time.perf_counter() - start


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def _wait_gone(processes: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(processes, timeout=seconds)
    return alive


def test_sigint_stops_the_run_and_rerun_resumes(ray_session, tmp_path):
    """Ctrl-C on `distpose train` (attached to a running cluster) stops the run and its workers promptly;
    running the same command again resumes from the last committed epoch checkpoint."""
    epochs, per_epoch = 5, 20
    test_start = time.time()
    address = ray_session.get_runtime_context().gcs_address
    argv = [sys.executable, "-m", "distpose", "train",
            *tiny(tmp_path, "interrupted", "data.source=random", "data.batch_size=8", f"train.epochs={epochs}",
                  f"data.batches_per_epoch={per_epoch}"),
            "--address", address]
    directory = tmp_path / "interrupted"
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and first.poll() is None:
                if any(r["epoch"] >= 2 for r in read_records(directory, "step")) and committed_epoch(directory) >= 1:
                    break
                time.sleep(0.01)
            assert first.poll() is None, "the run ended before it could be interrupted"
            worker = psutil.Process(read_records(directory, "start")[0]["pid"])
            raylet = worker.parent()
            processes = [worker, *worker.children(recursive=True)]
            interrupted_at = read_records(directory, "step")[-1]["step"]
            code, stop_time = _interrupt(first, 60)
        finally:
            _kill(first)
    output = (tmp_path / "first.log").read_text()
    lingering = _wait_gone(processes, 30)
    print(f"\n[sigint] SIGINT after step {interrupted_at}: exit code {code} after {stop_time:.1f} s; "
          f"'distpose: interrupted' printed: {'distpose: interrupted' in output}")
    assert not lingering, f"train worker processes outlived the interrupted driver: {lingering}"
    # The console holds the driver's own lines; Ray's and DeepSpeed's go to the run's logs/.
    assert "Reporting training result" not in output and "[distpose] interrupted: mode backbone" in output
    assert "Checkpoint successfully created" in (directory / "logs" / "rank0.log").read_text()
    assert "[distpose] interrupted: mode backbone" in (directory / "logs" / "driver.log").read_text()
    # Ray Train's own SIGINT handler aborts the run and exits through SystemExit; the driver reports it as an
    # interrupt, like any Ctrl-C: exit code 130 and one line.
    assert code == 130 and "distpose: interrupted" in output, f"exit code {code}:\n{output[-3000:]}"
    assert read_records(directory, "step")[-1]["step"] < epochs * per_epoch, "the interrupted run went on to the end"
    assert not (directory / "final.pt").exists()

    second = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    starts = read_records(directory, "start")
    assert len(starts) == 2
    resumed = starts[1]
    print(f"[sigint] rerun: {resumed['resumed_from']}")
    assert resumed["resumed_from"].startswith("latest checkpoint of this run"), resumed
    assert resumed["epoch"] >= 1 and resumed["step"] == resumed["epoch"] * per_epoch
    assert read_records(directory, "step")[-1]["step"] == epochs * per_epoch
    assert read_model_file(directory / "final.pt")["meta"]["epoch"] == epochs
    # Nothing of either run is left on the cluster (processes started by this test; other tests share the Ray).
    assert not _wait_gone(_ray_train_processes(raylet, since=test_start - 1), 30)


def test_unplaceable_workers_fail_after_max_failures_and_ctrl_c_stops_the_wait(ray_session, tmp_path):
    """A GPU asked of a cluster without one (attached by address, so an autoscaler could still add one):
    each start waits train.start_timeout_s, then counts as a failure, and train.max_failures ends the run
    (Ray's own limit is infinite: the issue's run retried for 14 minutes). Ctrl-C during such a wait stops
    the command in seconds (Ray's handler waited for the busy controller, ignoring two Ctrl-C)."""
    address = ray_session.get_runtime_context().gcs_address
    argv = [sys.executable, "-m", "distpose", "train",
            *tiny(tmp_path, "no_gpu", "data.source=random", "data.batch_size=4", "train.use_gpu=true",
                  "train.start_timeout_s=3", "train.max_failures=1"), "--address", address]
    start = time.perf_counter()
    failed = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    took = time.perf_counter() - start
    print(f"\n[no gpu] failed after {took:.1f} s: {failed.stderr.strip().splitlines()[-1][:160]}")
    assert failed.returncode == 1, failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert "needs 1 GPU, but the cluster has 0 now" in lines[-2]
    assert lines[-1].startswith("distpose: error: run no_gpu failed after 1 restart(s): The worker group startup "
                                "timed out after 3.0 seconds"), failed.stderr
    assert "Traceback" not in failed.stderr

    waiting = subprocess.Popen([*argv[:-2], "train.start_timeout_s=120", "train.run_name=no_gpu_interrupted",
                                "--address", address], stderr=subprocess.PIPE, text=True)
    try:
        for line in waiting.stderr:  # the warning comes once connected, just before fit() starts waiting
            if "needs 1 GPU" in line:
                break
        time.sleep(3)
        code, stop_time = _interrupt(waiting, 30)
    finally:
        _kill(waiting)
    rest = waiting.stderr.read()
    print(f"[no gpu] Ctrl-C during the wait: exit code {code} after {stop_time:.1f} s")
    assert code == 130 and "distpose: interrupted" in rest and stop_time < 10, rest


# ---------------------------------------------------------------------------------------------
# bf16 and --resume


@pytest.mark.parametrize(("precision", "stage"), [("bf16", 1), ("bf16-mixed", 0)])
def test_bf16_on_cpu_exports_fp32_master_weights(ray_session, tmp_path, precision, stage):
    cfg = config(tmp_path, precision, f"train.precision={precision}", f"train.zero_stage={stage}", "data.source=random",
                 "data.batch_size=4", "train.epochs=1", "data.batches_per_epoch=2")
    outcome = train(cfg)
    steps = read_records(outcome.run_dir, "step")
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    torch.manual_seed(cfg.train.seed)  # what every worker does before building the model
    init = run_model(cfg).state_dict()
    final = final_weights(outcome.run_dir)
    names = [n for n, _ in run_architecture(cfg).named_parameters()]
    assert all(final[n].dtype == torch.float32 for n in names)
    assert all(torch.isfinite(final[n]).all() for n in names)
    assert any(not torch.equal(final[n], init[n]) for n in names)
    # The fp32 master copy, not its bf16 rounding: some weights are not representable in bf16.
    assert any(not torch.equal(final[n], final[n].bfloat16().float()) for n in names)


def test_resume_from_another_runs_checkpoint(reference, tmp_path):
    ref_dir = reference.run_dir
    checkpoint = sorted(p for p in ref_dir.glob("checkpoint_*") if p.is_dir())[-1]
    meta = read_meta(checkpoint)
    assert (meta.state.epoch, meta.state.step, meta.world_size) == (2, 20, 1)
    cfg = config(tmp_path, "continued", *DP, "train.workers=1", "train.grad_accum=2", "train.epochs=3")
    outcome = train(cfg, resume=str(checkpoint))
    start = read_records(outcome.run_dir, "start")
    assert len(start) == 1
    assert start[0]["resumed_from"] == f"--resume {checkpoint} ({checkpoint}, epoch 2, step 20)"
    assert (start[0]["epoch"], start[0]["step"]) == (2, 20)
    steps = read_records(outcome.run_dir, "step")
    assert [r["step"] for r in steps] == list(range(21, 31)) and all(r["epoch"] == 3 for r in steps)
    # The schedule resumed too: lr_steps=[2] puts the 3rd epoch at lr x 0.1 (a fresh LambdaLR would say 1e-3).
    assert all(r["lr"] == pytest.approx(cfg.train.lr * 0.1) for r in steps)
    assert read_model_file(outcome.final_model)["meta"]["epoch"] == 3
