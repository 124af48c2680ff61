"""DeepSpeed: the engine config derived from ours, the HRNet learning-rate schedule, and the engine.

The optimizer is a client torch.optim.Adam rather than one named in the DeepSpeed config: DeepSpeed's
own Adam JIT-compiles a C++ op at start-up (needs a compiler and minutes), and ZeRO partitions a
client optimizer just the same.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distpose.config import Config, ConfigError, grad_accum_at, micro_batch_size, worker_range
from distpose.errors import UserError

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
SHM_COMM_OP = "deepspeed_shm_comm"  # DeepSpeed's ShareMemCommBuilder.NAME


def deepspeed_config(cfg: Config, world_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON for `cfg` at `world_size` ranks (default: the most workers), with
    `train.deepspeed_config`'s keys (if any) merged over it."""
    t = cfg.train
    ds: dict[str, Any] = {
        "train_batch_size": cfg.data.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(cfg),
        "gradient_accumulation_steps": grad_accum_at(cfg, world_size or worker_range(t)[1]),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,  # our client Adam
        "steps_per_print": 10**9,  # we log steps ourselves
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        # Buffers in bf16 too: BatchNorm's running statistics must match its bf16 input on CPU.
        ds["bf16"] = {"enabled": True}
        ds["data_types"] = {"buffer_dtype": "bf16"}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    elif t.precision == "bf16-mixed":
        # No module's gradients are all-reduced in bf16 (DeepSpeed's default for convolutions): only the
        # arithmetic of the forward and backward passes is lowered, not the averaging of gradients.
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    if t.deepspeed_config:
        ds = _merge(ds, _read_override(t.deepspeed_config))
    return ds


def _read_override(path: str) -> dict[str, Any]:
    try:
        override = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"config key 'train.deepspeed_config': cannot read {path} ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config key 'train.deepspeed_config': {path} is not valid JSON ({exc})") from None
    if not isinstance(override, dict):
        raise ConfigError(f"config key 'train.deepspeed_config': {path} holds {type(override).__name__}, "
                          "expected a JSON object")
    clash = [k for k in BATCH_KEYS if k in override]
    if clash:
        raise ConfigError(f"config key 'train.deepspeed_config': {path} sets {clash[0]}; set data.batch_size, "
                          "train.workers and train.grad_accum instead")
    return override


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware (on a CPU: AVX512-BF16 or AMX), rather than emulating it."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def with_precision_resolved(cfg: Config, device: torch.device) -> Config:
    """`cfg` with train.precision=auto made concrete: bf16-mixed if every rank's device has native bf16 (ranks
    agree through an all-reduce), else fp32. Other precisions are returned as they are."""
    if cfg.train.precision != "auto":
        return cfg
    native = torch.tensor([int(native_bf16(device))], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(native, op=torch.distributed.ReduceOp.MIN)
    precision = "bf16-mixed" if int(native) else "fp32"
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))


def lr_multiplier(step: int, cfg: Config) -> float:
    """HRNet's schedule at optimizer step `step`: linear warmup over train.warmup_steps, then
    x lr_factor at each epoch of train.lr_steps."""
    t = cfg.train
    warmup = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else 1.0
    epoch = step // cfg.data.batches_per_epoch
    return warmup * t.lr_factor ** sum(epoch >= milestone for milestone in t.lr_steps)


def build_engine(model: nn.Module, groups: list[dict], cfg: Config, world_size: int, load_universal: bool = False):
    """deepspeed.initialize with our Adam over parameter `groups` (each with its own lr) and our schedule;
    the process group must already exist (Ray made it). `load_universal`: the checkpoint it will load is a
    universal one (ZeRO state written at another world size, converted)."""
    import deepspeed

    # On CPU DeepSpeed's communication setup JIT-compiles a shared-memory all-reduce op that only its
    # inference all-reduce uses: a C++ compile of about a minute on each node's first run, a load on every start.
    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    config = deepspeed_config(cfg, world_size)
    if load_universal:
        config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
    optimizer = torch.optim.Adam(groups, lr=cfg.train.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg))
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                               config=config, dist_init_required=False)
    except (AssertionError, ValueError) as exc:  # DeepSpeed's config checks
        raise UserError(f"DeepSpeed refused the config: {exc}") from None
    return engine
