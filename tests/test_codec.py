"""Heatmap codec: encode -> decode round trips, on synthetic points and on real COCO scored by pycocotools."""

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from distpose.data.coco import annotation_path, load_split
from distpose.data.codec import HeatmapCodec, invert_affine
from distpose.data.transforms import TopDownTransform, apply_affine, crop_matrix


def test_affine_inverse_roundtrip():
    rng = np.random.default_rng(0)
    for flip in (False, True):
        m = crop_matrix(np.array([300.0, 200.0]), np.array([150.0, 200.0]), 33.0, (256, 192), flip)
        pts = rng.uniform(0, 600, size=(17, 2))
        back = apply_affine(apply_affine(pts, m), invert_affine(torch.from_numpy(m)).numpy())
        np.testing.assert_allclose(back, pts, atol=1e-9)


def test_crop_maps_box_centre_to_crop_centre():
    m = crop_matrix(np.array([320.0, 240.0]), np.array([96.0, 128.0]), 0.0, (256, 192))
    np.testing.assert_allclose(apply_affine(np.array([[320.0, 240.0]]), m), [[95.5, 127.5]])
    # The window's width fills the crop's width: 2 input pixels per image pixel here.
    np.testing.assert_allclose(m[:, :2], [[2.0, 0.0], [0.0, 2.0]])


@pytest.mark.parametrize("sizes", [((256, 192), (64, 48)), ((128, 96), (32, 24))])
def test_encode_peak_at_joint_and_decode_error_bounded(sizes):
    codec = HeatmapCodec(*sizes, sigma=2.0)
    rng = np.random.default_rng(1)
    (ih, iw), _ = sizes
    joints = np.stack([rng.uniform(8, iw - 8, 17), rng.uniform(8, ih - 8, 17)], axis=1)
    heatmaps, weight = codec.encode(torch.from_numpy(joints), torch.ones(17, dtype=torch.bool))
    assert tuple(heatmaps.shape) == (17, *sizes[1]) and weight.tolist() == [1.0] * 17
    assert heatmaps.max() <= 1.0 and heatmaps.max() > 0.8
    decoded, scores = codec.decode(heatmaps[None], torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]]))
    decoded = decoded.numpy()
    assert scores.min() > 0.8  # peaks of exact Gaussians at sub-pixel centres
    stride = (iw - 1) / (sizes[1][1] - 1)
    # argmax is within half a heatmap pixel; the quarter step leaves at most a quarter (plus rounding).
    err = np.abs(decoded[0] - joints)
    assert err.max() <= 0.25 * stride + 1e-6
    # Sub-pixel offsets uniform in [0, 0.5) leave |0.25 - u| after the step: 0.125 on average,
    # where argmax alone would leave 0.25.
    assert err.mean() < 0.19 * stride


def test_encode_weights_zero_outside_or_unlabelled():
    codec = HeatmapCodec((256, 192), (64, 48))
    joints = np.array([[-10.0, 50.0], [50.0, 300.0], [100.0, 100.0], [100.0, 100.0]] + [[50.0, 50.0]] * 13)
    visible = np.ones(17, bool)
    visible[3] = False
    heatmaps, weight = codec.encode(torch.from_numpy(joints), torch.from_numpy(visible))
    assert weight[:4].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert heatmaps[[0, 1, 3]].max() == 0.0


def _roundtrip_results(coco_root, input_size, heatmap_size):
    """Encode every GT person to heatmaps and decode back to image coordinates."""
    with load_split(coco_root, "val2017") as split:
        records = list(split)
    codec = HeatmapCodec(input_size, heatmap_size, sigma=2.0)
    transform = TopDownTransform(input_size)
    results, errors = [], []
    for record in records:
        image = np.zeros((record.height, record.width, 3), np.uint8)
        for person in record.persons:
            if not person.usable:
                continue
            kps = np.array(person.keypoints).reshape(17, 3)
            crop = transform(image, person.bbox, kps)
            heatmaps, _ = codec.encode(torch.from_numpy(crop.joints), torch.from_numpy(crop.visible))
            decoded, _ = codec.decode(heatmaps[None], torch.from_numpy(crop.image_to_crop)[None])
            decoded = decoded.numpy()
            labelled = kps[:, 2] > 0
            errors.extend(np.linalg.norm(decoded[0][labelled] - kps[labelled, :2], axis=1))
            out = np.concatenate([decoded[0], np.ones((17, 1))], axis=1)
            results.append({"image_id": record.id, "category_id": 1, "keypoints": out.ravel().tolist(), "score": 1.0})
    return results, np.array(errors)


def test_encode_is_batched_and_matches_per_instance():
    codec = HeatmapCodec((128, 96), (32, 24), sigma=1.5)
    joints = torch.rand(5, 17, 2, dtype=torch.float64) * torch.tensor([95.0, 127.0], dtype=torch.float64)
    visible = torch.rand(5, 17) > 0.3
    batched, weights = codec.encode(joints, visible)
    for i in range(5):
        single, weight = codec.encode(joints[i], visible[i])
        assert torch.equal(batched[i], single) and torch.equal(weights[i], weight)
    # Against a direct evaluation of the 2-D Gaussian in float64.
    ys, xs = torch.meshgrid(torch.arange(32.0, dtype=torch.float64), torch.arange(24.0, dtype=torch.float64),
                            indexing="ij")
    mu = joints[2, 4] * codec.input_to_heatmap()
    direct = torch.exp(-((xs - mu[0]) ** 2 + (ys - mu[1]) ** 2) / (2 * 1.5**2)) * weights[2, 4]
    torch.testing.assert_close(batched[2, 4].double(), direct, atol=1e-6, rtol=0)


def test_codec_roundtrip_real_coco_ap(coco_mini):
    results, errors = _roundtrip_results(coco_mini, (256, 192), (64, 48))
    assert len(results) == 12
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_path(coco_mini, "val2017")))
        evaluator = COCOeval(gt, gt.loadRes(results), "keypoints")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    ap = evaluator.stats[0]
    print(f"codec round trip 256x192/64x48 on coco_val2017_mini: AP={ap:.4f} "
          f"mean keypoint error={errors.mean():.3f} px (max {errors.max():.3f})")
    assert ap >= 0.99
    assert errors.mean() < 2.0


def test_occluders_cover_pixels_near_labelled_joints_and_cost_no_random_draws_when_off():
    from distpose.config import AugmentConfig

    image = np.random.default_rng(0).integers(0, 256, (240, 180, 3), dtype=np.uint8)
    keypoints = np.zeros((17, 3), np.float32)
    keypoints[:5] = [[60, 40, 2], [70, 45, 2], [80, 60, 1], [90, 100, 2], [100, 150, 2]]
    bbox = [40.0, 20.0, 100.0, 180.0]
    on = TopDownTransform((96, 72), augment=AugmentConfig(occluder_prob=1.0))
    off = TopDownTransform((96, 72), augment=AugmentConfig(occluder_prob=0.0))
    for seed in range(20):
        covered, plain = (t(image, bbox, keypoints, np.random.default_rng(seed)) for t in (on, off))
        # The same placement (occluders are drawn after it); the label keeps every joint
        np.testing.assert_array_equal(covered.joints, plain.joints)
        np.testing.assert_array_equal(covered.visible, plain.visible)
        changed = np.argwhere((covered.image != plain.image).any(axis=2))[:, ::-1]  # (x, y)
        assert len(changed) > 0
        labelled = covered.joints[covered.visible]
        nearest = np.linalg.norm(changed[:, None] - labelled[None], axis=2).min(axis=1)
        # half-sides up to 15% of the height, centres jittered by 5% of it: 4 sigma of jitter bounds it
        assert nearest.max() <= np.hypot(0.15, 0.15) * 96 + 4 * 0.05 * 96 * np.sqrt(2) + 1
    # Off, the transform draws exactly what placing the crop draws: a config without occluders keeps its stream
    drawn, placed = np.random.default_rng(7), np.random.default_rng(7)
    off(image, bbox, keypoints, drawn)
    off.place(bbox, keypoints, placed)
    assert drawn.bit_generator.state == placed.bit_generator.state
