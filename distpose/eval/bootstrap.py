"""95% intervals for PCK: each model's score, and the paired difference between two models.

PCK is a ratio, correct joints over labelled joints, pooled over person instances that hold different
numbers of joints. A bootstrap resample draws N instances with replacement (each with all its joints)
and recomputes the ratio; the interval is the 2.5th and 97.5th percentiles over the resamples. A
difference between two models scored on the same instances is bootstrapped in pairs: one draw of
instances, both models' ratios on it, their difference. Pairing removes what the two models share
(hard and easy instances), which is most of the variance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distpose.eval.inference import Predictions
from distpose.eval.metrics import VISIBILITY, correct_joints

RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class InstancePCK:
    """One model's PCK of one kind of joint (visible or occluded) at one threshold, per instance."""

    instance_ids: np.ndarray  # [N], ascending
    correct: np.ndarray  # [N] correct joints of the kind in each instance
    joints: np.ndarray  # [N] labelled joints of the kind in each instance

    @property
    def value(self) -> float:
        return float(self.correct.sum() / self.joints.sum()) if self.joints.sum() else float("nan")


def instance_pck(predictions: Predictions, kind: str, threshold: float) -> InstancePCK:
    """Per-instance counts behind PCK@threshold of `kind` (a key of metrics.VISIBILITY)."""
    correct, labelled = correct_joints(predictions.keypoints, predictions.gt_keypoints, predictions.bboxes,
                                       threshold, VISIBILITY[kind])
    order = np.argsort(predictions.instance_ids, kind="stable")
    return InstancePCK(predictions.instance_ids[order], correct.sum(axis=1)[order], labelled.sum(axis=1)[order])


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def verdict(self, better: str = "beats", worse: str = "trails") -> str:
        """For a difference: `better` where the interval lies above zero, `worse` below it, else no verdict."""
        if self.low > 0:
            return better
        if self.high < 0:
            return worse
        return "no difference shown"

    def format(self, signed: bool = False, digits: int = 3) -> str:
        spec = f"+.{digits}f" if signed else f".{digits}f"
        return f"{self.estimate:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def resample_counts(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """[resamples, n] how often each of n items is drawn in each bootstrap resample of size n."""
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples)


def _interval(estimate: float, samples: np.ndarray, level: float) -> Interval:
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(samples, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high))


def _ratios(scores: InstancePCK, counts: np.ndarray) -> np.ndarray:
    joints = counts @ scores.joints
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(joints > 0, (counts @ scores.correct) / joints, np.nan)


def pck_interval(scores: InstancePCK, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    counts = resample_counts(len(scores.instance_ids), resamples, seed)
    return _interval(scores.value, _ratios(scores, counts), level)


def paired_difference(a: InstancePCK, b: InstancePCK, resamples: int = RESAMPLES, seed: int = 0,
                      level: float = LEVEL) -> Interval:
    """PCK of `a` minus PCK of `b`, with a paired bootstrap interval; both must score the same instances."""
    if not np.array_equal(a.instance_ids, b.instance_ids):
        raise ValueError(f"a paired comparison needs the same instances: {len(a.instance_ids)} vs "
                         f"{len(b.instance_ids)} instance ids, {len(np.setxor1d(a.instance_ids, b.instance_ids))} "
                         "not in both")
    counts = resample_counts(len(a.instance_ids), resamples, seed)
    return _interval(a.value - b.value, _ratios(a, counts) - _ratios(b, counts), level)
