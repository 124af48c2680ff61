"""COCO keypoint evaluation through pycocotools, with HRNet's rescoring and OKS-NMS for detector boxes."""

from __future__ import annotations

import contextlib
import io
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from distpose.config import COCO_STATS
from distpose.errors import DataError
from distpose.eval.inference import Predictions
from distpose.eval.metrics import oks
from distpose.keypoints import OKS_SIGMAS

STAT_NAMES = COCO_STATS


def rescore(keypoint_scores: np.ndarray, box_score: float, threshold: float = 0.2) -> float:
    """HRNet's instance score: the box score times the mean of the keypoint scores above `threshold`."""
    confident = keypoint_scores[keypoint_scores > threshold]
    return float(box_score * (confident.mean() if confident.size else 0.0))


def oks_nms(instances: list[dict[str, Any]], threshold: float = 0.9, sigmas: Sequence[float] = OKS_SIGMAS
            ) -> list[dict[str, Any]]:
    """Per image, keep instances in descending score order, dropping any whose OKS with a kept one
    (using the kept one's box area as scale) exceeds `threshold`. Instances are COCO results with an
    extra "area" (the detection box area)."""
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for inst in instances:
        by_image[inst["image_id"]].append(inst)
    kept = []
    for group in by_image.values():
        remaining = sorted(group, key=lambda inst: -inst["score"])
        while remaining:
            best = remaining.pop(0)
            kept.append(best)
            best_kps = np.asarray(best["keypoints"], dtype=np.float64).reshape(-1, 3)
            as_gt = np.concatenate([best_kps[:, :2], np.ones((len(best_kps), 1))], axis=1)
            remaining = [inst for inst in remaining
                         if oks(np.asarray(inst["keypoints"]).reshape(-1, 3)[:, :2], as_gt, best["area"], sigmas)
                         <= threshold]
    return kept


def evaluate(ground_truth: str | Path | dict[str, Any], results: list[dict[str, Any]]) -> dict[str, float]:
    """COCOeval(keypoints) of COCO-format results against the ground truth (an annotation file, or
    its parsed content); returns the 10 stats by name."""
    if not results:
        raise DataError("no predictions to evaluate")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        if isinstance(ground_truth, dict):
            gt = COCO()
            gt.dataset = ground_truth
            gt.createIndex()
        else:
            gt = COCO(str(ground_truth))
        evaluator = COCOeval(gt, gt.loadRes([{k: v for k, v in r.items() if k != "area"} for r in results]),
                             "keypoints")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(STAT_NAMES, (float(v) for v in evaluator.stats)))


def coco_results(predictions: Predictions, rescore_threshold: float = 0.2, nms_threshold: float | None = 0.9
                 ) -> list[dict[str, Any]]:
    """Predictions -> COCO keypoint results, scored as HRNet does (box score x mean confident joint
    score) and, unless `nms_threshold` is None, thinned by OKS-NMS."""
    results = []
    for i in range(len(predictions)):
        kps = np.concatenate([predictions.keypoints[i], predictions.scores[i][:, None]], axis=1)
        results.append({
            "image_id": int(predictions.image_ids[i]), "category_id": 1,
            "keypoints": [round(float(v), 3) for v in kps.ravel()],
            "score": rescore(predictions.scores[i], float(predictions.box_scores[i]), rescore_threshold),
            "area": float(predictions.areas[i]),
        })
    return results if nms_threshold is None else oks_nms(results, nms_threshold)
