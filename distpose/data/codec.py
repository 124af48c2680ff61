"""Heatmap codec: Gaussian targets and their decoding, as one object so the two cannot disagree.

Heatmap and input pixels relate by aligning the first and last pixel centres
(x_hm = x_in * (W_hm - 1) / (W_in - 1)), which is unbiased in both directions; decoding takes the
argmax, moves it a quarter pixel towards the higher neighbour (HRNet), and maps it back to the
original image through the inverse of the crop's affine matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distpose.data.transforms import apply_affine, invert_affine


@dataclass(frozen=True)
class HeatmapCodec:
    input_size: tuple[int, int]  # (h, w) of the crop
    heatmap_size: tuple[int, int]  # (h, w) of the heatmaps
    sigma: float = 2.0  # in heatmap pixels

    @property
    def input_to_heatmap(self) -> np.ndarray:
        """(sx, sy): multiply input-pixel coordinates by this to get heatmap-pixel coordinates."""
        (ih, iw), (hh, hw) = self.input_size, self.heatmap_size
        return np.array([(hw - 1) / (iw - 1), (hh - 1) / (ih - 1)])

    def encode(self, joints: np.ndarray, visible: np.ndarray, out: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """joints [K, 2] in input pixels, visible [K] -> heatmaps [K, h, w] float32, weights [K] float32.

        A joint gets weight 1 when it is labelled and its centre lies on the heatmap, else weight 0
        and an all-zero map. The heatmaps are written into `out` when given.
        """
        h, w = self.heatmap_size
        mu = (joints * self.input_to_heatmap).astype(np.float32)
        inside = (mu[:, 0] >= 0) & (mu[:, 0] <= w - 1) & (mu[:, 1] >= 0) & (mu[:, 1] <= h - 1)
        weight = (visible & inside).astype(np.float32)
        # The 2-D Gaussian is separable: an outer product of two 1-D ones per joint.
        inv = np.float32(-0.5 / (self.sigma * self.sigma))
        gx = np.exp(inv * np.square(np.arange(w, dtype=np.float32) - mu[:, :1]))
        gy = np.exp(inv * np.square(np.arange(h, dtype=np.float32) - mu[:, 1:])) * weight[:, None]
        heatmaps = np.multiply(gy[:, :, None], gx[:, None, :], out=out)
        return heatmaps, weight

    def decode(self, heatmaps: np.ndarray, image_to_crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """heatmaps [N, K, h, w], image_to_crop [N, 2, 3] -> keypoints [N, K, 2] in image pixels, scores [N, K]."""
        heatmaps = np.asarray(heatmaps, dtype=np.float32)
        n, k, h, w = heatmaps.shape
        flat = heatmaps.reshape(n, k, h * w)
        idx = flat.argmax(axis=2)
        scores = np.take_along_axis(flat, idx[..., None], axis=2)[..., 0]
        px, py = (idx % w).astype(np.float64), (idx // w).astype(np.float64)
        # Quarter-pixel step towards the larger neighbour, where both neighbours exist.
        hm = heatmaps.reshape(n * k, h, w)
        ix, iy, rows = (idx % w).ravel(), (idx // w).ravel(), np.arange(n * k)
        inner_x = (ix > 0) & (ix < w - 1)
        inner_y = (iy > 0) & (iy < h - 1)
        dx = np.where(inner_x, hm[rows, iy, np.clip(ix + 1, 0, w - 1)] - hm[rows, iy, np.clip(ix - 1, 0, w - 1)], 0)
        dy = np.where(inner_y, hm[rows, np.clip(iy + 1, 0, h - 1), ix] - hm[rows, np.clip(iy - 1, 0, h - 1), ix], 0)
        px += 0.25 * np.sign(dx).reshape(n, k)
        py += 0.25 * np.sign(dy).reshape(n, k)
        joints_input = np.stack([px, py], axis=-1) / self.input_to_heatmap
        keypoints = apply_affine(joints_input, invert_affine(np.asarray(image_to_crop, dtype=np.float64)))
        return keypoints, scores
