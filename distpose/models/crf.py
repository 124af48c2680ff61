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
    blurred = _blurred_histograms(displacements, radius, smoothing)
    size = 2 * radius + 1
    mass = blurred.sum(dim=(1, 2), keepdim=True)
    density = torch.where(mass > 0, blurred / mass.clamp_min(1e-300), torch.full_like(blurred, 1.0 / size**2))
    return torch.log((1 - uniform) * density + uniform / size**2).float()


def typed_pairwise_from_displacements(displacements: Sequence[np.ndarray], radius: int, types: int,
                                      smoothing: float = 1.0, uniform: float = 0.01, seed: int = 0) -> torch.Tensor:
    """[K, types, 2R+1, 2R+1]: each edge's displacements clustered into `types` (k-means), one table per type.

    A type's table is the log of its cluster's share of pairwise_from_displacements' density (the same
    histogram, blur and flat floor, the floor split evenly) plus log(types): the mixture with equal weights,
    log mean_t exp(table_t), is then exactly that function's table, so a typed CRF starts as the one-table CRF.
    """
    size = 2 * radius + 1
    tables = torch.zeros(len(displacements), types, size, size, dtype=torch.float64)
    for k, d in enumerate(displacements):
        labels = cluster_displacements(d, types, seed) if len(d) >= types else np.zeros(len(d), dtype=int)
        tables[k] = _blurred_histograms([d[labels == t] for t in range(types)], radius, smoothing)
    mass = tables.sum(dim=(1, 2, 3), keepdim=True)
    share = torch.where(mass > 0, tables / mass.clamp_min(1e-300), torch.full_like(tables, 1.0 / (types * size**2)))
    return torch.log(types * ((1 - uniform) * share + uniform / (types * size**2))).float()


def cluster_displacements(points: np.ndarray, types: int, seed: int = 0, iterations: int = 100) -> np.ndarray:
    """[N] the type of each (dy, dx) of `points` [N, 2], N >= types: Lloyd's k-means from a k-means++ start."""
    rng = np.random.default_rng(seed)
    centres = points[[int(rng.integers(len(points)))]]
    while len(centres) < types:
        nearest = ((points[:, None] - centres[None]) ** 2).sum(axis=2).min(axis=1)
        total = nearest.sum()
        pick = rng.choice(len(points), p=nearest / total) if total > 0 else int(rng.integers(len(points)))
        centres = np.vstack([centres, points[pick]])
    labels = np.zeros(len(points), dtype=int)
    for _ in range(iterations):
        labels = ((points[:, None] - centres[None]) ** 2).sum(axis=2).argmin(axis=1)
        moved = np.array([points[labels == t].mean(axis=0) if (labels == t).any() else centres[t]
                          for t in range(types)])
        if np.array_equal(moved, centres):
            break
        centres = moved
    return labels


def _blurred_histograms(displacements: Sequence[np.ndarray], radius: int, smoothing: float) -> torch.Tensor:
    """[N, 2R+1, 2R+1] float64: each set of displacements splatted bilinearly and blurred by a Gaussian."""
    size = 2 * radius + 1
    tables = np.zeros((len(displacements), size, size))
    for k, d in enumerate(displacements):
        if len(d):
            tables[k] = _splat(d + radius, size)
    kernel = torch.exp(-0.5 * (torch.arange(-3, 4, dtype=torch.float64) / smoothing) ** 2)
    kernel = (kernel / kernel.sum()).to(torch.float64)
    blurred = torch.from_numpy(tables)[:, None]
    blurred = F.conv2d(F.pad(blurred, (3, 3, 0, 0)), kernel.view(1, 1, 1, 7))
    return F.conv2d(F.pad(blurred, (0, 0, 3, 3)), kernel.view(1, 1, 7, 1))[:, 0]


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
    """With `types` > 1 each edge has that many pairwise tables, and a linear head on the mean-pooled features
    predicts, per instance and edge, the weights w of their mixture: the edge's log-potential is
    log sum_t w_t exp(T_t(d)) (image-dependent pairwise terms, Chen & Yuille 2014). It starts with equal
    weights. With one type there is no head, and every instance shares one table per edge.

    With `gains`, joint k's unary log-potential is multiplied by a learned temperature exp(tau_k) and edge k's
    pairwise log-potential by a learned weight exp(omega_k), both starting at 1: a few scalars that move the
    balance between a joint's evidence and its neighbour's pull faster than the 1x1 head and the tables can."""

    def __init__(self, feature_channels: int, parents: Sequence[int] = CRF_PARENTS, radius: int = 7, types: int = 1,
                 gains: bool = False):
        super().__init__()
        self.parents = list(parents)
        k = len(self.parents)
        self.unary_head = nn.Conv2d(feature_channels, k, 1)
        table = gaussian_window(radius, radius / 2)
        self.pairwise = nn.Parameter(table.repeat(k, 1, 1) if types == 1 else table.repeat(k, types, 1, 1))
        self.type_head = None
        if types > 1:
            self.type_head = nn.Linear(feature_channels, k * types)
            nn.init.zeros_(self.type_head.weight)
            nn.init.zeros_(self.type_head.bias)
        self.log_temperature = nn.Parameter(torch.zeros(k)) if gains else None
        self.log_edge_weight = nn.Parameter(torch.zeros(k)) if gains else None

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
        """Start the pairwise potentials from tables [K, 2R+1, 2R+1] (pairwise_from_displacements), or
        [K, types, 2R+1, 2R+1] (typed_pairwise_from_displacements)."""
        if tables.shape != self.pairwise.shape:
            raise ValueError(f"pairwise tables of shape {tuple(tables.shape)}, expected {tuple(self.pairwise.shape)}")
        self.pairwise.copy_(tables)

    def tables(self, features: torch.Tensor) -> torch.Tensor:
        """The pairwise log-potentials for these features: [K, 2R+1, 2R+1] shared, or [B, K, 2R+1, 2R+1]."""
        if self.type_head is None:
            tables = self.pairwise.float()
        else:
            b, k, types = features.shape[0], len(self.parents), self.pairwise.shape[1]
            weights = torch.log_softmax(self.type_head(features.float().mean(dim=(2, 3))).view(b, k, types), dim=2)
            tables = torch.logsumexp(weights[..., None, None] + self.pairwise.float(), dim=2)
        if self.log_edge_weight is not None:
            tables = tables * self.log_edge_weight.float().exp()[:, None, None]
        return tables

    def unary(self, features: torch.Tensor) -> torch.Tensor:
        """The unary log-potentials [B, K, H, W] in float32."""
        unary = self.unary_head(features).float()
        if self.log_temperature is not None:
            unary = unary * self.log_temperature.float().exp()[:, None, None]
        return unary

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, C, H, W] -> (log Z [B], log-marginals [B, K, H, W]), computed in float32."""
        return tree_crf_marginals(self.unary(features), self.tables(features), self.parents)

    @torch.no_grad()
    def map(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The most probable joint configuration: (score [B], positions [B, K, 2] as (y, x))."""
        return tree_crf_map(self.unary(features), self.tables(features), self.parents)
