"""Limb displacements on the heatmap grid, drawn as training draws its crops: the statistics the CRF's
pairwise potentials and window start from.

Every person of a split is placed `draws` times by the training loader's own TopDownTransform (its
augmentation included: scale, rotation, flip with the left/right swap, half-body boxes), without
cutting out any pixels. For every edge parent(k) -> k of the CRF tree whose two joints are labelled,
the displacement x_k - x_parent(k) is taken in heatmap pixels, as (dy, dx).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from distpose.config import DataConfig
from distpose.data.coco import usable_annotations
from distpose.data.codec import HeatmapCodec
from distpose.data.transforms import TopDownTransform
from distpose.keypoints import CRF_PARENTS, NUM_JOINTS


def limb_displacements(ground_truth: dict[str, Any], data: DataConfig, parents: Sequence[int] = CRF_PARENTS,
                       draws: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Per joint k, the [N_k, 2] displacements (dy, dx) from its parent in heatmap pixels (none for the root)."""
    transform = TopDownTransform(data.input_size, data.box_padding, data.augment)
    sx, sy = HeatmapCodec(data.input_size, data.heatmap_size).input_to_heatmap().numpy()
    rng = np.random.default_rng(seed)
    child = np.array([k for k, p in enumerate(parents) if p >= 0])
    parent = np.array([parents[k] for k in child])
    found: list[list[np.ndarray]] = [[] for _ in parents]
    for ann in usable_annotations(ground_truth):
        keypoints = np.asarray(ann["keypoints"], dtype=np.float64).reshape(NUM_JOINTS, 3)
        for _ in range(draws):
            _, joints, labelled = transform.place(ann["bbox"], keypoints, rng)
            yx = joints[:, ::-1] * (sy, sx)
            both = labelled[child] & labelled[parent]
            for k, d in zip(child[both], yx[child[both]] - yx[parent[both]]):
                found[k].append(d)
    return [np.array(d, dtype=np.float64).reshape(-1, 2) for d in found]
