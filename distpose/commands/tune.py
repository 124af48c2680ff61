"""`distpose tune SWEEP [k=v ...]`: a Ray Tune sweep over the recipes."""

from __future__ import annotations

import argparse

from distpose.commands.arguments import add_address_argument


def run_tune(args: argparse.Namespace) -> int:
    from distpose.train.sweep_file import load_sweep
    from distpose.train.tune import run_sweep

    run_sweep(load_sweep(args.sweep, args.overrides), address=args.address, resume=args.resume)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    tune = commands.add_parser(
        "tune", help="Ray Tune sweep over the recipes (ASHA), leaderboard and best model files",
        description="Run the sweep file's trials: per recipe a Tune experiment with ASHA on the validation "
        "metric; backbone recipes first, then crf/joint trials from the best backbone of their network. Writes "
        "storage/name/: leaderboard.md and .csv (best trial per recipe), trials.csv, best/<recipe>.pt.",
    )
    tune.add_argument("sweep", help="sweep YAML file, or a packaged sweep by name: quick, coco (configs/tune/)")
    tune.add_argument("overrides", nargs="*", metavar="key=value", help="override top-level sweep keys")
    add_address_argument(tune)
    tune.add_argument("--resume", action="store_true",
                      help="finish an interrupted sweep of this name: finished recipes and trials are not rerun")
    tune.set_defaults(func=run_tune)
