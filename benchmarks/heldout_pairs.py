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
from pathlib import Path

from distpose.bench import machine
from distpose.commands.arguments import write_json
from distpose.data.shards import shard_ground_truth
from distpose.eval.bootstrap import instance_pck, paired_difference, pck_interval
from distpose.eval.evaluate import evaluate_model
from distpose.eval.inference import Predictions
from distpose.eval.scoring import eval_config
from distpose.models.model_file import load_model_file
from distpose.pipeline import comparison_pairs
from distpose.recipes import RECIPE_NAMES

KINDS = (("visible", 0.1), ("occluded", 0.1), ("visible", 0.05))


def predictions_on(model_files: dict[str, Path], shards: str, split: str) -> dict[str, Predictions]:
    """Each model file's predictions on `split` of `shards`, with its own config (ground-truth boxes, flip test)."""
    truth = shard_ground_truth(shards, split)
    predictions = {}
    for name, path in model_files.items():
        model, cfg, _ = load_model_file(path)
        _, predictions[name] = evaluate_model(model, eval_config(cfg, shards, split), ground_truth=truth)
    return predictions


def differences(predictions: dict[str, Predictions]) -> dict[str, dict]:
    """The paired differences of the recipes' comparisons among `predictions`, per PCK kind."""
    return {f"{a} - {b}": {f"{k}@{t}": paired_difference(instance_pck(predictions[a], k, t),
                                                         instance_pck(predictions[b], k, t))
                           for k, t in KINDS}
            for a, b in comparison_pairs(predictions) if a in predictions and b in predictions}


def scored(model_files: dict[str, Path], shards: str, split: str) -> dict:
    predictions = predictions_on(model_files, shards, split)
    return {
        "instances": len(next(iter(predictions.values())).instance_ids),
        "runs": {name: {f"{k}@{t}": pck_interval(instance_pck(p, k, t)).format() for k, t in KINDS}
                 for name, p in predictions.items()},
        "pairs": {pair: {kind: d.format(signed=True) for kind, d in by_kind.items()}
                  for pair, by_kind in differences(predictions).items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("demo_shards")
    parser.add_argument("heldout_shards")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model_files = {name: args.runs / f"pipeline_{name}" / "final.pt" for name in RECIPE_NAMES}
    report = {"machine": machine(), "val": scored(model_files, args.demo_shards, "val"),
              "held-out": scored(model_files, args.heldout_shards, "val")}
    write_json(report, args.out)


if __name__ == "__main__":
    main()
