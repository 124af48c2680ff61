"""Loader throughput: the full training pipeline against a raw decode + warp loop, same images, same run.

The raw loop is the floor of any top-down loader (cv2.imdecode once per image, cv2.warpAffine
once per person, nothing else); the ratio says how much the pipeline's own work costs on top:
tar reading, JSON parsing, augmentation, heatmap targets, batching, and worker IPC.
"""

from __future__ import annotations

import dataclasses
import time
from itertools import islice
from typing import Any

import cv2
import numpy as np

from distpose.bench import machine
from distpose.config import DataConfig
from distpose.data.loader import train_loader
from distpose.data.shards import iter_tar_samples, parse_sample, shard_paths
from distpose.data.transforms import box_to_center_scale, crop_matrix


def raw_loop_rate(cfg: DataConfig, max_images: int, repeats: int) -> tuple[float, int]:
    """Instances/s of imdecode + warpAffine alone, over images held in memory."""
    work = []
    for path in shard_paths(cfg.shards, cfg.train_split):
        for raw in iter_tar_samples(path):
            sample = parse_sample(raw)
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
    """Steady-state instances/s of the training loader with `workers` DataLoader processes."""
    cfg = dataclasses.replace(cfg, loader_workers=workers, batches_per_epoch=warmup + batches)
    loader = train_loader(cfg)
    stream = iter(loader)
    for _ in islice(stream, warmup):
        pass
    start = time.perf_counter()
    n = sum(len(b["instance_id"]) for b in islice(stream, batches))
    return n / (time.perf_counter() - start)


def run(cfg: DataConfig, images: int = 300, batches: int = 40, warmup: int = 8, repeats: int = 3) -> dict[str, Any]:
    raw, raw_instances = raw_loop_rate(cfg, images, repeats)
    one = pipeline_rate(cfg, 1, warmup, batches)
    two = pipeline_rate(cfg, 2, warmup, batches)
    return {
        "benchmark": "loader",
        "machine": machine(),
        "shards": cfg.shards,
        "split": cfg.train_split,
        "input_size": list(cfg.input_size),
        "heatmap_size": list(cfg.heatmap_size),
        "batch_size": cfg.batch_size,
        "raw_decode_warp_instances_per_s": round(raw, 1),
        "raw_instances": raw_instances,
        "pipeline_1_worker_instances_per_s": round(one, 1),
        "pipeline_2_workers_instances_per_s": round(two, 1),
        "ratio_1_worker_vs_raw": round(one / raw, 3),
        "goal_ratio": 0.8,
    }
