"""What each training mode trains, freezes and minimises.

    backbone  all of the backbone, heatmap MSE with target weights (HRNet's recipe)
    crf       the CRF (unary head and pairwise) on a frozen backbone whose BatchNorm statistics
              are frozen too, so the features the CRF learns on are those it will see in eval
    joint     backbone features and CRF end to end, on the CRF's marginal cross-entropy

In the CRF modes the backbone's own heatmap head is frozen: inference reads the CRF marginals.
"""

from __future__ import annotations

import torch
from torch import nn

from distpose.config import Config, Mode
from distpose.data.codec import HeatmapCodec
from distpose.models.losses import crf_marginal_loss, heatmap_mse
from distpose.models.pose import PoseModel, PoseOutput, build_pose_model, pose_architecture


def with_crf(mode: Mode) -> bool:
    return mode != "backbone"


def run_model(cfg: Config, pairwise: torch.Tensor | None = None) -> PoseModel:
    """The model a run of cfg.train.mode starts from: the backbone (from model.pretrained, if named) in the
    backbone mode; in the crf and joint modes the trained backbone of train.backbone_checkpoint with a CRF
    (its pairwise tables from `pairwise`, the CRF prior, if given)."""
    crf = with_crf(cfg.train.mode)
    return build_pose_model(cfg.model, crf, cfg.train.backbone_checkpoint if crf else "", pairwise,
                            weights_source="config key 'train.backbone_checkpoint'")


def run_architecture(cfg: Config) -> PoseModel:
    """run_model's network, freshly initialised, with nothing loaded."""
    return pose_architecture(cfg.model, with_crf(cfg.train.mode))


def select_trainable(model: PoseModel, mode: Mode) -> list[nn.Parameter]:
    """Set requires_grad for `mode` and return the parameters the optimizer updates."""
    model.requires_grad_(mode == "backbone")
    if mode == "joint":
        model.requires_grad_(True)
        model.backbone.final_layer.requires_grad_(False)
    elif mode == "crf":
        model.crf.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def parameter_groups(model: PoseModel, mode: Mode, lr: float, backbone_lr_scale: float) -> list[dict]:
    """select_trainable's parameters as optimizer groups: in the joint mode the backbone's learn at
    lr x backbone_lr_scale (it starts trained; the CRF starts from its prior), the rest at lr."""
    trainable = select_trainable(model, mode)
    if mode != "joint":
        return [{"params": trainable, "lr": lr}]
    backbone = {id(p) for p in model.backbone.parameters()}
    return [{"params": [p for p in trainable if id(p) not in backbone], "lr": lr},
            {"params": [p for p in trainable if id(p) in backbone], "lr": lr * backbone_lr_scale}]


def set_train_mode(model: nn.Module, mode: Mode) -> None:
    """model.train(), except that the crf mode keeps the frozen backbone (BatchNorm included) in eval."""
    model.train()
    if mode == "crf":
        model.backbone.eval()


def target_codec(cfg: Config) -> HeatmapCodec:
    """The codec that renders the training targets: Gaussians of data.sigma for the heatmap MSE, of
    model.crf_target_sigma for the CRF modes' cross-entropy (where the target stands for the joint's true
    position, and a broad one rewards broad marginals that the pairwise prior then moves)."""
    sigma = cfg.data.sigma if cfg.train.mode == "backbone" else cfg.model.crf_target_sigma
    return HeatmapCodec(cfg.data.input_size, cfg.data.heatmap_size, sigma)


def mode_loss(output: PoseOutput, target: torch.Tensor, weight: torch.Tensor, mode: Mode) -> torch.Tensor:
    if mode == "backbone":
        return heatmap_mse(output.heatmaps.float(), target, weight)
    return crf_marginal_loss(output.log_marginals, target, weight)
