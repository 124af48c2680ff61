"""`distpose eval --checkpoint CKPT`: PCK, COCO AP/AR and skeleton drawings of a trained model."""

from __future__ import annotations

import argparse
from pathlib import Path

from distpose.commands.arguments import positive


def run_eval(args: argparse.Namespace) -> int:
    from distpose.eval.evaluate import lost_data
    from distpose.eval.scoring import score_to_directory, summary_line

    metrics, out = score_to_directory(args.checkpoint, args.data, args.split, args.boxes,
                                      Path(args.out) if args.out else None, args.overwrite, args.workers,
                                      args.address)
    print(f"{metrics['instances']} instances: {summary_line(metrics)}")
    if lost_data(metrics):
        print(lost_data(metrics))
    print(f"wrote {out}/metrics.json, results.json, skeletons.jpg")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "eval", help="score a model file: PCK, HRNet accuracy, COCO AP/AR, drawings",
        description="Score a model file (best.pt/final.pt of a run) on a split: PCK@thresholds for "
        "visible and occluded joints, HRNet's heatmap accuracy, COCO AP/AR via pycocotools. Writes "
        "metrics.json, results.json (COCO results) and skeletons.jpg (+ images/) to --out.",
    )
    evaluate.add_argument("--checkpoint", required=True, help="model file (best.pt, final.pt): a local path or s3://")
    evaluate.add_argument("--data", help="shard directory (local, s3:// or http(s)://) or COCO root (default: the "
                          "model's data.shards)")
    evaluate.add_argument("--split", help="split name (default: the model's val split, or the only one)")
    evaluate.add_argument("--boxes", default="gt",
                          help="'gt' for ground-truth boxes (default) or a COCO-results JSON of person detections")
    evaluate.add_argument("--out", help="output directory (default: eval-<model file>-<split>-<gt or the boxes "
                          "file's name> beside the model file, or in the working directory for one on object storage)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace the result already in the output directory")
    evaluate.add_argument("--workers", type=positive, default=1, help="Ray Train ranks (default 1: in process)")
    evaluate.add_argument("--address", help="Ray cluster address for --workers > 1 (default: local Ray)")
    evaluate.set_defaults(func=run_eval)
