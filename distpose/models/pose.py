"""The pose model: a heatmap backbone, optionally refined by a tree CRF, with flip-test inference.

A backbone alone, or with a TreeCRF on its stride-4 features. Which one a training mode builds, and
what it freezes, is the training code's business (train/modes.py); the model knows no training config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distpose.config import ConfigError, ModelConfig
from distpose.keypoints import FLIP_INDEX
from distpose.models.crf import TreeCRF
from distpose.models.factory import build_backbone
from distpose.models.weights import load_backbone_tensors, load_backbone_weights, read_torch_file, state_dict_in


@dataclass
class PoseOutput:
    heatmaps: torch.Tensor  # [B, K, h, w] from the backbone's heatmap head
    log_z: torch.Tensor | None = None  # [B], CRF models only
    log_marginals: torch.Tensor | None = None  # [B, K, h, w], CRF models only


def flip_back(maps: torch.Tensor) -> torch.Tensor:
    """Maps predicted on a mirrored crop -> maps for the original crop: mirror x, swap left/right.

    Exact, with no pixel shift: the codec aligns the first and last pixel centres of crop and
    heatmap, so mirroring the crop (x -> W_in - 1 - x) mirrors the heatmap (x -> W_hm - 1 - x).
    HRNet's one-pixel shift corrects the offset of its x / stride alignment, which we do not have.
    """
    return maps.flip(-1)[:, list(FLIP_INDEX)]


CRF_PREFIX = "crf."  # the CRF's tensors in a PoseModel's state dict


class PoseModel(nn.Module):
    # A CRF joint's confidence is its marginal mass within score_radius pixels: a single pixel's
    # probability is too peaked to rank people by; a wide window blurs neighbouring candidates together
    # (docs/crf.md, Training and decoding).
    def __init__(self, backbone: nn.Module, crf: TreeCRF | None = None, score_radius: int = 1):
        super().__init__()
        self.backbone = backbone
        self.crf = crf
        self.score_radius = score_radius

    def forward(self, images: torch.Tensor) -> PoseOutput:
        features = self.backbone.features(images)
        heatmaps = self.backbone.final_layer(features)
        if self.crf is None:
            return PoseOutput(heatmaps)
        log_z, log_marginals = self.crf(features)
        return PoseOutput(heatmaps, log_z, log_marginals)

    def keypoint_maps(self, images: torch.Tensor, flip_test: bool = False) -> torch.Tensor:
        """Maps whose argmax is the predicted joint and whose maximum its confidence, [B, K, h, w]
        float32: the heatmaps, or for a CRF model each joint's marginal probability of lying within
        `score_radius` heatmap pixels (in [0, 1], on the scale HRNet's rescoring threshold expects).
        With `flip_test`, averaged with the flip-backed maps of the mirrored images."""
        maps = self._maps(images)
        if flip_test:
            maps = 0.5 * (maps + flip_back(self._maps(images.flip(-1))))
        return maps

    def _maps(self, images: torch.Tensor) -> torch.Tensor:
        out = self(images)
        if out.log_marginals is None:
            return out.heatmaps.float()
        window = 2 * self.score_radius + 1
        probs = out.log_marginals.float().exp()
        return F.avg_pool2d(probs, window, stride=1, padding=self.score_radius, count_include_pad=True) * window**2


def build_pose_model(m: ModelConfig, with_crf: bool = False, backbone_weights: str | Path = "",
                     pairwise: torch.Tensor | None = None, weights_source: str = "backbone weights",
                     crf_from_weights: bool = False) -> PoseModel:
    """The network model config `m` describes, initialised from local files.

    `m.pretrained` (optional) is loaded into the backbone where names and shapes match. `backbone_weights`
    (a pose checkpoint or a bare weights file) must hold the whole backbone: a CRF must never start on a
    half-loaded network (`weights_source` names the setting in the error). `with_crf` adds the TreeCRF:
    with `crf_from_weights` the one `backbone_weights` holds (a CRF model file's, its window m.crf_window);
    else its unary head from the backbone's heatmap head (times m.crf_unary_scale), its pairwise potentials
    from `pairwise` ([K, 2R+1, 2R+1]) or else a broad Gaussian at zero.
    """
    backbone = build_backbone(m.backbone, m.num_joints)
    if m.pretrained:
        load_backbone_weights(backbone, m.backbone, m.pretrained)
    # Read once: the backbone and, with crf_from_weights, the CRF come from the same file.
    tensors = state_dict_in(read_torch_file(backbone_weights), backbone_weights) if backbone_weights else {}
    if backbone_weights:
        _load_whole_backbone(backbone, m.backbone, tensors, str(backbone_weights), weights_source)
    crf = None
    if with_crf:
        crf = new_crf(m, backbone.feature_channels)
        if crf_from_weights:
            _load_crf(crf, tensors, str(backbone_weights), weights_source)
        else:
            crf.init_unary_from(backbone.final_layer, m.crf_unary_scale)
            if pairwise is not None:
                crf.init_pairwise(pairwise)
    return PoseModel(backbone, crf)


def crf_radius_in(path: str | Path) -> int | None:
    """The window radius R of the CRF a model file holds, or None if it holds none."""
    pairwise = state_dict_in(read_torch_file(path), path).get(f"{CRF_PREFIX}pairwise")
    return None if pairwise is None else pairwise.shape[-1] // 2


def _load_crf(crf: TreeCRF, tensors: dict[str, torch.Tensor], path: str, source: str) -> None:
    state = {k.removeprefix(CRF_PREFIX): v for k, v in tensors.items() if k.startswith(CRF_PREFIX)}
    own = crf.state_dict()
    if set(state) != set(own):
        raise ConfigError(f"{source}: {path} holds no complete CRF (a crf run's model file does), so the CRF "
                          f"cannot start from it")
    odd = next((k for k in own if own[k].shape != state[k].shape), None)
    if odd is not None:
        raise ConfigError(f"{source}: {path}'s CRF has {odd} of shape {list(state[odd].shape)}, this model's is "
                          f"{list(own[odd].shape)} (another window or backbone)")
    crf.load_state_dict(state)


def crf_radius(m: ModelConfig) -> int:
    if m.crf_window == "auto":
        raise ConfigError("config key 'model.crf_window': 'auto' is chosen from the training data when a run starts "
                          "(distpose train); building a CRF model needs the integer it chose")
    return m.crf_window


def _load_whole_backbone(backbone: nn.Module, name: str, tensors: dict[str, torch.Tensor], path: str, source: str
                         ) -> None:
    report = load_backbone_tensors(backbone, name, tensors, path)
    if report.missing or report.mismatched:
        example = (report.mismatched or report.missing)[0]
        raise ConfigError(f"{source}: {path} does not hold a complete {name!r} backbone ({len(report.missing)} tensors "
                          f"missing, {len(report.mismatched)} of another shape, e.g. {example})")


def pose_architecture(m: ModelConfig, with_crf: bool) -> PoseModel:
    """The network `m` describes, freshly initialised, with nothing loaded."""
    backbone = build_backbone(m.backbone, m.num_joints)
    return PoseModel(backbone, new_crf(m, backbone.feature_channels) if with_crf else None)


def new_crf(m: ModelConfig, feature_channels: int) -> TreeCRF:
    """A freshly initialised TreeCRF of `m`'s window, displacement types and gains."""
    return TreeCRF(feature_channels, radius=crf_radius(m), types=m.crf_pairwise_types, gains=m.crf_gains)
