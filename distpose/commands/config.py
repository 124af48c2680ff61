"""`distpose config`, `distpose model-info NAME` and `distpose convert`: a resolved config; a network's size;
a published pose model as a distpose checkpoint."""

from __future__ import annotations

import argparse
import typing

from distpose.commands.arguments import add_config_arguments, log, output_path
from distpose.config import Backbone, input_multiple
from distpose.errors import UserError


def show_config(args: argparse.Namespace) -> int:
    from distpose.config import dump_yaml, load_config

    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def input_size(text: str) -> tuple[int, int]:
    """HxW, checked against the network where one is named (its deepest stride must divide it)."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 256x192, got {text!r}") from None
    if height < 8 or width < 8 or height % 8 or width % 8:
        raise argparse.ArgumentTypeError(f"expected HxW in multiples of 8, e.g. 256x192, got {text!r}")
    return height, width


def check_input_size(name: str, size: tuple[int, int]) -> None:
    multiple = input_multiple(name)
    if size[0] % multiple or size[1] % multiple:
        raise UserError(f"--input {size[0]}x{size[1]}: {name} needs multiples of {multiple} "
                        f"(its lowest-resolution stage is at stride {multiple})")


def run_model_info(args: argparse.Namespace) -> int:
    from distpose.models.factory import ModelInfo, model_info

    check_input_size(args.name, args.input)
    info = model_info(args.name, args.input)
    print(f"{info.name}: {info.params / 1e6:.2f}M parameters ({info.params:,}), "
          f"{info.macs / 1e9:.2f} GMACs at {info.input_size[0]}x{info.input_size[1]}, "
          f"heatmaps {info.output_shape[1]}x{info.output_shape[2]}x{info.output_shape[3]}")
    print(f"counter: {ModelInfo.COUNTER}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from distpose.models.pose import convert_pose_weights

    check_input_size(args.arch, args.input)
    output_path(args.out)
    convert_pose_weights(args.source, args.out, args.arch, args.input)
    log.info("wrote %s: %s at %dx%d, for `distpose eval --checkpoint` and `distpose predict --checkpoint`",
             args.out, args.arch, *args.input)
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
    info.add_argument("--input", type=input_size, default=(256, 192), help="input HxW (default 256x192)")
    info.set_defaults(func=run_model_info)

    convert = commands.add_parser(
        "convert", help="a published HRNet or SimpleBaseline pose model as a distpose checkpoint",
        description="Turn an official pose model's weights file (HRNet's pose_hrnet_w32_256x192.pth, "
        "SimpleBaseline's pose_resnet_50_256x192.pth, ...; official parameter names) into a distpose inference "
        "checkpoint that `eval` and `predict` load. Every tensor of the network must be in the file.",
    )
    convert.add_argument("source", help="the official .pth file")
    convert.add_argument("out", help="the distpose checkpoint to write (.pt)")
    convert.add_argument("--arch", required=True, choices=typing.get_args(Backbone),
                         help="the network: hrnet_w32, hrnet_w48 (HRNet), resnet50 (SimpleBaseline)")
    convert.add_argument("--input", type=input_size, default=(256, 192),
                         help="the input HxW it was trained at (default 256x192)")
    convert.set_defaults(func=run_convert)
