"""The driver: check the config and files, connect to Ray, and fit one TorchTrainer run.

Everything that can be wrong with what the user asked for is checked here, before Ray starts.
The run directory is `train.storage/train.run_name`: Ray's checkpoints and state, and ours
(config.yaml, metrics.jsonl, best.pt, final.pt). It must be on a filesystem every node sees.
Running the same run name again resumes it from its latest checkpoint; a finished run is not retrained.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distpose.cluster import ray_cluster
from distpose.config import Config, ConfigError, dump_yaml, to_dict
from distpose.data.shards import read_manifest
from distpose.errors import DataError, UserError
from distpose.files import atomic_write_bytes
from distpose.models.weights import read_pose_checkpoint
from distpose.monitor.metrics import RunMetrics
from distpose.train.checkpoints import FINAL_MODEL, META_FILE
from distpose.train.crf_prior import PRIOR_FILE, with_crf_prior
from distpose.train.engine import deepspeed_config

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

class TrainingFailed(UserError):
    """The run failed after its retries (exit code 1)."""

    exit_code = 1


@dataclass
class TrainOutcome:
    run_dir: Path
    final_model: Path
    metrics: dict[str, Any]  # of the last checkpoint
    wall_time: float  # seconds in fit() (0 when the run had already finished)
    trained: bool  # False when a finished run was found and left alone


def run_dir(cfg: Config) -> Path:
    return Path(cfg.train.storage).resolve() / cfg.train.run_name


def with_absolute_paths(cfg: Config, base: Path | None = None) -> Config:
    """The config with its file paths made absolute (relative ones taken from `base`, default the working
    directory): Ray workers, and Tune trials, run in other directories."""
    def absolute(path: str) -> str:
        return str((base or Path.cwd()).joinpath(path).resolve()) if path else path

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
            read_manifest(cfg.data.shards, split)
        except DataError as exc:
            raise ConfigError(f"config key 'data.shards': {exc}") from None


def preflight(cfg: Config, resume: str | None = None) -> None:
    """Fail with one line before Ray starts: missing shards, backbone checkpoint or resume directory,
    a DeepSpeed override that does not parse, a backbone checkpoint of another network."""
    check_shards(cfg)
    if cfg.train.mode != "backbone":
        path = cfg.train.backbone_checkpoint
        if not Path(path).is_file():
            raise ConfigError(f"config key 'train.backbone_checkpoint': {path} does not exist "
                              f"(train.mode={cfg.train.mode!r} starts from a trained backbone)")
        trained = read_pose_checkpoint(path)["config"].get("model", {}).get("backbone")
        if trained not in (None, cfg.model.backbone):
            raise ConfigError(f"config key 'train.backbone_checkpoint': {path} holds a {trained!r} backbone, "
                              f"but model.backbone is {cfg.model.backbone!r}")
    if resume is not None and not (Path(resume) / META_FILE).is_file():
        raise UserError(f"--resume {resume}: not a distpose training checkpoint (no {META_FILE} inside)")
    deepspeed_config(cfg)


def finished_run(cfg: Config) -> dict[str, Any] | None:
    """final.pt's metadata if this run name already trained to train.epochs."""
    final = run_dir(cfg) / FINAL_MODEL
    if not final.is_file():
        return None
    meta = read_pose_checkpoint(final)["meta"]
    return meta if meta.get("epoch", 0) >= cfg.train.epochs else None


def train(cfg: Config, address: str | None = None, resume: str | None = None,
          callbacks: Sequence[Any] = ()) -> TrainOutcome:
    """Fit `cfg` on the Ray cluster (connecting to it, or starting a local one, unless connected).
    `callbacks`: Ray Train UserCallbacks (a Tune trial passes TuneReportCallback)."""
    preflight(cfg, resume)
    cfg = with_absolute_paths(cfg)
    resume = str(Path(resume).resolve()) if resume else None
    directory = run_dir(cfg)
    done = finished_run(cfg) if resume is None else None
    if done is not None:
        log.info(f"[distpose] run {cfg.train.run_name} already finished ({done['epoch']} epochs): "
              f"{directory / FINAL_MODEL}; not retraining (use another train.run_name to train again)")
        return TrainOutcome(directory, directory / FINAL_MODEL, done, 0.0, False)

    directory.mkdir(parents=True, exist_ok=True)
    cfg, prior = with_crf_prior(cfg)
    if prior is not None:
        log.info(f"[distpose] {cfg.train.run_name}: {prior.summary(cfg)}")
        atomic_write_bytes(directory / PRIOR_FILE, json.dumps(prior.record(), indent=1).encode())
    atomic_write_bytes(directory / "config.yaml", dump_yaml(cfg).encode())
    with ray_cluster(address, cfg.monitor) as disconnects_from_cluster:
        run_metrics = RunMetrics(cfg.monitor.enabled, cfg.train.run_name, cfg.train.mode)
        run_metrics.state("running")
        start, final = time.perf_counter(), "failed"
        try:
            result = _fit(cfg, directory, resume, callbacks, prior.pairwise if prior else None)
            final = "finished"
        except KeyboardInterrupt:
            final = "interrupted"
            raise
        finally:
            run_metrics.state(final)
            if disconnects_from_cluster and final != "interrupted":  # Ctrl-C means leave now
                run_metrics.wait_until_exported(final)
        wall = time.perf_counter() - start
    log.info(f"[distpose] run {cfg.train.run_name} finished in {wall:.1f} s: {directory / FINAL_MODEL}")
    return TrainOutcome(directory, directory / FINAL_MODEL, dict(result.metrics or {}), wall, True)


def _fit(cfg: Config, directory: Path, resume: str | None, callbacks: Sequence[Any], pairwise: torch.Tensor | None
         ) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from distpose.monitor.callback import RunMetricsCallback
    from distpose.train.worker import train_worker

    t = cfg.train
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": to_dict(cfg), "run_dir": str(directory), "resume": resume,
                           "crf_pairwise": None if pairwise is None else pairwise.tolist()},
        scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(
            name=t.run_name, storage_path=str(directory.parent),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=[*callbacks, RunMetricsCallback(cfg.monitor.enabled, t.run_name, t.mode)],
        ),
    )
    # fit() installs Ray's own SIGINT handler (it aborts the run, then exits via SystemExit) and leaves
    # it installed, holding the finished run's controller alive and swallowing later Ctrl-C.
    main_thread = threading.current_thread() is threading.main_thread()
    previous_sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        return trainer.fit()
    except SystemExit:
        raise KeyboardInterrupt from None
    except Exception as exc:  # Ray wraps the worker's error; keep its last line
        if type(exc).__name__ not in ("TrainingFailedError", "WorkerGroupError", "ControllerError"):
            raise
        cause = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise TrainingFailed(f"run {t.run_name} failed after {t.max_failures} restart(s): {cause} "
                             f"(full log above; the latest checkpoint in {directory} is kept)") from None
    finally:
        if previous_sigint is not None:  # None: not the main thread, or a handler installed outside Python
            signal.signal(signal.SIGINT, previous_sigint)
