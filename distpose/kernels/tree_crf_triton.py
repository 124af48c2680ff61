"""Fused Triton kernels for tree-CRF messages: one launch per tree level.

A message of edge parent -> child over displacements d in a (2R+1)^2 window is
    m(x) = logsumexp_d [belief(x + d) + w(d)]    (or max_d, with its argmax, for MAP)
The tree code stacks a level's edges, so one launch covers (batch x edges in the level) x output
tiles. Forward is two passes over the window per tile: the max (the max-product message, and
the stabiliser), then the sum of exp(s - max); nothing of size (2R+1)^2 x H x W is ever stored.
Backward recomputes each softmax weight exp(belief(z) + w(d) - m(z - d)) from the saved message,
gathering over z (no atomics for the belief gradient) and reducing the pairwise gradient per
program: atomically, or into per-program partials summed afterwards when
torch.use_deterministic_algorithms(True) is on. Accumulation is fp32 whatever the input dtype;
rows that are all -inf give -inf (forward) and zero gradient (backward), never NaN.

On a CPU the kernels run under TRITON_INTERPRET=1 (set before triton is imported), with one
block configuration: autotuning needs a GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton import knobs

INTERPRETED = bool(knobs.runtime.interpret)

if INTERPRETED:
    _FORWARD_CONFIGS = [triton.Config({"BLOCK_H": 8, "BLOCK_W": 16})]
    _BACKWARD_CONFIGS = [triton.Config({"BLOCK_H": 8, "BLOCK_W": 16})]
else:
    _FORWARD_CONFIGS = [
        triton.Config({"BLOCK_H": bh, "BLOCK_W": bw}, num_warps=nw)
        for bh, bw in ((8, 16), (8, 32), (16, 16), (16, 32), (32, 16), (32, 32)) for nw in (2, 4, 8)
    ]
    _BACKWARD_CONFIGS = [
        triton.Config({"BLOCK_H": bh, "BLOCK_W": bw}, num_warps=nw)
        for bh, bw in ((8, 16), (16, 16), (16, 32), (32, 32)) for nw in (4, 8)
    ]


def _most_tiles(h: int, w: int) -> int:
    """Tiles per map under the backward configuration that cuts it finest: the deterministic
    pairwise gradient keeps one partial per tile, whichever configuration the autotuner picks."""
    return max(math.ceil(h / c.kwargs["BLOCK_H"]) * math.ceil(w / c.kwargs["BLOCK_W"]) for c in _BACKWARD_CONFIGS)


@triton.jit
def _tile_coordinates(tile, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Row [BLOCK_H, 1] and column [1, BLOCK_W] pixel indices of tile number `tile`, row-major."""
    tiles_w = tl.cdiv(W, BLOCK_W)
    ys = (tile // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    xs = (tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    return ys, xs


@triton.jit
def _window_term(belief, pairwise, y, row_ok, x, W, d):
    """belief(x + d) + w(d) in fp32 over a tile (y, x already displaced); -inf off the grid."""
    ok = row_ok & (x >= 0) & (x < W)
    term = tl.load(belief + y * W + x, mask=ok, other=float("-inf")).to(tl.float32)
    return term + tl.load(pairwise + d).to(tl.float32)


@triton.autotune(configs=_FORWARD_CONFIGS, key=["H", "W", "S", "MAX_PRODUCT"])
@triton.jit
def _message_forward(belief_ptr, pairwise_ptr, out_ptr, argmax_ptr, H, W,
                     S: tl.constexpr, MAX_PRODUCT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    n = tl.program_id(0)
    tile = tl.program_id(1)
    ys, xs = _tile_coordinates(tile, W, BLOCK_H, BLOCK_W)
    inside = (ys < H) & (xs < W)
    R: tl.constexpr = S // 2
    belief = belief_ptr + n * H * W
    pairwise = pairwise_ptr + n * S * S

    # Pass 1: the max over the window (and, for max-product, the first window index reaching it).
    best = tl.full([BLOCK_H, BLOCK_W], float("-inf"), tl.float32)
    index = tl.zeros([BLOCK_H, BLOCK_W], tl.int32)
    for i in range(S):
        y = ys + (i - R)
        row_ok = (y >= 0) & (y < H)
        for j in range(S):
            s = _window_term(belief, pairwise, y, row_ok, xs + (j - R), W, i * S + j)
            if MAX_PRODUCT:
                better = s > best
                index = tl.where(better, i * S + j, index)
                best = tl.where(better, s, best)
            else:
                best = tl.maximum(best, s)

    offsets = n * H * W + ys * W + xs
    if MAX_PRODUCT:
        tl.store(out_ptr + offsets, best, mask=inside)
        tl.store(argmax_ptr + offsets, index, mask=inside)
    else:
        # Pass 2: sum of exp(s - max); a row with nothing possible keeps total 0 -> -inf.
        stable = tl.where(best > float("-inf"), best, 0.0)
        total = tl.zeros([BLOCK_H, BLOCK_W], tl.float32)
        for i in range(S):
            y = ys + (i - R)
            row_ok = (y >= 0) & (y < H)
            for j in range(S):
                s = _window_term(belief, pairwise, y, row_ok, xs + (j - R), W, i * S + j)
                total += tl.exp(s - stable)
        out = tl.where(total > 0, tl.log(tl.where(total > 0, total, 1.0)) + stable, float("-inf"))
        tl.store(out_ptr + offsets, out, mask=inside)


@triton.autotune(configs=_BACKWARD_CONFIGS, key=["H", "W", "S", "DETERMINISTIC"], reset_to_zero=["grad_pairwise_ptr"])
@triton.jit
def _message_backward(belief_ptr, pairwise_ptr, out_ptr, grad_ptr, grad_belief_ptr, grad_pairwise_ptr,
                      H, W, PARTIALS, S: tl.constexpr, DETERMINISTIC: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Program (n, tile of belief positions z): d belief(z) = sum_d g(z - d) a(z, d) and this tile's
    share of d w(d) = sum_z g(z - d) a(z, d), with a(z, d) = exp(belief(z) + w(d) - m(z - d))."""
    n = tl.program_id(0)
    tile = tl.program_id(1)
    ys, xs = _tile_coordinates(tile, W, BLOCK_H, BLOCK_W)
    inside = (ys < H) & (xs < W)
    R: tl.constexpr = S // 2
    plane = n * H * W
    belief = tl.load(belief_ptr + plane + ys * W + xs, mask=inside, other=float("-inf")).to(tl.float32)
    grad_belief = tl.zeros([BLOCK_H, BLOCK_W], tl.float32)
    for i in range(S):
        y = ys - (i - R)  # the message position x = z - d that this term contributed to
        row_ok = inside & (y >= 0) & (y < H)
        for j in range(S):
            x = xs - (j - R)
            ok = row_ok & (x >= 0) & (x < W)
            out = tl.load(out_ptr + plane + y * W + x, mask=ok, other=0.0)
            grad = tl.load(grad_ptr + plane + y * W + x, mask=ok, other=0.0).to(tl.float32)
            w = tl.load(pairwise_ptr + n * S * S + i * S + j).to(tl.float32)
            # A -inf message has only -inf terms: their weight is 0 (and must not become NaN).
            ok = ok & (out > float("-inf"))
            weight = grad * tl.exp(tl.where(ok, belief + w - tl.where(ok, out, 0.0), float("-inf")))
            grad_belief += weight
            partial = tl.sum(tl.sum(weight, axis=1), axis=0)
            if DETERMINISTIC:
                tl.store(grad_pairwise_ptr + (n * PARTIALS + tile) * S * S + i * S + j, partial)
            else:
                tl.atomic_add(grad_pairwise_ptr + n * S * S + i * S + j, partial)
    tl.store(grad_belief_ptr + plane + ys * W + xs, grad_belief, mask=inside)


def _grid(n: int, h: int, w: int):
    return lambda meta: (n, triton.cdiv(h, meta["BLOCK_H"]) * triton.cdiv(w, meta["BLOCK_W"]))


def _forward(belief: torch.Tensor, pairwise: torch.Tensor, max_product: bool
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    n, h, w = belief.shape
    out = torch.empty((n, h, w), dtype=torch.float32, device=belief.device)
    argmax = torch.empty((n, h, w), dtype=torch.int32, device=belief.device) if max_product else out
    _message_forward[_grid(n, h, w)](belief, pairwise, out, argmax, h, w, S=pairwise.shape[-1],
                                     MAX_PRODUCT=max_product)
    return out, (argmax.long() if max_product else None)


class TritonMessage(torch.autograd.Function):
    @staticmethod
    def forward(ctx, belief: torch.Tensor, pairwise: torch.Tensor) -> torch.Tensor:
        belief, pairwise = belief.contiguous(), pairwise.contiguous()
        out, _ = _forward(belief, pairwise, max_product=False)
        ctx.save_for_backward(belief, pairwise, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        belief, pairwise, out = ctx.saved_tensors
        n, h, w = belief.shape
        size = pairwise.shape[-1]
        deterministic = torch.are_deterministic_algorithms_enabled()
        partials = _most_tiles(h, w) if deterministic else 1
        grad_belief = torch.empty((n, h, w), dtype=torch.float32, device=belief.device)
        grad_pairwise = torch.zeros((n, partials, size, size), dtype=torch.float32, device=belief.device)
        _message_backward[_grid(n, h, w)](belief, pairwise, out, grad.contiguous(), grad_belief, grad_pairwise,
                                          h, w, partials, S=size, DETERMINISTIC=deterministic)
        return grad_belief.to(belief.dtype), grad_pairwise.sum(dim=1).to(pairwise.dtype)


def triton_message(belief: torch.Tensor, pairwise: torch.Tensor, max_product: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The `message` formulation backed by the kernels: fp32 out, belief [N, H, W], pairwise [N, S, S]."""
    if max_product:
        with torch.no_grad():
            return _forward(belief.contiguous(), pairwise.contiguous(), max_product=True)
    return TritonMessage.apply(belief, pairwise), None
