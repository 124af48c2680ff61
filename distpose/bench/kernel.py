"""Benchmark of the fused Triton tree-CRF kernel against every baseline, on one device.

At B x 17 joints (the COCO tree: 16 edges) x 64x48, for each window (R=7, R=15 and the full-map
window), in one process: forward (marginals: an upward and a downward pass), forward + backward,
and max-product (MAP) times of

- `triton`: the fused kernel (needs CUDA, or TRITON_INTERPRET=1 at toy sizes);
- `shift` (the PyTorch reference) and `unfold` (the other exact PyTorch formulation);
- `conv`: the stabilised probability-space message, exp -> conv2d -> log. A speed baseline only:
  it underflows on peaked heatmaps, and its error is reported beside its time.

Errors are against the float64 reference on realistic log-heatmaps. The Triton kernel's rate is
given in log-sum-exp terms per second (one exp each) against the exp unit's peak, where known.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch
import torch.nn.functional as F

from distpose.bench import machine
from distpose.bench.crf import Marginals, best_time, forward, forward_backward, with_impl
from distpose.kernels.tree_crf import marginals_with, tree_crf_map, tree_depths, triton_runs_on
from distpose.keypoints import CRF_PARENTS

log = logging.getLogger(__name__)

# Special-function (MUFU ex2) throughput: SMs x 16 per clock x boost clock. H100 and H200 SXM share
# the GH100 die at 132 SMs and 1.83 GHz boost: about 3.9e12 exp/s (docs/crf.md's performance model).
EXP_PEAK_PER_S = {"H100": 3.9e12, "H200": 3.9e12}
EDGES = len(CRF_PARENTS) - 1
EXACT = ("triton", "shift", "unfold")


def conv_message(belief: torch.Tensor, pairwise: torch.Tensor, max_product: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log sum_d exp(belief(x + d)) exp(w(d)) through one grouped conv2d in probability space, each map
    and window scaled by its maximum first. Far-off pixels underflow to 0, hence -inf: not exact."""
    assert not max_product, "the probability-space baseline has no max-product form"
    n = belief.shape[0]
    radius = pairwise.shape[-1] // 2

    def peak(x: torch.Tensor) -> torch.Tensor:
        m = x.detach().flatten(1).amax(dim=1)
        return torch.where(torch.isfinite(m), m, torch.zeros_like(m))[:, None, None]

    b_max, w_max = peak(belief), peak(pairwise)
    total = F.conv2d(torch.exp(belief - b_max)[None], torch.exp(pairwise - w_max)[:, None], padding=radius,
                     groups=n)[0]
    return torch.log(total) + b_max + w_max, None


def skeleton_log_heatmaps(batch: int, size: tuple[int, int], radius: int, gen: torch.Generator) -> torch.Tensor:
    """Log-Gaussian heatmaps (sigma 2, as the training targets) of poses the tree can explain: each
    joint within the window of its parent, so the CRF's probable configurations are those of a real
    prediction. Values reach -1000 far from the peaks, as a log-heatmap does."""
    h, w = size
    joints = len(CRF_PARENTS)
    pos = torch.zeros(batch, joints, 2)
    for k in _tree_order():
        parent = CRF_PARENTS[k]
        if parent < 0:
            pos[:, k] = torch.rand(batch, 2, generator=gen) * torch.tensor([h - 1.0, w - 1.0])
        else:
            step = (torch.rand(batch, 2, generator=gen) * 2 - 1) * radius
            pos[:, k] = (pos[:, parent] + step).clamp(torch.zeros(2), torch.tensor([h - 1.0, w - 1.0]))
    ys = torch.arange(h, dtype=torch.float32)[:, None]
    xs = torch.arange(w, dtype=torch.float32)[None, :]
    cy, cx = pos[..., 0, None, None], pos[..., 1, None, None]
    return -((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * 2.0**2) + 0.1 * torch.randn(batch, joints, h, w, generator=gen)


def _tree_order() -> list[int]:
    """Joints with every parent before its children."""
    depths = tree_depths(CRF_PARENTS)
    return sorted(range(len(CRF_PARENTS)), key=lambda k: depths[k])


def _marginals(name: str) -> Marginals:
    if name == "conv":
        return lambda unary, pairwise: marginals_with(unary, pairwise, CRF_PARENTS, conv_message)
    return with_impl(name)


def _map(impl: str, unary: torch.Tensor, pairwise: torch.Tensor) -> torch.Tensor:
    return tree_crf_map(unary, pairwise, CRF_PARENTS, impl)[1]


def _measure(fn, repeats: int, *args) -> tuple[float | None, Any, str]:
    """(best seconds, result, status); one untimed call first (autotuning, allocator warm-up), which
    also stands as the figure when it took over 5 s; out of memory is a status, not a crash."""
    try:
        first, result = best_time(fn, 1, *args)
        if first > 5.0:
            return first, result, "ok (single run)"
        seconds, result = best_time(fn, repeats, *args)
        return seconds, result, "ok"
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None, "out of memory"


PROBABLE = -50.0  # log-marginals above this (probability > 2e-22) are the ones any decision uses


def log_marginal_error(got: torch.Tensor | None, expected: torch.Tensor) -> dict[str, Any]:
    """Largest absolute log-marginal error over all outputs and over the probable ones, largest
    relative error, and outputs that came out -inf or NaN where the reference is finite. Far from
    the peaks log-marginals reach -3000, where float32 itself only resolves 2.4e-4."""
    if got is None:
        return {}
    got = got.double()
    lost = torch.isfinite(expected) & ~torch.isfinite(got)
    both = torch.isfinite(expected) & torch.isfinite(got)
    if not both.any():
        return {"outputs_lost_to_non_finite": int(lost.sum())}
    err = (got - expected).abs()
    probable = both & (expected > PROBABLE)
    return {
        "max_abs_log_marginal_error": _sig(err[both].max().item()),
        "max_abs_log_marginal_error_probable": _sig(err[probable].max().item()) if probable.any() else None,
        "max_rel_log_marginal_error": _sig((err[both] / expected[both].abs().clamp_min(1.0)).max().item()),
        "outputs_lost_to_non_finite": int(lost.sum()),
    }


TABLES = ("shared", "per-sample")  # one [K, S, S] set for the batch, or [B, K, S, S] (CRF displacement types)


def run(batch: int = 64, size: tuple[int, int] = (64, 48), radii: tuple[int, ...] = (7, 15),
        full_window: bool = True, repeats: int = 5, device: str | None = None,
        impls: tuple[str, ...] = (*EXACT, "conv"), tables: tuple[str, ...] = TABLES) -> dict[str, Any]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    h, w = size
    windows = list(radii) + ([max(h, w) - 1] if full_window else [])
    gen = torch.Generator().manual_seed(0)
    peak = next((v for k, v in EXP_PEAK_PER_S.items() if k in machine().get("device", "")), None)
    skipped = {} if triton_runs_on(device) else {"triton": f"needs CUDA or TRITON_INTERPRET=1 (device {device})"}
    results = []
    for radius, kind in itertools.product(windows, tables):
        s = 2 * radius + 1
        unary = skeleton_log_heatmaps(batch, size, min(radius, max(h, w) - 1), gen).to(device)
        shape = (len(CRF_PARENTS), s, s) if kind == "shared" else (batch, len(CRF_PARENTS), s, s)
        pairwise = (-torch.rand(*shape, generator=gen) * 3).to(device)
        log.info("R=%d, %s tables: float64 reference", radius, kind)
        expected = forward(with_impl("shift"), unary.double(), pairwise.double())
        row: dict[str, Any] = {"radius": radius, "window": s, "full_map_window": radius == max(h, w) - 1,
                               "tables": kind}
        for name in impls:
            if name in skipped:
                row[name] = {"status": f"skipped: {skipped[name]}"}
                continue
            log.info("R=%d, %s tables: %s", radius, kind, name)
            entry: dict[str, Any] = {}
            fwd, marginals, entry["status"] = _measure(forward, repeats, _marginals(name), unary, pairwise)
            entry["forward_ms"] = None if fwd is None else round(fwd * 1e3, 3)
            entry.update(log_marginal_error(marginals, expected))
            fb, _, _ = _measure(forward_backward, repeats, _marginals(name), unary, pairwise)
            entry["forward_backward_ms"] = None if fb is None else round(fb * 1e3, 3)
            if name in EXACT:
                mp, _, _ = _measure(_map, repeats, name, unary, pairwise)
                entry["max_product_ms"] = None if mp is None else round(mp * 1e3, 3)
            row[name] = entry
        results.append(_summarise(row, batch, h * w, s, peak))
    return {
        "benchmark": "crf-kernel",
        "machine": machine(),
        "batch": batch, "joints": len(CRF_PARENTS), "edges": EDGES, "map_size": list(size), "dtype": "float32",
        "exp_peak_per_s": peak,
        "notes": "forward = marginals (upward + downward pass); errors against the float64 shift reference; "
                 "conv is the probability-space speed baseline, not exact; tables: one pairwise set for the "
                 "batch (shared) or one per instance (per-sample, as CRF displacement types make them)",
        "results": results,
    }


def _summarise(row: dict[str, Any], batch: int, pixels: int, window: int, peak: float | None) -> dict[str, Any]:
    """Ratios against the fastest exact PyTorch path, and the kernel's exp rate against its bound."""
    terms_per_pass = batch * EDGES * pixels * window * window
    row["lse_terms_per_pass"] = terms_per_pass
    triton = row.get("triton", {})
    pytorch_fb = [row[n]["forward_backward_ms"] for n in ("shift", "unfold")
                  if row.get(n, {}).get("forward_backward_ms")]
    if triton.get("forward_backward_ms") and pytorch_fb:
        speedup = min(pytorch_fb) / triton["forward_backward_ms"]
        row["triton_forward_backward_speedup_vs_fastest_pytorch"] = _sig(speedup)
    if triton.get("forward_ms"):
        per_pass_s = triton["forward_ms"] / 2e3
        row["triton_lse_terms_per_s"] = _sig(terms_per_pass / per_pass_s)
        if peak:
            bound_ms = terms_per_pass / peak * 1e3
            row["exp_bound_ms_per_pass"] = round(bound_ms, 3)
            row["triton_ms_per_pass_over_bound"] = _sig(per_pass_s * 1e3 / bound_ms)
    return row


def _sig(x: float) -> float:
    """Three significant digits, whatever the magnitude (interpreted runs are orders of magnitude slower)."""
    return float(f"{x:.3g}")
