"""The `distpose` command: one module per subcommand, each a thin layer over the library.

    distpose data synth|shard|verify   build and check the WebDataset shards
    distpose train CONFIG [k=v ...]    train with Ray Train + DeepSpeed (local Ray, or --address)
    distpose eval --checkpoint CKPT    PCK, COCO AP/AR and skeleton drawings of a trained model
    distpose predict --checkpoint CKPT IMAGE... --out DIR   keypoints for image files
    distpose pipeline [CONFIG_DIR]     data, the six recipes trained, evaluation and a report (`make demo`)
    distpose tune SWEEP [k=v ...]      Ray Tune sweep over the recipes: leaderboard and best model files
    distpose config                    print a resolved config (YAML + key=value overrides)
    distpose model-info NAME           parameters and GMACs of a pose network
    distpose convert SRC OUT --arch A  a published HRNet/SimpleBaseline pose model as a distpose model file
    distpose bench loader|train|crf|kernel|ablation   loader and training throughput; the CRF formulations;
                                             the kernel; the CRF recipes' choices, one at a time

User mistakes (bad arguments, config keys, missing or corrupt files) print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from distpose import __version__
from distpose.commands import bench, config, data, evaluate, pipeline, predict, train, tune
from distpose.commands.arguments import split_overrides
from distpose.errors import UserError

# The order of `distpose --help`.
COMMANDS = (data, train, tune, evaluate, predict, pipeline, config, bench)


class _Formatter(logging.Formatter):
    """Progress as it is said; anything worse than that with its level, so that it stands out."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno <= logging.INFO else f"distpose: {record.levelname.lower()}: {text}"


class _ConsoleHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record, not as it was when main() ran: a stream swapped in for one
    call (a test's capture) may be closed before the next call logs."""

    def __init__(self):
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    """-q/-v on `parser` and every subcommand under it, so that they may come anywhere on the line."""
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                           help="warnings and errors only: no progress")
    verbosity.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                           help="debug messages, and Ray's, DeepSpeed's and the workers' own output")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_verbosity(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distpose",
        description="Distributed training of top-down 2D human-pose models on COCO keypoints "
        "(Ray Train + DeepSpeed + WebDataset).",
    )
    parser.add_argument("--version", action="version", version=f"distpose {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(commands)
    _add_verbosity(parser)
    return parser


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line as a namespace. `key.sub=value` overrides may come anywhere on the line, after options
    too (`distpose pipeline quick --val-images 50 train.epochs=1`): argparse alone takes positionals only before
    the first option that follows them."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    late = [word for word in extra if "=" in word and not word.startswith("-")]
    if len(late) < len(extra) or (late and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if late:
        args.overrides = [*args.overrides, *late]
    split_overrides(args)
    return args


# What an interrupted command keeps, and how to go on from it.
RESUME_HINTS = {
    "train": "rerun the same command to resume from the run's latest checkpoint",
    "pipeline": "rerun the same command to go on: finished runs are kept, an unfinished one resumes",
    "tune": "rerun the same command with --resume to go on: each unfinished trial resumes from its latest "
            "checkpoint, finished ones are kept",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    # The flags' default is SUPPRESS (so that a subcommand's parser does not reset what an outer one set):
    # the namespace has them only where given, and every command reads them from here on.
    args.quiet, args.verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    quiet, verbose = args.quiet, args.verbose
    if quiet and verbose:
        print("distpose: error: -q and -v exclude each other", file=sys.stderr)
        return 2
    handler = _ConsoleHandler()
    handler.setFormatter(_Formatter())
    handler.setLevel(logging.WARNING if quiet else logging.DEBUG)  # a run's log file takes INFO regardless
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    # Our debug messages, not every library's; a run's log file still takes INFO. Set on every call: a level left
    # by an earlier call in the same process (-q) would silence this one.
    logging.getLogger("distpose").setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.NOTSET)
    # Tune's TensorBoard logger renames every `pck@0.1`-style metric, one INFO line per name per trial.
    logging.getLogger("tensorboardX").setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except UserError as exc:
        print(f"distpose: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a path that is a file, unreadable, unwritable, or a full disk
        print(f"distpose: error: {exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = RESUME_HINTS.get(args.command)
        print(f"distpose: interrupted{f'; {hint}' if hint else ''}", file=sys.stderr)
        return 130
