"""Where a CRF run starts: limb displacements drawn as training draws its crops, the window chosen from
them, and pairwise tables that are their smoothed log-density; checked against hand computation and
brute force."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from distpose.config import AugmentConfig, ConfigError, DataConfig, load_config
from distpose.data.limbs import limb_displacements
from distpose.data.shards import shard_ground_truth
from distpose.keypoints import FLIP_INDEX, INDEX, NUM_JOINTS
from distpose.models.crf import choose_radius, inside_window, pairwise_from_displacements, window_coverage
from distpose.models.model_file import save_model_file
from distpose.train.crf_prior import crf_prior
from distpose.train.modes import run_model

NO_AUG = AugmentConfig(flip_prob=0, half_body_prob=0, scale_factor=0, rotation_prob=0)
DATA = DataConfig(input_size=(128, 96), heatmap_size=(32, 24), augment=NO_AUG)


def person(points: dict[str, tuple[float, float]], bbox=(0.0, 0.0, 75.0, 100.0)) -> dict:
    keypoints = np.zeros((NUM_JOINTS, 3))
    for name, (x, y) in points.items():
        keypoints[INDEX[name]] = (x, y, 2)
    return {"bbox": list(bbox), "keypoints": keypoints.ravel().tolist(), "num_keypoints": len(points),
            "iscrowd": 0, "area": 7500.0, "id": 1, "image_id": 1}


def test_displacements_by_hand():
    # A 75x100 box at the crop's aspect: window 93.75 x 125 pixels onto 96 x 128 input pixels, then
    # input -> heatmap by aligning the first and last pixel centres: x * 23 / 95, y * 31 / 127.
    truth = {"annotations": [person({"left_shoulder": (30, 20), "left_elbow": (40, 50), "nose": (35, 5)})]}
    found = limb_displacements(truth, DATA, draws=1)
    s = 96 / 93.75
    np.testing.assert_allclose(found[INDEX["left_elbow"]], [[30 * s * 31 / 127, 10 * s * 23 / 95]])
    np.testing.assert_allclose(found[INDEX["left_shoulder"]], [[15 * s * 31 / 127, -5 * s * 23 / 95]])
    # Only edges with both joints labelled count: the right side and the wrists have none.
    assert [len(d) for d in found] == [1 if k in (INDEX["left_elbow"], INDEX["left_shoulder"]) else 0
                                       for k in range(NUM_JOINTS)]


def test_a_flipped_crop_swaps_left_and_right_limbs():
    points = {"nose": (37, 5), "left_shoulder": (30, 20), "right_shoulder": (45, 22), "left_elbow": (20, 45),
              "right_elbow": (60, 40)}
    truth = {"annotations": [person(points)]}
    plain = limb_displacements(truth, DATA, draws=1)
    flipped = limb_displacements(truth, dataclasses.replace(DATA, augment=dataclasses.replace(NO_AUG, flip_prob=1)),
                                 draws=1)
    for k in (INDEX["left_elbow"], INDEX["right_elbow"], INDEX["left_shoulder"]):
        np.testing.assert_allclose(flipped[k], plain[FLIP_INDEX[k]] * [1, -1])


def brute_force_table(points: np.ndarray, radius: int, smoothing: float, uniform: float) -> np.ndarray:
    """The same density, computed cell by cell in float64: bilinear weights, then a Gaussian blur summed
    over every source cell (truncated at 3 pixels, as a 7-tap kernel), then the uniform mix and the log."""
    size = 2 * radius + 1
    hist = np.zeros((size, size))
    for dy, dx in points:
        for cy, cx in itertools.product(range(size), range(size)):
            wy = max(0.0, 1 - abs(dy + radius - cy))
            wx = max(0.0, 1 - abs(dx + radius - cx))
            hist[cy, cx] += wy * wx
    taps = np.exp(-0.5 * (np.arange(-3, 4) / smoothing) ** 2)
    taps /= taps.sum()
    blurred = np.zeros_like(hist)
    for cy, cx, oy, ox in itertools.product(range(size), range(size), range(-3, 4), range(-3, 4)):
        if 0 <= cy + oy < size and 0 <= cx + ox < size:
            blurred[cy + oy, cx + ox] += hist[cy, cx] * taps[oy + 3] * taps[ox + 3]
    return np.log((1 - uniform) * blurred / blurred.sum() + uniform / size**2)


def test_pairwise_tables_match_brute_force_and_are_log_densities():
    rng = np.random.default_rng(0)
    displacements = [np.zeros((0, 2))] + [rng.normal([2.0, -1.0], 1.5, size=(50, 2)) for _ in range(3)]
    tables = pairwise_from_displacements(displacements, radius=4, smoothing=1.0, uniform=0.01)
    assert tables.shape == (4, 9, 9) and tables.dtype == torch.float32
    for k in range(1, 4):
        np.testing.assert_allclose(tables[k].numpy(), brute_force_table(displacements[k], 4, 1.0, 0.01), atol=1e-5)
    torch.testing.assert_close(tables.exp().sum((1, 2)), torch.ones(4), rtol=0, atol=1e-5)
    # No data: the flat density. Data: the mode lies at the displacements' centre, (dy, dx) = (2, -1).
    torch.testing.assert_close(tables[0], torch.full((9, 9), -np.log(81.0)))
    assert np.unravel_index(int(tables[1].argmax()), (9, 9)) == (4 + 2, 4 - 1)


def test_window_coverage_and_radius_by_brute_force():
    rng = np.random.default_rng(1)
    displacements = [rng.normal(0, 3, size=(200, 2)), rng.normal(4, 2, size=(100, 2))]
    for radius in range(1, 12):
        # Held: both components round to a cell of the window, i.e. lie within R + 0.5.
        held = sum(1 for d in displacements for dy, dx in d if max(abs(dy), abs(dx)) < radius + 0.5)
        assert window_coverage(displacements, radius) == pytest.approx(held / 300)
    radius = choose_radius(displacements, 0.95, max_radius=20)
    assert window_coverage(displacements, radius) >= 0.95 > window_coverage(displacements, radius - 1)
    assert choose_radius(displacements, 1.0, max_radius=3) == 3
    assert inside_window(np.zeros((0, 2)), 2).shape == (0,)


def test_crf_prior_on_shards_and_into_the_model(synth_shards, tmp_path):
    backbone = tmp_path / "backbone.pt"
    base = [f"data.shards={synth_shards}", "data.input_size=[96,64]", "data.heatmap_size=[24,16]"]
    save_model_file(backbone, run_model(load_config(None, base)).state_dict(), load_config(None, base))
    cfg = load_config(None, [*base, "train.mode=crf", f"train.backbone_checkpoint={backbone}",
                             "model.crf_window_coverage=0.9"])
    prior = crf_prior(cfg)
    displacements = limb_displacements(shard_ground_truth(synth_shards, "train"), cfg.data, draws=4, seed=0)
    assert prior.limbs == sum(len(d) for d in displacements) > 0
    assert prior.coverage == window_coverage(displacements, prior.radius) >= 0.9
    assert prior.radius == 1 or window_coverage(displacements, prior.radius - 1) < 0.9
    assert f"R={prior.radius} " in prior.summary(cfg) and f"{prior.limbs:,} training limbs" in prior.summary(cfg)
    ready = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, crf_window=prior.radius))
    model = run_model(ready, prior.pairwise)
    assert torch.equal(model.crf.pairwise.data, prior.pairwise)
    gaussian = crf_prior(load_config(None, [*base, "train.mode=crf", f"train.backbone_checkpoint={backbone}",
                                            "model.crf_window=3", "model.crf_pairwise_init=gaussian"]))
    assert gaussian.radius == 3 and gaussian.pairwise is None and gaussian.limbs == prior.limbs


def test_random_data_needs_a_fixed_window_and_the_gaussian():
    base = ["data.source=random", "train.mode=crf", "train.backbone_checkpoint=b.pt"]
    with pytest.raises(ConfigError, match="model.crf_window"):
        load_config(None, base)
    with pytest.raises(ConfigError, match="model.crf_pairwise_init"):
        load_config(None, [*base, "model.crf_window=3"])
    assert crf_prior(load_config(None, [*base, "model.crf_window=3", "model.crf_pairwise_init=gaussian"])).radius == 3


def test_displacement_types_cluster_the_limbs_and_their_even_mixture_is_the_one_table_prior():
    from distpose.models.crf import cluster_displacements, typed_pairwise_from_displacements

    rng = np.random.default_rng(0)
    blobs = np.array([[-3.0, 0.0], [2.0, 3.0], [1.0, -4.0]])
    truth = rng.integers(0, 3, 600)
    points = blobs[truth] + rng.normal(0, 0.4, (600, 2))
    labels = cluster_displacements(points, 3)
    # k-means finds the three blobs: every cluster is one blob, by brute force over the label permutations
    assert any(np.array_equal(np.array(perm)[labels], truth) for perm in itertools.permutations(range(3)))
    edges = [np.zeros((0, 2)), points, points[:5] * 0.5, np.zeros((0, 2))]  # the root, a limb, a short one, none
    one = pairwise_from_displacements(edges, radius=5).double()
    typed = typed_pairwise_from_displacements(edges, radius=5, types=3).double()
    assert typed.shape == (4, 3, 11, 11)
    torch.testing.assert_close(torch.log(typed.exp().mean(dim=1)), one, atol=1e-5, rtol=0)
    # each type holds its own blob: its table peaks where its cluster lies
    for t in range(3):
        peak = np.unravel_index(int(typed[1, t].argmax()), (11, 11))
        assert min(np.abs(np.array(peak) - 5 - blobs).sum(axis=1)) <= 1
