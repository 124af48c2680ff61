"""What each choice of the CRF modes is worth: one change at a time against the shipped crf and joint
configs, trained from the same backbone and scored on the same validation instances.

    pairwise start   the training split's limb statistics (shipped) / a Gaussian at zero displacement
    window           chosen from the limbs (shipped) / a smaller radius
    unary scale      the shipped model.crf_unary_scale / a third / three times
    target           the cross-entropy target at model.crf_target_sigma (shipped) / at the heatmaps' data.sigma
    occluders        synthetic occluders pasted on the CRF's training crops / none
    types            displacement types per edge with per-instance weights (Chen & Yuille) / one table per edge
    gains            a learned temperature per joint and weight per edge / none
    joint start      the crf run's backbone and CRF (shipped, staged) / the backbone and a fresh CRF
    joint backbone   the backbone at train.lr x backbone_lr_scale (shipped) / at the CRF's learning rate
    joint heatmaps   the CRF's loss alone / plus the backbone's heatmap MSE

The joint variants that start from a crf run start from the shipped crf variant's model. Every variant
reports its PCK@0.1 (visible and occluded) with a 95% bootstrap interval, its paired difference from the
reference run of its mode, and from the backbone it started from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

from distpose.bench import machine
from distpose.cluster import ray_cluster
from distpose.config import Config, find_config, load_config
from distpose.errors import UserError
from distpose.eval.bootstrap import Interval
from distpose.eval.evaluate import flat_metrics
from distpose.eval.report import HEADLINE, KINDS, RunResult, compare
from distpose.eval.scoring import score_model_file
from distpose.files import exists, read_bytes, within
from distpose.metrics_log import read_records
from distpose.train.crf_prior import PRIOR_FILE
from distpose.train.driver import run_dir, train

log = logging.getLogger(__name__)

# (variant, train.mode of the recipe varied, overrides): the first of each mode is its reference.
VARIANTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("crf (shipped)", "crf", ()),
    ("crf, pairwise a Gaussian at zero", "crf", ("model.crf_pairwise_init=gaussian",)),
    ("crf, window R=3", "crf", ("model.crf_window=3",)),
    ("crf, unary scale / 3", "crf", ("model.crf_unary_scale={scale_third}",)),
    ("crf, unary scale x 3", "crf", ("model.crf_unary_scale={scale_triple}",)),
    ("crf, cross-entropy target at data.sigma", "crf", ("model.crf_target_sigma={heatmap_sigma}",)),
    ("crf, synthetic occluders on half the crops", "crf", ("data.augment.occluder_prob=0.5",)),
    ("crf, 3 displacement types per edge", "crf", ("model.crf_pairwise_types=3",)),
    ("crf, a learned temperature per joint and weight per edge", "crf", ("model.crf_gains=true",)),
    ("joint (shipped)", "joint", ()),
    ("joint, from the backbone and a fresh CRF", "joint",
     ("train.crf_from_checkpoint=false", "model.crf_window_coverage={crf_coverage}")),
    ("joint, backbone at the CRF's learning rate", "joint", ("train.backbone_lr_scale=1.0",)),
    ("joint, plus the heatmap MSE x 1000", "joint", ("train.heatmap_loss_weight=1000",)),
)


def _say(text: str) -> None:
    log.info("[ablation] %s", text)


def _slug(name: str) -> str:
    return "_".join(re.findall(r"[a-z0-9]+", name.lower()))


def variant_configs(config_dir: Path, network: str, overrides: tuple[str, ...]) -> list[tuple[str, Config]]:
    """(variant, config) per variant, its run named ablation_<network>_<the variant's name as a slug> in the configs'
    storage: by name, not position, so a variant added later never finds another variant's finished run."""
    out = []
    crf_path = config_dir / f"{network}_crf.yaml"
    if not crf_path.is_file():
        raise UserError(f"ablation: config directory {config_dir} lacks {crf_path.name}")
    crf_coverage = load_config(crf_path, overrides).model.crf_window_coverage  # a fresh CRF's window, as crf's
    for name, mode, changes in VARIANTS:
        path = config_dir / f"{network}_{mode}.yaml"
        if not path.is_file():
            raise UserError(f"ablation: config directory {config_dir} lacks {path.name}")
        base = load_config(path, overrides)
        values = {"scale_third": base.model.crf_unary_scale / 3, "scale_triple": base.model.crf_unary_scale * 3,
                  "heatmap_sigma": base.data.sigma, "crf_coverage": crf_coverage}
        extra = [c.format(**values) for c in changes] + [f"train.run_name=ablation_{network}_{_slug(name)}"]
        out.append((name, load_config(path, [*overrides, *extra])))
    return out


def run(config_dir: str | Path = "quick", network: str = "cnn", overrides: tuple[str, ...] = (),
        address: str | None = None) -> dict[str, Any]:
    variants = variant_configs(find_config(config_dir, directory=True), network, overrides)
    backbone = variants[0][1].train.backbone_checkpoint
    if not exists(backbone):
        raise UserError(f"ablation: the backbone checkpoint {backbone} does not exist: train it first (`make demo` "
                        "writes runs/pipeline_<network>/final.pt) or name one with train.backbone_checkpoint=...")
    _say(f"{len(variants)} CRF runs from {backbone}")
    _, base_predictions, _ = score_model_file(backbone)
    base = RunResult(network, "the backbone", {}, predictions=base_predictions)
    results: list[tuple[str, Config, RunResult]] = []
    crf_reference = None
    with ray_cluster(address, variants[0][1].monitor):
        for name, cfg in variants:
            if cfg.train.crf_from_checkpoint:  # the staged schedule: from the shipped crf variant's model
                cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, backbone_checkpoint=crf_reference))
            _say(f"{name}: training {cfg.train.run_name}")
            outcome = train(cfg)
            if crf_reference is None and cfg.train.mode == "crf":
                crf_reference = str(outcome.final_model)
            metrics, predictions, _ = score_model_file(outcome.final_model)
            results.append((name, cfg, RunResult(name, cfg.train.mode, flat_metrics(metrics),
                                                  training_seconds(outcome.run_dir), predictions=predictions)))
    references: dict[str, RunResult] = {}
    for _, cfg, result in results:
        references.setdefault(cfg.train.mode, result)  # each mode's first variant
    rows = []
    for name, cfg, result in results:
        prior_file = within(run_dir(cfg), PRIOR_FILE)
        prior = read_bytes(prior_file) if exists(prior_file) else b"{}"
        reference = references[cfg.train.mode]
        rows.append({
            "variant": name, "mode": cfg.train.mode, "run": cfg.train.run_name, "wall_time": result.wall_time,
            "steps": cfg.train.epochs * cfg.data.batches_per_epoch, "prior": json.loads(prior),
            "metrics": {k: result.metrics[k] for k in ("visible/pck@0.1", "occluded/pck@0.1", "AP")},
            "intervals": {kind: _record(i) for kind, i in result.intervals().items()},
            "vs_reference": None if reference is result else
            {kind: _record(d) for kind, d in compare(result, reference).differences.items()},
            "vs_backbone": {kind: _record(d) for kind, d in compare(result, base).differences.items()},
        })
    return {"benchmark": "crf-ablation", "machine": machine(), "network": network, "backbone": backbone,
            "instances": len(base_predictions), "metric": HEADLINE, "kinds": list(KINDS), "variants": rows,
            "table": table(rows)}


def training_seconds(directory: Path | str) -> float:
    """From the run's first start to its final.pt, in its metrics.jsonl: the same figure for a run trained
    now and for a finished run found again."""
    start = min(r["time"] for r in read_records(directory, "start"))
    return max(r["time"] for r in read_records(directory, "final")) - start


def _record(interval: Interval) -> list[float]:
    return [interval.estimate, interval.low, interval.high]


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: each variant's scores and its differences from its mode's reference and from the backbone."""
    def diff(values: list[float] | None) -> str:
        if values is None:
            return "(reference)"
        estimate, low, high = values
        verdict = " better" if low > 0 else " worse" if high < 0 else ""
        return f"{estimate:+.3f} [{low:+.3f}, {high:+.3f}]{verdict}"

    lines = ["| variant | R | visible | occluded | visible vs reference | occluded vs reference | "
             "visible vs backbone | occluded vs backbone | training s |", "|" + "---|" * 9]
    for r in rows:
        (v, vl, vh), (o, ol, oh) = r["intervals"]["visible"], r["intervals"]["occluded"]
        ref, bb = r["vs_reference"] or {}, r["vs_backbone"]
        lines.append(f"| {r['variant']} | {r['prior'].get('radius', '-')} | {v:.3f} [{vl:.3f}, {vh:.3f}] | "
                     f"{o:.3f} [{ol:.3f}, {oh:.3f}] | {diff(ref.get('visible') if ref else None)} | "
                     f"{diff(ref.get('occluded') if ref else None)} | {diff(bb['visible'])} | {diff(bb['occluded'])} | "
                     f"{r['wall_time']:.0f} |")
    return "\n".join(lines)
