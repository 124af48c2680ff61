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

from distpose.config import Config, Mode, TrainConfig
from distpose.data.codec import HeatmapCodec
from distpose.models.losses import crf_marginal_loss, heatmap_mse
from distpose.models.pose import PoseModel, PoseOutput, build_pose_model, pose_architecture


def with_crf(mode: Mode) -> bool:
    return mode != "backbone"


def run_model(cfg: Config, pairwise: torch.Tensor | None = None) -> PoseModel:
    """The model a run of cfg.train.mode starts from: the backbone (from model.pretrained, if named) in the
    backbone mode; in the crf and joint modes the trained backbone of train.backbone_checkpoint with a CRF:
    with train.crf_from_checkpoint that file's CRF, else a new one (its pairwise tables from `pairwise`, the
    CRF prior, if given)."""
    crf = with_crf(cfg.train.mode)
    return build_pose_model(cfg.model, crf, cfg.train.backbone_checkpoint if crf else "", pairwise,
                            weights_source="config key 'train.backbone_checkpoint'",
                            crf_from_weights=cfg.train.crf_from_checkpoint)


def run_architecture(cfg: Config) -> PoseModel:
    """run_model's network, freshly initialised, with nothing loaded."""
    return pose_architecture(cfg.model, with_crf(cfg.train.mode))


def select_trainable(model: PoseModel, train: TrainConfig) -> list[nn.Parameter]:
    """Set requires_grad for train.mode and return the parameters the optimizer updates."""
    mode = train.mode
    model.requires_grad_(mode == "backbone")
    if mode == "joint":
        model.requires_grad_(True)
        model.backbone.final_layer.requires_grad_(train.heatmap_loss_weight > 0)
    elif mode == "crf":
        model.crf.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def parameter_groups(model: PoseModel, train: TrainConfig) -> list[dict]:
    """select_trainable's parameters as optimizer groups, in this order: the CRF's at lr (the first group's rate
    is the one the run logs), its gains (model.crf_gains) at lr x crf_gain_lr_scale, and in the joint mode the
    backbone's at lr x backbone_lr_scale (it starts trained). Without gains these are the groups runs have always
    had, so older checkpoints resume."""
    crf = model.crf
    gains = set() if crf is None or crf.log_temperature is None else {id(crf.log_temperature), id(crf.log_edge_weight)}
    backbone = {id(p) for p in model.backbone.parameters()} if train.mode == "joint" else set()
    roles: dict[str, list[nn.Parameter]] = {"base": [], "gains": [], "backbone": []}
    for parameter in select_trainable(model, train):
        role = "gains" if id(parameter) in gains else "backbone" if id(parameter) in backbone else "base"
        roles[role].append(parameter)
    scales = {"base": 1.0, "gains": train.crf_gain_lr_scale, "backbone": train.backbone_lr_scale}
    return [{"params": params, "lr": train.lr * scales[role]} for role, params in roles.items() if params]


def set_train_mode(model: nn.Module, mode: Mode) -> None:
    """model.train(), except that the crf mode keeps the frozen backbone (BatchNorm included) in eval."""
    model.train()
    if mode == "crf":
        model.backbone.eval()


class ModeLoss:
    """What a mode minimises, with the codecs that render its targets from a batch's joints.

    backbone: the heatmap MSE, targets of data.sigma. crf and joint: the CRF marginals' cross-entropy, targets
    of model.crf_target_sigma (the target stands for the joint's true position, and a broad one rewards broad
    marginals that the pairwise prior then moves); in the joint mode plus train.heatmap_loss_weight x the
    backbone's heatmap MSE.
    """

    def __init__(self, cfg: Config):
        d, t = cfg.data, cfg.train
        self.heatmap_codec = HeatmapCodec(d.input_size, d.heatmap_size, d.sigma)
        self.crf_codec = None if t.mode == "backbone" else \
            HeatmapCodec(d.input_size, d.heatmap_size, cfg.model.crf_target_sigma)
        self.heatmap_weight = {"backbone": 1.0, "crf": 0.0, "joint": t.heatmap_loss_weight}[t.mode]

    def __call__(self, output: PoseOutput, joints: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """joints [B, K, 2] in crop pixels, visible [B, K] (labelled) -> the scalar loss."""
        terms = []
        if self.crf_codec is not None:
            target, weight = self.crf_codec.encode(joints, visible)
            terms.append(crf_marginal_loss(output.log_marginals, target, weight))
        if self.heatmap_weight:
            target, weight = self.heatmap_codec.encode(joints, visible)
            mse = heatmap_mse(output.heatmaps.float(), target, weight)
            terms.append(mse if self.heatmap_weight == 1.0 else self.heatmap_weight * mse)
        return sum(terms[1:], terms[0])
