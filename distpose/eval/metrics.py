"""Keypoint metrics: PCK in image pixels, HRNet's heatmap accuracy, and object keypoint similarity."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from distpose.keypoints import NAMES, OKS_SIGMAS

VISIBILITY = {"visible": 2, "occluded": 1}


def correct_joints(pred: np.ndarray, gt: np.ndarray, boxes: np.ndarray, threshold: float, visibility: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """([N, K] correct, [N, K] labelled) for the joints whose label is `visibility` (2 visible, 1 occluded):
    correct where the prediction lies within `threshold` x the longer box side of the ground truth,
    both in original image pixels. pred [N, K, 2], gt [N, K, 3] (x, y, v), boxes [N, 4] (x, y, w, h)."""
    pred, gt, boxes = (np.asarray(a, dtype=np.float64) for a in (pred, gt, boxes))
    scale = np.maximum(boxes[:, 2], boxes[:, 3])[:, None]
    labelled = gt[..., 2] == visibility
    return (np.linalg.norm(pred - gt[..., :2], axis=-1) / scale <= threshold) & labelled, labelled


def pck(pred: np.ndarray, gt: np.ndarray, boxes: np.ndarray, thresholds: Sequence[float] = (0.05, 0.1, 0.2)
        ) -> dict[str, Any]:
    """Percentage of correct keypoints (correct_joints), reported separately for visible (v=2) and occluded
    (v=1) joints: per joint and the mean over all such joint instances; None where a joint has no instance
    of that kind."""
    report: dict[str, Any] = {}
    for kind, v in VISIBILITY.items():
        entry: dict[str, Any] = {"count": int((np.asarray(gt)[..., 2] == v).sum())}
        for t in thresholds:
            hit, mask = correct_joints(pred, gt, boxes, t, v)
            per_joint = {name: (float(hit[:, k].sum() / mask[:, k].sum()) if mask[:, k].any() else None)
                         for k, name in enumerate(NAMES)}
            entry[f"pck@{t:g}"] = {"mean": float(hit.sum() / mask.sum()) if mask.any() else None,
                                   "per_joint": per_joint}
        report[kind] = entry
    return report


def heatmap_argmax(heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, K, H, W] -> integer (x, y) [B, K, 2] of each map's maximum, and the maxima [B, K]."""
    b, k, _, w = heatmaps.shape
    values, index = heatmaps.reshape(b, k, -1).max(dim=2)
    return torch.stack([index % w, index // w], dim=-1), values


def hrnet_accuracy_counts(pred: torch.Tensor, target: torch.Tensor, threshold: float = 0.5
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """HRNet's training accuracy ("PCK@0.05 of heatmap size") per joint, as (correct [K], counted [K]): argmax
    of predicted and target heatmaps, distances per axis in units of a tenth of the heatmap size, correct below
    `threshold`; joints whose target peak is not above 1 pixel on both axes, or whose predicted max is not
    positive, follow HRNet's rules (not counted; prediction at the origin)."""
    h, w = pred.shape[2:]
    pred_xy, pred_max = heatmap_argmax(pred)
    target_xy, _ = heatmap_argmax(target)
    pred_xy = pred_xy.double() * (pred_max > 0)[..., None]
    target_xy = target_xy.double()
    counted = (target_xy[..., 0] > 1) & (target_xy[..., 1] > 1)
    norm = torch.tensor([w / 10, h / 10], dtype=torch.float64)
    correct = (((pred_xy - target_xy) / norm).norm(dim=-1) < threshold) & counted
    return correct.sum(0).double(), counted.sum(0).double()


def accuracy_from_counts(correct: torch.Tensor, counted: torch.Tensor) -> float:
    """The mean over joints with a target of each joint's accuracy. Over one batch, HRNet's logged accuracy; an
    evaluation sums the counts over the whole split first (HRNet's batch-size weighted mean of batch accuracies
    depends on the batching)."""
    seen = counted > 0
    return float((correct[seen] / counted[seen]).mean()) if seen.any() else 0.0


def oks(pred: np.ndarray, gt: np.ndarray, area: float, sigmas: Sequence[float] = OKS_SIGMAS) -> float:
    """Object keypoint similarity of one prediction [K, 2] to one ground truth [K, 3] over its labelled
    joints: mean of exp(-d^2 / (2 area (2 sigma)^2)), COCO's definition."""
    gt = np.asarray(gt, dtype=np.float64)
    labelled = gt[:, 2] > 0
    if not labelled.any():
        return 0.0
    d2 = ((np.asarray(pred, dtype=np.float64) - gt[:, :2]) ** 2).sum(axis=1)
    k2 = (2 * np.asarray(sigmas, dtype=np.float64)) ** 2
    return float(np.exp(-d2 / (2 * max(area, np.spacing(1)) * k2))[labelled].mean())
