"""`distpose train CONFIG [k=v ...]`: one run with Ray Train + DeepSpeed."""

from __future__ import annotations

import argparse

from distpose.commands.arguments import add_address_argument, add_config_arguments


def run_train(args: argparse.Namespace) -> int:
    from distpose.config import load_config
    from distpose.train.driver import train

    cfg = load_config(args.config, args.overrides)
    train(cfg, address=args.address, resume=args.resume)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train", help="train a pose model with Ray Train + DeepSpeed",
        description="Train on a Ray cluster: a local one by default, an existing one with --address or "
        "RAY_ADDRESS. Writes train.storage/train.run_name/: checkpoints (the latest train.keep_checkpoints), "
        "metrics.jsonl (every step and evaluation), best.pt and final.pt (model files: fp32 "
        "weights + config). Rerunning a run name resumes it from its latest checkpoint; a finished run "
        "is not retrained.",
    )
    add_config_arguments(train)
    add_address_argument(train)
    train.add_argument("--resume", metavar="CHECKPOINT_DIR",
                       help="start from this training checkpoint (a checkpoint_* directory of any run)")
    train.set_defaults(func=run_train)
