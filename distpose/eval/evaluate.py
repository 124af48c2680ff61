"""Scoring a model on a split of shards: PCK (visible and occluded joints), HRNet's heatmap accuracy
and COCO AP/AR, from predictions that may have been made on several ranks and gathered.

The ground truth for COCO eval is rebuilt from the shards' own annotation JSON (data.shards.shard_ground_truth),
so evaluation needs nothing but the shards (the annotation file they came from may live on another machine).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from distpose.config import Config
from distpose.data.coco import Detection
from distpose.data.codec import HeatmapCodec
from distpose.data.loader import eval_loader
from distpose.data.shards import read_manifest, shard_ground_truth
from distpose.errors import DataError
from distpose.eval.coco_eval import coco_results, evaluate
from distpose.eval.inference import MapsFn, Predictions, model_maps, predict
from distpose.eval.metrics import accuracy_from_counts, hrnet_accuracy_counts, pck
from distpose.models.pose import PoseModel

log = logging.getLogger(__name__)


@dataclass
class HeatmapAccuracy:
    """HRNet's accuracy over a whole split: per-joint counts summed over batches (and ranks), so that neither
    the batch size nor the ranks' shares change the result."""

    correct: torch.Tensor | None = None  # [K] float64
    counted: torch.Tensor | None = None

    def add(self, maps: torch.Tensor, batch: dict[str, torch.Tensor], codec: HeatmapCodec) -> None:
        target, _ = codec.encode(batch["joints"], batch["visible"])
        self.merge(HeatmapAccuracy(*hrnet_accuracy_counts(maps, target)))

    def merge(self, other: HeatmapAccuracy) -> None:
        if other.correct is None:
            return
        if self.correct is None:
            self.correct, self.counted = other.correct.clone(), other.counted.clone()
        else:
            self.correct += other.correct
            self.counted += other.counted

    @property
    def value(self) -> float | None:
        return None if self.correct is None else accuracy_from_counts(self.correct, self.counted)


def predict_with_accuracy(batches: Iterable[dict[str, torch.Tensor]], keypoint_maps: MapsFn, codec: HeatmapCodec
                          ) -> tuple[Predictions, HeatmapAccuracy]:
    accuracy = HeatmapAccuracy()

    def maps_and_accuracy(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        maps = keypoint_maps(batch)
        accuracy.add(maps, batch, codec)
        return maps

    return predict(batches, maps_and_accuracy, codec), accuracy


def score(predictions: Predictions, ground_truth: dict[str, Any], thresholds: Iterable[float],
          accuracy: HeatmapAccuracy | None = None, gt_boxes: bool = True) -> dict[str, Any]:
    """Flat metrics (`visible/pck@0.1`, `occluded/pck@0.1`, `accuracy`, `AP`, `AR`, ...) and, under
    `pck_per_joint`, the per-joint table. PCK needs ground-truth boxes (each prediction knows its person)."""
    metrics: dict[str, Any] = {"instances": len(predictions)}
    if gt_boxes and len(predictions):
        table = pck(predictions.keypoints, predictions.gt_keypoints, predictions.bboxes, tuple(thresholds))
        for kind, entry in table.items():
            metrics[f"{kind}/joints"] = entry["count"]
            metrics |= {f"{kind}/{name}": value["mean"] for name, value in entry.items() if name != "count"}
        metrics["pck_per_joint"] = {kind: {name: value["per_joint"] for name, value in entry.items() if name != "count"}
                                    for kind, entry in table.items()}
    if accuracy is not None and gt_boxes:
        metrics["accuracy"] = accuracy.value
    if len(predictions):
        # Ground-truth boxes are scored as they are; detector boxes get HRNet's rescoring and OKS-NMS.
        results = coco_results(predictions, nms_threshold=None if gt_boxes else 0.9)
        metrics |= evaluate(ground_truth, results)
    return metrics


def gather_predictions(local: Predictions, accuracy: HeatmapAccuracy, unreadable: list[str]
                       ) -> tuple[Predictions, HeatmapAccuracy, list[str]]:
    """Every rank's predictions, accuracy counts and unreadable shards, on every rank (as they are without a
    process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return local, accuracy, unreadable
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, (local, accuracy, unreadable))
    nonempty = [p for p, _, _ in parts if len(p)]  # a rank without shards of the split predicts nothing
    merged, total = Predictions.concat(nonempty) if nonempty else local, HeatmapAccuracy()
    for _, part, _ in parts:
        total.merge(part)
    return merged, total, sorted({name for _, _, names in parts for name in names})


def _counted(batches: Iterable[dict[str, Any]], bar: tqdm) -> Iterator[dict[str, Any]]:
    for batch in batches:
        bar.update(len(batch["image_id"]))
        yield batch


def evaluate_model(model: PoseModel, cfg: Config, rank: int = 0, world_size: int = 1,
                   device: torch.device | str = "cpu", boxes: Mapping[int, list[Detection]] | None = None,
                   ground_truth: dict[str, Any] | None = None, progress: bool = False
                   ) -> tuple[dict[str, Any], Predictions]:
    """Predict this rank's share of `cfg.data.val_split`, gather, and score; (metrics, all predictions).
    Every rank of a process group must call it; rank 0 scores, the others get empty metrics. `progress`: a
    bar with the rate and ETA on stderr (the instance total is known with ground-truth boxes)."""
    codec = HeatmapCodec(cfg.data.input_size, cfg.data.heatmap_size, cfg.data.sigma)
    loader = eval_loader(cfg.data, rank, world_size, boxes=boxes)
    total = read_manifest(cfg.data.shards, cfg.data.val_split)["instances"] if boxes is None else None
    with tqdm(total=total, unit="person", desc="eval", disable=not progress) as bar:
        local, accuracy = predict_with_accuracy(_counted(loader, bar), model_maps(model, cfg.eval.flip_test, device),
                                                codec)
    predictions, accuracy, unreadable = gather_predictions(local, accuracy, loader.unreadable_shards)
    if loader.skipped:
        log.warning("evaluation skipped bad samples: %s", dict(loader.skipped))
    if not len(predictions):  # the same count on every rank: they all stop
        skipped = f" (skipped: {dict(loader.skipped)})" if loader.skipped else ""
        raise DataError(f"{cfg.data.shards}: no {cfg.data.val_split} instance could be evaluated{skipped}")
    if rank != 0:
        return {}, predictions
    if ground_truth is None:
        ground_truth = shard_ground_truth(cfg.data.shards, cfg.data.val_split)
    metrics = score(predictions, ground_truth, cfg.eval.pck_thresholds, accuracy, gt_boxes=boxes is None)
    if boxes is None:  # every labelled person of the split is scored, unless its shard could not be read
        metrics["lost_instances"] = total - len(predictions)
    metrics["unreadable_shards"] = unreadable
    return metrics, predictions


def lost_data(metrics: Mapping[str, Any], prefix: str = "") -> str:
    """What an evaluation could not score, in words ("" when nothing was lost): `metrics` as evaluate_model
    returns them, or as a run records them (keys with `prefix`)."""
    shards, lost = metrics.get(f"{prefix}unreadable_shards"), metrics.get(f"{prefix}lost_instances")
    if not shards and not lost:
        return ""
    names = shards if isinstance(shards, str) else ", ".join(shards or [])
    counted = f"{int(lost)} of the split's instances not scored" if lost else "instances not scored"
    return f"{counted}: unreadable shard(s) {names or '(not named)'}"


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics only (what goes to logs, reports and Ray)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.floating))}
