"""`distpose config` and `distpose model-info NAME`: a resolved config; a network's size."""

from __future__ import annotations

import argparse
import typing

from distpose.commands.arguments import add_config_arguments
from distpose.config import Backbone


def show_config(args: argparse.Namespace) -> int:
    from distpose.config import dump_yaml, load_config

    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 256x192, got {text!r}") from None
    if height < 32 or width < 32 or height % 32 or width % 32:
        # HRNet's lowest branch is at stride 32; its fusions need whole pixels there.
        raise argparse.ArgumentTypeError(f"expected HxW in multiples of 32, e.g. 256x192, got {text!r}")
    return height, width


def run_model_info(args: argparse.Namespace) -> int:
    from distpose.models.factory import ModelInfo, model_info

    info = model_info(args.name, args.input)
    print(f"{info.name}: {info.params / 1e6:.2f}M parameters ({info.params:,}), "
          f"{info.macs / 1e9:.2f} GMACs at {info.input_size[0]}x{info.input_size[1]}, "
          f"heatmaps {info.output_shape[1]}x{info.output_shape[2]}x{info.output_shape[3]}")
    print(f"counter: {ModelInfo.COUNTER}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    config = commands.add_parser(
        "config", help="print a resolved config",
        description="Print the config that a command would run with: defaults, then CONFIG, then "
        "key.sub=value overrides, checked against the schema.",
    )
    add_config_arguments(config)
    config.set_defaults(func=show_config)

    info = commands.add_parser(
        "model-info", help="parameters and multiply-accumulates of a pose network",
        description="Build a pose network (no weights are loaded) and print its parameter count and the "
        "multiply-accumulates of one forward pass at the given input size.",
    )
    info.add_argument("name", choices=typing.get_args(Backbone), help="backbone name")
    info.add_argument("--input", type=_size, default=(256, 192), help="input HxW (default 256x192)")
    info.set_defaults(func=run_model_info)
