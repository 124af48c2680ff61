"""Heatmap codec: Gaussian targets and their decoding, as one object so the two cannot disagree.

Heatmap and input pixels relate by aligning the first and last pixel centres
(x_hm = x_in * (W_hm - 1) / (W_in - 1)), which is unbiased in both directions; decoding takes the
argmax, moves it a quarter pixel towards the higher neighbour (HRNet), and maps it back to the
original image through the inverse of the crop's affine matrix.

Both directions are batched torch code that runs where the batch is: loader workers ship only
crops and joint coordinates (a heatmap batch is 1.4x the bytes of its crops at 256x192), and the
training step renders the targets on the accelerator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distpose.data.transforms import apply_affine


@dataclass(frozen=True)
class HeatmapCodec:
    input_size: tuple[int, int]  # (h, w) of the crop
    heatmap_size: tuple[int, int]  # (h, w) of the heatmaps
    sigma: float = 2.0  # in heatmap pixels

    def input_to_heatmap(self, device: torch.device | None = None) -> torch.Tensor:
        """(sx, sy): multiply input-pixel coordinates by this to get heatmap-pixel coordinates."""
        (ih, iw), (hh, hw) = self.input_size, self.heatmap_size
        return torch.tensor([(hw - 1) / (iw - 1), (hh - 1) / (ih - 1)], dtype=torch.float64, device=device)

    def encode(self, joints: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """joints [..., K, 2] in input pixels, visible [..., K] -> heatmaps [..., K, h, w], weights [..., K].

        A joint gets weight 1 when it is labelled and its centre lies on the heatmap, else weight 0
        and an all-zero map. float32, on the joints' device.
        """
        h, w = self.heatmap_size
        mu = (joints.double() * self.input_to_heatmap(joints.device)).float()
        mx, my = mu[..., 0:1], mu[..., 1:2]
        inside = (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
        weight = (visible.bool() & inside[..., 0]).float()
        # The 2-D Gaussian is separable: an outer product of two 1-D ones per joint.
        inv = -0.5 / (self.sigma * self.sigma)
        gx = torch.exp(inv * (torch.arange(w, dtype=torch.float32, device=joints.device) - mx) ** 2)
        gy = torch.exp(inv * (torch.arange(h, dtype=torch.float32, device=joints.device) - my) ** 2)
        heatmaps = (gy * weight[..., None])[..., :, None] * gx[..., None, :]
        return heatmaps, weight

    def decode(self, heatmaps: torch.Tensor, image_to_crop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """heatmaps [N, K, h, w], image_to_crop [N, 2, 3] -> keypoints [N, K, 2] float64 in image
        pixels and scores [N, K] (the heatmap maxima)."""
        n, k, h, w = heatmaps.shape
        scores, idx = heatmaps.reshape(n, k, h * w).float().max(dim=2)
        ix, iy = idx % w, idx // w
        flat = heatmaps.reshape(n, k, h * w).float()

        def at(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return flat.gather(2, (y.clamp(0, h - 1) * w + x.clamp(0, w - 1))[..., None])[..., 0]

        # Quarter-pixel step towards the larger neighbour, where both neighbours exist.
        dx = torch.where((ix > 0) & (ix < w - 1), at(ix + 1, iy) - at(ix - 1, iy), torch.zeros_like(scores))
        dy = torch.where((iy > 0) & (iy < h - 1), at(ix, iy + 1) - at(ix, iy - 1), torch.zeros_like(scores))
        px = ix.double() + 0.25 * torch.sign(dx).double()
        py = iy.double() + 0.25 * torch.sign(dy).double()
        joints_input = torch.stack([px, py], dim=-1) / self.input_to_heatmap(heatmaps.device)
        crop_to_image = invert_affine(image_to_crop.double())
        return apply_affine(joints_input, crop_to_image), scores


def invert_affine(m: torch.Tensor) -> torch.Tensor:
    """Inverse of [..., 2, 3] affine matrices."""
    lin = torch.linalg.inv(m[..., :2])
    return torch.cat([lin, -(lin @ m[..., 2:])], dim=-1)
