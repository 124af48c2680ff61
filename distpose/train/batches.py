"""Training micro-batches for one rank: the shard stream, or seeded random batches.

Both are endless; the loop takes grad_accum_at(cfg, world size) micro-batches per optimizer step. A stream is a
function of the step it starts at, nothing else: the loop restarts it at every step a checkpoint may be saved at,
so an attempt resumed from a checkpoint draws exactly the batches the unkilled run drew after it. (A stream of
the pass order, data.order: pass, is already where such a restart would put it, and goes on.)
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator

import torch

from distpose.config import Config, grad_accum_at, micro_batch_size
from distpose.data.loader import StreamingLoader, train_loader
from distpose.data.passes import PassLoader, pass_loader
from distpose.keypoints import NUM_JOINTS


def rank_loader(cfg: Config, rank: int, world_size: int, start_step: int) -> StreamingLoader:
    """This rank's shard stream from `start_step`, in micro-batches, seeded by that step."""
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


class TrainingBatches:
    """One rank's endless micro-batches for `cfg.data.source`, restartable at a step (`restart`)."""

    def __init__(self, cfg: Config, rank: int, world_size: int, start_step: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self._earlier: Counter = Counter()  # skips of the streams restarted away
        self.loader: StreamingLoader | None = None
        self._batches: Iterator[dict[str, torch.Tensor]] = iter(())
        self.restart(start_step)

    def restart(self, step: int) -> None:
        """Drop the stream under way (its loader workers stop) and start the one that begins at `step`."""
        if isinstance(self.loader, PassLoader) and self.loader.position == step:
            return  # the pass order's stream is where a restart would put it
        if self.loader is not None:
            self._earlier.update(self.loader.skipped)
            self.loader.close()
        if self.cfg.data.source == "random":
            self._batches = random_batches(self.cfg, self.rank, self.world_size, step)
        elif self.cfg.data.order == "pass":
            self.loader = pass_loader(self.cfg.data, self.rank, self.world_size, step, micro_batch_size(self.cfg))
            self._batches = iter(self.loader)
        else:
            self.loader = rank_loader(self.cfg, self.rank, self.world_size, step)
            self._batches = endless(self.loader)

    @property
    def skipped(self) -> Counter:
        """Bad samples skipped so far on this rank, by reason, over every stream it started."""
        return self._earlier + (self.loader.skipped if self.loader is not None else Counter())

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return next(self._batches)
