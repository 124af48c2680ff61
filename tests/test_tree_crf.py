"""The tree CRF reference against brute-force enumeration of every joint configuration (float64)."""

import math

import pytest
import torch

from distpose.kernels import tree_crf_map, tree_crf_marginals, tree_depths

TOL = dict(atol=1e-9, rtol=0)


def pairwise_table(window: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, S, S] window -> [B, P, P] table over (x_parent, x_child), -inf outside the window."""
    r = window.shape[-1] // 2
    ys, xs = torch.div(torch.arange(h * w), w, rounding_mode="floor"), torch.arange(h * w) % w
    dy, dx = ys[None, :] - ys[:, None], xs[None, :] - xs[:, None]  # child minus parent
    valid = (dy.abs() <= r) & (dx.abs() <= r)
    table = torch.full((window.shape[0], h * w, h * w), -math.inf, dtype=window.dtype)
    table[:, valid] = window[:, (dy + r)[valid], (dx + r)[valid]]
    return table


def brute_force(unary: torch.Tensor, pairwise: torch.Tensor, parents: list[int]):
    """Score every configuration: a tensor with one axis of H*W positions per joint."""
    b, k, h, w = unary.shape
    p = h * w
    if pairwise.dim() == 3:
        pairwise = pairwise.expand(b, *pairwise.shape)
    scores = torch.zeros((b,) + (p,) * k, dtype=unary.dtype)

    def on_axes(values: torch.Tensor, axes: list[int]) -> torch.Tensor:
        shape = [b] + [1] * k
        for axis in axes:
            shape[1 + axis] = p
        return values.reshape(shape)

    for joint in range(k):
        scores = scores + on_axes(unary[:, joint].reshape(b, p), [joint])
    for child, parent in enumerate(parents):
        if parent >= 0:
            table = pairwise_table(pairwise[:, child], h, w)  # [B, P(parent), P(child)]
            if parent > child:
                table = table.transpose(1, 2)
            scores = scores + on_axes(table, sorted([parent, child]))
    flat = scores.reshape(b, -1)
    log_z = torch.logsumexp(flat, dim=1)
    marginals = torch.stack([
        torch.logsumexp(scores.movedim(1 + joint, 1).reshape(b, p, -1), dim=2) for joint in range(k)
    ], dim=1).reshape(b, k, h, w) - log_z[:, None, None, None]
    best_score, best = flat.max(dim=1)
    positions = torch.stack(torch.unravel_index(best, (p,) * k), dim=1)  # [B, K] flat positions
    return log_z, marginals, best_score, torch.stack([positions // w, positions % w], dim=-1)


CASES = [
    # parents, (H, W), R
    ([-1, 0, 1], (6, 5), 1),  # chain
    ([-1, 0, 1], (6, 5), 2),
    ([-1, 0, 1], (5, 4), 3),
    ([-1, 0, 0, 1], (4, 3), 1),  # branching
    ([1, -1, 1, 2], (4, 3), 2),  # root in the middle, parents after children
    ([-1, 0, 0, 1, 1], (3, 3), 1),  # five joints, two branch points
    ([-1, 0, 1, 2, 3], (3, 3), 2),  # five-joint chain
]


@pytest.mark.parametrize("parents, size, radius", CASES)
@pytest.mark.parametrize("shared", [True, False], ids=["shared-pairwise", "per-sample-pairwise"])
@pytest.mark.parametrize("impl", ["reference", "unfold", "shift"])
def test_marginals_and_map_equal_brute_force(parents, size, radius, shared, impl):
    gen = torch.Generator().manual_seed(len(parents) * 100 + radius * 10 + shared)
    b, k = 2, len(parents)
    unary = torch.randn(b, k, *size, generator=gen, dtype=torch.float64) * 2
    window = (k, 2 * radius + 1, 2 * radius + 1) if shared else (b, k, 2 * radius + 1, 2 * radius + 1)
    pairwise = torch.randn(*window, generator=gen, dtype=torch.float64) * 2
    log_z, log_marginals = tree_crf_marginals(unary, pairwise, parents, impl)
    bf_log_z, bf_marginals, bf_score, bf_positions = brute_force(unary, pairwise, parents)
    torch.testing.assert_close(log_z, bf_log_z, **TOL)
    torch.testing.assert_close(log_marginals, bf_marginals, **TOL)
    score, positions = tree_crf_map(unary, pairwise, parents, impl)
    torch.testing.assert_close(score, bf_score, **TOL)
    assert torch.equal(positions, bf_positions)


def test_window_larger_than_the_map():
    gen = torch.Generator().manual_seed(5)
    unary = torch.randn(1, 3, 3, 3, generator=gen, dtype=torch.float64)
    pairwise = torch.randn(3, 15, 15, generator=gen, dtype=torch.float64)  # R = 7 on a 3x3 grid
    log_z, log_marginals = tree_crf_marginals(unary, pairwise, [-1, 0, 0])
    bf_log_z, bf_marginals, _, bf_positions = brute_force(unary, pairwise, [-1, 0, 0])
    torch.testing.assert_close(log_z, bf_log_z, **TOL)
    torch.testing.assert_close(log_marginals, bf_marginals, **TOL)
    assert torch.equal(tree_crf_map(unary, pairwise, [-1, 0, 0])[1], bf_positions)


def test_single_joint():
    unary = torch.randn(2, 1, 4, 3, dtype=torch.float64)
    log_z, log_marginals = tree_crf_marginals(unary, torch.zeros(1, 3, 3, dtype=torch.float64), [-1])
    torch.testing.assert_close(log_z, torch.logsumexp(unary.reshape(2, -1), 1), **TOL)
    torch.testing.assert_close(log_marginals, unary - log_z[:, None, None, None], **TOL)
    score, positions = tree_crf_map(unary, torch.zeros(1, 3, 3, dtype=torch.float64), [-1])
    torch.testing.assert_close(score, unary.reshape(2, -1).max(1).values, **TOL)
    best = unary.reshape(2, -1).argmax(1)
    assert positions[:, 0].tolist() == [[int(i) // 3, int(i) % 3] for i in best]


@pytest.mark.parametrize("impl", ["unfold", "shift"])
def test_gradcheck(impl):
    gen = torch.Generator().manual_seed(0)
    unary = torch.randn(2, 3, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    pairwise = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(u, w):
        log_z, log_marginals = tree_crf_marginals(u, w, [-1, 0, 0], impl)
        return log_z, log_marginals

    assert torch.autograd.gradcheck(f, (unary, pairwise), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", ["unfold", "shift"])
def test_marginals_are_the_gradient_of_log_z(impl):
    gen = torch.Generator().manual_seed(1)
    unary = torch.randn(2, 4, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    pairwise = torch.randn(2, 4, 5, 5, generator=gen, dtype=torch.float64)
    log_z, log_marginals = tree_crf_marginals(unary, pairwise, [-1, 0, 0, 2], impl)
    (grad,) = torch.autograd.grad(log_z.sum(), unary)
    torch.testing.assert_close(grad, log_marginals.exp(), **TOL)


@pytest.mark.parametrize("impl", ["unfold", "shift"])
def test_impossible_joint_gives_minus_inf_without_nan(impl):
    unary = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, 3, 4, 4, dtype=torch.bool)
    mask[1, 2] = True  # joint 2 of sample 1 can be nowhere
    masked = unary.masked_fill(mask, -math.inf)
    pairwise = torch.randn(3, 3, 3, dtype=torch.float64)
    log_z, log_marginals = tree_crf_marginals(masked, pairwise, [-1, 0, 1], impl)
    assert torch.isfinite(log_z[0]) and log_z[1] == -math.inf
    assert not torch.isnan(log_marginals).any() and (log_marginals[1] == -math.inf).all()
    torch.testing.assert_close(log_marginals[0].exp().sum((1, 2)), torch.ones(3, dtype=torch.float64), **TOL)
    (grad,) = torch.autograd.grad(log_z[0] + log_marginals[0].exp().sum(), unary)
    assert torch.isfinite(grad).all() and (grad[1] == 0).all()


def test_window_that_forbids_every_configuration():
    """Unary mass only in opposite corners, window too small to connect them."""
    unary = torch.full((1, 2, 6, 6), -math.inf, dtype=torch.float64)
    unary[0, 0, 0, 0] = unary[0, 1, 5, 5] = 0.0
    log_z, log_marginals = tree_crf_marginals(unary, torch.zeros(2, 3, 3, dtype=torch.float64), [-1, 0])
    assert log_z.item() == -math.inf and not torch.isnan(log_marginals).any()


@pytest.mark.parametrize("args, message", [
    ((torch.zeros(1, 3, 4, 4), torch.zeros(3, 3, 3), [-1, 0]), "parents has 2 entries for K=3"),
    ((torch.zeros(1, 3, 4, 4), torch.zeros(3, 4, 4), [-1, 0, 1]), "pairwise must be"),
    ((torch.zeros(1, 3, 4, 4), torch.zeros(2, 3, 3, 3), [-1, 0, 1]), "pairwise must be"),
    ((torch.zeros(3, 4, 4), torch.zeros(3, 3, 3), [-1, 0, 1]), "unary must be [B, K, H, W]"),
    ((torch.zeros(1, 3, 4, 4), torch.zeros(3, 3, 3), [-1, -1, 1]), "exactly one root"),
    ((torch.zeros(1, 3, 4, 4), torch.zeros(3, 3, 3), [-1, 2, 1]), "cycle"),
])
def test_bad_arguments_are_clear_errors(args, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tree_crf_marginals(*args)
    with pytest.raises(ValueError, match="impl must be"):
        tree_crf_map(torch.zeros(1, 1, 2, 2), torch.zeros(1, 3, 3), [-1], impl="cuda")


def test_tree_depths():
    assert tree_depths([-1, 0, 0, 1, 2]) == [0, 1, 1, 2, 2]
    assert tree_depths([1, -1, 1]) == [1, 0, 1]
