"""Epochs as passes over the training split, in an order that no world size changes (data.order: pass).

Epoch e's plan: the split's shards in an order seeded by (data.seed, e), their usable person instances laid end
to end in tar order (N in all, as the manifest counts them) and cut into B = data.batch_size runs of N // B or
N // B + 1, the partitions. Step i of the epoch trains on the i-th instance of every partition, slot q of the
global batch holding partition q's. Rank r of W takes slots [r B/W, (r+1) B/W) as its micro-batches, cut as
random_batches cuts a global batch, and its loader workers split those slots into contiguous blocks. So a step's
global batch is the same at any world size, and an epoch of S <= N // B steps trains on S B distinct instances,
once each, however often the world size changed within it (the others wait for another epoch's order).

A slot's crop is a function of (data.seed, step) alone, its augmentation drawn from a generator seeded by the
epoch, slot and position: a stream started at any step is the one an unkilled run draws from that step, so a
resumed run needs nothing from its checkpoint but the step, and a checkpoint needs no restart of the stream.

An instance's position is known from labels alone, so an image that is corrupt or does not decode keeps its
instances' slots, as crops with no joint labelled; a sample whose labels cannot be read drops out, and a partition it
leaves short starts over to fill its steps.

Cost: a partition's reader reads its first shard from that shard's start (labels parsed, images neither checked nor
decoded), so a shard shared by m partitions is read about (m + 1) / 2 times; a resume reads up to its position the
same way.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from distpose.config import DataConfig
from distpose.data.coco import Person
from distpose.data.loader import (
    RING_KEY,
    STATS_KEY,
    CorruptSampleCounter,
    StreamingLoader,
    StreamSpec,
    batch_buffers,
    tar_samples,
    worker_slot,
    write_row,
)
from distpose.data.shards import (
    DecodedSample,
    SampleError,
    check_jpeg_crc,
    decode_image,
    parse_sample,
    read_manifest,
)
from distpose.data.transforms import TopDownTransform
from distpose.errors import DataError
from distpose.files import join


@dataclass(frozen=True)
class ShardIndex:
    """A shard of the split: its usable instances and, for shards written with it, each sample's byte offset and
    usable instances, which let a reader start at the sample that holds a given instance."""

    url: str
    instances: int
    sample_offsets: tuple[int, ...] = ()
    sample_instances: tuple[int, ...] = ()

    @functools.cached_property
    def before(self) -> tuple[int, ...]:
        """Usable instances before each sample, and in all."""
        return tuple(itertools.accumulate(self.sample_instances, initial=0))

    def start_of(self, instance: int) -> tuple[int, int]:
        """(byte offset, number) of the sample holding the shard's `instance`-th usable instance: (0, 0) without
        an index."""
        if not self.sample_offsets or instance == 0:
            return 0, 0
        number = bisect.bisect_right(self.before, instance) - 1
        return self.sample_offsets[number], number


@dataclass(frozen=True)
class Segment:
    shard: ShardIndex
    first: int  # the shard's usable instances [first, end), counted in tar order
    end: int


def split_instances(shard_dir: str, split: str) -> tuple[ShardIndex, ...]:
    """The shards of `split`, as its manifest describes them."""
    return tuple(ShardIndex(join(shard_dir, s["name"]), int(s["instances"]), tuple(s.get("sample_offsets", ())),
                            tuple(s.get("sample_instances", ())))
                 for s in read_manifest(shard_dir, split)["shards"])


def check_pass_length(data: DataConfig, instances: int) -> None:
    """DataError unless an epoch of data.batches_per_epoch steps fits in one pass over `instances`."""
    most = instances // data.batch_size
    if data.batches_per_epoch > most:
        raise DataError(f"data.batches_per_epoch={data.batches_per_epoch} steps of data.batch_size="
                        f"{data.batch_size} need {data.batches_per_epoch * data.batch_size} instances, and a pass "
                        f"over split '{data.train_split}' has {instances}: at most {most} steps an epoch with "
                        "data.order=pass")


def partitions(shards: tuple[ShardIndex, ...], parts: int, seed: int, epoch: int) -> list[list[Segment]]:
    """Epoch `epoch`'s `parts` partitions of the shards' instances, each as the shard ranges it reads in order."""
    order = list(shards)
    random.Random(f"{seed} pass {epoch}").shuffle(order)
    starts = list(itertools.accumulate((s.instances for s in order), initial=0))
    bounds = [k * starts[-1] // parts for k in range(parts + 1)]
    result = []
    for low, high in itertools.pairwise(bounds):
        segments, j = [], bisect.bisect_right(starts, low) - 1
        while low < high:
            end = min(high, starts[j + 1])
            if end > low:
                segments.append(Segment(order[j], low - starts[j], end - starts[j]))
                low = end
            j += 1
        result.append(segments)
    return result


class _Gate:
    """A skip counter's handler that counts only while `on`: a reader passing over samples that are not its to
    train on (another partition's, or those before a resumed position) leaves them to the reader that trains."""

    def __init__(self, counter: CorruptSampleCounter):
        self.counter, self.on = counter, True

    def __call__(self, exn: Exception) -> bool:
        return self.counter(exn) if self.on else True


def partition_instances(segments: list[Segment], start: int, counter: CorruptSampleCounter
                        ) -> Iterator[tuple[DecodedSample, Person]]:
    """The partition's instances from its `start`-th on, endlessly: past its last it begins again, which only a
    partition that corrupt samples left short of its planned length reaches. Those before `start` are parsed,
    not decoded."""
    gate = _Gate(counter)
    produced = 0
    while True:
        before = produced
        for segment in segments:
            shard = segment.shard
            offset, number = shard.start_of(segment.first)
            position = shard.before[number] if shard.sample_offsets else 0  # the shard's usable instances so far
            gate.on = produced >= start and position >= segment.first
            for raw in tar_samples(iter([{"url": shard.url, "offset": offset}]), gate):
                limit = None
                if shard.sample_offsets and number < len(shard.sample_instances):
                    # The index places each sample, so that a sample misread cannot shift the ones after it.
                    position, limit = shard.before[number], shard.before[number + 1]
                    number += 1
                gate.on = produced >= start and position >= segment.first
                try:  # the labels alone: every reader of the shard counts positions alike, whatever its images
                    sample = parse_sample(raw, check_jpeg=False)
                except SampleError as exc:
                    exc.args = (f"{exc} in {raw.get('__url__', '?')}",)
                    gate(exc)
                    continue
                for person in [p for p in sample.persons if p.usable][:None if limit is None else limit - position]:
                    if segment.first <= position < segment.end:
                        if produced >= start:
                            yield sample, person
                        produced += 1
                    position += 1
                if position >= segment.end:
                    break
        if produced == before:
            raise DataError(f"no usable instance in a pass over {', '.join(s.shard.url for s in segments)}: "
                            "are the shards corrupt? run `distpose data verify`")


@dataclass(frozen=True)
class PassPlan:
    """What a rank's pass stream needs, picklable for loader workers."""

    shards: tuple[ShardIndex, ...]  # split_instances
    data: DataConfig  # batch_size: the global batch; batches_per_epoch: S
    rank: int
    world_size: int
    start_step: int

    def slots(self, worker: int, workers: int) -> range:
        """The global batch's slots that loader worker `worker` of `workers` on this rank fills."""
        per_rank = self.data.batch_size // self.world_size
        first = self.rank * per_rank
        return range(first + worker * per_rank // workers, first + (worker + 1) * per_rank // workers)


class PassStream(IterableDataset):
    """One message per step from each loader worker: the crops of its slots, from plan.start_step on."""

    def __init__(self, plan: PassPlan, spec: StreamSpec):
        super().__init__()
        self.plan, self.spec = plan, spec
        self.ring = None  # set by StreamingLoader before its DataLoader starts workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan, d = self.plan, self.plan.data
        worker, workers = worker_slot()
        slots = plan.slots(worker, workers)
        counter = CorruptSampleCounter()
        transform = TopDownTransform(d.input_size, d.box_padding, d.augment)
        ring = self.ring if get_worker_info() is not None else None
        readers: list[Iterator[tuple[DecodedSample, Person]]] = []
        decoded: list[tuple[str | None, np.ndarray | None]] = []  # each slot's last image: persons share it
        epoch = None
        for made, step in enumerate(itertools.count(plan.start_step)):
            this_epoch, index = divmod(step, d.batches_per_epoch)
            if this_epoch != epoch:
                parts = partitions(plan.shards, d.batch_size, d.seed, this_epoch)
                readers = [partition_instances(parts[q], index, counter) for q in slots]
                epoch, decoded = this_epoch, [(None, None)] * len(slots)
            batch = ring.free_slot(worker, made) if ring is not None else batch_buffers(self.spec, len(slots), False)
            arrays = {name: t.numpy() for name, t in batch.items()}
            for row, (slot, reader) in enumerate(zip(slots, readers)):
                sample, person = next(reader)
                if decoded[row][0] != sample.key:
                    try:
                        check_jpeg_crc(sample.key, sample.jpg, sample.jpg_crc32)
                        decoded[row] = sample.key, decode_image(sample)
                    except SampleError as exc:
                        counter(exc)
                        decoded[row] = sample.key, None
                rng = np.random.default_rng([d.seed, epoch, slot, index])
                write_row(arrays, row, transform, sample.image_id, decoded[row][1], person, 1.0, rng)
            stats = (worker, dict(counter.counts), list(counter.unreadable))
            if ring is None:
                yield {**batch, STATS_KEY: stats}
            else:
                yield {RING_KEY: (made, len(slots)), STATS_KEY: stats}


class PassLoader(StreamingLoader):
    """A rank's endless micro-batches of the pass order, from plan.start_step on."""

    def __init__(self, plan: PassPlan, num_workers: int, micro_batch: int):
        per_rank = plan.data.batch_size // plan.world_size
        spec = StreamSpec(tuple(s.url for s in plan.shards), True, plan.rank, plan.world_size,
                          -(-per_rank // max(num_workers, 1)), plan.data)
        check_pass_length(plan.data, sum(s.instances for s in plan.shards))
        super().__init__(spec, num_workers, stream=PassStream(plan, spec))
        self.micro_batch, self.per_step = micro_batch, per_rank // micro_batch
        self.start_step, self.taken = plan.start_step, 0

    @property
    def position(self) -> int | None:
        """The step whose first micro-batch comes next, None within a step."""
        step, within = divmod(self.taken, self.per_step)
        return None if within else self.start_step + step

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._stream is None:
            self._stream = self._start()
        blocks_per_step = max(self.dataloader.num_workers, 1)
        while True:
            blocks = [next(self._stream) for _ in range(blocks_per_step)]
            step = {name: torch.cat([b[name] for b in blocks]) for name in blocks[0]}
            for first in range(0, self.per_step * self.micro_batch, self.micro_batch):
                self.taken += 1
                yield {name: t[first:first + self.micro_batch] for name, t in step.items()}


def pass_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1, start_step: int = 0,
                micro_batch: int | None = None) -> PassLoader:
    """Rank `rank`'s share of the pass order of `cfg.train_split` from `start_step`, in micro-batches of
    `micro_batch` (default: all of its share of a step)."""
    plan = PassPlan(split_instances(cfg.shards, cfg.train_split), cfg, rank, world_size, start_step)
    return PassLoader(plan, cfg.loader_workers, micro_batch or cfg.batch_size // world_size)


def instance_digest(image_ids: torch.Tensor, instance_ids: torch.Tensor) -> int:
    """An order-free fingerprint of a set of instances: the sum of a 32-bit hash of each (image id, instance id),
    exact in int64 for up to 2^31 instances. Equal sets give equal sums; two different sets, the same sum with
    odds of about 2^-32."""
    return sum(int.from_bytes(hashlib.blake2b(f"{i}/{j}".encode(), digest_size=4).digest(), "little")
               for i, j in zip(image_ids.tolist(), instance_ids.tolist()))
