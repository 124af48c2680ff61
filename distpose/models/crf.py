"""TreeCRF: a unary head on backbone features plus learned pairwise potentials over a tree of joints.

The pairwise log-potential of edge parent(k) -> k is a free (2R+1) x (2R+1) table over the
displacement x_k - x_parent(k) in heatmap pixels, starting as a broad Gaussian (sigma = R / 2)
centred on zero, so training begins close to independent joints and learns the limb geometry.
Inference is exact (distpose.kernels).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from distpose.kernels import tree_crf_map, tree_crf_marginals
from distpose.keypoints import CRF_PARENTS


def gaussian_window(radius: int, sigma: float) -> torch.Tensor:
    """[2R+1, 2R+1] log-potential -|d|^2 / (2 sigma^2)."""
    d = torch.arange(-radius, radius + 1, dtype=torch.float32)
    return -(d[:, None] ** 2 + d[None, :] ** 2) / (2 * sigma * sigma)


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

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, C, H, W] -> (log Z [B], log-marginals [B, K, H, W]), computed in float32."""
        unary = self.unary_head(features).float()
        return tree_crf_marginals(unary, self.pairwise.float(), self.parents)

    @torch.no_grad()
    def map(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The most probable joint configuration: (score [B], positions [B, K, 2] as (y, x))."""
        return tree_crf_map(self.unary_head(features).float(), self.pairwise.float(), self.parents)
