"""Training throughput: the full distributed path against a plain PyTorch loop, same model and data, same run.

The distributed path is `distpose train` itself: Ray Train workers, DeepSpeed, the WebDataset stream (or
data.source=random), the per-step logging and metrics. The plain loop is what a researcher writes first:
one process, torch.optim.Adam, the same loader, loss and precision (autocast for bf16, bf16-mixed and fp16), doing one
rank's work per step (train.grad_accum micro-batches of the rank's size). It runs first, in this process
and before Ray starts, so the two never share the machine. Both are timed on the wall clock at steady
state: the first `warmup` steps of each are left out.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from typing import Any

import torch

from distpose.bench import machine
from distpose.config import Config, ConfigError, micro_batch_size
from distpose.errors import UserError
from distpose.metrics_log import read_records
from distpose.models.factory import count_macs
from distpose.models.pose import build_pose_model
from distpose.train.batches import TrainingBatches
from distpose.train.crf_prior import with_crf_prior
from distpose.train.engine import with_precision_resolved
from distpose.train.modes import ModeLoss, parameter_groups, run_model, set_train_mode
from distpose.train.step import micro_batch_loss, optimizer_step

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' datasheets, matched against the device name
# in this order (the H100 PCIe and NVL parts are slower than the SXM one); MFU is reported on these only.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                   ("A100", 312e12), ("L40S", 362e12))


def plain_loop(cfg: Config, warmup: int, steps: int) -> dict[str, float]:
    """Samples/s of a single-process loop doing one rank's share of each step (rank 0's data)."""
    device = torch.device("cuda" if cfg.train.use_gpu else "cpu")
    torch.manual_seed(cfg.train.seed)
    torch.set_num_threads(cfg.train.cpus_per_worker)
    cfg, prior = with_crf_prior(cfg)
    model = run_model(cfg, prior.pairwise if prior else None).to(device)
    optimizer = torch.optim.Adam(parameter_groups(model, cfg.train))
    batches = TrainingBatches(cfg, 0, cfg.train.workers, 0)
    mode_loss = ModeLoss(cfg)
    half = {"bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    autocast = torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    set_train_mode(model, cfg.train.mode)
    accum, waited = cfg.train.grad_accum, 0.0

    def loss_of(batch: dict[str, Any]) -> torch.Tensor:
        return micro_batch_loss(model, batch, mode_loss, device, autocast=autocast)

    def backward(loss: torch.Tensor) -> None:
        scaler.scale(loss / accum).backward()

    for index in range(warmup + steps):
        if index == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, waited = time.perf_counter(), 0.0
        optimizer.zero_grad(set_to_none=True)
        _, batch_wait = optimizer_step(batches, accum, loss_of, backward)
        waited += batch_wait
        scaler.step(optimizer)
        scaler.update()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    samples = steps * micro_batch_size(cfg) * accum
    return {"samples_per_s": samples / elapsed, "data_wait_share": waited / elapsed}


def distributed_run(cfg: Config, warmup: int, steps: int, address: str | None) -> dict[str, float]:
    """Samples/s (all ranks) of `distpose train` over its steps after `warmup`, on the wall clock between rank 0's
    step records: per-step logging and metrics count, as they do in training."""
    from distpose.train.driver import train

    with tempfile.TemporaryDirectory(prefix="distpose-bench-train-") as storage:
        run = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, storage=storage, run_name="bench", epochs=1, keep_checkpoints=1, max_failures=0),
            data=dataclasses.replace(cfg.data, batches_per_epoch=warmup + steps),
            eval=dataclasses.replace(cfg.eval, every_epochs=0))
        outcome = train(run, address)
        records = read_records(outcome.run_dir, "step")[warmup - 1:]
    timed, elapsed = records[1:], records[-1]["time"] - records[0]["time"]
    return {"samples_per_s": len(timed) * cfg.data.batch_size / elapsed,
            "data_wait_share": sum(r["data_wait"] for r in timed) / elapsed,
            "step_time_p50_s": sorted(r["step_time"] for r in timed)[len(timed) // 2]}


def checkpoint_cost(cfg: Config, warmup: int, steps: int, address: str | None, with_checkpoints: dict[str, float]
                    ) -> dict[str, float]:
    """What train.checkpoint_every_steps costs: the distributed run again with checkpoints at epoch ends only (none
    in the timed steps), and the ratio of the two runs' step times."""
    every = cfg.train.checkpoint_every_steps
    log.info(f"[bench] again without checkpoints every {every} steps, the baseline ...")
    without = distributed_run(dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, checkpoint_every_steps=0, checkpoint_every_minutes=0.0)), warmup, steps, address)
    # Saves follow the records of steps warmup ... warmup + steps - 1 that are multiples of it: all inside the window.
    saves = sum(1 for step in range(warmup, warmup + steps) if step % every == 0)
    step_with = cfg.data.batch_size / with_checkpoints["samples_per_s"]
    step_without = cfg.data.batch_size / without["samples_per_s"]
    return {"every_steps": every, "saves_timed": saves, "samples_per_s_without": without["samples_per_s"],
            "data_wait_share_without": without["data_wait_share"],
            "step_time_ratio": step_with / step_without,
            "seconds_per_save": (step_with - step_without) * steps / saves if saves else None}


def training_flops_per_sample(cfg: Config) -> float:
    """2 FLOPs per multiply-accumulate, forward and a backward of twice the forward's work (backbone mode:
    every weight trains)."""
    model = build_pose_model(cfg.model).eval()
    macs, _ = count_macs(model, torch.zeros(1, 3, *cfg.data.input_size))
    return 3 * 2 * macs


def model_flops_utilization(cfg: Config, samples_per_s_per_gpu: float) -> float | None:
    if cfg.train.mode != "backbone" or cfg.train.precision != "bf16" or not cfg.train.use_gpu:
        return None
    name = torch.cuda.get_device_name(0)
    peak = next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)
    return None if peak is None else training_flops_per_sample(cfg) * samples_per_s_per_gpu / peak


def run(cfg: Config, warmup: int, steps: int, address: str | None = None, plain_only: bool = False
        ) -> dict[str, Any]:
    """Both paths, or with `plain_only` the plain loop alone (no Ray, no DeepSpeed: what a GPU node without
    them can measure)."""
    t = cfg.train
    if not isinstance(t.workers, int):
        raise ConfigError(f"config key 'train.workers': got {list(t.workers)}; `bench train` measures one world "
                          "size, a number")
    if t.use_gpu and not torch.cuda.is_available():
        raise UserError("train.use_gpu=true, but this machine has no CUDA device: `distpose bench train` runs its "
                        "plain loop in its own process, so run it on a GPU node (with --address for the cluster)")
    # Resolved here, on the machine that runs the plain loop, so that both paths train at the same precision.
    cfg = with_precision_resolved(cfg, torch.device("cuda" if t.use_gpu else "cpu"))
    t = cfg.train
    log.info(f"[bench] plain PyTorch loop: {warmup} + {steps} steps of {micro_batch_size(cfg) * t.grad_accum} "
             "(one rank's share) ...")
    plain = plain_loop(cfg, warmup, steps)
    log.info(f"[bench] plain loop: {plain['samples_per_s']:.1f} samples/s")
    described = {
        "benchmark": "train",
        "machine": machine(),
        "backbone": cfg.model.backbone, "mode": t.mode, "input_size": list(cfg.data.input_size),
        "batch": cfg.data.batch_size, "precision": t.precision, "zero_stage": t.zero_stage, "workers": t.workers,
        "cpus_per_worker": t.cpus_per_worker, "use_gpu": t.use_gpu, "data_source": cfg.data.source,
        "loader_workers": cfg.data.loader_workers, "warmup_steps": warmup, "timed_steps": steps,
    }
    if plain_only:
        return {**described, "plain": plain, "mfu": model_flops_utilization(cfg, plain["samples_per_s"]),
                "note": "the plain single-process loop alone (--plain-only): samples/s at steady state on the "
                        "wall clock, warmup steps left out"}
    distributed = distributed_run(cfg, warmup, steps, address)
    per_worker = distributed["samples_per_s"] / t.workers
    checkpoints = checkpoint_cost(cfg, warmup, steps, address, distributed) if t.checkpoint_every_steps else None
    return {
        **described,
        **({"checkpoints": checkpoints} if checkpoints else {}),
        "distributed": distributed,
        "plain": plain,
        # The plain loop does one rank's work; with N workers the distributed path should reach N times its rate.
        "ratio": distributed["samples_per_s"] / plain["samples_per_s"],
        "overhead": 1 - per_worker / plain["samples_per_s"],
        "samples_per_s_per_worker": per_worker,
        "mfu": model_flops_utilization(cfg, per_worker),
        "note": "samples/s at steady state on the wall clock (warmup steps left out); the plain loop does one "
                "rank's share of each step; overhead = 1 - (distributed / workers) / plain",
    }
