"""Model files: this project's inference format (a run's best.pt and final.pt, `distpose convert`'s output).

A model file holds the whole pose model's fp32 weights and the config that built it, so it loads without Ray,
DeepSpeed or the run that wrote it. It is a weights file too: `model.pretrained` or `train.backbone_checkpoint`
may name one, and its backbone's tensors load (weights.load_backbone_weights). Training state that a run resumes
from (optimizer, schedule, ZeRO partitions) is a checkpoint, train/checkpoints.py.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from distpose.config import Config, config_from_dict, to_dict
from distpose.errors import UserError
from distpose.files import write_bytes
from distpose.models.pose import CRF_PREFIX, PoseModel, build_pose_model, pose_architecture
from distpose.models.weights import read_torch_file

MODEL_FILE_FORMAT = "distpose.pose/1"


def save_model_file(path: str | Path, state_dict: dict[str, torch.Tensor], config: Config | dict[str, Any],
                    meta: dict[str, Any] | None = None) -> None:
    """Write a model's weights (as fp32, on the CPU) with its config (a Config or its to_dict), atomically."""
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu() for k, v in state_dict.items()}
    plain = to_dict(config) if isinstance(config, Config) else config
    buffer = io.BytesIO()
    torch.save({"format": MODEL_FILE_FORMAT, "config": plain, "state_dict": state, "meta": meta or {}}, buffer)
    write_bytes(path, buffer.getvalue())


def read_model_file(path: str | Path) -> dict[str, Any]:
    """The file's contents: format, config (a plain dict), state_dict, meta."""
    obj = read_torch_file(path, "model file")
    if not isinstance(obj, dict) or obj.get("format") != MODEL_FILE_FORMAT:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"model file {path}: not a distpose model file (format {found!r}, "
                        f"expected {MODEL_FILE_FORMAT!r})")
    return obj


def load_model_file(path: str | Path) -> tuple[PoseModel, Config, dict[str, Any]]:
    """(the model in eval mode, the config that built it, the file's metadata)."""
    contents = read_model_file(path)
    cfg = config_from_dict(contents["config"], source=f"model file {path}")
    model = pose_architecture(cfg.model, with_crf=any(k.startswith(CRF_PREFIX) for k in contents["state_dict"]))
    model.load_state_dict(contents["state_dict"])
    return model.eval(), cfg, contents["meta"]


def convert_official_model(source: str | Path, out: str | Path, backbone: str, input_size: tuple[int, int]) -> Config:
    """A published pose model's weights file (HRNet's pose_hrnet_*, SimpleBaseline's pose_resnet_50, official
    names) as a model file. Every tensor of the network, heatmap head included, must be in the file."""
    height, width = input_size
    cfg = config_from_dict({"model": {"backbone": backbone},
                            "data": {"input_size": [height, width], "heatmap_size": [height // 4, width // 4]}},
                           source="distpose convert")
    model = build_pose_model(cfg.model, backbone_weights=source, weights_source="distpose convert")
    save_model_file(out, model.state_dict(), cfg, {"kind": "converted", "source": str(Path(source).resolve())})
    return cfg
