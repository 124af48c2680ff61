"""Weights files: pretrained backbones, ours or the official releases, loaded into a backbone.

Nothing is downloaded. A backbone weights file is any torch file holding a state dict (bare, or
under "state_dict" / "model"), named as in this project or as in the official releases:
torchvision's ResNet-50 and SimpleBaseline's pose_resnet for `resnet50`, the HRNet pose and
ImageNet releases for the `hrnet_*` backbones. Tensors are loaded where the (translated) name and
the shape both match; the rest is reported, so ImageNet files (no heatmap head, a classifier
instead) load their backbone and leave the head at its initialisation. A model file (model_file.py)
is a weights file too: its "backbone." tensors load, its CRF's are reported unused.
"""

from __future__ import annotations

import io
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distpose.errors import UserError
from distpose.files import read_bytes
from distpose.models.registry import BACKBONES

log = logging.getLogger(__name__)

# Official parameter names -> ours, per backbone family; first matching rule wins.
_RESNET_NAMES = [
    (r"^conv1\.", "stem.0.0."),
    (r"^bn1\.", "stem.0.1."),
    (r"^layer([1-4])\.", lambda m: f"resnet.{int(m[1]) - 1}."),
    # pose_resnet's deconv_layers is one flat Sequential of (ConvTranspose, BN, ReLU) x 3.
    (r"^deconv_layers\.(\d+)\.", lambda m: f"deconv.{int(m[1]) // 3}.{int(m[1]) % 3}."),
]
_HRNET_NAMES = [
    (r"^conv([12])\.", lambda m: f"stem.{int(m[1]) - 1}.0."),
    (r"^bn([12])\.", lambda m: f"stem.{int(m[1]) - 1}.1."),
    # A new branch is a Sequential of one Sequential(conv, bn, relu) in the official code.
    (r"^transition(\d)\.(\d+)\.0\.([01])\.(\w+)$", lambda m: f"transitions.{int(m[1]) - 1}.{m[2]}.{m[3]}.{m[4]}"),
    (r"^transition(\d)\.", lambda m: f"transitions.{int(m[1]) - 1}."),
    (r"^stage(\d)\.(\d+)\.fuse_layers\.", lambda m: f"stages.{int(m[1]) - 2}.{m[2]}.fuse.paths."),
    (r"^stage(\d)\.", lambda m: f"stages.{int(m[1]) - 2}."),
]
# Upsampling fuse paths (j > i) are Sequential(conv, bn, upsample) officially and
# Sequential(Sequential(conv, bn), upsample) here: one index deeper.
_HRNET_UPSAMPLE_PATH = re.compile(r"fuse\.paths\.(\d+)\.(\d+)\.([01])\.(\w+)$")


def official_to_ours(name: str, backbone: str) -> str:
    """Translate one official parameter name into this project's name for `backbone` (unchanged if
    it already is one of ours or matches no rule)."""
    hrnet = BACKBONES[backbone].family == "hrnet"
    rules = _HRNET_NAMES if hrnet else _RESNET_NAMES if backbone == "resnet50" else []
    for pattern, replacement in rules:
        new, count = re.subn(pattern, replacement, name, count=1)
        if count:
            name = new
            break
    if hrnet:
        up = _HRNET_UPSAMPLE_PATH.search(name)
        if up and int(up[2]) > int(up[1]):
            name = name[: up.start()] + f"fuse.paths.{up[1]}.{up[2]}.0.{up[3]}.{up[4]}"
    return name


@dataclass
class LoadReport:
    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, no such name in the model
    mismatched: list[str] = field(default_factory=list)  # same name, different shape

    def summary(self) -> str:
        return (f"loaded {self.loaded} tensors; {len(self.missing)} left at initialisation, "
                f"{len(self.unexpected)} unused, {len(self.mismatched)} of another shape")


def read_torch_file(path: str | Path, what: str = "weights file") -> Any:
    """A torch file's tensors and plain containers (never its pickled code), or one line naming `what` failed."""
    try:
        data = read_bytes(path)
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"{what} {path} does not exist") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as exc:
        if "Unsupported global" in str(exc):  # torch's advice, weights_only=False, would run the file's code
            raise UserError(f"{what} {path}: holds Python objects besides tensors and plain containers; "
                            f"distpose loads weights only, never a file's pickled code") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{what} {path}: not a readable torch file ({first})") from None


def state_dict_in(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"weights file {path}: holds no state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_backbone_weights(backbone: nn.Module, name: str, path: str | Path) -> LoadReport:
    """Load a weights file into `backbone` (built as `name`) where names and shapes match."""
    return load_backbone_tensors(backbone, name, state_dict_in(read_torch_file(path), path), path)


def load_backbone_tensors(backbone: nn.Module, name: str, tensors: dict[str, torch.Tensor], path: str | Path
                          ) -> LoadReport:
    """load_backbone_weights for the tensors already read from the weights file at `path`."""
    own = backbone.state_dict()
    report, update = LoadReport(), {}
    for key, value in tensors.items():
        for prefix in ("module.", "backbone."):  # DataParallel / MMPose wrappers
            key = key.removeprefix(prefix)
        key = official_to_ours(key, name)
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            report.mismatched.append(f"{key} {list(value.shape)} (model {list(own[key].shape)})")
        else:
            update[key] = value
    if not update:
        raise UserError(f"weights file {path}: none of its {len(tensors)} tensors fit backbone {name!r} "
                        f"(first names: {', '.join(list(tensors)[:3])})")
    backbone.load_state_dict(update, strict=False)
    report.loaded = len(update)
    report.missing = [k for k in own if k not in update]
    log.info("backbone %s from %s: %s", name, path, report.summary())
    return report
