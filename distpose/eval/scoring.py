"""Scoring a model file on a split: in this process on its own validation split (the pipeline, sweeps and
benchmarks), or on any split with metrics JSON, COCO results and skeleton drawings written to a directory,
in process or on Ray Train ranks (`distpose eval`).

Data is a shard directory, or a COCO root (annotations/ + images), which is sharded into a
temporary directory first: evaluation always reads shards, so it runs the same code as training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distpose.config import Config
from distpose.data.coco import load_detections
from distpose.data.shards import read_manifest, splits_in, write_shards
from distpose.errors import UserError
from distpose.eval.coco_eval import coco_results
from distpose.eval.draw import draw_predictions
from distpose.eval.evaluate import evaluate_model, flat_metrics
from distpose.eval.inference import Predictions
from distpose.files import atomic_write_bytes, is_http, is_uri
from distpose.models.model_file import load_model_file

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"  # of `distpose eval`, in its output directory


def resolve_split(data: str, split: str | None) -> str:
    """The split of `data` (a shard directory, or a COCO root) to score: `split`, or the only one there (shards:
    "val" if there is one)."""
    splits = splits_in(data)
    if splits or is_http(data):  # shards (an http(s) location cannot be listed: it must name its split)
        if split is None:
            if not splits:
                raise UserError(f"--data {data}: an http(s) location cannot be listed; choose a split with --split")
            split = "val" if "val" in splits else splits[-1]
        read_manifest(data, split)
        return split
    annotations = sorted((Path(data) / "annotations").glob("person_keypoints_*.json"))
    if not annotations:
        raise UserError(f"--data {data}: neither shards (*.manifest.json) nor a COCO root "
                        "(annotations/person_keypoints_<split>.json)")
    names = [p.stem.removeprefix("person_keypoints_") for p in annotations]
    if split is None:
        if len(names) > 1:
            raise UserError(f"--data {data} holds several splits ({', '.join(names)}); choose one with --split")
        return names[0]
    if split not in names:
        raise UserError(f"--split {split}: --data {data} has no annotations/person_keypoints_{split}.json "
                        f"(it has {', '.join(names)})")
    return split


@contextlib.contextmanager
def shards_for(data: str, split: str) -> Iterator[str]:
    """The shard directory holding `split` of `data`: a shard directory as it is, or a COCO root sharded
    into a temporary directory for the duration."""
    if splits_in(data) or is_http(data):
        yield data
        return
    with tempfile.TemporaryDirectory(prefix="distpose-eval-shards-") as tmp:
        log.info("sharding %s split %s into %s", data, split, tmp)
        write_shards(Path(data), split, tmp, samples_per_shard=256, role="eval", progress=False)
        yield tmp


def default_out_dir(checkpoint: str, split: str, boxes: str) -> Path:
    """eval-<model file>-<split>-<boxes: gt, or the detections file's name> beside the model file (in the working
    directory for one on object storage): each split and choice of boxes keeps its own result."""
    beside = Path.cwd() if is_uri(checkpoint) else Path(checkpoint).resolve().parent
    return beside / f"eval-{Path(checkpoint).stem}-{split}-{'gt' if boxes == 'gt' else Path(boxes).stem}"


def score_model_file(path: str | Path, ground_truth: dict[str, Any] | None = None, loader_workers: int = 1
                     ) -> tuple[dict[str, Any], Predictions, Config]:
    """A model file scored on its own config's validation split, in this process (at most `loader_workers`
    DataLoader processes): (metrics, predictions, its config)."""
    model, cfg, _ = load_model_file(path)
    data = dataclasses.replace(cfg.data, loader_workers=min(cfg.data.loader_workers, loader_workers))
    cfg = dataclasses.replace(cfg, data=data)
    metrics, predictions = evaluate_model(model, cfg, ground_truth=ground_truth)
    return metrics, predictions, cfg


def eval_config(cfg: Config, shards: str, split: str) -> Config:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=shards, val_split=split,
                                                              loader_workers=min(cfg.data.loader_workers, 2)))


def write_results(out_dir: Path, metrics: dict[str, Any], predictions: Predictions, gt_boxes: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / METRICS_FILE, (json.dumps(metrics, indent=1) + "\n").encode())
    results = coco_results(predictions, nms_threshold=None if gt_boxes else 0.9)
    atomic_write_bytes(out_dir / "results.json", json.dumps(results).encode())


def summary_line(metrics: dict[str, Any]) -> str:
    flat = flat_metrics(metrics)
    keys = [k for k in flat if k.endswith(("pck@0.05", "pck@0.1", "pck@0.2"))] + ["accuracy", "AP", "AR"]
    return ", ".join(f"{k} {flat[k]:.4f}" for k in keys if k in flat)


def score_to_directory(checkpoint: str, data: str | None, split: str | None, boxes: str, out_dir: Path | None,
                       overwrite: bool = False, workers: int = 1, address: str | None = None
                       ) -> tuple[dict[str, Any], Path]:
    """Score a model file; write metrics.json, results.json and drawings under out_dir (default:
    default_out_dir), which must not hold an earlier result unless `overwrite`. (metrics, out_dir)."""
    model, cfg, _ = load_model_file(checkpoint)
    detections = None if boxes == "gt" else load_detections(boxes)
    if data is None:  # the model's own validation split, unless another is named
        data, split = cfg.data.shards, split or cfg.data.val_split
    split = resolve_split(data, split)
    out_dir = out_dir or default_out_dir(checkpoint, split, boxes)
    if (out_dir / METRICS_FILE).exists() and not overwrite:
        raise UserError(f"--out {out_dir} holds an earlier result ({METRICS_FILE}); pass --overwrite to replace it, "
                        f"or --out to write elsewhere")
    with shards_for(data, split) as shards:
        cfg = eval_config(cfg, shards, split)
        if workers > 1:
            metrics, predictions = _evaluate_on_ray(checkpoint, cfg, detections, workers, address)
        else:
            metrics, predictions = evaluate_model(model, cfg, boxes=detections,
                                                  progress=log.isEnabledFor(logging.INFO))
        write_results(out_dir, metrics, predictions, detections is None)
        draw_predictions(shards, split, predictions, out_dir)
    return metrics, out_dir


def _evaluate_on_ray(checkpoint: str, cfg: Config, detections: Any, workers: int, address: str | None
                     ) -> tuple[dict[str, Any], Predictions]:
    """The same evaluation split over `workers` Ray Train ranks; rank 0's result comes back."""
    import ray
    from ray.train import RunConfig, ScalingConfig

    from distpose.cluster import fit, ray_cluster, torch_trainer

    def per_rank(job: dict[str, Any]) -> None:
        import ray.train

        context = ray.train.get_context()
        model, _, _ = load_model_file(job["checkpoint"])
        result = evaluate_model(model, job["cfg"], context.get_world_rank(), context.get_world_size(),
                                boxes=job["detections"])
        if context.get_world_rank() == 0:
            ray.get(job["inbox"].put.remote(result))

    with ray_cluster(address, cfg.monitor), tempfile.TemporaryDirectory(prefix="distpose-eval-run-") as storage:
        inbox = ray.remote(_Inbox).remote()
        where = checkpoint if is_uri(checkpoint) else str(Path(checkpoint).resolve())
        fit(torch_trainer(per_rank, train_loop_config={"checkpoint": where, "cfg": cfg,
                                                       "detections": detections, "inbox": inbox},
                          scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                          run_config=RunConfig(name="eval", storage_path=storage)))
        return ray.get(inbox.get.remote())


class _Inbox:
    """A Ray actor holding rank 0's evaluation result for the driver."""

    def __init__(self) -> None:
        self.value: Any = None

    def put(self, value: Any) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value
