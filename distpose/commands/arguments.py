"""Argument types and output helpers shared by the commands."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from distpose.errors import UserError
from distpose.files import atomic_write_bytes

log = logging.getLogger("distpose")


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def plural(count: int, noun: str, nouns: str = "") -> str:
    """`1 shard`, `2 shards`, `1,024 images`; `nouns` for an irregular plural."""
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"


def output_path(out: str | None) -> Path | None:
    """Check an --out path before a long run, not after it."""
    if not out:
        return None
    path = Path(out)
    if path.is_dir():
        raise UserError(f"--out {path} is a directory; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_json(doc: dict, path: Path | None) -> None:
    text = json.dumps(doc, indent=2)
    print(text)
    if path:
        atomic_write_bytes(path, (text + "\n").encode())
        log.info("wrote %s", path)


def add_config_arguments(parser: argparse.ArgumentParser,
                         config_help: str = "YAML config file, or a packaged config by name, e.g. quick/cnn "
                                            "(default: built-in defaults)") -> None:
    parser.add_argument("config", nargs="?", help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def add_address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")


def split_overrides(args: argparse.Namespace) -> None:
    """argparse cannot tell an optional config path from the first override: `a=b` is an override."""
    config = getattr(args, "config", None)
    if config is not None and "=" in config and not Path(config).exists():
        args.overrides = [config, *args.overrides]
        args.config = None
