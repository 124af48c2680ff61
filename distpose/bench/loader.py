"""Loader throughput: the full training pipeline against a raw decode + warp loop, same images, same run.

The raw loop is the floor of any top-down loader (cv2.imdecode once per image, cv2.warpAffine
once per person, nothing else, on one core); the ratio says what the pipeline's own work costs on
top: tar reading, annotation parsing and checks, augmentation, batching, worker IPC, and rendering
the heatmap targets, which the consumer does per batch (in training, on the accelerator).
"""

from __future__ import annotations

import dataclasses
import time
from itertools import islice
from typing import Any

import cv2
import numpy as np
import torch

from distpose.bench import machine
from distpose.config import DataConfig
from distpose.data.codec import HeatmapCodec
from distpose.data.loader import train_loader
from distpose.data.passes import pass_loader, split_instances
from distpose.data.shards import SampleError, iter_tar_samples, parse_sample, read_manifest, shard_paths
from distpose.data.transforms import box_to_center_scale, crop_matrix
from distpose.errors import UserError


def raw_loop_rate(cfg: DataConfig, max_images: int, repeats: int) -> tuple[float, int]:
    """Instances/s of imdecode + warpAffine alone, over images held in memory."""
    work = []
    for path in shard_paths(cfg.shards, cfg.train_split):
        for raw in iter_tar_samples(path):
            try:
                sample = parse_sample(raw)
            except SampleError:  # the pipeline skips these too
                continue
            matrices = []
            for p in sample.persons:
                if p.usable:
                    center, scale = box_to_center_scale(p.bbox, cfg.aspect_ratio, cfg.box_padding)
                    matrices.append(crop_matrix(center, scale, 0.0, cfg.input_size))
            if matrices:
                work.append((np.frombuffer(sample.jpg, np.uint8), matrices))
            if len(work) >= max_images:
                break
        if len(work) >= max_images:
            break
    out_h, out_w = cfg.input_size
    instances = sum(len(m) for _, m in work)
    best = 0.0
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # one core, like one loader worker (which runs OpenCV single-threaded)
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            for buf, matrices in work:
                image = cv2.imdecode(buf, cv2.IMREAD_COLOR)
                for m in matrices:
                    cv2.warpAffine(image, m, (out_w, out_h), flags=cv2.INTER_LINEAR)
            best = max(best, instances / (time.perf_counter() - start))
    finally:
        cv2.setNumThreads(threads)
    return best, instances


def pipeline_rate(cfg: DataConfig, workers: int, warmup: int, batches: int) -> float:
    """Steady-state instances/s of the training loader with `workers` DataLoader processes (0: all in
    this process), each batch's heatmap targets rendered here as the training step would."""
    codec = HeatmapCodec(cfg.input_size, cfg.heatmap_size, cfg.sigma)
    if cfg.order == "pass":  # endless, over as many epochs as it takes
        instances = sum(s.instances for s in split_instances(cfg.shards, cfg.train_split))
        stream = iter(pass_loader(dataclasses.replace(cfg, loader_workers=workers,
                                                      batches_per_epoch=instances // cfg.batch_size)))
    else:
        stream = iter(train_loader(dataclasses.replace(cfg, loader_workers=workers,
                                                       batches_per_epoch=warmup + batches)))
    for _ in islice(stream, warmup):
        pass
    threads, torch_threads = cv2.getNumThreads(), torch.get_num_threads()
    # One core each, like the raw loop: the in-process run, and the consumer, whose rendering threads
    # would otherwise spin on the cores the loader workers are measured on.
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    try:
        start, n = time.perf_counter(), 0
        for batch in islice(stream, batches):
            codec.encode(batch["joints"], batch["visible"])
            n += len(batch["instance_id"])
        return n / (time.perf_counter() - start)
    finally:
        cv2.setNumThreads(threads)
        torch.set_num_threads(torch_threads)


def _same_shards(cfg: DataConfig, remote: str) -> None:
    """A remote rate is comparable only over the same shards: their manifests list the same digests."""
    local, other = (read_manifest(where, cfg.train_split) for where in (cfg.shards, remote))
    if [s["sha256"] for s in local["shards"]] != [s["sha256"] for s in other["shards"]]:
        raise UserError(f"--remote {remote}: its '{cfg.train_split}' shards are not those of data.shards "
                        f"{cfg.shards} (their sha256 digests differ): copy the same shards there")


def remote_rates(cfg: DataConfig, remote: str, warmup: int, batches: int, repeats: int
                 ) -> tuple[float, float]:
    """The best 1-worker pipeline rate from data.shards and from `remote` (a copy of the same shards), measured
    alternately so that both see the same noise. The caller checks first that they are the same shards."""
    local, far = 0.0, 0.0
    for _ in range(repeats):
        local = max(local, pipeline_rate(cfg, 1, warmup, batches))
        far = max(far, pipeline_rate(dataclasses.replace(cfg, shards=remote), 1, warmup, batches))
    return local, far


def run(cfg: DataConfig, images: int = 300, batches: int = 60, warmup: int = 16, repeats: int = 3,
        remote: str | None = None) -> dict[str, Any]:
    if remote:  # before the long local runs: a wrong location fails at once
        _same_shards(cfg, remote)
    raw, raw_instances = raw_loop_rate(cfg, images, repeats)
    rates = {workers: pipeline_rate(cfg, workers, warmup, batches) for workers in (0, 1, 2)}
    result = {
        "benchmark": "loader",
        "machine": machine(),
        "shards": cfg.shards,
        "split": cfg.train_split,
        "order": cfg.order,
        "input_size": list(cfg.input_size),
        "heatmap_size": list(cfg.heatmap_size),
        "batch_size": cfg.batch_size,
        "raw_decode_warp_instances_per_s": round(raw, 1),
        "raw_instances": raw_instances,
        "pipeline_in_process_instances_per_s": round(rates[0], 1),
        "pipeline_1_worker_instances_per_s": round(rates[1], 1),
        "pipeline_2_workers_instances_per_s": round(rates[2], 1),
        "ratio_in_process_vs_raw": round(rates[0] / raw, 3),
        "ratio_1_worker_vs_raw": round(rates[1] / raw, 3),
        "goal_ratio": 0.8,
        "notes": "raw loop and in-process pipeline on one core (OpenCV single-threaded); "
                 "1/2 workers: DataLoader processes, targets rendered in the consuming process",
    }
    if cfg.order == "pass":  # against the default order, here and now
        resample = dataclasses.replace(cfg, order="resample")
        rates_resample = {workers: pipeline_rate(resample, workers, warmup, batches) for workers in (0, 2)}
        result |= {
            "resample_in_process_instances_per_s": round(rates_resample[0], 1),
            "resample_2_workers_instances_per_s": round(rates_resample[2], 1),
            "ratio_pass_vs_resample_in_process": round(rates[0] / rates_resample[0], 3),
            "ratio_pass_vs_resample_2_workers": round(rates[2] / rates_resample[2], 3),
        }
    if remote:
        local, far = remote_rates(cfg, remote, warmup, batches, repeats)
        result |= {
            "remote": remote,
            "remote_1_worker_instances_per_s": round(far, 1),
            "local_1_worker_instances_per_s": round(local, 1),
            "ratio_remote_vs_local": round(far / local, 3),
            "goal_remote_ratio": 0.9,
            "remote_notes": f"1 loader worker, best of {repeats} runs from each, alternately",
        }
    return result
