"""Bootstrap intervals for PCK, checked against statistics that do not depend on the code: the delta-method
standard error of a ratio, coverage of a known true value over simulated validation sets, and exact
differences built by hand."""

import numpy as np
import pytest

from distpose.eval.bootstrap import InstancePCK, Interval, instance_pck, paired_difference, pck_interval
from distpose.eval.inference import Predictions
from distpose.eval.metrics import pck


def simulated(rng: np.random.Generator, n: int, p_low: float = 2.0) -> InstancePCK:
    """n instances with 1-5 joints each; instance i's joints are correct with probability p_i ~ Beta(p_low, 2),
    independent of its joint count, so the population's PCK (sum correct / sum joints) is E[p]."""
    joints = rng.integers(1, 6, size=n)
    correct = rng.binomial(joints, rng.beta(p_low, 2.0, size=n))
    return InstancePCK(np.arange(n), correct, joints)


def test_interval_width_matches_the_delta_method():
    scores = simulated(np.random.default_rng(0), 400)
    interval = pck_interval(scores, resamples=4000, seed=1)
    # Ratio estimator R = sum c / sum n: Var(R) ~ sum (c_i - R n_i)^2 / (sum n)^2.
    r = scores.value
    se = np.sqrt(((scores.correct - r * scores.joints) ** 2).sum()) / scores.joints.sum()
    assert interval.estimate == r
    assert interval.low < r < interval.high
    assert (interval.high - interval.low) / (2 * 1.96 * se) == pytest.approx(1.0, abs=0.1)


def test_intervals_cover_the_true_value_about_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    truth = 2.0 / 4.0  # E[p] for Beta(2, 2)
    sims = 300
    covered = 0
    for s in range(sims):
        interval = pck_interval(simulated(rng, 200), resamples=1000, seed=s)
        covered += interval.low <= truth <= interval.high
    assert 0.91 <= covered / sims <= 0.985, covered / sims


def test_paired_difference_of_a_model_with_itself_is_exactly_zero():
    scores = simulated(np.random.default_rng(3), 150)
    assert paired_difference(scores, scores) == Interval(0.0, 0.0, 0.0)
    assert paired_difference(scores, scores).verdict() == "no difference shown"


def test_paired_difference_finds_a_small_real_gain_that_unpaired_intervals_cannot():
    rng = np.random.default_rng(4)
    base = simulated(rng, 300)
    # The better model gets one more joint right on 15% of the instances where it can.
    room = np.flatnonzero(base.correct < base.joints)
    gained = rng.choice(room, size=int(0.15 * len(base.joints)), replace=False)
    better = InstancePCK(base.instance_ids, base.correct + np.isin(base.instance_ids, gained), base.joints)
    exact = len(gained) / base.joints.sum()
    diff = paired_difference(better, base, seed=5)
    assert diff.estimate == pytest.approx(exact)
    assert diff.low > 0 and diff.verdict() == "beats" and paired_difference(base, better).verdict() == "trails"
    # The two models' own intervals overlap: only the pairing shows the gain.
    a, b = pck_interval(better, seed=5), pck_interval(base, seed=5)
    assert a.low < b.high


def test_a_comparison_needs_the_same_instances():
    a = simulated(np.random.default_rng(5), 10)
    b = InstancePCK(a.instance_ids + 1, a.correct, a.joints)
    with pytest.raises(ValueError, match="same instances"):
        paired_difference(a, b)


def test_instance_counts_add_up_to_the_reported_pck():
    rng = np.random.default_rng(6)
    n, k = 40, 17
    gt = np.concatenate([rng.uniform(0, 100, (n, k, 2)), rng.integers(0, 3, (n, k, 1))], axis=2)
    pred = gt[..., :2] + rng.normal(0, 8, (n, k, 2))
    boxes = np.tile([0.0, 0.0, 80.0, 100.0], (n, 1))
    ids = rng.permutation(1000)[:n]
    predictions = Predictions(pred, np.ones((n, k)), np.ones(n), ids, ids, boxes, np.full(n, 8000.0), gt)
    table = pck(pred, gt, boxes, (0.1,))
    for kind in ("visible", "occluded"):
        scores = instance_pck(predictions, kind, 0.1)
        assert list(scores.instance_ids) == sorted(ids)
        assert scores.value == pytest.approx(table[kind]["pck@0.1"]["mean"])
        assert scores.joints.sum() == table[kind]["count"]
