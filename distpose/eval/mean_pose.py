"""The mean-pose predictor: the floor every trained model must clear.

It learns one thing from the training split, each joint's mean position relative to the person's
crop window (the same padded, aspect-fixed window the models see), and predicts that pose in every
ground-truth box of the evaluation split, whatever the image shows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distpose.data.coco import usable_annotations
from distpose.data.transforms import box_to_center_scale
from distpose.eval.inference import Predictions
from distpose.keypoints import NUM_JOINTS


def fit_mean_pose(ground_truth: dict[str, Any], aspect_ratio: float, padding: float) -> np.ndarray:
    """[K, 2] mean of each labelled joint's offset from its crop window's centre, in window sizes."""
    total, count = np.zeros((NUM_JOINTS, 2)), np.zeros((NUM_JOINTS, 1))
    for ann in usable_annotations(ground_truth):
        center, size = box_to_center_scale(ann["bbox"], aspect_ratio, padding)
        joints = np.asarray(ann["keypoints"], dtype=np.float64).reshape(NUM_JOINTS, 3)
        labelled = joints[:, 2:] > 0
        total += np.where(labelled, (joints[:, :2] - center) / size, 0.0)
        count += labelled
    return total / np.maximum(count, 1)


def predict_mean_pose(mean_pose: np.ndarray, ground_truth: dict[str, Any], aspect_ratio: float, padding: float
                      ) -> Predictions:
    """The mean pose placed in every usable ground-truth box of the split."""
    anns = usable_annotations(ground_truth)
    keypoints = np.zeros((len(anns), NUM_JOINTS, 2))
    for i, ann in enumerate(anns):
        center, size = box_to_center_scale(ann["bbox"], aspect_ratio, padding)
        keypoints[i] = center + mean_pose * size
    return Predictions(
        keypoints=keypoints, scores=np.ones((len(anns), NUM_JOINTS)), box_scores=np.ones(len(anns)),
        image_ids=np.array([a["image_id"] for a in anns], dtype=np.int64),
        instance_ids=np.array([a["id"] for a in anns], dtype=np.int64),
        bboxes=np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4),
        areas=np.array([a["area"] for a in anns], dtype=np.float64),
        gt_keypoints=np.array([a["keypoints"] for a in anns], dtype=np.float64).reshape(-1, NUM_JOINTS, 3),
    )
