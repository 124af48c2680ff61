"""The demo's comparisons again, on its validation split and on a held-out set: paired 95% intervals. Prints JSON.

    python benchmarks/heldout_pairs.py RUNS DEMO_SHARDS HELDOUT_SHARDS [--out FILE]

RUNS holds the pipeline's runs (pipeline_<recipe>/final.pt). The held-out set is a synthetic one of another
seed, sharded as an eval split, e.g.

    distpose data synth --out heldout --train 10 --val 600 --seed 28
    distpose data shard --coco-root heldout --split val --out heldout-shards

Each model file is scored on both sets with its own config (ground-truth boxes, flip test), and each comparison
the recipes exist for gets its paired bootstrap interval over the set's instances, for visible and occluded
PCK@0.1 and visible PCK@0.05.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from distpose.data.shards import shard_ground_truth
from distpose.eval.bootstrap import instance_pck, paired_difference, pck_interval
from distpose.eval.evaluate import evaluate_model
from distpose.models.model_file import load_model_file
from distpose.pipeline import comparison_pairs
from distpose.recipes import RECIPE_NAMES

KINDS = (("visible", 0.1), ("occluded", 0.1), ("visible", 0.05))


def scored(runs: Path, shards: str, split: str) -> dict:
    truth = shard_ground_truth(shards, split)
    predictions = {}
    for name in RECIPE_NAMES:
        model, cfg, _ = load_model_file(runs / f"pipeline_{name}" / "final.pt")
        data = dataclasses.replace(cfg.data, shards=shards, val_split=split, loader_workers=1)
        _, predictions[name] = evaluate_model(model, dataclasses.replace(cfg, data=data), ground_truth=truth)
    return {
        "instances": len(predictions["cnn"].instance_ids),
        "runs": {name: {f"{k}@{t}": pck_interval(instance_pck(p, k, t)).format() for k, t in KINDS}
                 for name, p in predictions.items()},
        "pairs": {f"{a} - {b}": {f"{k}@{t}": paired_difference(instance_pck(predictions[a], k, t),
                                                               instance_pck(predictions[b], k, t)).format(signed=True)
                                 for k, t in KINDS} for a, b in comparison_pairs(RECIPE_NAMES)
                  if b is not None},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("demo_shards")
    parser.add_argument("heldout_shards")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = {"val": scored(args.runs, args.demo_shards, "val"),
              "held-out": scored(args.runs, args.heldout_shards, "val")}
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
