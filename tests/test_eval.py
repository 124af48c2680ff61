"""Evaluation against hand computations and pycocotools on the real mini set."""

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from distpose.data.codec import HeatmapCodec
from distpose.eval.coco import evaluate, oks_nms, rescore
from distpose.eval.metrics import hrnet_accuracy, oks, pck
from distpose.keypoints import OKS_SIGMAS


def gt_annotations(coco_mini):
    doc = json.loads((coco_mini / "annotations" / "person_keypoints_val2017.json").read_text())
    return [a for a in doc["annotations"] if a["num_keypoints"] > 0 and not a["iscrowd"]]


def test_ground_truth_as_predictions_scores_ap_one(coco_mini):
    results = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
               for a in gt_annotations(coco_mini)]
    stats = evaluate(coco_mini / "annotations" / "person_keypoints_val2017.json", results)
    assert stats["AP"] == pytest.approx(1.0) and stats["AR"] == pytest.approx(1.0)


def test_oks_of_a_known_shift_matches_hand_and_pycocotools(coco_mini):
    ann = max(gt_annotations(coco_mini), key=lambda a: a["num_keypoints"])
    gt = np.array(ann["keypoints"], dtype=np.float64).reshape(17, 3)
    pred = gt[:, :2] + np.array([3.0, 4.0])  # every joint 5 px off
    labelled = [k for k in range(17) if gt[k, 2] > 0]
    by_hand = sum(math.exp(-25.0 / (2 * ann["area"] * (2 * OKS_SIGMAS[k]) ** 2)) for k in labelled) / len(labelled)
    assert oks(pred, gt, ann["area"]) == pytest.approx(by_hand, abs=1e-12)

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(coco_mini / "annotations" / "person_keypoints_val2017.json"))
        kps = np.concatenate([pred, np.ones((17, 1))], axis=1).ravel().tolist()
        dt = coco.loadRes([{"image_id": ann["image_id"], "category_id": 1, "keypoints": kps, "score": 1.0}])
        evaluator = COCOeval(coco, dt, "keypoints")
        evaluator.params.imgIds = [ann["image_id"]]
        evaluator.evaluate()
    ious = evaluator.ious[(ann["image_id"], 1)]
    gt_ids = [g["id"] for g in coco.loadAnns(coco.getAnnIds(imgIds=ann["image_id"]))]
    column = [i for i, g in enumerate(sorted(coco.loadAnns(gt_ids), key=lambda g: g.get("ignore", 0)))
              if g["id"] == ann["id"]]
    assert np.asarray(ious)[0, column[0]] == pytest.approx(by_hand, abs=1e-9)


def test_pck_by_hand():
    boxes = np.array([[0, 0, 100, 50], [10, 10, 40, 200]], dtype=np.float64)  # longer sides 100 and 200
    gt = np.zeros((2, 17, 3))
    gt[:, :, :2] = 50.0
    gt[0, :4, 2] = [2, 2, 1, 1]
    gt[1, :3, 2] = [2, 1, 0]
    pred = gt[:, :, :2].copy()
    pred[0, :4, 0] += [4, 8, 15, 30]  # 0.04, 0.08, 0.15, 0.30 of 100
    pred[1, :3, 0] += [9, 50, 1]  # 0.045, 0.25 of 200; joint 2 unlabelled
    report = pck(pred, gt, boxes)
    vis, occ = report["visible"], report["occluded"]
    assert vis["count"] == 3 and occ["count"] == 3
    assert vis["pck@0.05"]["mean"] == pytest.approx(2 / 3)  # 0.04, 0.045 in; 0.08 out
    assert vis["pck@0.1"]["mean"] == pytest.approx(1.0)
    assert occ["pck@0.1"]["mean"] == 0.0 and occ["pck@0.2"]["mean"] == pytest.approx(1 / 3)
    assert vis["pck@0.05"]["per_joint"]["nose"] == 1.0 and vis["pck@0.05"]["per_joint"]["left_eye"] == 0.0
    assert occ["pck@0.2"]["per_joint"]["right_eye"] == 1.0  # one occluded instance, at 0.15
    assert occ["pck@0.2"]["per_joint"]["left_eye"] == 0.0  # one occluded instance, at 0.25
    assert vis["pck@0.2"]["per_joint"]["right_ankle"] is None


def test_hrnet_accuracy_thresholds_at_a_twentieth_of_the_map():
    codec = HeatmapCodec((256, 192), (64, 48), sigma=2.0)
    joints = torch.tensor([[[100.0, 120.0]] * 17], dtype=torch.float64)
    target, _ = codec.encode(joints, torch.ones(1, 17, dtype=torch.bool))
    stride = 191 / 47
    near, _ = codec.encode(joints + torch.tensor([2.0 * stride, 0.0], dtype=torch.float64),
                           torch.ones(1, 17, dtype=torch.bool))  # 2 heatmap px in x: 2 / 4.8 < 0.5
    far, _ = codec.encode(joints + torch.tensor([3.0 * stride, 0.0], dtype=torch.float64),
                          torch.ones(1, 17, dtype=torch.bool))  # 3 / 4.8 > 0.5
    assert hrnet_accuracy(near, target) == 1.0 and hrnet_accuracy(far, target) == 0.0
    mixed = torch.cat([near[:, :8], far[:, 8:]], dim=1)
    assert hrnet_accuracy(mixed, target) == pytest.approx(8 / 17)


def test_rescoring_and_oks_nms():
    assert rescore(np.array([0.1, 0.5, 0.9]), 0.8) == pytest.approx(0.8 * 0.7)
    assert rescore(np.array([0.1, 0.15]), 0.9) == 0.0
    base = np.stack([np.linspace(10, 90, 17), np.linspace(20, 180, 17), np.ones(17)], axis=1)
    shifted = base + [0.5, 0.5, 0]
    far = base + [300, 0, 0]
    instances = [
        {"image_id": 1, "keypoints": shifted.ravel().tolist(), "score": 0.7, "area": 8000.0},
        {"image_id": 1, "keypoints": base.ravel().tolist(), "score": 0.9, "area": 8000.0},
        {"image_id": 1, "keypoints": far.ravel().tolist(), "score": 0.5, "area": 8000.0},
        {"image_id": 2, "keypoints": shifted.ravel().tolist(), "score": 0.1, "area": 8000.0},
    ]
    kept = oks_nms(instances, threshold=0.9)
    assert sorted((k["image_id"], k["score"]) for k in kept) == [(1, 0.5), (1, 0.9), (2, 0.1)]
