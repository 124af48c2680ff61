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

from distpose.config import DataConfig
from distpose.data.coco import annotation_path, load_detections, load_split
from distpose.data.codec import HeatmapCodec
from distpose.data.loader import eval_loader
from distpose.data.shards import write_shards
from distpose.data.transforms import apply_affine
from distpose.errors import DataError
from distpose.eval.coco_eval import coco_results, evaluate, oks_nms, rescore
from distpose.eval.evaluate import HeatmapAccuracy
from distpose.eval.inference import predict
from distpose.eval.metrics import accuracy_from_counts, hrnet_accuracy_counts, oks, pck
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


def hrnet_accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """HRNet's accuracy of one batch."""
    return accuracy_from_counts(*hrnet_accuracy_counts(pred, target))


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


def test_a_splits_heatmap_accuracy_does_not_depend_on_its_batches():
    """Summed per joint over the split: batches of 1, 3 or all 7 give the same value, that of a brute-force
    count. (The batch-size weighted mean of batch accuracies, HRNet's log, gave the in-training evaluation and
    `distpose eval` of one model file different values.)"""
    codec = HeatmapCodec((64, 48), (16, 12), sigma=2.0)
    generator = torch.Generator().manual_seed(0)
    joints = torch.rand(7, 17, 2, generator=generator, dtype=torch.float64) * torch.tensor([47.0, 63.0])
    visible = torch.rand(7, 17, generator=generator) > 0.3
    batch = {"joints": joints, "visible": visible}
    target, _ = codec.encode(joints, visible)
    found = torch.rand(7, 17, 1, 1, generator=generator) > 0.5  # else the maximum falls anywhere
    maps = target.float() * found + 0.1 * torch.rand(7, 17, 16, 12, generator=generator)
    counted = [[bool(t.flatten().argmax() % 12 > 1 and t.flatten().argmax() // 12 > 1) for t in person]
               for person in target]
    correct = [[False] * 17 for _ in range(7)]
    for n in range(7):
        for k in range(17):
            p, t = int(maps[n, k].flatten().argmax()), int(target[n, k].flatten().argmax())
            dx, dy = (p % 12 - t % 12) / 1.2, (p // 12 - t // 12) / 1.6
            correct[n][k] = counted[n][k] and (dx * dx + dy * dy) ** 0.5 < 0.5
    per_joint = [sum(correct[n][k] for n in range(7)) / sum(counted[n][k] for n in range(7))
                 for k in range(17) if any(counted[n][k] for n in range(7))]
    expected = sum(per_joint) / len(per_joint)
    values = []
    for size in (1, 3, 7):
        accuracy = HeatmapAccuracy()
        for start in range(0, 7, size):
            part = slice(start, start + size)
            accuracy.add(maps[part], {k: v[part] for k, v in batch.items()}, codec)
        values.append(accuracy.value)
    assert 0.2 < expected < 0.8 and values == [pytest.approx(expected, abs=1e-12)] * 3
    weighted = sum(hrnet_accuracy(maps[n:n + 1], target[n:n + 1]) for n in range(7)) / 7
    assert weighted != pytest.approx(expected)  # the old way, batches of 1


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


@pytest.fixture(scope="module")
def mini_eval(coco_mini, tmp_path_factory):
    """The real mini set as shards, read at 256x192 -> 64x48, and its labelled persons by image."""
    out = tmp_path_factory.mktemp("mini_eval_shards")
    write_shards(coco_mini, "val2017", out, samples_per_shard=2, progress=False)
    cfg = DataConfig(shards=str(out), val_split="val2017", input_size=(256, 192), heatmap_size=(64, 48),
                     batch_size=16, loader_workers=0)
    with load_split(coco_mini, "val2017") as split:
        persons = {r.id: [p for p in r.persons if p.usable] for r in split}
    return cfg, HeatmapCodec(cfg.input_size, cfg.heatmap_size, cfg.sigma), persons


def box_iou(a, b) -> float:
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return iw * ih / (a[2] * a[3] + b[2] * b[3] - iw * ih)


def oracle_maps(codec, persons):
    """A perfect 'model': heatmaps of the labelled person that best overlaps each crop's box."""
    def maps(batch):
        out = torch.zeros(len(batch["image_id"]), 17, *codec.heatmap_size)
        for row in range(len(out)):
            box = batch["bbox"][row].tolist()
            matches = [(box_iou(box, p.bbox), p) for p in persons[int(batch["image_id"][row])]]
            overlap, person = max(matches, key=lambda m: m[0], default=(0.0, None))
            if overlap >= 0.5:
                kps = torch.tensor(person.keypoints, dtype=torch.float64).reshape(17, 3)
                out[row], _ = codec.encode(apply_affine(kps[:, :2], batch["image_to_crop"][row]), kps[:, 2] > 0)
        return out
    return maps


def test_end_to_end_with_ground_truth_boxes(coco_mini, mini_eval):
    cfg, codec, persons = mini_eval
    preds = predict(eval_loader(cfg), oracle_maps(codec, persons), codec)
    assert sorted(preds.instance_ids.tolist()) == sorted(p.id for ps in persons.values() for p in ps)
    stats = evaluate(annotation_path(coco_mini, "val2017"), coco_results(preds))
    assert stats["AP"] >= 0.99 and stats["AR"] >= 0.99
    report = pck(preds.keypoints, preds.gt_keypoints, preds.bboxes)
    assert report["visible"]["pck@0.05"]["mean"] == 1.0 and report["occluded"]["pck@0.05"]["mean"] == 1.0


def test_end_to_end_with_detector_boxes(coco_mini, mini_eval):
    """The mini set's detector boxes -> crops -> decode -> rescoring -> OKS-NMS -> COCOeval."""
    cfg, codec, persons = mini_eval
    detections = load_detections(coco_mini / "annotations" / "person_detections_val2017.json")
    preds = predict(eval_loader(cfg, boxes=detections), oracle_maps(codec, persons), codec)
    assert sorted(preds.instance_ids.tolist()) == list(range(118))  # every detector box once
    detector_scores = {d.index: d.score for ds in detections.values() for d in ds}
    np.testing.assert_allclose(preds.box_scores, [detector_scores[i] for i in preds.instance_ids], rtol=1e-6)
    kept = coco_results(preds)
    assert len(kept) < len(coco_results(preds, nms_threshold=None))  # duplicate boxes removed
    for a in kept:
        for b in kept:
            if a is not b and a["image_id"] == b["image_id"] and a["score"] >= b["score"]:
                gt = np.concatenate([np.reshape(a["keypoints"], (17, 3))[:, :2], np.ones((17, 1))], axis=1)
                assert oks(np.reshape(b["keypoints"], (17, 3))[:, :2], gt, a["area"]) <= 0.9
    stats = evaluate(annotation_path(coco_mini, "val2017"), kept)
    print(f"detector boxes, perfect heatmaps: {len(preds)} boxes, {len(kept)} after OKS-NMS, AP={stats['AP']:.4f}")
    assert stats["AP"] >= 0.99 and stats["AR"] == pytest.approx(1.0)


@pytest.mark.parametrize("doc, message", [
    ({"image_id": 1}, "expected a list of detections"),
    ([{"image_id": "7", "bbox": [0, 0, 5, 5], "score": 0.5}], "detection 0 field 'image_id' is '7'"),
    ([{"image_id": 7, "bbox": [0, 0, 5], "score": 0.5}], "detection 0 field 'bbox'"),
    ([{"image_id": 7, "bbox": [0, 0, 5, 5], "score": None}], "detection 0 field 'score' is None"),
])
def test_bad_detections_file_names_the_record(tmp_path, doc, message):
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=message):
        load_detections(path)


def test_detections_keep_people_above_the_score_threshold(tmp_path):
    path = tmp_path / "dets.json"
    path.write_text(json.dumps([
        {"image_id": 7, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5},
        {"image_id": 7, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.9},  # a car
        {"image_id": 7, "category_id": 1, "bbox": [0, 0, 0, 5], "score": 0.9},  # empty box
        {"image_id": 8, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.05},
    ]))
    assert {k: [d.index for d in v] for k, v in load_detections(path).items()} == {7: [0], 8: [3]}
    assert list(load_detections(path, min_score=0.1)) == [7]
