"""Training micro-batches for one rank: the shard stream, or seeded random batches.

Both are endless iterators; the loop takes grad_accum_at(cfg, world size) micro-batches per optimizer step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from distpose.config import Config, grad_accum_at, micro_batch_size
from distpose.data.loader import StreamingLoader, train_loader
from distpose.keypoints import NUM_JOINTS


def rank_loader(cfg: Config, rank: int, world_size: int, start_step: int) -> StreamingLoader:
    """This rank's shard stream, in micro-batches. The stream is reseeded by the step it starts at,
    so an attempt resumed from a checkpoint does not replay the batches its predecessor drew."""
    data = dataclasses.replace(cfg.data, batch_size=micro_batch_size(cfg),
                               batches_per_epoch=cfg.data.batches_per_epoch * grad_accum_at(cfg, world_size),
                               seed=cfg.data.seed + 7919 * start_step)
    return train_loader(data, rank, world_size)


def endless(loader: StreamingLoader) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield from loader


def random_batches(cfg: Config, rank: int, world_size: int, start_step: int) -> Iterator[dict[str, torch.Tensor]]:
    """Seeded random crops and joints. Step s's global batch depends on (data.seed, s) only and is
    cut into micro-batches, rank r of W taking chunks r*A ... (A = grad_accum_at(cfg, W)): the same samples
    are trained on whatever the number of workers, which is what data-parallel checks need."""
    d, accum, micro = cfg.data, grad_accum_at(cfg, world_size), micro_batch_size(cfg)
    (h, w), n = d.input_size, d.batch_size
    step = start_step
    while True:
        gen = torch.Generator().manual_seed(d.seed * 1_000_003 + step)
        images = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=gen)
        joints = torch.rand(n, NUM_JOINTS, 2, generator=gen) * torch.tensor([w - 1, h - 1])
        visible = torch.rand(n, NUM_JOINTS, generator=gen) < 0.8
        for chunk in range(rank * accum, (rank + 1) * accum):
            part = slice(chunk * micro, (chunk + 1) * micro)
            yield {"image": images[part], "joints": joints[part], "visible": visible[part]}
        step += 1


def training_batches(cfg: Config, rank: int, world_size: int, start_step: int
                     ) -> tuple[Iterator[dict[str, torch.Tensor]], StreamingLoader | None]:
    """(endless micro-batches, the loader behind them or None) for `cfg.data.source`."""
    if cfg.data.source == "random":
        return random_batches(cfg, rank, world_size, start_step), None
    loader = rank_loader(cfg, rank, world_size, start_step)
    return endless(loader), loader
