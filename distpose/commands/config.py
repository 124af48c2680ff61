"""`distpose config`, `distpose model-info NAME` and `distpose convert`: a resolved config; a network's size;
a published pose model as a distpose model file."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import yaml

from distpose.commands.arguments import add_config_arguments, log, output_path
from distpose.config import ResolvedConfig, resolve_config, to_dict
from distpose.errors import UserError
from distpose.models.registry import BACKBONES

COMMENT_COLUMN = 56  # where the source comments line up; a longer line gets its comment two spaces after it


def annotated_yaml(resolved: ResolvedConfig) -> str:
    """The config as YAML that load_config reads back, each value followed by a comment naming the layer that
    set it (default, a file's name, override), under a header listing the layers in the order they apply."""
    layers = [("default", "(the schema, distpose/config.py)"), *((Path(str(f)).name, str(f)) for f in resolved.files),
              ("override", "(the command line)")]
    width = max(len(name) for name, _ in layers)
    header = ["# Each value's comment names the layer that set it; the layers, in the order they apply:",
              *(f"#   {name.ljust(width)}  {where}" for name, where in layers)]
    lines: list[tuple[str, str]] = []  # (YAML line, its value's source; "" for a section)

    def add(mapping: dict, prefix: str, indent: str) -> None:
        for key, value in mapping.items():
            if isinstance(value, dict):
                lines.append((f"{indent}{key}:", ""))
                add(value, f"{prefix}{key}.", indent + "  ")
            else:
                lines.append((f"{indent}{key}: {one_line_yaml(value)}", resolved.source(prefix + key)))

    add(to_dict(resolved.config), "", "")
    column = min(COMMENT_COLUMN, max(len(line) for line, source in lines if source))
    body = [f"{line.ljust(column)}  # {source}" if source else line for line, source in lines]
    return "\n".join([*header, *body]) + "\n"


def one_line_yaml(value: object) -> str:
    """A value as YAML on one line, so that its comment follows it: lists in flow style, a string holding a line
    break (or another unprintable character) double-quoted with escapes, where YAML would spread it over lines."""
    style = '"' if isinstance(value, str) and not value.isprintable() else None
    text = yaml.safe_dump(value, default_flow_style=True, default_style=style, width=math.inf)
    return text.removesuffix("\n...\n").rstrip("\n")


def show_config(args: argparse.Namespace) -> int:
    print(annotated_yaml(resolve_config(args.config, args.overrides)), end="")
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
    multiple = BACKBONES[name].input_multiple
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
    from distpose.models.model_file import convert_official_model

    check_input_size(args.arch, args.input)
    output_path(args.out)
    convert_official_model(args.source, args.out, args.arch, args.input)
    log.info("wrote %s: %s at %dx%d, for `distpose eval --checkpoint` and `distpose predict --checkpoint`",
             args.out, args.arch, *args.input)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    config = commands.add_parser(
        "config", help="print a resolved config",
        description="Print the config that a command would run with: defaults, then CONFIG's base file (if "
        "it names one), then CONFIG, then key.sub=value overrides, checked against the schema. Each value's "
        "comment names the layer that set it; the output is itself a config file.",
    )
    add_config_arguments(config)
    config.set_defaults(func=show_config)

    info = commands.add_parser(
        "model-info", help="parameters and multiply-accumulates of a pose network",
        description="Build a pose network (no weights are loaded) and print its parameter count and the "
        "multiply-accumulates of one forward pass at the given input size.",
    )
    info.add_argument("name", choices=list(BACKBONES), help="backbone name")
    info.add_argument("--input", type=input_size, default=(256, 192), help="input HxW (default 256x192)")
    info.set_defaults(func=run_model_info)

    convert = commands.add_parser(
        "convert", help="a published HRNet or SimpleBaseline pose model as a distpose model file",
        description="Turn an official pose model's weights file (HRNet's pose_hrnet_w32_256x192.pth, "
        "SimpleBaseline's pose_resnet_50_256x192.pth, ...; official parameter names) into a distpose "
        "model file that `eval` and `predict` load. Every tensor of the network must be in the file.",
    )
    convert.add_argument("source", help="the official .pth file")
    convert.add_argument("out", help="the distpose model file to write (.pt)")
    convert.add_argument("--arch", required=True, choices=list(BACKBONES),
                         help="the network: hrnet_w32, hrnet_w48 (HRNet), resnet50 (SimpleBaseline)")
    convert.add_argument("--input", type=input_size, default=(256, 192),
                         help="the input HxW it was trained at (default 256x192)")
    convert.set_defaults(func=run_convert)
