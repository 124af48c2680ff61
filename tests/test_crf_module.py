"""TreeCRF module and the training losses."""

import math

import pytest
import torch

from distpose.data.codec import HeatmapCodec
from distpose.keypoints import CRF_PARENTS
from distpose.models.crf import TreeCRF, gaussian_window
from distpose.models.losses import crf_marginal_loss, heatmap_mse


def test_tree_crf_module_gives_normalised_marginals_and_trains_both_parts():
    torch.manual_seed(0)
    crf = TreeCRF(feature_channels=8, radius=3)
    features = torch.randn(2, 8, 16, 12)
    log_z, log_marginals = crf(features)
    assert tuple(log_marginals.shape) == (2, 17, 16, 12) and tuple(log_z.shape) == (2,)
    torch.testing.assert_close(log_marginals.exp().sum((2, 3)), torch.ones(2, 17), atol=1e-5, rtol=0)
    log_marginals[:, :, 8, 6].sum().backward()
    assert crf.pairwise.grad.abs().sum() > 0 and crf.unary_head.weight.grad.abs().sum() > 0
    score, positions = crf.map(features)
    assert tuple(positions.shape) == (2, 17, 2) and torch.isfinite(score).all()


def test_pairwise_starts_as_a_broad_gaussian_and_unary_from_a_head():
    crf = TreeCRF(4, radius=4)
    window = gaussian_window(4, 2.0)
    assert window[4, 4] == 0 and window.argmax() == 40 and window[0, 0] == pytest.approx(-(16 + 16) / 8)
    assert torch.equal(crf.pairwise[5], window) and crf.radius == 4 and crf.parents == list(CRF_PARENTS)
    head = torch.nn.Conv2d(4, 17, 1)
    crf.init_unary_from(head, scale=30.0)
    assert torch.equal(crf.unary_head.weight, head.weight * 30) and torch.equal(crf.unary_head.bias, head.bias * 30)


def test_heatmap_mse_matches_hand_computation():
    pred = torch.zeros(1, 2, 2, 2)
    target = torch.ones(1, 2, 2, 2)
    weight = torch.tensor([[1.0, 0.0]])
    # joint 0: mean squared error 1, joint 1: weighted out; mean over joints of 0.5 * mse = 0.25
    assert heatmap_mse(pred, target, weight).item() == pytest.approx(0.25)
    assert heatmap_mse(target, target, torch.ones(1, 2)).item() == 0


def test_crf_loss_is_cross_entropy_minimised_by_the_target():
    codec = HeatmapCodec((64, 48), (16, 12), sigma=1.5)
    target, weight = codec.encode(torch.tensor([[[20.0, 30.0], [5.0, 60.0]]]), torch.tensor([[True, False]]))
    probs = target / target.sum((2, 3), keepdim=True).clamp_min(1e-30)
    entropy = -(probs[0, 0] * probs[0, 0].clamp_min(1e-30).log()).sum()
    at_target = crf_marginal_loss(probs.clamp_min(1e-30).log(), target, weight)
    uniform = crf_marginal_loss(torch.full((1, 2, 16, 12), -math.log(16 * 12)), target, weight)
    # One joint used out of 2 slots: the sum over used joints is divided by B x K = 2.
    torch.testing.assert_close(at_target, entropy / 2)
    assert uniform.item() == pytest.approx(math.log(16 * 12) / 2) and uniform > at_target
    # -inf marginals where the target is zero cost nothing and give no NaN.
    log_marginals = probs.clamp_min(1e-30).log().masked_fill(probs == 0, -math.inf).requires_grad_()
    loss = crf_marginal_loss(log_marginals, target, weight)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(log_marginals.grad).all()
    assert crf_marginal_loss(log_marginals, target, torch.zeros(1, 2)).item() == 0


def test_one_displacement_type_is_the_shared_table_crf_and_types_mix_per_instance():
    from distpose.kernels import tree_crf_marginals

    torch.manual_seed(0)
    features = torch.randn(3, 8, 10, 8)
    one = TreeCRF(8, radius=2)
    assert one.type_head is None and set(one.state_dict()) == {"unary_head.weight", "unary_head.bias", "pairwise"}
    assert torch.equal(one.tables(features), one.pairwise)
    typed = TreeCRF(8, radius=2, types=3)
    tables = torch.randn(17, 3, 5, 5)
    typed.init_pairwise(tables)
    typed.unary_head.load_state_dict(one.unary_head.state_dict())
    # Equal weights at the start: every instance gets log mean_t exp(T_t), in float64 by hand
    mixed = torch.log(tables.double().exp().mean(dim=1))
    torch.testing.assert_close(typed.tables(features).double(), mixed.expand(3, 17, 5, 5), atol=1e-6, rtol=0)
    with torch.no_grad():
        typed.type_head.weight.normal_()
    per_instance = typed.tables(features)
    assert per_instance.shape == (3, 17, 5, 5) and not torch.allclose(per_instance[0], per_instance[1])
    w = torch.softmax(typed.type_head(features.mean(dim=(2, 3))).view(3, 17, 3), dim=2).double()
    by_hand = torch.log((w[..., None, None] * tables.double().exp()[None]).sum(dim=2))
    torch.testing.assert_close(per_instance.double(), by_hand, atol=1e-5, rtol=0)
    log_z, log_marginals = typed(features)
    ref_z, ref_marginals = tree_crf_marginals(typed.unary_head(features).double(), by_hand, CRF_PARENTS,
                                              impl="reference")
    torch.testing.assert_close(log_marginals.double(), ref_marginals, atol=1e-4, rtol=0)
    torch.testing.assert_close(log_z.double(), ref_z, atol=1e-4, rtol=0)
    log_marginals[:, :, 4, 4].sum().backward()  # the type head learns from the marginals
    assert typed.type_head.weight.grad.abs().sum() > 0 and typed.pairwise.grad.abs().sum() > 0


def test_gains_scale_each_joints_unary_and_each_edges_table_and_start_at_one():
    from distpose.kernels import tree_crf_map, tree_crf_marginals

    torch.manual_seed(0)
    features = torch.randn(2, 8, 10, 8)
    plain, gained = TreeCRF(8, radius=2), TreeCRF(8, radius=2, gains=True)
    assert plain.log_temperature is None and "log_temperature" not in plain.state_dict()
    gained.load_state_dict({**plain.state_dict(), **{k: v for k, v in gained.state_dict().items() if "log_" in k}})
    for a, b in zip(plain(features), gained(features)):  # at the start the gains are 1: the same CRF
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    temperature, edge_weight = torch.rand(17) * 3 + 0.2, torch.rand(17) * 3 + 0.2
    with torch.no_grad():
        gained.log_temperature.copy_(temperature.log())
        gained.log_edge_weight.copy_(edge_weight.log())
    # The same CRF in float64 with each joint's unary and each edge's table multiplied out by hand
    unary = plain.unary_head(features).double() * temperature.double()[:, None, None]
    tables = plain.pairwise.double() * edge_weight.double()[:, None, None]
    ref_z, ref_marginals = tree_crf_marginals(unary, tables, CRF_PARENTS, impl="reference")
    log_z, log_marginals = gained(features)
    torch.testing.assert_close(log_marginals.double(), ref_marginals, atol=1e-4, rtol=0)
    torch.testing.assert_close(log_z.double(), ref_z, atol=1e-4, rtol=0)
    torch.testing.assert_close(gained.map(features)[1], tree_crf_map(unary, tables, CRF_PARENTS)[1], atol=0, rtol=0)
    log_marginals[:, :, 4, 4].sum().backward()
    assert gained.log_temperature.grad.abs().min() > 0  # every joint's temperature learns
    assert gained.log_edge_weight.grad[1:].abs().min() > 0  # every edge's weight (the root has no edge)
