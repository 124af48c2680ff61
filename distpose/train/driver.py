"""The driver: check the config and files, connect to Ray, and fit one TorchTrainer run.

Everything that can be wrong with what the user asked for is checked here, before Ray starts.
The run directory is `train.storage/train.run_name`: Ray's checkpoints and state, and ours
(config.yaml, metrics.jsonl, best.pt, final.pt). It must be on a filesystem every node sees, or on object
storage (`s3://bucket/prefix`): then each node keeps the run's logs and partial checkpoints in a local
scratch directory, and rank 0 uploads metrics.jsonl every few seconds.
Running the same run name again resumes it from its latest checkpoint; a finished run is not retrained.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distpose.cluster import (
    check_reachable,
    check_resources,
    environment,
    fit,
    is_local,
    log_file,
    ray_cluster,
    torch_trainer,
    verbose,
    warn_if_short,
)
from distpose.config import Config, ConfigError, ModelConfig, TrainConfig, dump_yaml, load_config, to_dict, worker_range
from distpose.data.coco import load_detections
from distpose.data.passes import check_pass_length
from distpose.data.shards import read_manifest
from distpose.errors import DataError, UserError
from distpose.files import exists, is_uri, join, within, write_bytes
from distpose.metrics_log import METRICS_LOG
from distpose.models.model_file import read_model_file
from distpose.models.pose import build_pose_model
from distpose.monitor.prometheus import RunMetrics
from distpose.train.checkpoints import (
    FINAL_MODEL,
    META_FILE,
    PARTIAL_CHECKPOINT_PREFIX,
    prune_checkpoints,
    read_meta,
)
from distpose.train.crf_prior import PRIOR_FILE, with_crf_prior
from distpose.train.engine import deepspeed_config
from distpose.train.progress import FollowProgress

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
# How long Ray Train waits for a worker group to be placed before that start counts as a failure.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
LOG_DIR = "logs"  # under the run directory (scratch directory, for object storage): driver.log, each rank's output
RUN_CONFIG = "config.yaml"  # the run's config as it last started, in the run directory
# What a run's checkpoints are made of: a rerun of the run may change anything else (epochs, workers, lr...).
# model.pretrained only initialises a fresh run.
MODEL_KEYS = ("train.mode", "data.input_size", "data.heatmap_size",
              *(f"model.{f.name}" for f in dataclasses.fields(ModelConfig) if f.name != "pretrained"))

class TrainingFailed(UserError):
    """The run failed after its retries (exit code 1)."""

    exit_code = 1


@dataclass
class TrainOutcome:
    run_dir: Path | str  # a URI for a run on object storage
    final_model: Path | str
    metrics: dict[str, Any]  # of the last checkpoint
    wall_time: float  # seconds in fit() (0 when the run had already finished)
    trained: bool  # False when a finished run was found and left alone


def run_dir(cfg: Config) -> Path | str:
    """Where the run's checkpoints and results are: a local directory, or a URI on object storage."""
    if is_uri(cfg.train.storage):
        return join(cfg.train.storage, cfg.train.run_name)
    return Path(cfg.train.storage).resolve() / cfg.train.run_name


def scratch_dir(cfg: Config) -> Path:
    """Where this node keeps the run's logs and partial checkpoints: the run directory itself when it is
    local, else the same path under the temporary directory of every node."""
    directory = run_dir(cfg)
    if isinstance(directory, Path):
        return directory
    return Path(tempfile.gettempdir()) / "distpose-runs" / cfg.train.run_name


def with_absolute_paths(cfg: Config, base: Path | None = None) -> Config:
    """The config with its file paths made absolute (relative ones taken from `base`, default the working
    directory): Ray workers, and Tune trials, run in other directories."""
    def absolute(path: str) -> str:
        return str((base or Path.cwd()).joinpath(path).resolve()) if path and not is_uri(path) else path

    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, shards=absolute(cfg.data.shards)),
        model=dataclasses.replace(cfg.model, pretrained=absolute(cfg.model.pretrained)),
        train=dataclasses.replace(cfg.train, storage=absolute(cfg.train.storage),
                                  backbone_checkpoint=absolute(cfg.train.backbone_checkpoint),
                                  deepspeed_config=absolute(cfg.train.deepspeed_config)),
        eval=dataclasses.replace(cfg.eval, boxes="gt" if cfg.eval.boxes == "gt" else absolute(cfg.eval.boxes)),
    )


def check_shards(cfg: Config) -> None:
    """The shards the run reads (training split, and validation split if it evaluates) have manifests."""
    splits = [cfg.data.train_split] if cfg.data.source == "shards" else []
    splits += [cfg.data.val_split] if cfg.eval.every_epochs else []
    for split in splits:
        try:
            manifest = read_manifest(cfg.data.shards, split)
        except DataError as exc:
            raise ConfigError(f"config key 'data.shards': {exc}") from None
        if split == cfg.data.train_split and cfg.data.source == "shards" and cfg.data.order == "pass":
            try:
                check_pass_length(cfg.data, manifest["instances"])
            except DataError as exc:
                raise ConfigError(f"config key 'data.batches_per_epoch': {exc}") from None


def resources_of(t: TrainConfig) -> dict[str, tuple[float, str]]:
    """What the run's worker group reserves to start (an elastic run: its fewest workers), each with the
    settings that ask for it."""
    fewest, most = worker_range(t)
    workers = f"train.workers={t.workers}" if fewest == most else f"train.workers={list(t.workers)} (at least {fewest})"
    need = {"CPU": (fewest * t.cpus_per_worker, f"{workers} x train.cpus_per_worker={t.cpus_per_worker}")}
    if t.use_gpu:
        need["GPU"] = (fewest, f"train.use_gpu=true with {workers}")
    return need


def check_model_files(cfg: Config) -> None:
    """The weights and detector boxes the config names exist and fit: a worker would find out only after
    Ray started, in a traceback per rank and a retry."""
    if cfg.model.pretrained:
        if not Path(cfg.model.pretrained).is_file():
            raise ConfigError(f"config key 'model.pretrained': {cfg.model.pretrained} does not exist (a local "
                              f"weights file, docs/coco.md; model.pretrained='' trains from scratch)")
        build_pose_model(cfg.model)  # loads the file: one that fits nothing fails here, with its names
    if cfg.eval.boxes != "gt" and cfg.eval.every_epochs:
        load_detections(cfg.eval.boxes)


def preflight(cfg: Config, resume: str | None = None, address: str | None = None) -> None:
    """Fail with one line before Ray starts: missing shards, weights, detector boxes, backbone checkpoint
    or resume directory, a DeepSpeed override that does not parse, a backbone checkpoint of another
    network, more CPUs or GPUs than this machine (or the connected cluster) has."""
    check_model_files(cfg)
    check_shards(cfg)
    check_resources(resources_of(cfg.train), address)
    if not is_local(address):
        check_reachable(address or os.environ["RAY_ADDRESS"])
    if cfg.train.mode != "backbone":
        path = cfg.train.backbone_checkpoint
        if not exists(path):
            raise ConfigError(f"config key 'train.backbone_checkpoint': {path} does not exist "
                              f"(train.mode={cfg.train.mode!r} starts from a trained backbone)")
        trained = read_model_file(path)["config"].get("model", {}).get("backbone")
        if trained not in (None, cfg.model.backbone):
            raise ConfigError(f"config key 'train.backbone_checkpoint': {path} holds a {trained!r} backbone, "
                              f"but model.backbone is {cfg.model.backbone!r}")
    if resume is not None:
        try:
            read_meta(resume)
        except FileNotFoundError:
            raise UserError(f"--resume {resume}: not a distpose training checkpoint (no {META_FILE} inside)") from None
        except (ValueError, KeyError, TypeError):
            raise UserError(f"--resume {resume}: its {META_FILE} is not one this distpose writes (a checkpoint of "
                            f"an older version?)") from None
    deepspeed_config(cfg)


def setting(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def check_same_model(cfg: Config) -> None:
    """A rerun of a run continues its checkpoints (or returns its final model): refuse one whose model or
    data shape differs from the config the run recorded, before anything in the run is rewritten."""
    recorded_at = within(run_dir(cfg), RUN_CONFIG)
    if not exists(recorded_at):
        return
    recorded = load_config(recorded_at)
    differ = [key for key in MODEL_KEYS if setting(recorded, key) != setting(cfg, key)
              # the recorded window is the one "auto" chose, from the same data and coverage
              and not (key == "model.crf_window" and cfg.model.crf_window == "auto")]
    if differ:
        changes = ", ".join(f"{key} {setting(recorded, key)!r} -> {setting(cfg, key)!r}" for key in differ)
        raise ConfigError(f"run {cfg.train.run_name} ({run_dir(cfg)}) holds another model: {changes}; "
                          f"a run directory holds one model, so train this one under another "
                          f"train.run_name=NAME")


def finished_run(cfg: Config) -> dict[str, Any] | None:
    """final.pt's metadata if this run name already trained to train.epochs."""
    final = join(run_dir(cfg), FINAL_MODEL)
    if not exists(final):
        return None
    meta = read_model_file(final)["meta"]
    return meta if meta.get("epoch", 0) >= cfg.train.epochs else None


def train(cfg: Config, address: str | None = None, resume: str | None = None,
          callbacks: Sequence[Any] = ()) -> TrainOutcome:
    """Fit `cfg` on the Ray cluster (connecting to it, or starting a local one, unless connected).
    `callbacks`: Ray Train UserCallbacks (a Tune trial passes TuneReportCallback)."""
    preflight(cfg, resume, address)
    check_same_model(cfg)
    cfg = with_absolute_paths(cfg)
    resume = str(Path(resume).resolve()) if resume and not is_uri(resume) else resume
    directory = run_dir(cfg)
    done = finished_run(cfg) if resume is None else None
    if done is not None:
        log.info(f"[distpose] run {cfg.train.run_name} already finished ({done['epoch']} epochs): "
              f"{join(directory, FINAL_MODEL)}; not retraining (use another train.run_name to train again)")
        return TrainOutcome(directory, within(directory, FINAL_MODEL), done, 0.0, False)

    scratch = scratch_dir(cfg)
    scratch.mkdir(parents=True, exist_ok=True)
    cfg, prior = with_crf_prior(cfg)
    if prior is not None:
        log.info(f"[distpose] {cfg.train.run_name}: {prior.summary(cfg)}")
        write_bytes(join(directory, PRIOR_FILE), json.dumps(prior.record(), indent=1).encode())
    write_bytes(join(directory, RUN_CONFIG), dump_yaml(cfg).encode())
    for partial in scratch.glob(PARTIAL_CHECKPOINT_PREFIX + "*"):  # of a rank killed while saving
        shutil.rmtree(partial, ignore_errors=True)
    logs = scratch / LOG_DIR
    with ray_cluster(address, cfg.monitor) as disconnects_from_cluster, log_file(logs / "driver.log"):
        warn_if_short(resources_of(cfg.train), cfg.train.start_timeout_s)
        run_metrics = RunMetrics(cfg.monitor.enabled, cfg.train.run_name, cfg.train.mode)
        run_metrics.state("running")
        run_metrics.failures(0)
        start, final = time.perf_counter(), "failed"
        try:
            with FollowProgress(join(directory, METRICS_LOG), cfg):
                result = _fit(cfg, scratch, None if verbose() else logs, resume, callbacks,
                              prior.pairwise if prior else None)
            for removed in prune_checkpoints(directory, cfg.train.keep_checkpoints):
                log.debug("removed %s: older than the %d kept (train.keep_checkpoints)", removed,
                          cfg.train.keep_checkpoints)
            final = "finished"
        except KeyboardInterrupt:
            final = "interrupted"
            raise
        finally:
            run_metrics.state(final)
            if disconnects_from_cluster and final != "interrupted":  # Ctrl-C means leave now
                run_metrics.wait_until_exported(final)
        wall = time.perf_counter() - start
    log.info(f"[distpose] run {cfg.train.run_name} finished in {wall:.1f} s: {join(directory, FINAL_MODEL)}")
    return TrainOutcome(directory, within(directory, FINAL_MODEL), dict(result.metrics or {}), wall, True)


def _fit(cfg: Config, scratch: Path, log_dir: Path | None, resume: str | None, callbacks: Sequence[Any],
         pairwise: torch.Tensor | None) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from distpose.monitor.callback import RunMetricsCallback
    from distpose.train.worker import train_worker

    t = cfg.train
    trainer = torch_trainer(
        train_worker,
        train_loop_config={"config": to_dict(cfg), "run_dir": str(run_dir(cfg)), "scratch_dir": str(scratch),
                           "resume": resume,
                           "log_dir": None if log_dir is None else str(log_dir),
                           "crf_pairwise": None if pairwise is None else pairwise.tolist()},
        scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu,
                                     elastic_resize_monitor_interval_s=t.elastic_resize_interval_s,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(
            name=t.run_name, storage_path=t.storage,
            # A worker group that cannot be placed is a controller failure: unbounded by default.
            failure_config=FailureConfig(max_failures=t.max_failures, controller_failure_limit=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=[*callbacks, RunMetricsCallback(cfg.monitor.enabled, t.run_name, t.mode,
                                                      join(run_dir(cfg), METRICS_LOG))],
        ),
    )
    try:
        # fit() passes the environment on to the controller; a value the user set stands
        with environment(START_TIMEOUT_ENV, None if START_TIMEOUT_ENV in os.environ else str(t.start_timeout_s)):
            return fit(trainer)
    except Exception as exc:  # Ray wraps the worker's error; keep its last line
        if type(exc).__name__ not in ("TrainingFailedError", "WorkerGroupError", "ControllerError"):
            raise
        cause = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        if len(cause) > 200 and ". " in cause:  # Ray's explanations run to paragraphs: their first sentence
            cause = cause[: cause.index(". ") + 1]
        where = "above" if log_dir is None else f"in {log_dir}"
        raise TrainingFailed(f"run {t.run_name} failed after {t.max_failures} restart(s): {cause} "
                             f"(full log {where}; the latest checkpoint in {run_dir(cfg)} is kept)") from None
