"""The CRF's starting point, measured on the training split when a crf or joint run starts.

From the limb displacements of distpose.data.limbs (the training split's persons placed as the
loader places them, augmentation included, at heatmap resolution) come the window R (with
model.crf_window="auto", the smallest that holds model.crf_window_coverage of the limbs) and, with
model.crf_pairwise_init="data", each edge's pairwise table. The driver measures once per run, before
Ray starts, writes what it found to the run's crf_prior.json, and hands the tables to every rank.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from distpose.config import Config, ConfigError
from distpose.data.limbs import limb_displacements
from distpose.data.shards import shard_ground_truth
from distpose.keypoints import CRF_PARENTS, NAMES
from distpose.models.crf import (
    choose_radius,
    inside_window,
    pairwise_from_displacements,
    typed_pairwise_from_displacements,
    window_coverage,
)
from distpose.models.pose import crf_radius_in

PRIOR_FILE = "crf_prior.json"
# Images read for the statistics: each person is placed DRAWS times, which gives thousands of limbs per
# edge; more would not move a 2R+1-cell histogram (COCO's training split has 118k images).
MAX_IMAGES = 2000
DRAWS = 4


@dataclass
class CRFPrior:
    radius: int
    pairwise: torch.Tensor | None  # [K, (types,) 2R+1, 2R+1] log-potentials; None: the Gaussian at zero
    limbs: int  # displacements measured (0 when nothing was measured: data.source=random)
    coverage: float | None  # fraction of them the window holds
    edge_coverage: dict[str, float]  # per edge "parent-child"
    how: str  # how R and the tables were chosen, in words
    from_checkpoint: bool = False  # the whole CRF comes from train.backbone_checkpoint (nothing measured)

    def record(self) -> dict[str, Any]:
        init = "checkpoint" if self.from_checkpoint else "gaussian" if self.pairwise is None else "data"
        return {"radius": self.radius, "limbs": self.limbs, "coverage": self.coverage,
                "edge_coverage": self.edge_coverage, "how": self.how, "pairwise_init": init}

    def summary(self, cfg: Config) -> str:
        h, w = cfg.data.heatmap_size
        text = f"CRF window R={self.radius} ({2 * self.radius + 1}x{2 * self.radius + 1} at heatmap {h}x{w})"
        if self.coverage is not None:
            edge, worst = min(self.edge_coverage.items(), key=lambda item: item[1])
            text += (f" holds {self.coverage:.1%} of {self.limbs:,} training limbs (augmented; fewest: "
                     f"{edge} {worst:.1%})")
        return f"{text}; {self.how}"


def crf_prior(cfg: Config) -> CRFPrior:
    m, d = cfg.model, cfg.data
    if d.source != "shards":  # config.validate allows only a fixed window and the Gaussian here
        return CRFPrior(m.crf_window, None, 0, None, {}, "window as configured, pairwise a Gaussian at zero "
                                                         "(data.source=random has no limbs to measure)")
    truth = shard_ground_truth(d.shards, d.train_split, max_images=MAX_IMAGES)
    displacements = limb_displacements(truth, d, CRF_PARENTS, draws=DRAWS, seed=d.seed)
    if m.crf_window == "auto":
        radius = choose_radius(displacements, m.crf_window_coverage, max(d.heatmap_size) - 1)
        how = f"R chosen to hold {m.crf_window_coverage:.0%} of them"
    else:
        radius, how = m.crf_window, "R as configured"
    if m.crf_pairwise_init == "data" and m.crf_pairwise_types > 1:
        pairwise = typed_pairwise_from_displacements(displacements, radius, m.crf_pairwise_types, seed=d.seed)
        how += f", pairwise tables from their displacements in {m.crf_pairwise_types} types per edge (k-means)"
    elif m.crf_pairwise_init == "data":
        pairwise = pairwise_from_displacements(displacements, radius)
        how += ", pairwise tables from their displacements"
    else:
        pairwise = None
        how += ", pairwise a Gaussian at zero"
    held = {f"{NAMES[p]}-{NAMES[k]}": float(inside_window(displacements[k], radius).mean())
            for k, p in enumerate(CRF_PARENTS) if p >= 0 and len(displacements[k])}
    total = sum(len(x) for x in displacements)
    return CRFPrior(radius, pairwise, total, window_coverage(displacements, radius), held, how)



def checkpoint_crf(cfg: Config) -> CRFPrior:
    """With train.crf_from_checkpoint: the window of the CRF that train.backbone_checkpoint holds."""
    path = cfg.train.backbone_checkpoint
    radius = crf_radius_in(path)
    if radius is None:
        raise ConfigError(f"config key 'train.backbone_checkpoint': {path} holds no CRF, but "
                          f"train.crf_from_checkpoint=true starts the CRF from it (name a crf run's model file)")
    if cfg.model.crf_window not in ("auto", radius):
        raise ConfigError(f"config key 'model.crf_window': {cfg.model.crf_window}, but the CRF of {path} "
                          f"(train.crf_from_checkpoint) has R={radius}")
    return CRFPrior(radius, None, 0, None, {}, f"the CRF (unary head, pairwise tables) of {path}",
                    from_checkpoint=True)


def with_crf_prior(cfg: Config) -> tuple[Config, CRFPrior | None]:
    """For a crf or joint run: the config with the window its prior chose, and the prior. Else (cfg, None)."""
    if cfg.train.mode == "backbone":
        return cfg, None
    prior = checkpoint_crf(cfg) if cfg.train.crf_from_checkpoint else crf_prior(cfg)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, crf_window=prior.radius)), prior
