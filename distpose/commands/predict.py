"""`distpose predict --checkpoint CKPT IMAGE... --out DIR`: keypoints for image files."""

from __future__ import annotations

import argparse
from pathlib import Path

from distpose.commands.arguments import plural


def run_predict(args: argparse.Namespace) -> int:
    from distpose.eval.predict import predict_images

    out = Path(args.out)
    counts = predict_images(args.checkpoint, args.images, out, args.boxes, args.min_box_score)
    removed = f" ({counts['removed_by_nms']} duplicates removed by OKS-NMS)" if counts["removed_by_nms"] else ""
    skipped = f", {plural(len(counts['skipped']), 'unreadable image')} skipped" if counts["skipped"] else ""
    print(f"{plural(counts['people'], 'person', 'people')}{removed} in {plural(counts['images'], 'image')}{skipped}: "
          f"drawings and results.json in {out}")
    return 1 if counts["skipped"] and not counts["images"] else 0


def register(commands: argparse._SubParsersAction) -> None:
    predict = commands.add_parser(
        "predict", help="keypoints for image files: drawings and COCO-results JSON",
        description="Run a model file on image files: person boxes from --boxes (COCO-results "
        "detections; image ids are the files' numeric names) or the whole image as one person. Writes one "
        "drawing per image and results.json (COCO keypoint results) to --out.",
    )
    predict.add_argument("images", nargs="+", help="image files, or directories of them")
    predict.add_argument("--checkpoint", required=True, help="model file (best.pt, final.pt): a local path or s3://")
    predict.add_argument("--boxes", help="COCO-results JSON of person detections (default: whole image)")
    predict.add_argument("--min-box-score", type=float, default=0.0, help="drop detections below this score")
    predict.add_argument("--out", required=True, help="output directory")
    predict.set_defaults(func=run_predict)
