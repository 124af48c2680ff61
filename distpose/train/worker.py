"""The training function every Ray Train rank runs, top to bottom.

Build the model for the mode, wrap it in DeepSpeed, resume from the latest checkpoint if there is
one (at an epoch end or within an epoch), then per epoch: steps (each of train.grad_accum micro-batches), with a
checkpoint at every train.checkpoint_every_steps-th step when asked, evaluation when due, and a checkpoint at the
epoch's end. Every rank saves its part of each checkpoint and reports it. Ray made the process group (gloo on
CPU, NCCL on GPU) before this runs; nothing here depends on which.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from distpose.config import Config, config_from_dict, grad_accum_at, micro_batch_size
from distpose.data.passes import instance_digest
from distpose.eval.evaluate import evaluate_model, flat_metrics
from distpose.files import exists, is_uri, join
from distpose.metrics_log import METRICS_LOG, MetricsLog
from distpose.models.model_file import save_model_file
from distpose.monitor.prometheus import WorkerMetrics
from distpose.train.batches import TrainingBatches
from distpose.train.checkpoints import (
    BEST_MODEL,
    DEEPSPEED_TAG,
    FINAL_MODEL,
    PARTIAL_CHECKPOINT_PREFIX,
    TrainState,
    checkpoint_name,
    consolidated_state_dict,
    loadable_checkpoint,
    newest_complete_checkpoint,
    save_checkpoint,
)
from distpose.train.engine import build_engine, with_precision_resolved
from distpose.train.modes import ModeLoss, parameter_groups, run_architecture, run_model, set_train_mode
from distpose.train.step import micro_batch_loss, optimizer_step


def _log_to(directory: str | None, rank: int) -> None:
    """Send this worker process's stdout and stderr (Python's, DeepSpeed's, Ray's, C++'s) to
    `directory`/rank<r>.log: the console shows the driver's progress lines, not every rank's chatter."""
    if not directory:
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(Path(directory) / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _mean_across_ranks(value: torch.Tensor) -> float:
    if torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= torch.distributed.get_world_size()
    return float(value)


def _hosts_by_rank() -> list[str]:
    """Every rank's host name, in rank order: where a start placed its ranks."""
    hosts = [socket.gethostname()]
    if torch.distributed.is_initialized():
        hosts = [""] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(hosts, socket.gethostname())
    return hosts


def _checkpoint_to_resume(job: dict[str, Any], chief: bool) -> tuple[str | None, str]:
    """(where the checkpoint to resume is, how it was chosen): the newest complete checkpoint of this run on
    storage, else `--resume`'s, else none. Rank 0 chooses (removing incomplete checkpoints) and tells the
    others, so that every rank loads the same one."""
    choice: list[Any] = [None, "fresh start"]
    if chief:
        newest = newest_complete_checkpoint(job["run_dir"], remove_incomplete=True)
        if newest is not None:
            choice = [newest, "latest checkpoint of this run"]
        elif job.get("resume"):
            choice = [job["resume"], f"--resume {job['resume']}"]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(choice, src=0)
    return choice[0], choice[1]


def _engine_resumed(model, groups: list[dict], cfg: Config, job: dict[str, Any], rank: int, world: int):
    """The DeepSpeed engine with the state of the checkpoint to resume (if any) loaded: (engine, progress,
    where it came from)."""
    import ray.train

    location, origin = _checkpoint_to_resume(job, rank == 0)
    if location is None:
        return build_engine(model, groups, cfg, world), TrainState(), origin
    with ray.train.Checkpoint(location).as_directory() as directory, \
            loadable_checkpoint(Path(directory), world) as (source, meta, universal):
        engine = build_engine(model, groups, cfg, world, load_universal=universal)
        engine.load_checkpoint(str(source), tag=DEEPSPEED_TAG)
    state = meta.state
    converted = f", ZeRO state of {meta.world_size} ranks resharded for {world}" if universal else ""
    return engine, state, f"{origin} ({location}, epoch {state.epoch}, step {state.step}{converted})"


def _with_rank0_buffers(state: dict[str, torch.Tensor], module: torch.nn.Module, world: int
                       ) -> dict[str, torch.Tensor]:
    """`state` with rank 0's buffers. DeepSpeed does not synchronise buffers, so each rank's BatchNorm
    statistics follow its own micro-batches, while checkpoints and model files keep rank 0's: a rank that
    scored its share of the validation split with its own would score another model than the one exported."""
    if world == 1:
        return state
    buffers = [{name: state[name] for name, _ in module.named_buffers() if name in state}]
    torch.distributed.broadcast_object_list(buffers, src=0)
    return {**state, **buffers[0]}


def _evaluate(engine, cfg: Config, rank: int, world: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Score the consolidated fp32 weights, as exported: every rank evaluates a plain copy of the model, so
    ZeRO-3's partitioned forward (which needs all ranks in step) never meets ranks with unequal eval shares."""
    state = _with_rank0_buffers(consolidated_state_dict(engine), engine.module, world)
    model = run_architecture(cfg)
    model.load_state_dict(state)
    metrics, _ = evaluate_model(model.to(engine.device), cfg, rank, world, engine.device)
    scores = {f"val/{k}": v for k, v in flat_metrics(metrics).items()}
    if metrics.get("unreadable_shards"):
        scores["val/unreadable_shards"] = ", ".join(metrics["unreadable_shards"])
    return scores, state


def train_worker(job: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(job["config"], source="job config")
    config_dict, run_dir, scratch = job["config"], job["run_dir"], Path(job["scratch_dir"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    chief = rank == 0
    _log_to(job.get("log_dir"), rank)
    torch.set_num_threads(cfg.train.cpus_per_worker)
    torch.manual_seed(cfg.train.seed)
    device = ray.train.torch.get_device()
    cfg = with_precision_resolved(cfg, device)

    pairwise = job.get("crf_pairwise")
    model = run_model(cfg, None if pairwise is None else torch.tensor(pairwise)).to(device)
    groups = parameter_groups(model, cfg.train)
    engine, state, origin = _engine_resumed(model, groups, cfg, job, rank, world)
    # Decided before anyone writes: every rank must agree on joining the (collective) export.
    export_final = state.epoch < cfg.train.epochs or not exists(join(run_dir, FINAL_MODEL))
    scratch.mkdir(parents=True, exist_ok=True)
    local = not is_uri(run_dir)
    log = MetricsLog(scratch / METRICS_LOG, chief, None if local else join(run_dir, METRICS_LOG))
    telemetry = WorkerMetrics(cfg.monitor.enabled, cfg.train.run_name, cfg.train.mode, rank)
    accum = grad_accum_at(cfg, world)
    log.write("start", epoch=state.epoch, step=state.step, world_size=world, resumed_from=origin,
              hosts=_hosts_by_rank(), pid=os.getpid(), micro_batch=micro_batch_size(cfg), grad_accum=accum,
              device=str(device), precision=cfg.train.precision)

    mode_loss = ModeLoss(cfg)
    batches = TrainingBatches(cfg, rank, world, state.step)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16 if cfg.train.precision == "fp16" \
        else torch.float32
    steps, mode, every = cfg.data.batches_per_epoch, cfg.train.mode, cfg.train.checkpoint_every_steps

    trained = [0, 0]  # this rank's instances and their digest since the last tally (random batches have none)

    def loss_of(batch: dict[str, Any]) -> torch.Tensor:
        if "instance_id" in batch:
            trained[0] += len(batch["instance_id"])
            trained[1] += instance_digest(batch["image_id"], batch["instance_id"])
        return micro_batch_loss(engine, batch, mode_loss, device, dtype)

    def tally() -> None:  # before a save and at the epoch's end: into the state, summed over ranks
        total = torch.tensor(trained, dtype=torch.int64)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        state.epoch_instances += int(total[0])
        state.epoch_digest += int(total[1])
        trained[:] = [0, 0]

    def backward(loss: torch.Tensor) -> None:  # DeepSpeed steps the optimizer at the accumulation boundary
        engine.backward(loss)
        engine.step()

    rank_samples = micro_batch_size(cfg) * accum  # per optimizer step
    last_save = time.monotonic()

    def save(metrics: dict[str, Any]) -> None:
        nonlocal last_save
        saving = time.perf_counter()
        tally()
        log.sync()  # the record on storage covers every step the checkpoint holds
        _save_and_report(engine, state, config_dict, metrics, scratch)
        telemetry.checkpoint_saved(time.perf_counter() - saving)
        last_save = time.monotonic()

    for epoch in range(state.epoch, cfg.train.epochs):
        set_train_mode(engine.module, mode)
        epoch_start = time.perf_counter()
        while state.epoch_step < steps:
            start = time.perf_counter()
            lr = engine.get_lr()[0]  # the rate this step trains at; engine.step() moves the schedule on
            loss, waited = optimizer_step(batches, accum, loss_of, backward)
            loss_value = _mean_across_ranks(loss)
            elapsed = time.perf_counter() - start
            state.step += 1
            state.epoch_step += 1
            state.epoch_loss += loss_value
            log.write("step", epoch=epoch + 1, step=state.step, loss=loss_value, lr=lr, step_time=elapsed,
                      data_wait=waited, samples_per_s=cfg.data.batch_size / elapsed)
            telemetry.step(rank_samples, elapsed, waited, loss_value, lr)
            telemetry.gpu_memory(device)
            if every and state.step % every == 0 and state.epoch_step < steps:
                # A step a checkpoint may be saved at: the stream restarts here whether or not one is, so a run
                # resumed from any such checkpoint draws what this one draws.
                batches.restart(state.step)
                minutes = cfg.train.checkpoint_every_minutes
                if not minutes or _agreed(time.monotonic() - last_save >= 60 * minutes):
                    save({"epoch": state.epoch, "step": state.step})

        state.epoch = epoch + 1
        tally()
        metrics = {"epoch": state.epoch, "step": state.step, "loss": state.epoch_loss / steps,
                   "epoch_time": time.perf_counter() - epoch_start}
        if state.epoch_instances:
            metrics |= {"instances": state.epoch_instances, "instance_digest": state.epoch_digest}
        state.epoch_step, state.epoch_loss, state.epoch_instances, state.epoch_digest = 0, 0.0, 0, 0
        if batches.skipped:
            metrics["skipped_samples"] = sum(batches.skipped.values())
        log.write("epoch", **metrics)
        every_eval = cfg.eval.every_epochs
        if every_eval and (state.epoch % every_eval == 0 or state.epoch == cfg.train.epochs):
            scores, weights = _evaluate(engine, cfg, rank, world)
            telemetry.progressed()
            metrics |= scores
            score = scores.get(f"val/{cfg.eval.best_metric}")  # rank 0 scores; only its state is checkpointed
            if chief and score is not None and (state.best_score is None or score > state.best_score):
                state.best_score, state.best_epoch = score, state.epoch
                save_model_file(join(run_dir, BEST_MODEL), weights, config_dict, {**metrics, "kind": "best"})
            log.write("eval", **metrics)
        state.metrics = metrics
        telemetry.epoch(state.epoch, batches.skipped)
        save(metrics)
        if state.epoch < cfg.train.epochs:
            batches.restart(state.step)

    if export_final:
        weights = consolidated_state_dict(engine)
        if chief:
            save_model_file(join(run_dir, FINAL_MODEL), weights, config_dict,
                                 {**state.metrics, "kind": "final", "best_epoch": state.best_epoch})
            log.write("final", epoch=state.epoch, step=state.step, path=join(run_dir, FINAL_MODEL))


def _agreed(decision: bool) -> bool:
    """Rank 0's `decision`, on every rank: a save is collective, and clocks differ between ranks."""
    if torch.distributed.is_initialized():
        choice = [decision]
        torch.distributed.broadcast_object_list(choice, src=0)
        return bool(choice[0])
    return decision


def _save_and_report(engine, state: TrainState, config: dict[str, Any], metrics: dict[str, float], scratch: Path
                     ) -> None:
    """Every rank saves its part of the DeepSpeed state and reports its directory; Ray uploads them into one
    checkpoint directory on the run's storage (reporting from rank 0 alone would lose the other ranks' ZeRO
    partitions). The local directory is under the run's scratch directory (a rank killed mid-save leaves it
    there, for the driver to remove)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix=PARTIAL_CHECKPOINT_PREFIX, dir=scratch) as tmp:
        save_checkpoint(engine, Path(tmp), state, config)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=checkpoint_name(state.step))
