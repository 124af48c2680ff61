"""Running a pose model over evaluation batches: keypoints in original image pixels, per instance."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

import numpy as np
import torch

from distpose.data.codec import HeatmapCodec
from distpose.data.transforms import normalize_images
from distpose.models.pose import PoseModel

MapsFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class Predictions:
    keypoints: np.ndarray  # [N, K, 2] float64, original image pixels
    scores: np.ndarray  # [N, K] confidence of each joint (its map's maximum)
    box_scores: np.ndarray  # [N] 1 for ground-truth boxes, the detector's score otherwise
    image_ids: np.ndarray  # [N] int64
    instance_ids: np.ndarray  # [N] int64: annotation id, or index in the detections file
    bboxes: np.ndarray  # [N, 4] x, y, w, h
    areas: np.ndarray  # [N]
    gt_keypoints: np.ndarray  # [N, K, 3] (x, y, v); all zero for detector boxes

    def __len__(self) -> int:
        return len(self.image_ids)

    @staticmethod
    def concat(parts: Iterable[Predictions]) -> Predictions:
        parts = list(parts)
        return Predictions(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Predictions)))


def model_maps(model: PoseModel, flip_test: bool, device: torch.device | str = "cpu") -> MapsFn:
    """Keypoint maps of a batch's crops from `model`, in inference mode on `device`."""
    model.eval()

    @torch.inference_mode()
    def maps(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        images = normalize_images(batch["image"].to(device, non_blocking=True))
        return model.keypoint_maps(images, flip_test).cpu()

    return maps


def predict(batches: Iterable[dict[str, torch.Tensor]], keypoint_maps: MapsFn, codec: HeatmapCodec) -> Predictions:
    """Decode each batch's maps through its crops' affines back to the original images."""
    parts = []
    for batch in batches:
        keypoints, scores = codec.decode(keypoint_maps(batch), batch["image_to_crop"])
        parts.append(Predictions(
            keypoints.numpy(), scores.numpy(), batch["score"].numpy().copy(), batch["image_id"].numpy().copy(),
            batch["instance_id"].numpy().copy(), batch["bbox"].numpy().copy(), batch["area"].numpy().copy(),
            batch["keypoints"].numpy().copy(),
        ))
    if not parts:
        empty = np.zeros((0,))
        return Predictions(*(empty for _ in fields(Predictions)))
    return Predictions.concat(parts)
