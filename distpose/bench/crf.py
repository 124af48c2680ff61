"""CPU benchmark of the reference tree CRF: the shift-and-accumulate message against unfold + logsumexp.

Full COCO problem size (B=8, K=17 on the COCO tree, 64x48 maps), windows R=7 and R=15; forward
(marginals) and forward + backward, each formulation timed in the same process, best of `repeats`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from distpose.bench import machine
from distpose.kernels.tree_crf import REFERENCE, tree_crf_marginals
from distpose.keypoints import CRF_PARENTS


def log_heatmaps(batch: int, joints: int, size: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Peaked log-potentials like a trained head's: a Gaussian bump (sigma 2) at a random spot plus noise
    (float32, on the CPU: `gen` decides them whatever the device they are timed on)."""
    h, w = size
    ys, xs = torch.arange(h, dtype=torch.float32)[:, None], torch.arange(w, dtype=torch.float32)[None, :]
    cy = torch.rand(batch, joints, 1, 1, generator=gen) * (h - 1)
    cx = torch.rand(batch, joints, 1, 1, generator=gen) * (w - 1)
    bump = -((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * 2.0**2)
    return bump + 0.5 * torch.randn(batch, joints, h, w, generator=gen)


def best_time(fn, repeats: int, *args) -> tuple[float, Any]:
    """Best wall time of `repeats` calls, and the last call's result (GPU work included: synchronised)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        _synchronize()
        start = time.perf_counter()
        result = fn(*args)
        _synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


Marginals = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def with_impl(impl: str) -> Marginals:
    return lambda unary, pairwise: tree_crf_marginals(unary, pairwise, CRF_PARENTS, impl)


def forward(marginals: Marginals, unary: torch.Tensor, pairwise: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return marginals(unary, pairwise)[1]


def forward_backward(marginals: Marginals, unary: torch.Tensor, pairwise: torch.Tensor) -> None:
    """A training-like loss: log Z plus a cross-entropy-like term on every (finite) marginal."""
    u, w = unary.clone().requires_grad_(), pairwise.clone().requires_grad_()
    log_z, log_marginals = marginals(u, w)
    finite = torch.where(torch.isfinite(log_marginals), log_marginals, torch.zeros_like(log_marginals))
    (log_z.sum() - (finite * unary.flatten(2).softmax(-1).view_as(unary)).sum()).backward()


def run(batch: int = 8, size: tuple[int, int] = (64, 48), radii: tuple[int, ...] = (7, 15),
        repeats: int = 2) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    joints = len(CRF_PARENTS)
    unary = log_heatmaps(batch, joints, size, gen)
    results = []
    for radius in radii:
        window = 2 * radius + 1
        pairwise = -torch.rand(joints, window, window, generator=gen) * 3
        row: dict[str, Any] = {"radius": radius}
        marginals = {}
        for impl in ("unfold", "shift"):
            seconds, marginals[impl] = best_time(forward, repeats, with_impl(impl), unary, pairwise)
            row[f"{impl}_forward_s"] = round(seconds, 4)
            row[f"{impl}_forward_backward_s"] = round(
                best_time(forward_backward, repeats, with_impl(impl), unary, pairwise)[0], 4)
        row["forward_speedup_shift_vs_unfold"] = round(row["unfold_forward_s"] / row["shift_forward_s"], 2)
        row["forward_backward_speedup_shift_vs_unfold"] = round(
            row["unfold_forward_backward_s"] / row["shift_forward_backward_s"], 2)
        finite = torch.isfinite(marginals["unfold"]) & torch.isfinite(marginals["shift"])
        row["max_abs_log_marginal_difference"] = float((marginals["unfold"] - marginals["shift"])[finite].abs().max())
        results.append(row)
    return {
        "benchmark": "crf-reference",
        "machine": machine(),
        "batch": batch, "joints": joints, "map_size": list(size), "dtype": "float32",
        "threads": torch.get_num_threads(),
        "reference_formulation": REFERENCE,
        "results": results,
    }
