"""Streaming top-down loader: WebDataset shards -> batches of augmented person crops and their joints.

Each Ray Train rank builds one loader; each of its DataLoader workers runs the whole pipeline
(read tar -> parse -> decode the image once -> one augmented crop per person -> batch). Batches
carry crops and joint coordinates; `HeatmapCodec.encode` renders the targets where the batch is
consumed (on the accelerator in training).

- Training resamples shards at random (seeded by rank and worker) and the loader yields exactly
  `batches_per_epoch` batches, so every rank steps equally often whatever the shard sizes:
  uneven batch counts would hang the collectives of data-parallel training.
- Evaluation gives each shard to exactly one (rank, worker) slot and reads it once, in order,
  so every person instance is seen exactly once across the job.
- Bad samples are skipped and counted by reason, never slept on. Each batch carries its worker's
  running counts to the main process; `StreamingLoader.skipped` sums them. A training stream that
  finds nothing usable in many shard reads in a row stops with a DataError instead of spinning.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distpose.config import DataConfig
from distpose.data.coco import Detection, Person
from distpose.data.shards import DecodedSample, SampleError, decode_image, parse_sample, shard_paths
from distpose.data.transforms import TopDownTransform
from distpose.errors import DataError
from distpose.files import open_input
from distpose.keypoints import NUM_JOINTS

log = logging.getLogger(__name__)
STATS_KEY = "_loader_stats"
RING_KEY = "_ring_batch"  # a worker's batch in the BatchRing: (its number, rows)


class CorruptSampleCounter:
    """A webdataset error handler that counts and logs, then carries on (no sleep)."""

    def __init__(self, log_first: int = 10):
        self.counts: Counter = Counter()
        self.unreadable: list[str] = []  # the shards (file names) cut short or not readable at all
        self.log_first = log_first

    def __call__(self, exn: Exception) -> bool:
        reason = getattr(exn, "reason", None) or f"unreadable shard ({type(exn).__name__})"
        self.counts[reason] += 1
        # webdataset and _opened append the shard's location to the exception's arguments
        shard = next((a for a in reversed(exn.args) if isinstance(a, str) and a.endswith(".tar")), None)
        if reason.startswith("unreadable shard") and shard and shard.rsplit("/", 1)[-1] not in self.unreadable:
            self.unreadable.append(shard.rsplit("/", 1)[-1])
        total = sum(self.counts.values())
        # Log the first few, then at powers of two from 1024 and every 10000th, so a rotten shard
        # cannot flood the log.
        if total <= self.log_first or (total & (total - 1) == 0 and total >= 1024) or total % 10000 == 0:
            detail = " ".join(str(a) for a in exn.args if isinstance(a, str)) or repr(exn)
            log.warning("skipped bad sample #%d (%s): %s", total, reason, detail)
        return True


@dataclass(frozen=True)
class StreamSpec:
    """What one rank's pipeline needs, picklable for DataLoader workers."""

    urls: tuple[str, ...]
    train: bool
    rank: int
    world_size: int
    batch_size: int
    data: DataConfig
    boxes: Mapping[int, list[Detection]] | None = None  # evaluation on detector boxes instead of the labels


def _workers_context():
    """Loader workers are forked from a forkserver, not from this process. This process runs other threads
    (a Ray driver's or worker's gRPC and core-worker threads, the S3 client's, OpenCV's and torch's pools), and a
    fork copies their locks and native state as they are at that instant: a worker forked from this process can die
    of SIGABRT on a lock that one of those threads held mid-flight. The server is a fresh single-threaded
    interpreter that imports this module once; each worker then forks from it in milliseconds."""
    context = torch.multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _init_worker(environment: dict[str, str], worker_id: int) -> None:
    """A worker takes this process's environment as it was when the loader was made, as a fork would: the
    forkserver keeps the one it started with (object-store credentials and endpoint set since would be missing).
    And one OpenCV thread: loader workers are the parallelism, OpenCV's own threads would only fight them for
    cores (safe to set here: the forkserver never started OpenCV's pool)."""
    os.environ.clear()
    os.environ.update(environment)
    cv2.setNumThreads(1)


def worker_slot() -> tuple[int, int]:
    """(this DataLoader worker's number, how many there are): (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _Progress:
    """Shard reads since the last usable person, shared by the resampler and the decoder."""

    def __init__(self) -> None:
        self.reads_since_person = 0


def _resampled(urls: tuple[str, ...], rng: random.Random, progress: _Progress, shuffle_buffer: int
               ) -> Iterator[dict[str, str]]:
    # Every readable shard adds at least one sample to the shuffle buffer, so a healthy stream
    # yields a person within `shuffle_buffer` reads; past that, allow a few passes over the shards.
    limit = shuffle_buffer + max(10, 3 * len(urls))
    while True:
        if progress.reads_since_person >= limit:
            raise DataError(f"no usable sample in {limit} shard reads in a row (e.g. {urls[0]}): "
                            "are the shards corrupt? run `distpose data verify`")
        progress.reads_since_person += 1
        yield {"url": rng.choice(urls)}


def _opened(shards: Iterator[dict[str, Any]], handler: CorruptSampleCounter) -> Iterator[dict[str, Any]]:
    """Each shard with a stream reading it, from its "offset" if given (a sample's start): local, s3:// or
    http(s):// (webdataset's own opener shells out to curl for http and knows no s3)."""
    for shard in shards:
        try:
            yield {**shard, "stream": open_input(shard["url"], shard.get("offset", 0))}
        except OSError as exc:
            exc.args = (*exc.args, shard["url"])
            if not handler(exc):
                return


def tar_samples(shards: Iterator[dict[str, Any]], handler: CorruptSampleCounter) -> Iterator[dict[str, Any]]:
    files = wds.tariterators.tar_file_expander(_opened(shards, handler), handler=handler)
    return wds.tariterators.group_by_keys(files, handler=handler)


def _shuffled(stream: Iterator, buffer: int, rng: random.Random) -> Iterator:
    return wds.shuffle(buffer, initial=buffer // 4, rng=rng)(stream) if buffer > 1 else stream


def _detected(detection: Detection) -> Person:
    """A detector box as an unlabelled person: its instance id is the detection's index."""
    w, h = detection.bbox[2:]
    return Person(detection.index, list(detection.bbox), [0.0] * 3 * NUM_JOINTS, 0, w * h, 0)


def _persons(samples: Iterator[dict[str, Any]], counter: CorruptSampleCounter, progress: _Progress,
             boxes: Mapping[int, list[Detection]] | None = None
             ) -> Iterator[tuple[DecodedSample, np.ndarray, Person, float]]:
    """Decode each image once; yield (sample, image, person, box score) for each usable labelled
    person in it, or for each detector box given for it."""
    for raw in samples:
        try:
            sample = parse_sample(raw)
            if boxes is None:
                persons = [(p, 1.0) for p in sample.persons if p.usable]
            else:
                persons = [(_detected(d), d.score) for d in boxes.get(sample.image_id, ())]
            if not persons:
                continue
            image = decode_image(sample)
        except SampleError as exc:
            exc.args = (f"{exc} in {raw.get('__url__', '?')}",)
            counter(exc)
            continue
        progress.reads_since_person = 0
        for person, score in persons:
            yield sample, image, person, score


def batch_buffers(spec: StreamSpec, size: int, shared: bool) -> dict[str, torch.Tensor]:
    """Empty batch tensors that crops are written into in place: views of one storage, in shared memory for
    a BatchRing."""
    d, k = spec.data, NUM_JOINTS
    layout = {
        "image": ((*d.input_size, 3), torch.uint8),  # RGB, channels last: see normalize_images
        "joints": ((k, 2), torch.float32),  # in crop pixels, after augmentation: HeatmapCodec.encode
        "visible": ((k,), torch.bool),  # labelled (v > 0), after the flip's joint swap
        "image_to_crop": ((2, 3), torch.float64),
        "keypoints": ((k, 3), torch.float32),  # ground truth in original image pixels, with v
        "bbox": ((4,), torch.float32),
        "area": ((), torch.float32),
        "score": ((), torch.float32),  # box score: 1 for ground-truth boxes
        "image_id": ((), torch.int64),
        "instance_id": ((), torch.int64),
    }
    offsets, nbytes = {}, 0
    for name, (shape, dtype) in layout.items():
        offsets[name] = nbytes
        nbytes += -(-size * math.prod(shape) * dtype.itemsize // 64) * 64  # 64-byte aligned fields
    storage = torch.UntypedStorage._new_shared(nbytes) if shared else torch.UntypedStorage(nbytes)
    return {
        name: torch.empty(0, dtype=dtype).set_(storage, offsets[name] // dtype.itemsize, (size, *shape))
        for name, (shape, dtype) in layout.items()
    }


PREFETCH_FACTOR = 4  # batches each loader worker has asked for ahead of the consumer
RING_SLOTS = PREFETCH_FACTOR + 2  # those, the one being copied out, and one for the request sent meanwhile
RING_WAIT_S = 600.0


class BatchRing:
    """Batch buffers in shared memory that each loader worker fills in turn and the consuming process copies
    out of, made once per DataLoader iterator: a fresh shared segment per batch cost a loader worker several ms a
    batch, nearly all of it in first-touch page faults (benchmarks/README.md, Loader).

    Worker w writes its k-th batch into slot k % RING_SLOTS once `consumed[w]` shows that slot copied out; the
    DataLoader keeps at most PREFETCH_FACTOR batches a worker in flight, so that wait is a guard, not a stall."""

    def __init__(self, spec: StreamSpec, workers: int):
        self.slots = [[batch_buffers(spec, spec.batch_size, shared=True) for _ in range(RING_SLOTS)]
                      for _ in range(workers)]
        self.consumed = torch.zeros(workers, dtype=torch.int64).share_memory_()

    def free_slot(self, worker: int, batch: int) -> dict[str, torch.Tensor]:
        """The buffers for `worker`'s batch number `batch`, once the consumer has copied out what they held."""
        deadline = time.monotonic() + RING_WAIT_S
        while batch - int(self.consumed[worker]) >= RING_SLOTS:
            if time.monotonic() > deadline:
                raise RuntimeError(f"loader worker {worker}: its consumer took no batch in {RING_WAIT_S:.0f} s")
            time.sleep(0.001)
        return self.slots[worker][batch % RING_SLOTS]

    def take(self, worker: int, batch: int, rows: int, pin: bool) -> dict[str, torch.Tensor]:
        """Copy the first `rows` rows of `worker`'s batch number `batch` into memory of this process (pinned for
        the accelerator when `pin`) and hand its slot back to the worker."""
        copied = {}
        for name, buffer in self.slots[worker][batch % RING_SLOTS].items():
            copied[name] = torch.empty_like(buffer[:rows], pin_memory=pin).copy_(buffer[:rows])
        self.consumed[worker] += 1
        return copied


def write_row(arrays: dict[str, np.ndarray], row: int, transform: TopDownTransform, image_id: int,
              image: np.ndarray | None, person: Person, score: float, rng: np.random.Generator | None) -> None:
    """Crop and augment `person` straight into `row` of the batch `arrays`. An image that did not decode
    (`image` None) leaves a black crop with no joint labelled: a row that weighs nothing in the loss."""
    keypoints = np.asarray(person.keypoints, np.float32).reshape(-1, 3)
    if image is None:
        arrays["image"][row], arrays["joints"][row], arrays["visible"][row] = 0, 0.0, False
        arrays["image_to_crop"][row] = np.eye(2, 3)
    else:
        crop = transform(image, person.bbox, keypoints, rng, out=arrays["image"][row])
        arrays["joints"][row], arrays["visible"][row] = crop.joints, crop.visible
        arrays["image_to_crop"][row] = crop.image_to_crop
    arrays["keypoints"][row] = keypoints
    arrays["bbox"][row] = person.bbox
    arrays["area"][row], arrays["score"][row] = person.area, score
    arrays["image_id"][row], arrays["instance_id"][row] = image_id, person.id


def _batches(persons: Iterator[tuple[DecodedSample, np.ndarray, Person, float]], spec: StreamSpec,
             rng: np.random.Generator, buffers: Callable[[int], dict[str, torch.Tensor]]
             ) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """Crop and augment each person straight into its row of the batch buffers; `buffers(k)` gives the k-th
    batch's. Yields each batch's buffers and its number of rows (the batch size but for evaluation's last)."""
    d = spec.data
    transform = TopDownTransform(d.input_size, d.box_padding, d.augment if spec.train else None)
    size = spec.batch_size
    batch, arrays, row, made = None, {}, 0, 0
    for sample, image, person, score in persons:
        if batch is None:
            batch = buffers(made)
            made += 1
            arrays = {name: t.numpy() for name, t in batch.items()}
        write_row(arrays, row, transform, sample.image_id, image, person, score, rng)
        row += 1
        if row == size:
            yield batch, row
            batch, row = None, 0
    if batch is not None and not spec.train:
        yield batch, row


class TopDownStream(IterableDataset):
    """One rank's pipeline; each DataLoader worker iterates its own copy."""

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec
        self.ring: BatchRing | None = None  # set by StreamingLoader before its DataLoader starts workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        spec, d = self.spec, self.spec.data
        worker, num_workers = worker_slot()
        seed = (d.seed, spec.rank, worker)
        counter, progress = CorruptSampleCounter(), _Progress()
        if spec.train:
            shards: Iterator[dict[str, str]] = _resampled(spec.urls, random.Random(str(seed)), progress,
                                                          d.sample_shuffle)
        else:
            slot, slots = spec.rank * num_workers + worker, spec.world_size * num_workers
            shards = iter([{"url": u} for u in spec.urls[slot::slots]])
        samples = tar_samples(shards, counter)
        if spec.train:
            samples = _shuffled(samples, d.sample_shuffle, random.Random(f"{seed} samples"))
        persons = _persons(samples, counter, progress, spec.boxes)
        if spec.train:
            # Shuffling (image, person) references before cropping: cheap, and crops are then
            # written once, straight into the batch.
            persons = _shuffled(persons, d.instance_shuffle, random.Random(f"{seed} instances"))
        rng = np.random.default_rng([d.seed, spec.rank, worker])
        ring = self.ring if get_worker_info() is not None else None
        if ring is None:
            def buffers(_: int) -> dict[str, torch.Tensor]:
                return batch_buffers(spec, spec.batch_size, shared=False)
        else:
            buffers = functools.partial(ring.free_slot, worker)
        for made, (batch, rows) in enumerate(_batches(persons, spec, rng, buffers)):
            stats = (worker, dict(counter.counts), list(counter.unreadable))
            if ring is None:
                yield {**{name: t[:rows] for name, t in batch.items()}, STATS_KEY: stats}
            else:  # the batch stays in the ring: the message says which it is
                yield {RING_KEY: (made, rows), STATS_KEY: stats}
        # A last, empty message so skips after the final batch are still reported.
        yield {STATS_KEY: (worker, dict(counter.counts), list(counter.unreadable))}


def _counted(stream: Iterator[dict[str, Any]], skips: dict[int, tuple[dict[str, int], list[str]]],
             ring: BatchRing | None, pin: bool) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of a DataLoader stream, copied out of the workers' `ring`, with each worker's skip counts and
    unreadable shards taken out into `skips`.

    Not a method: kept on its loader, a generator holding the loader would be a reference cycle.
    The garbage collector frees a cycle's multiprocessing queues before the DataLoader iterator's
    shutdown runs, so its workers would never get the stop signal, and each would be killed only
    after the DataLoader's 5-s join timeout."""
    for message in stream:
        worker, counts, unreadable = message.pop(STATS_KEY)
        skips[worker] = counts, unreadable
        if RING_KEY in message:
            assert ring is not None
            yield ring.take(worker, *message[RING_KEY], pin=pin)
        elif message:
            yield message


class StreamingLoader:
    """Batches for one rank. Training: an endless stream cut into epochs of `batches_per_epoch`.
    Evaluation: each iteration is one full pass over this rank's shards."""

    def __init__(self, spec: StreamSpec, num_workers: int, batches_per_epoch: int | None = None,
                 stream: IterableDataset | None = None):
        """`stream`: the dataset each worker iterates (it has a `ring` for the workers' batches), by default
        TopDownStream(spec)."""
        self.spec = spec
        self.batches_per_epoch = batches_per_epoch
        self.pin = torch.cuda.is_available()
        self.dataloader = DataLoader(
            stream or TopDownStream(spec), batch_size=None, num_workers=num_workers,
            # Workers' batches are pinned as they are copied out of the ring (BatchRing.take).
            pin_memory=self.pin and not num_workers, prefetch_factor=PREFETCH_FACTOR if num_workers else None,
            multiprocessing_context=_workers_context() if num_workers else None,
            worker_init_fn=functools.partial(_init_worker, dict(os.environ)) if num_workers else None,
        )
        self._stream: Iterator[dict[str, Any]] | None = None
        self._skips: dict[int, tuple[dict[str, int], list[str]]] = {}

    @property
    def skipped(self) -> Counter:
        """Bad samples skipped so far on this rank, by reason."""
        total: Counter = Counter()
        for counts, _ in self._skips.values():
            total.update(counts)
        return total

    @property
    def unreadable_shards(self) -> list[str]:
        """The file names of the shards this rank found cut short or unreadable so far."""
        return sorted({name for _, names in self._skips.values() for name in names})

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("an evaluation loader has no fixed length")
        return self.batches_per_epoch

    def _start(self) -> Iterator[dict[str, torch.Tensor]]:
        """A new DataLoader iterator (its workers, and a ring for them) and its batches."""
        workers = self.dataloader.num_workers
        ring = BatchRing(self.spec, workers) if workers else None
        self.dataloader.dataset.ring = ring  # pickled to the workers as the iterator starts them
        return _counted(iter(self.dataloader), self._skips, ring, self.pin)

    def close(self) -> None:
        """Stop the training stream's workers now (a restarted stream's would otherwise run until collected)."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not self.spec.train:
            self._skips = {}
            yield from self._start()
            return
        if self._stream is None:
            self._stream = self._start()
        for _ in range(len(self)):
            yield next(self._stream)


def train_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1) -> StreamingLoader:
    """The training stream of `cfg.train_split` for one rank."""
    spec = StreamSpec(tuple(shard_paths(cfg.shards, cfg.train_split)), True, rank, world_size, cfg.batch_size, cfg)
    return StreamingLoader(spec, cfg.loader_workers, cfg.batches_per_epoch)


def eval_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1, split: str | None = None,
                boxes: Mapping[int, list[Detection]] | None = None) -> StreamingLoader:
    """One exact pass over this rank's share of `split` (default `cfg.val_split`): every labelled
    person once, or with `boxes` (see coco.load_detections) every detector box of its images once."""
    spec = StreamSpec(tuple(shard_paths(cfg.shards, split or cfg.val_split)), False, rank, world_size,
                      cfg.batch_size, cfg, boxes)
    return StreamingLoader(spec, cfg.loader_workers)

