"""`distpose pipeline`: data, the six recipes trained in dependency order, evaluation, report.

    synthetic COCO -> shards -> mean-pose floor
    cnn -> cnn_crf -> cnn_joint      (each run starts from the final.pt before it)
    hrnet -> hrnet_crf -> hrnet_joint
    -> report.md: comparison table, loss and PCK curves, skeleton grid per run

One Ray cluster serves every run. Runs are named `pipeline_<recipe>` under the storage directory, so
rerunning the pipeline resumes an interrupted run and skips finished ones.
"""

from __future__ import annotations

import functools
import json
import logging
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from distpose.cluster import ray_cluster
from distpose.config import Config, find_config, load_config
from distpose.data.shards import manifest_path, shard_ground_truth, write_shards
from distpose.data.synth import generate_synthetic_coco
from distpose.errors import UserError
from distpose.eval.draw import draw_predictions
from distpose.eval.evaluate import flat_metrics, score
from distpose.eval.mean_pose import fit_mean_pose, predict_mean_pose
from distpose.eval.report import Comparison, RunResult, compare, write_report
from distpose.eval.scoring import score_model_file
from distpose.files import exists, is_uri, read_bytes, within
from distpose.metrics_log import run_history
from distpose.recipes import RECIPES, backbone_recipe, check_recipe_mode, recipe
from distpose.train.crf_prior import PRIOR_FILE
from distpose.train.driver import RUN_CONFIG, TrainOutcome, run_dir, train

log = logging.getLogger(__name__)


def _say(text: str) -> None:
    log.info("[pipeline] %s", text)


def prepare_data(root: Path, shards: str, train_images: int, val_images: int) -> None:
    """Synthetic COCO in `root` and its shards in `shards` (a directory or an object-store URI), unless
    already there (generation is deterministic)."""
    if not (root / "annotations" / "person_keypoints_val.json").is_file():
        _say(f"generating {train_images} + {val_images} synthetic images in {root}")
        generate_synthetic_coco(root, num_train=train_images, num_val=val_images, workers=2, progress=False)
    for split, per_shard in (("train", 100), ("val", 50)):
        if not exists(manifest_path(shards, split)):
            _say(f"sharding {split} into {shards}")
            write_shards(root, split, shards, samples_per_shard=per_shard, workers=2, progress=False)


GroundTruth = Callable[[str, str], dict]


def ground_truth_reader() -> GroundTruth:
    """shard_ground_truth read once per (shard directory, split): every run of a pipeline is scored
    against the same validation split."""
    read = functools.cache(shard_ground_truth)
    return lambda shards, split: read(shards if is_uri(shards) else str(Path(shards).resolve()), split)


def mean_pose_floor(cfg: Config, truth: GroundTruth) -> RunResult:
    d = cfg.data
    mean = fit_mean_pose(truth(d.shards, d.train_split), d.aspect_ratio, d.box_padding)
    val = truth(d.shards, d.val_split)
    predictions = predict_mean_pose(mean, val, d.aspect_ratio, d.box_padding)
    metrics = score(predictions, val, cfg.eval.pck_thresholds)
    return RunResult("mean pose", "floor: the training set's mean pose in every box", flat_metrics(metrics),
                      predictions=predictions)


def comparisons(results: list[RunResult], configs: dict[str, Config]) -> list[Comparison]:
    """HRNet against the CNN, each CRF run against its backbone, and each joint run against the crf run it
    started from: the comparisons the recipes exist for."""
    by_name = {r.name: r for r in results}
    return [compare(by_name[a], by_name[b]) for a, b in comparison_pairs(configs)
            if a in by_name and b in by_name]


def comparison_pairs(names: Iterable[str]) -> list[tuple[str, str]]:
    """(run, against) for the recipes in `names`: HRNet against the CNN, each CRF run against its backbone,
    each joint run against the crf run it started from."""
    names = list(names)
    pairs = [("hrnet", "cnn")] + [(name, backbone_recipe(name)) for name in names]
    return pairs + [(name, recipe(name).parent) for name in names if recipe(name).mode == "joint"]


def crf_notes(results: list[RunResult], configs: dict[str, Config]) -> list[str]:
    """How each CRF run started (its window and pairwise tables, from crf_prior.json) and its training
    budget next to its backbone's."""
    by_name = {r.name: r for r in results}
    notes = []
    for name, cfg in configs.items():
        if cfg.train.mode == "backbone" or name not in by_name:
            continue
        prior = json.loads(read_bytes(within(run_dir(cfg), PRIOR_FILE)))
        held = "" if prior["coverage"] is None else \
            f" holds {prior['coverage']:.1%} of {prior['limbs']:,} training limbs (augmented)"
        parent = recipe(name).parent
        base = by_name.get(parent)
        notes.append(f"- {name}: window R={prior['radius']} at heatmap {cfg.data.heatmap_size[0]}x"
                     f"{cfg.data.heatmap_size[1]}{held}; {prior['how']}; trained {len(by_name[name].steps)} steps "
                     f"from {parent} ({len(base.steps) if base else 0} steps).")
    if notes:
        notes.insert(0, "How each CRF run started (its run directory's crf_prior.json):")
    return notes


def run_config(config_dir: Path, name: str, overrides: list[str], parent: Path | str | None,
               run_suffix: str = "") -> Config:
    """Recipe `name`'s config as the pipeline trains it: run pipeline_<name><run_suffix>, from `parent`."""
    path = config_dir / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"pipeline config directory {config_dir} lacks {name}.yaml (recipe {name!r})")
    extra = [f"train.run_name=pipeline_{name}{run_suffix}"]
    if parent is not None:
        # The report scores every final.pt itself; a CRF run's own evaluation would only repeat the last one.
        extra += [f"train.backbone_checkpoint={parent}", "eval.every_epochs=0"]
    cfg = load_config(path, [*overrides, *extra])
    check_recipe_mode(name, cfg.train.mode, str(path))
    return cfg


def run_pipeline(config_dir: str | Path = "quick", overrides: tuple[str, ...] = (),
                 data_root: str | Path = "data/synth", report_dir: str | Path = "reports/pipeline",
                 train_images: int = 1000, val_images: int = 250, address: str | None = None) -> Path:
    start = time.perf_counter()
    config_dir, report_dir = find_config(config_dir, directory=True), Path(report_dir)
    # Every config read and checked now, not after the data and the first fits.
    first, *_ = [run_config(config_dir, r.name, list(overrides), None) for r in RECIPES]
    prepare_data(Path(data_root), first.data.shards, train_images, val_images)
    truth = ground_truth_reader()
    floor = mean_pose_floor(first, truth)
    _say(f"mean-pose floor: visible PCK@0.1 {floor.metrics.get('visible/pck@0.1', 0):.3f}")
    results, finals, configs = [floor], {}, {}
    with ray_cluster(address, first.monitor):
        for r in RECIPES:
            cfg = run_config(config_dir, r.name, list(overrides), finals.get(r.parent))
            configs[r.name] = cfg
            _say(f"{r.name}: {r.description} ({cfg.model.backbone}, mode {cfg.train.mode})")
            outcome = train(cfg)
            finals[r.name] = outcome.final_model
            results.append(_evaluate_run(r.name, r.description, outcome, report_dir, truth))
            m = results[-1].metrics
            _say(f"{r.name}: visible PCK@0.1 {m.get('visible/pck@0.1', 0):.3f}, occluded "
                 f"{m.get('occluded/pck@0.1', 0):.3f}, AP {m.get('AP', 0):.3f} ({outcome.wall_time:.0f} s)")
    header = [f"Configs: `{config_dir}` (overrides: {' '.join(overrides) or 'none'}); data: `{data_root}` "
              f"({train_images} training, {val_images} validation images); total pipeline time "
              f"{time.perf_counter() - start:.0f} s."]
    path = write_report(report_dir, results, header, comparisons(results, configs), crf_notes(results, configs))
    _say(f"report: {path} ({time.perf_counter() - start:.0f} s in all)")
    return path


def _evaluate_run(name: str, description: str, outcome: TrainOutcome, report_dir: Path, truth: GroundTruth
                  ) -> RunResult:
    """Score the run's final.pt in this process (the table's figures) and draw its skeleton grid."""
    data = load_config(within(outcome.run_dir, RUN_CONFIG)).data
    metrics, predictions, cfg = score_model_file(outcome.final_model, truth(data.shards, data.val_split))
    grid_path = draw_predictions(cfg.data.shards, cfg.data.val_split, predictions, report_dir / name, max_images=8)
    steps, evals = run_history(outcome.run_dir)
    throughput = statistics.median(s["samples_per_s"] for s in steps) if steps else None
    return RunResult(name, description, flat_metrics(metrics), outcome.wall_time or None, throughput, steps, evals,
                      str(grid_path.relative_to(report_dir)) if grid_path else None, predictions)
