"""Building pose networks by name, and counting what they cost."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distpose.errors import UserError
from distpose.models import cnn, hrnet
from distpose.models.registry import BACKBONES

MODULES = {"cnn": cnn, "hrnet": hrnet}


def build_backbone(name: str, num_joints: int = 17) -> nn.Module:
    """A heatmap network: `features(images)` at stride 4 and `final_layer`, `forward` = both."""
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r} (allowed: {', '.join(BACKBONES)})")
    return getattr(MODULES[BACKBONES[name].module], name)(num_joints)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    params: int
    macs: int  # multiply-accumulates of one forward pass at `input_size`
    input_size: tuple[int, int]
    output_shape: tuple[int, ...]

    COUNTER = "distpose hook counter: multiply-accumulates of Conv2d, ConvTranspose2d and Linear layers"


def count_macs(model: nn.Module, images: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Multiply-accumulates of convolutions, transposed convolutions and linear layers in one forward
    pass (normalisation, activations, pooling and upsampling are not MACs and are left out)."""
    total = 0

    def conv(module: nn.Conv2d, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    def deconv(module: nn.ConvTranspose2d, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += inputs[0].numel() * (module.out_channels // module.groups) * kh * kw

    def linear(module: nn.Linear, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    hooks = []
    for module in model.modules():
        for kind, hook in ((nn.Conv2d, conv), (nn.ConvTranspose2d, deconv), (nn.Linear, linear)):
            if type(module) is kind:
                hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            output = model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return total, output


def model_info(name: str, input_size: tuple[int, int] = (256, 192), num_joints: int = 17) -> ModelInfo:
    model = build_backbone(name, num_joints).eval()
    macs, output = count_macs(model, torch.zeros(1, 3, *input_size))
    params = sum(p.numel() for p in model.parameters())
    return ModelInfo(name, params, macs, input_size, tuple(output.shape))
