"""Training throughput: the full distributed path against a plain PyTorch loop, same model and data, same run.

The distributed path is `distpose train` itself: Ray Train workers, DeepSpeed, the WebDataset stream (or
data.source=random), every step timed by the worker (metrics.jsonl). The plain loop is what a researcher
writes first: one process, torch.optim.Adam, the same loader, loss and precision (autocast for bf16). The
plain loop runs first, before Ray starts, so the two never share the machine. Both are timed at steady
state: the first `warmup` steps of each are left out.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from typing import Any

import torch

from distpose.bench import machine
from distpose.config import Config
from distpose.data.codec import HeatmapCodec
from distpose.data.transforms import normalize_images
from distpose.models.factory import count_macs
from distpose.models.pose import build_pose_model
from distpose.train.batches import training_batches
from distpose.train.modes import mode_loss, select_trainable, set_train_mode

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' datasheets; MFU is reported on these only.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def plain_loop(cfg: Config, warmup: int, steps: int) -> dict[str, float]:
    """Samples/s of a single-process loop over global batches of data.batch_size."""
    device = torch.device("cuda" if cfg.train.use_gpu else "cpu")
    torch.manual_seed(cfg.train.seed)
    torch.set_num_threads(cfg.train.cpus_per_worker)
    model = build_pose_model(cfg).to(device)
    optimizer = torch.optim.Adam(select_trainable(model, cfg.train.mode), lr=cfg.train.lr)
    single = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, workers=1, grad_accum=1))
    batches, _ = training_batches(single, 0, 1, 0)
    codec = HeatmapCodec(cfg.data.input_size, cfg.data.heatmap_size, cfg.data.sigma)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    set_train_mode(model, cfg.train.mode)
    waited = 0.0
    for index in range(warmup + steps):
        if index == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, waited = time.perf_counter(), 0.0
        before = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - before
        images = normalize_images(batch["image"].to(device, non_blocking=True))
        target, weight = codec.encode(batch["joints"].to(device), batch["visible"].to(device))
        with autocast:
            output = model(images)
        loss = mode_loss(output, target, weight, cfg.train.mode)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"samples_per_s": steps * cfg.data.batch_size / elapsed, "data_wait_share": waited / elapsed}


def distributed_run(cfg: Config, warmup: int, steps: int, address: str | None) -> dict[str, float]:
    """Samples/s of `distpose train` over its steps after `warmup`, from the per-step times rank 0 logged."""
    from distpose.train.driver import train

    with tempfile.TemporaryDirectory(prefix="distpose-bench-train-") as storage:
        run = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, storage=storage, run_name="bench", epochs=1, keep_checkpoints=1, max_failures=0),
            data=dataclasses.replace(cfg.data, batches_per_epoch=warmup + steps),
            eval=dataclasses.replace(cfg.eval, every_epochs=0))
        outcome = train(run, address)
        lines = (outcome.run_dir / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r["kind"] == "step"][warmup:]
    step_time = sum(r["step_time"] for r in records)
    return {"samples_per_s": len(records) * cfg.data.batch_size / step_time,
            "data_wait_share": sum(r["data_wait"] for r in records) / step_time,
            "step_time_p50_s": sorted(r["step_time"] for r in records)[len(records) // 2]}


def training_flops_per_sample(cfg: Config) -> float:
    """2 FLOPs per multiply-accumulate, forward and a backward of twice the forward's work."""
    model = build_pose_model(cfg).eval()
    macs, _ = count_macs(model, torch.zeros(1, 3, *cfg.data.input_size))
    return 3 * 2 * macs


def model_flops_utilization(cfg: Config, samples_per_s_per_gpu: float) -> float | None:
    if not cfg.train.use_gpu or cfg.train.precision != "bf16" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    return None if peak is None else training_flops_per_sample(cfg) * samples_per_s_per_gpu / peak


def run(cfg: Config, warmup: int, steps: int, address: str | None = None) -> dict[str, Any]:
    t = cfg.train
    print(f"[bench] plain PyTorch loop: {warmup} + {steps} steps of {cfg.data.batch_size} ...", flush=True)
    plain = plain_loop(cfg, warmup, steps)
    print(f"[bench] plain loop: {plain['samples_per_s']:.1f} samples/s; now the distributed path ...", flush=True)
    distributed = distributed_run(cfg, warmup, steps, address)
    per_worker = distributed["samples_per_s"] / t.workers
    return {
        "benchmark": "train",
        "machine": machine(),
        "backbone": cfg.model.backbone, "mode": t.mode, "input_size": list(cfg.data.input_size),
        "batch": cfg.data.batch_size, "precision": t.precision, "zero_stage": t.zero_stage, "workers": t.workers,
        "cpus_per_worker": t.cpus_per_worker, "use_gpu": t.use_gpu, "data_source": cfg.data.source,
        "loader_workers": cfg.data.loader_workers, "warmup_steps": warmup, "timed_steps": steps,
        "distributed": distributed,
        "plain": plain,
        "ratio": distributed["samples_per_s"] / plain["samples_per_s"],
        # The plain loop is one process; with N workers the distributed path should reach N times its rate.
        "overhead": 1 - per_worker / plain["samples_per_s"],
        "samples_per_s_per_worker": per_worker,
        "mfu": model_flops_utilization(cfg, per_worker),
        "note": "samples/s at steady state (warmup steps left out); overhead = 1 - (distributed / workers) / plain",
    }
