"""`distpose pipeline [CONFIG_DIR]`: data, the six runs, evaluation and a report (`make demo`)."""

from __future__ import annotations

import argparse

from distpose.commands.arguments import add_address_argument, positive


def run_pipeline(args: argparse.Namespace) -> int:
    from distpose.pipeline import run_pipeline

    run_pipeline(args.config or "quick", tuple(args.overrides), data_root=args.data,
                 report_dir=args.report, train_images=args.train_images, val_images=args.val_images,
                 address=args.address)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    pipeline = commands.add_parser(
        "pipeline", help="synthetic data, the six recipes trained and evaluated, one report",
        description="Generate synthetic COCO data and its shards (if missing), train cnn and hrnet backbones, "
        "then cnn_crf, cnn_joint, hrnet_crf and hrnet_joint from them, evaluate each, and write a report "
        "(report.md, comparison table with the mean-pose floor, loss and PCK plots, skeleton grids). "
        "CONFIG is a directory holding cnn.yaml, hrnet.yaml, cnn_crf.yaml, cnn_joint.yaml, hrnet_crf.yaml "
        "and hrnet_joint.yaml (a path or a packaged name; default quick); overrides apply to every run. "
        "One Ray cluster serves all runs; rerunning resumes unfinished runs and skips finished ones.",
    )
    pipeline.add_argument("config", nargs="?", help="config directory (a path or a packaged name; default quick)")
    pipeline.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides for every run")
    pipeline.add_argument("--data", default="data/synth", help="synthetic COCO root (default data/synth)")
    pipeline.add_argument("--train-images", type=positive, default=1000, help="if generated (default 1000)")
    pipeline.add_argument("--val-images", type=positive, default=250, help="if generated (default 250)")
    pipeline.add_argument("--report", default="reports/pipeline", help="report directory (default reports/pipeline)")
    add_address_argument(pipeline)
    pipeline.set_defaults(func=run_pipeline)
