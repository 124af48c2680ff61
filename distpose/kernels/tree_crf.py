"""Exact inference in a tree-structured CRF over joint positions on a heatmap grid.

p(x) is proportional to exp(sum_k u_k(x_k) + sum_{k != root} w_k(x_k - x_parent(k))), where each x_k
is a pixel (y, x) of an H x W grid, u are unary log-potentials [B, K, H, W], and w_k is the
log-potential of the edge parent(k) -> k over displacements d = x_k - x_parent(k) in a
(2R+1) x (2R+1) window, indexed [dy + R, dx + R]; displacements outside the window are impossible.

Sum-product runs in log space over the tree's levels: leaves to root (messages, log Z), then root
to leaves (outside messages), which gives every joint's exact log-marginal. A message is
m(x_p) = logsumexp_d [b_c(x_p + d) + w_c(d)] for all edges of a level at once. Never computed as
exp -> conv2d -> log: that underflows to -inf on peaked real heatmaps (benchmarks/README.md measures it).
Max-product with back-pointers gives the MAP configuration.

Each message is one of the formulations in MESSAGES: the PyTorch reference (any device), unfold
(a simpler PyTorch baseline), or the fused Triton kernel (tree_crf_triton.py), which impl="auto"
picks on CUDA.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def tree_depths(parents: Sequence[int]) -> list[int]:
    """Depth of every node of a parent-list tree; ValueError unless it is one rooted tree."""
    n = len(parents)
    roots = [k for k, p in enumerate(parents) if p == -1]
    if len(roots) != 1:
        raise ValueError(f"a tree needs exactly one root (-1), got {len(roots)} in {list(parents)}")
    depths: list[int | None] = [None] * n
    for k in range(n):
        path = []
        node = k
        while node != -1 and depths[node] is None:
            if node in path:
                raise ValueError(f"parent list {list(parents)} has a cycle through node {node}")
            if not -1 <= parents[node] < n:
                raise ValueError(f"parent of node {node} is {parents[node]}, outside [-1, {n})")
            path.append(node)
            node = parents[node]
        base = -1 if node == -1 else depths[node]
        for i, p in enumerate(reversed(path)):
            depths[p] = base + 1 + i
    return depths  # type: ignore[return-value]


def logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp that gives -inf, with zero gradient, for a slice of all -inf (torch's gives NaN grads)."""
    m = x.detach().amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    total = torch.exp(x - m).sum(dim=dim, keepdim=True)
    positive = total > 0
    out = torch.where(positive, torch.log(torch.where(positive, total, torch.ones_like(total))) + m,
                      torch.full_like(total, NEG_INF))
    return out.squeeze(dim)


def _windows(belief: torch.Tensor, radius: int) -> torch.Tensor:
    """[N, H, W] -> [N, (2R+1)^2, H*W]: entry (d, x) is belief(x + d), -inf off the grid."""
    n, h, w = belief.shape
    padded = F.pad(belief[:, None], (radius, radius, radius, radius), value=NEG_INF)
    return F.unfold(padded, kernel_size=2 * radius + 1).view(n, (2 * radius + 1) ** 2, h * w)


def _unfold_message(belief: torch.Tensor, pairwise: torch.Tensor, max_product: bool
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All (2R+1)^2 window terms at once: simple, but autograd keeps [N, (2R+1)^2, H*W] alive."""
    n, h, w = belief.shape
    scores = _windows(belief, pairwise.shape[-1] // 2) + pairwise.reshape(n, -1, 1)
    if max_product:
        best, index = scores.max(dim=1)
        return best.view(n, h, w), index.view(n, h, w)
    return logsumexp(scores, dim=1).view(n, h, w), None


def _shifted(belief: torch.Tensor, radius: int) -> torch.Tensor:
    return F.pad(belief, (radius, radius, radius, radius), value=NEG_INF)


def _max_pass(padded: torch.Tensor, pairwise: torch.Tensor, h: int, w: int, with_index: bool
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """max_d [belief(x + d) + pairwise(d)] over the window, one displacement at a time, and (if asked)
    the window index of the first maximum."""
    size = pairwise.shape[-1]
    best = torch.full((padded.shape[0], h, w), NEG_INF, dtype=padded.dtype, device=padded.device)
    index = torch.zeros(best.shape, dtype=torch.long, device=best.device) if with_index else None
    for i in range(size):
        for j in range(size):
            term = padded[:, i:i + h, j:j + w] + pairwise[:, i, j, None, None]
            if index is None:
                torch.maximum(best, term, out=best)
            else:
                better = term > best
                best = torch.where(better, term, best)
                index = torch.where(better, torch.full_like(index, i * size + j), index)
    return best, index


class _ShiftMessage(torch.autograd.Function):
    """One displacement at a time: a max pass, then a sum of exp(term - max); the backward pass
    recomputes each term's softmax weight from the saved output. Memory O(N H W) for any window."""

    @staticmethod
    def forward(ctx, belief: torch.Tensor, pairwise: torch.Tensor) -> torch.Tensor:
        h, w = belief.shape[1:]
        size = pairwise.shape[-1]
        padded = _shifted(belief, size // 2)
        best, _ = _max_pass(padded, pairwise, h, w, with_index=False)
        stable = torch.where(torch.isfinite(best), best, torch.zeros_like(best))
        total = torch.zeros_like(belief)
        for i in range(size):
            for j in range(size):
                total += torch.exp(padded[:, i:i + h, j:j + w] + pairwise[:, i, j, None, None] - stable)
        out = torch.where(total > 0, torch.log(total) + stable, torch.full_like(total, NEG_INF))
        ctx.save_for_backward(belief, pairwise, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        belief, pairwise, out = ctx.saved_tensors
        h, w = belief.shape[1:]
        size, radius = pairwise.shape[-1], pairwise.shape[-1] // 2
        padded = _shifted(belief, radius)
        # Where out is -inf every term is -inf too, so its weights are exp(-inf) = 0 with out := 0.
        finite = torch.isfinite(out)
        out = torch.where(finite, out, torch.zeros_like(out))
        grad = torch.where(finite, grad, torch.zeros_like(grad))
        grad_padded = torch.zeros_like(padded)
        grad_pairwise = torch.zeros_like(pairwise)
        for i in range(size):
            for j in range(size):
                weight = torch.exp(padded[:, i:i + h, j:j + w] + pairwise[:, i, j, None, None] - out) * grad
                grad_padded[:, i:i + h, j:j + w] += weight
                grad_pairwise[:, i, j] = weight.sum(dim=(1, 2))
        return grad_padded[:, radius:radius + h, radius:radius + w], grad_pairwise


def _shift_message(belief: torch.Tensor, pairwise: torch.Tensor, max_product: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not max_product:
        return _ShiftMessage.apply(belief, pairwise), None
    h, w = belief.shape[1:]
    return _max_pass(_shifted(belief, pairwise.shape[-1] // 2), pairwise, h, w, with_index=True)


def _triton_message(belief: torch.Tensor, pairwise: torch.Tensor, max_product: bool
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    from .tree_crf_triton import triton_message  # imports triton: only when asked for

    return triton_message(belief, pairwise, max_product)


# The formulations of one message; "reference" is the faster PyTorch one on CPU (see
# `distpose bench crf`), "unfold" stays as the benchmark's baseline and a cross-check, "triton"
# is the fused kernel (CUDA, or any device under TRITON_INTERPRET=1).
MessageFn = Callable[[torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]]
MESSAGES: dict[str, MessageFn] = {"shift": _shift_message, "unfold": _unfold_message, "triton": _triton_message}
REFERENCE = "shift"


def message(belief: torch.Tensor, pairwise: torch.Tensor, max_product: bool = False, formulation: str = REFERENCE
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """m(x) = logsumexp_d [belief(x + d) + pairwise(d)] (or max, with the argmax d as a window index).

    belief [N, H, W], pairwise [N, 2R+1, 2R+1] -> m [N, H, W] (and argmax [N, H, W] for max-product).
    """
    return MESSAGES[formulation](belief, pairwise, max_product)


class _Schedule:
    """A parent-list tree's non-root nodes grouped by depth, deepest level first (one batched
    message computation per level)."""

    def __init__(self, parents: Sequence[int]):
        depths = tree_depths(parents)
        self.parents = list(parents)
        self.root = self.parents.index(-1)
        self.levels = [[k for k, d in enumerate(depths) if d == level] for level in range(max(depths), 0, -1)]
        self.children = [[c for c, p in enumerate(self.parents) if p == k] for k in range(len(self.parents))]


IMPLS = ("auto", "reference", *MESSAGES)


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on `device`: compiled on CUDA, or anywhere interpreted."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _formulation(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_runs_on(device) else REFERENCE  # never the interpreter
    if impl == "triton" and not triton_runs_on(device):
        raise ValueError(f"impl='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 set before triton is "
                         f"imported); got a {device.type} tensor")
    return REFERENCE if impl == "reference" else impl


def _check(unary: torch.Tensor, pairwise: torch.Tensor, parents: Sequence[int]
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated arguments: unary in the working dtype (float64 stays, anything else is computed in
    float32), and pairwise as [B, K, 2R+1, 2R+1] in that dtype."""
    if unary.dim() != 4:
        raise ValueError(f"unary must be [B, K, H, W], got shape {tuple(unary.shape)}")
    b, k = unary.shape[:2]
    if len(parents) != k:
        raise ValueError(f"parents has {len(parents)} entries for K={k} joints")
    if pairwise.dim() == 3:
        pairwise = pairwise.unsqueeze(0).expand(b, *pairwise.shape)
    if pairwise.dim() != 4 or pairwise.shape[:2] != (b, k) or pairwise.shape[2] != pairwise.shape[3] \
            or pairwise.shape[2] % 2 == 0:
        raise ValueError(f"pairwise must be [K, 2R+1, 2R+1] or [B, K, 2R+1, 2R+1] for B={b}, K={k}; "
                         f"got {tuple(pairwise.shape)}")
    dtype = torch.float64 if unary.dtype == torch.float64 else torch.float32
    return unary.to(dtype), pairwise.to(dtype)


def _peak_removed(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, H, W] maps minus each map's maximum, and those maxima [B, L] (0 for an all -inf map).

    Messages are kept this way so that every per-pixel value stays within the range of the unaries:
    summed unnormalised, they reach thousands on peaked heatmaps, where float32 rounds at 1e-4.
    The maxima are detached: log Z and the marginals do not depend on where a message is cut, so
    their gradients are exact without differentiating the cut.
    """
    peak = maps.detach().flatten(2).amax(dim=2)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    return maps - peak[..., None, None], peak


def _upward(unary: torch.Tensor, pairwise: torch.Tensor, schedule: _Schedule, max_product: bool,
            send: MessageFn):
    """Leaves to root. Returns, per node, the summed incoming messages [B, H, W] and the constant
    [B] (float64) taken out of them, each node's message to its parent, and (max-product) the
    back-pointers."""
    b, k, h, w = unary.shape
    incoming: list[torch.Tensor] = [torch.zeros_like(unary[:, 0]) for _ in range(k)]
    removed = [torch.zeros(b, dtype=torch.float64, device=unary.device) for _ in range(k)]
    sent: dict[int, torch.Tensor] = {}
    pointers: dict[int, torch.Tensor] = {}
    for level in schedule.levels:
        beliefs = torch.stack([unary[:, c] + incoming[c] for c in level], dim=1)  # [B, L, H, W]
        msgs, argmax = send(beliefs.reshape(-1, h, w), pairwise[:, level].reshape(-1, *pairwise.shape[2:]),
                            max_product)
        msgs, peaks = _peak_removed(msgs.view(b, len(level), h, w))
        for i, c in enumerate(level):
            p = schedule.parents[c]
            sent[c] = msgs[:, i]
            incoming[p] = incoming[p] + msgs[:, i]
            removed[p] = removed[p] + removed[c] + peaks[:, i].double()
            if argmax is not None:
                pointers[c] = argmax.view(b, len(level), h, w)[:, i]
    return incoming, removed, sent, pointers


def tree_crf_marginals(unary: torch.Tensor, pairwise: torch.Tensor, parents: Sequence[int], impl: str = "auto"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log-partition [B] and log-marginals [B, K, H, W] (each joint's map sums to 1 in
    probability). A batch element with no possible configuration gets log_z = -inf and all -inf
    marginals. Differentiable with respect to unary and pairwise."""
    send = MESSAGES[_formulation(impl, unary.device)]
    return marginals_with(unary, pairwise, parents, send)


def marginals_with(unary: torch.Tensor, pairwise: torch.Tensor, parents: Sequence[int], send: MessageFn
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """tree_crf_marginals with any message function `send`: benchmarks use it to time baselines
    that must never be the implementation."""
    unary, pairwise = _check(unary, pairwise, parents)
    schedule = _Schedule(parents)
    b, k, h, w = unary.shape
    incoming, removed, sent, _ = _upward(unary, pairwise, schedule, False, send)
    root = schedule.root
    log_z = logsumexp((unary[:, root] + incoming[root]).reshape(b, -1), dim=1) + removed[root].to(unary.dtype)

    outside: list[torch.Tensor | None] = [None] * k
    outside[root] = torch.zeros_like(unary[:, root])
    for level in reversed(schedule.levels):
        rest = []
        for c in level:
            # Everything at the parent but this child's own message, summed afresh: subtracting the
            # message from the parent's total would cancel catastrophically where it is very negative.
            p = schedule.parents[c]
            others = [sent[s] for s in schedule.children[p] if s != c]
            rest.append(sum(others, unary[:, p] + outside[p]))
        flipped = pairwise[:, level].flip(-1, -2)  # x_c = x_p + d  <=>  x_p = x_c + (-d)
        msgs, _ = send(torch.stack(rest, 1).reshape(-1, h, w), flipped.reshape(-1, *pairwise.shape[2:]), False)
        msgs, _ = _peak_removed(msgs.view(b, len(level), h, w))
        for i, c in enumerate(level):
            outside[c] = msgs[:, i]

    # Each joint's full belief is its marginal up to a constant: normalising it locally cancels the
    # constants taken out of the messages, with no large log Z subtracted per pixel.
    beliefs = torch.stack([unary[:, c] + incoming[c] + outside[c] for c in range(k)], dim=1)
    norm = logsumexp(beliefs.flatten(2), dim=2)[..., None, None]
    finite = torch.isfinite(log_z)[:, None, None, None] & torch.isfinite(norm)
    log_marginals = torch.where(finite, beliefs - torch.where(finite, norm, torch.zeros_like(norm)),
                                torch.full_like(beliefs, NEG_INF))
    return log_z, log_marginals


def tree_crf_map(unary: torch.Tensor, pairwise: torch.Tensor, parents: Sequence[int], impl: str = "auto"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """MAP score [B] and positions [B, K, 2] (int64 y, x) of the most probable configuration."""
    formulation = _formulation(impl, unary.device)
    unary, pairwise = _check(unary, pairwise, parents)
    schedule = _Schedule(parents)
    b, k, _, w = unary.shape
    radius = pairwise.shape[-1] // 2
    with torch.no_grad():
        incoming, removed, _, pointers = _upward(unary, pairwise, schedule, True, MESSAGES[formulation])
        root = schedule.root
        score, best = (unary[:, root] + incoming[root]).reshape(b, -1).max(dim=1)
        score = score + removed[root].to(score.dtype)
        flat = torch.zeros(b, k, dtype=torch.long, device=unary.device)
        flat[:, root] = best
        for level in reversed(schedule.levels):
            for c in level:
                # Back-pointer at the parent's position: the window index of the best displacement.
                d = pointers[c].reshape(b, -1).gather(1, flat[:, schedule.parents[c], None])[:, 0]
                py, px = flat[:, schedule.parents[c]] // w, flat[:, schedule.parents[c]] % w
                cy = py + d // (2 * radius + 1) - radius
                cx = px + d % (2 * radius + 1) - radius
                flat[:, c] = cy * w + cx
    positions = torch.stack([flat // w, flat % w], dim=-1)
    return score, positions
