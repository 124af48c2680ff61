"""The demo's CNN chain (cnn -> cnn_crf -> cnn_joint) trained with several seeds: each seed's paired differences
on the validation split and on a held-out set, and their spread across seeds. Prints JSON.

    python benchmarks/seed_spread.py HELDOUT_SHARDS [--seeds 0 1 2] [--config quick] [--out FILE]

Run it where `make demo` ran (its data/shards and runs/). Seed s sets train.seed (the initialisation) and
data.seed (the order and augmentation of the training stream) of every run of the chain. Seed 0 is the demo's
own chain, so its runs are the pipeline's (runs/pipeline_<recipe>) and the demo's finished ones are reused;
seed s > 0 trains runs/pipeline_<recipe>_seed<s>. One local Ray cluster serves every run. HELDOUT_SHARDS is made
as benchmarks/heldout_pairs.py's docstring says.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path

from heldout_pairs import differences, predictions_on

from distpose.bench import machine
from distpose.cluster import ray_cluster
from distpose.commands.arguments import write_json
from distpose.config import find_config
from distpose.pipeline import run_config
from distpose.recipes import recipe
from distpose.train.driver import train

CHAIN = ("cnn", "cnn_crf", "cnn_joint")


def train_chain(config_dir: Path, seed: int) -> dict[str, Path]:
    """The chain's final model files at `seed`, trained where missing."""
    finals: dict[str, Path] = {}
    for name in CHAIN:
        cfg = run_config(config_dir, name, [f"train.seed={seed}", f"data.seed={seed}"], finals.get(recipe(name).parent),
                         run_suffix="" if seed == 0 else f"_seed{seed}")
        finals[name] = Path(train(cfg).final_model)
    return finals


def spread(per_seed: dict[int, dict]) -> dict:
    """Across seeds, per set, comparison and PCK kind: the estimates' mean, min and max, and how many seeds'
    intervals lie wholly above or below zero."""
    first = next(iter(per_seed.values()))
    out = {}
    for set_name, pairs in first.items():
        for pair, kinds in pairs.items():
            for kind in kinds:
                found = [per_seed[s][set_name][pair][kind] for s in per_seed]
                out.setdefault(set_name, {}).setdefault(pair, {})[kind] = {
                    "mean": round(statistics.mean(d.estimate for d in found), 4),
                    "min": round(min(d.estimate for d in found), 4),
                    "max": round(max(d.estimate for d in found), 4),
                    "seeds_above_zero": sum(d.low > 0 for d in found),
                    "seeds_below_zero": sum(d.high < 0 for d in found),
                }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("heldout_shards")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", default="quick", help="recipe directory (a path or a packaged name)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # each run's progress and result lines
    config_dir = find_config(args.config, directory=True)
    first = run_config(config_dir, CHAIN[0], [], None)
    with ray_cluster(None, first.monitor):
        finals = {seed: train_chain(config_dir, seed) for seed in args.seeds}
    sets = {"val": (first.data.shards, first.data.val_split), "held-out": (args.heldout_shards, "val")}
    per_seed, instances = {}, {}
    for seed, files in finals.items():
        per_seed[seed] = {}
        for set_name, (shards, split) in sets.items():
            predictions = predictions_on(files, shards, split)
            instances[set_name] = len(predictions[CHAIN[0]].instance_ids)
            per_seed[seed][set_name] = differences(predictions)
    report = {
        "machine": machine(),
        "seeds": args.seeds,
        "instances": instances,
        "per_seed": {seed: {set_name: {pair: {kind: d.format(signed=True) for kind, d in kinds.items()}
                                       for pair, kinds in pairs.items()} for set_name, pairs in by_set.items()}
                     for seed, by_set in per_seed.items()},
        "spread": spread(per_seed),
    }
    write_json(report, args.out)


if __name__ == "__main__":
    main()
