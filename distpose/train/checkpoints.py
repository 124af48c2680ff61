"""Training checkpoints (DeepSpeed state of every rank + our metadata) and inference exports.

A Ray checkpoint directory holds DeepSpeed's files under the tag `state` (each rank writes its own
ZeRO partitions; Ray merges the ranks' directories) and `meta.json`: the config, the epoch and step
reached, the metrics of that epoch and the best score so far. The inference checkpoints best.pt and
final.pt (models/weights.py format: fp32 weights + config) load without Ray or DeepSpeed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from distpose.files import atomic_write_bytes

DEEPSPEED_TAG = "state"
META_FILE = "meta.json"
METRICS_LOG = "metrics.jsonl"
PARTIAL_CHECKPOINT_PREFIX = ".partial-checkpoint-"  # a rank's save before Ray copies it into the run
BEST_MODEL = "best.pt"
FINAL_MODEL = "final.pt"


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    best_score: float | None = None  # the best of eval's selection metric so far
    best_epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # of the last completed epoch


def write_meta(directory: Path, state: TrainState, config: dict[str, Any]) -> None:
    doc = {"config": config, **asdict(state)}
    atomic_write_bytes(directory / META_FILE, json.dumps(doc, indent=1).encode())


def read_meta(directory: Path) -> tuple[TrainState, dict[str, Any]]:
    doc = json.loads((Path(directory) / META_FILE).read_text())
    config = doc.pop("config")
    return TrainState(**doc), config


def consolidated_state_dict(engine) -> dict[str, torch.Tensor]:
    """The full fp32 weights and buffers, on the CPU. Collective under ZeRO-3: every rank must call it.

    Trained parameters come from DeepSpeed's fp32 master copy where it keeps one (ZeRO 1-3, bf16),
    so a bf16 run exports its full-precision weights, not their bf16 rounding.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    named = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(named.values()), enabled=engine.zero_optimization_stage() == 3):
        state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
                 for k, v in module.state_dict().items()}
    for name, param in named.items():
        if param.requires_grad:
            master = safe_get_full_fp32_param(param)
            if master is not None:
                state[name] = master.detach().float().cpu().reshape(state[name].shape)
    return state

