"""Top-down transforms (HRNet's recipe): person box -> centre/scale -> affine crop, with augmentation.

Coordinates follow OpenCV: pixel centres sit at integer coordinates. A crop is one affine matrix
from image to input pixels; keypoints go through the same matrix as the pixels, and its inverse
takes predictions back to the image, so no convention can drift between crop and decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from distpose.config import AugmentConfig
from distpose.keypoints import FLIP_INDEX, INDEX, NUM_JOINTS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UPPER_BODY = np.array([k for k in range(NUM_JOINTS) if k < INDEX["left_hip"]])
LOWER_BODY = np.array([k for k in range(NUM_JOINTS) if k >= INDEX["left_hip"]])
FLIP_ORDER = np.array(FLIP_INDEX)


def box_to_center_scale(bbox: np.ndarray | list[float], aspect_ratio: float, padding: float
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Centre and (width, height) of the crop window for an [x, y, w, h] box, padded, at the aspect."""
    x, y, w, h = (float(v) for v in bbox)
    center = np.array([x + (w - 1) * 0.5, y + (h - 1) * 0.5])
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    else:
        w = h * aspect_ratio
    return center, np.array([w, h]) * padding


def crop_matrix(center: np.ndarray, scale: np.ndarray, rotation: float, output_size: tuple[int, int],
                flip: bool = False) -> np.ndarray:
    """2x3 affine from image pixels to crop pixels: window `scale` (w, h) at `center`, rotated by
    `rotation` degrees (counter-clockwise, as HRNet), mirrored afterwards if `flip`."""
    out_h, out_w = output_size
    s = out_w / scale[0]
    a = math.radians(rotation)
    cos, sin = s * math.cos(a), s * math.sin(a)
    # Rotate about the window centre, then place it at the crop centre.
    m = np.array([[cos, sin, 0.0], [-sin, cos, 0.0]])
    m[:, 2] = np.array([(out_w - 1) * 0.5, (out_h - 1) * 0.5]) - m[:, :2] @ center
    if flip:  # then x -> out_w - 1 - x
        m[0] = -m[0]
        m[0, 2] += out_w - 1.0
    return m


def apply_affine(points, m):
    """Map [..., N, 2] points through [..., 2, 3] affines (NumPy arrays or torch tensors alike)."""
    return points @ m[..., :2].swapaxes(-1, -2) + m[..., None, :, 2]


def half_body_box(joints: np.ndarray, visible: np.ndarray, rng: np.random.Generator) -> list[float] | None:
    """A box around the upper or the lower body's labelled joints (HRNet's half-body augmentation)."""
    upper, lower = UPPER_BODY[visible[UPPER_BODY]], LOWER_BODY[visible[LOWER_BODY]]
    chosen = upper if (rng.random() < 0.5 and len(upper) > 2) or len(lower) <= 2 else lower
    if len(chosen) < 2:
        return None
    pts = joints[chosen]
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    w, h = hi - lo + 1
    # HRNet enlarges a half body by 1.5; box_to_center_scale then pads by the usual factor.
    cx, cy = (lo + hi) * 0.5
    return [cx - 0.75 * w + 0.5, cy - 0.75 * h + 0.5, 1.5 * w, 1.5 * h]


@dataclass
class Crop:
    image: np.ndarray  # [H, W, 3] uint8 RGB (channels last: see normalize_images)
    joints: np.ndarray  # [K, 2] in crop pixels, joint order already swapped if flipped
    visible: np.ndarray  # [K] bool: labelled (v > 0)
    image_to_crop: np.ndarray  # [2, 3]


class TopDownTransform:
    """Person box -> affine crop of `input_size` (h, w), with HRNet's augmentation when `augment` is given."""

    def __init__(self, input_size: tuple[int, int], padding: float = 1.25, augment: AugmentConfig | None = None):
        self.input_size = input_size
        self.aspect_ratio = input_size[1] / input_size[0]  # the box takes the crop's shape, as in HRNet
        self.padding = padding
        self.augment = augment

    def place(self, bbox: list[float], keypoints: np.ndarray, rng: np.random.Generator | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where the crop goes, with its augmentation drawn from `rng`: (image-to-crop affine [2, 3], joints
        [K, 2] in crop pixels, labelled [K]), the joints swapped left for right when the crop is mirrored.
        Everything a crop is but its pixels, so joint statistics can be drawn as training draws them."""
        joints, visible = keypoints[:, :2].astype(np.float64), keypoints[:, 2] > 0
        rotation, flip = 0.0, False
        aug = self.augment
        if aug is not None:
            assert rng is not None, "augmentation needs a random generator"
            if np.count_nonzero(visible) > aug.half_body_min_joints and rng.random() < aug.half_body_prob:
                bbox = half_body_box(joints, visible, rng) or bbox
        center, scale = box_to_center_scale(bbox, self.aspect_ratio, self.padding)
        if aug is not None:
            f = aug.scale_factor
            # min/max, not np.clip: the same values, a tenth of the time on a scalar (place runs per crop)
            scale = scale * min(max(rng.standard_normal() * f + 1.0, 1.0 - f), 1.0 + f)
            if rng.random() < aug.rotation_prob:
                r = aug.rotation_factor
                rotation = min(max(rng.standard_normal() * r, -2.0 * r), 2.0 * r)
            flip = rng.random() < aug.flip_prob
        m = crop_matrix(center, scale, rotation, self.input_size, flip)
        joints = apply_affine(joints, m)
        if flip:
            joints, visible = joints[FLIP_ORDER], visible[FLIP_ORDER]
        return m, joints, visible

    def __call__(self, image: np.ndarray, bbox: list[float], keypoints: np.ndarray,
                 rng: np.random.Generator | None = None, out: np.ndarray | None = None) -> Crop:
        """`image` HWC uint8 BGR, `keypoints` [K, 3] (x, y, v) in image pixels.

        The crop is written into `out` ([H, W, 3] uint8, e.g. a row of a batch buffer) when given,
        and comes out RGB: swapping channels on the small crop is cheaper than on the whole image.
        """
        m, joints, visible = self.place(bbox, keypoints, rng)
        out_h, out_w = self.input_size
        crop = cv2.warpAffine(image, m, (out_w, out_h), dst=out, flags=cv2.INTER_LINEAR)
        cv2.cvtColor(crop, cv2.COLOR_BGR2RGB, dst=crop)
        # Drawn only when enabled, so a config without occluders keeps its random stream (and its results).
        if self.augment is not None and self.augment.occluder_prob > 0 and rng.random() < self.augment.occluder_prob:
            paste_occluders(crop, joints, visible, rng)
        return Crop(crop, joints, visible, m)


def paste_occluders(crop: np.ndarray, joints: np.ndarray, labelled: np.ndarray, rng: np.random.Generator) -> None:
    """Paint 1-3 solid rectangles or ellipses of random colour over `crop` in place, each centred near a random
    labelled joint (jittered by 5% of the crop's height), half-sides 4-15% of it: the joint under one loses its
    evidence and keeps its label, as an occluded joint does. A crop with no labelled joint is left as it is."""
    candidates = np.flatnonzero(labelled)
    if not len(candidates):
        return
    height = crop.shape[0]
    for _ in range(int(rng.integers(1, 4))):
        centre = joints[int(rng.choice(candidates))] + rng.normal(0.0, 0.05 * height, size=2)
        half = rng.uniform(0.04, 0.15, size=2) * height
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            p, q = np.rint(centre - half).astype(int), np.rint(centre + half).astype(int)
            cv2.rectangle(crop, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), colour, -1)
        else:
            c, axes = np.rint(centre).astype(int), np.rint(half).astype(int)
            cv2.ellipse(crop, (int(c[0]), int(c[1])), (int(axes[0]), int(axes[1])), float(rng.uniform(0, 180)), 0,
                        360, colour, -1)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """Loader crops, uint8 [B, H, W, 3] RGB -> float [B, 3, H, W] ImageNet-normalised, on their device.

    Loader workers ship uint8 channels-last crops (4x fewer bytes through IPC than float, and no
    per-pixel CPU work after the warp); the conversion runs on the accelerator.
    """
    mean = torch.tensor(IMAGENET_MEAN, device=images.device) * 255.0
    std = torch.tensor(IMAGENET_STD, device=images.device) * 255.0
    return ((images.float() - mean) / std).permute(0, 3, 1, 2).contiguous()
