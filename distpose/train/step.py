"""One optimizer step, the same in `distpose train` (DeepSpeed) and in `bench train`'s plain loop: its
micro-batches drawn from the stream, each one's loss for the mode, and the backward pass the caller owns."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from distpose.data.transforms import normalize_images
from distpose.train.modes import ModeLoss


def micro_batch_loss(model: torch.nn.Module, batch: dict[str, Any], loss: ModeLoss, device: torch.device,
                     input_dtype: torch.dtype = torch.float32,
                     autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """The mode's loss on one micro-batch: images normalised (and cast to `input_dtype` for an all-bf16/fp16
    model), the forward under `autocast` if given, targets rendered by `loss` on the device."""
    images = normalize_images(batch["image"].to(device, non_blocking=True)).to(input_dtype)
    with autocast or contextlib.nullcontext():
        output = model(images)
    return loss(output, batch["joints"].to(device), batch["visible"].to(device))


def optimizer_step(batches: Iterator[dict[str, Any]], accum: int, loss_of: Callable[[dict[str, Any]], torch.Tensor],
                   backward: Callable[[torch.Tensor], None]) -> tuple[torch.Tensor, float]:
    """`accum` micro-batches: each one's loss from `loss_of`, handed to `backward`. Returns the mean loss
    (detached, on the device) and the seconds spent waiting for data."""
    waited, loss_sum = 0.0, None
    for _ in range(accum):
        before = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - before
        loss = loss_of(batch)
        backward(loss)
        loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
    return loss_sum / accum, waited
