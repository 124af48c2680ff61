"""The backbones by name: each one's family, input multiple, and the module whose function of that name
builds it. The config checks `model.backbone` and `data.input_size` against this table, so it imports
nothing (no torch): reading a config never loads a network."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str  # cnn or hrnet: the recipes' network, and which official weight names translate to it
    input_multiple: int  # its deepest stride: input heights and widths must be multiples of it
    module: str  # distpose.models.<module>.<name>(num_joints) builds it


BACKBONES = {spec.name: spec for spec in (
    BackboneSpec("cnn_small", "cnn", 8, "cnn"),
    BackboneSpec("resnet50", "cnn", 32, "cnn"),
    BackboneSpec("hrnet_small", "hrnet", 32, "hrnet"),
    BackboneSpec("hrnet_w32", "hrnet", 32, "hrnet"),
    BackboneSpec("hrnet_w48", "hrnet", 32, "hrnet"),
)}
