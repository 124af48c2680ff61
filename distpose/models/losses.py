"""Training losses: HRNet's weighted heatmap MSE, and cross-entropy for CRF marginals."""

from __future__ import annotations

import torch


def heatmap_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """HRNet's JointsMSELoss: mean over joints of 0.5 * MSE(pred * w, target * w) over batch and pixels.

    pred, target [B, K, H, W]; weight [B, K] (0 for joints that are unlabelled or off the map).
    """
    w = weight[:, :, None, None].to(pred.dtype)
    return 0.5 * ((pred - target) * w).pow(2).mean(dim=(0, 2, 3)).mean()


def crf_marginal_loss(log_marginals: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between each weighted joint's marginal and its Gaussian target normalised to sum 1,
    summed over those joints and divided by all B x K joint slots.

    Dividing by the slot count, not by the joints used, keeps the loss a plain mean over the batch:
    data-parallel ranks then average to exactly the loss of one big batch, as heatmap_mse does.

    Pixels where the target is 0 contribute nothing, also where the marginal is -inf (a position the
    pairwise window rules out), so such a marginal costs nothing unless the target needs it there.
    """
    target = target.float()
    mass = target.sum(dim=(2, 3), keepdim=True)
    probs = target / mass.clamp_min(torch.finfo(target.dtype).tiny)
    terms = torch.where(probs > 0, probs * log_marginals.float(), torch.zeros_like(probs))
    per_joint = -terms.sum(dim=(2, 3))  # [B, K]
    used = (weight > 0) & (mass[..., 0, 0] > 0)
    return (per_joint * used).sum() / used.numel()
