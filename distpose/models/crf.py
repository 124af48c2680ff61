"""TreeCRF: a unary head on backbone features plus learned pairwise potentials over a tree of joints.

The pairwise log-potential of edge parent(k) -> k is a free (2R+1) x (2R+1) table over the
displacement x_k - x_parent(k) in heatmap pixels, indexed [dy + R, dx + R]. Training starts it from
what the training split says (`pairwise_from_displacements`: the log-density of the limbs' measured
displacements, augmentation included) or, without data, from a broad Gaussian centred on zero.
Inference is exact (distpose.kernels).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distpose.kernels import tree_crf_map, tree_crf_marginals
from distpose.keypoints import CRF_PARENTS


def gaussian_window(radius: int, sigma: float) -> torch.Tensor:
    """[2R+1, 2R+1] log-potential -|d|^2 / (2 sigma^2)."""
    d = torch.arange(-radius, radius + 1, dtype=torch.float32)
    return -(d[:, None] ** 2 + d[None, :] ** 2) / (2 * sigma * sigma)


def inside_window(displacements: np.ndarray, radius: int) -> np.ndarray:
    """[N] whether each (dy, dx) displacement rounds to a cell of the (2R+1) x (2R+1) window."""
    return (np.abs(displacements) < radius + 0.5).all(axis=1)


def window_coverage(displacements: Sequence[np.ndarray], radius: int) -> float:
    """The fraction of all edges' displacements that the window holds."""
    held = sum(int(inside_window(d, radius).sum()) for d in displacements)
    return held / max(sum(len(d) for d in displacements), 1)


def choose_radius(displacements: Sequence[np.ndarray], coverage: float, max_radius: int) -> int:
    """The smallest R whose window holds at least `coverage` of all displacements (at most `max_radius`)."""
    for radius in range(1, max_radius):
        if window_coverage(displacements, radius) >= coverage:
            return radius
    return max_radius


def pairwise_from_displacements(displacements: Sequence[np.ndarray], radius: int, smoothing: float = 1.0,
                                uniform: float = 0.01) -> torch.Tensor:
    """[K, 2R+1, 2R+1] log-probabilities of each edge's displacement, from its measured displacements.

    Each displacement is spread bilinearly over its four nearest cells; the histogram is blurred by a
    Gaussian of `smoothing` pixels, then mixed with `uniform` of a flat density, so that no displacement
    in the window is ruled out; those outside the window are left out. An edge without data (and the
    root's unused row) gets the flat density.
    """
    size = 2 * radius + 1
    tables = np.zeros((len(displacements), size, size))
    for k, d in enumerate(displacements):
        if len(d):
            tables[k] = _splat(d + radius, size)
    kernel = torch.exp(-0.5 * (torch.arange(-3, 4, dtype=torch.float64) / smoothing) ** 2)
    kernel = (kernel / kernel.sum()).to(torch.float64)
    blurred = torch.from_numpy(tables)[:, None]
    blurred = F.conv2d(F.pad(blurred, (3, 3, 0, 0)), kernel.view(1, 1, 1, 7))
    blurred = F.conv2d(F.pad(blurred, (0, 0, 3, 3)), kernel.view(1, 1, 7, 1))[:, 0]
    mass = blurred.sum(dim=(1, 2), keepdim=True)
    density = torch.where(mass > 0, blurred / mass.clamp_min(1e-300), torch.full_like(blurred, 1.0 / size**2))
    return torch.log((1 - uniform) * density + uniform / size**2).float()


def _splat(points: np.ndarray, size: int) -> np.ndarray:
    """Bilinear histogram of (y, x) points in cell units on a size x size grid; points off the grid are dropped."""
    grid = np.zeros((size, size))
    base = np.floor(points).astype(int)
    frac = points - base
    for dy in (0, 1):
        for dx in (0, 1):
            y, x = base[:, 0] + dy, base[:, 1] + dx
            weight = (frac[:, 0] if dy else 1 - frac[:, 0]) * (frac[:, 1] if dx else 1 - frac[:, 1])
            on = (y >= 0) & (y < size) & (x >= 0) & (x < size)
            np.add.at(grid, (y[on], x[on]), weight[on])
    return grid


class TreeCRF(nn.Module):
    def __init__(self, feature_channels: int, parents: Sequence[int] = CRF_PARENTS, radius: int = 7):
        super().__init__()
        self.parents = list(parents)
        self.unary_head = nn.Conv2d(feature_channels, len(self.parents), 1)
        self.pairwise = nn.Parameter(gaussian_window(radius, radius / 2).repeat(len(self.parents), 1, 1))

    @property
    def radius(self) -> int:
        return self.pairwise.shape[-1] // 2

    @torch.no_grad()
    def init_unary_from(self, heatmap_head: nn.Conv2d, scale: float = 1.0) -> None:
        """Start the unary head as the backbone's trained heatmap head times `scale` (crf and joint modes):
        heatmaps peak near 1, and log-potentials need a contrast of many nats to give sharp marginals."""
        self.unary_head.weight.copy_(heatmap_head.weight * scale)
        self.unary_head.bias.copy_(heatmap_head.bias * scale)

    @torch.no_grad()
    def init_pairwise(self, tables: torch.Tensor) -> None:
        """Start the pairwise potentials from [K, 2R+1, 2R+1] tables (e.g. pairwise_from_displacements)."""
        if tables.shape != self.pairwise.shape:
            raise ValueError(f"pairwise tables of shape {tuple(tables.shape)}, expected {tuple(self.pairwise.shape)}")
        self.pairwise.copy_(tables)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, C, H, W] -> (log Z [B], log-marginals [B, K, H, W]), computed in float32."""
        unary = self.unary_head(features).float()
        return tree_crf_marginals(unary, self.pairwise.float(), self.parents)

    @torch.no_grad()
    def map(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The most probable joint configuration: (score [B], positions [B, K, 2] as (y, x))."""
        return tree_crf_map(self.unary_head(features).float(), self.pairwise.float(), self.parents)
