"""`distpose eval` and `distpose predict` on the real mini COCO set, the shard ground truth, the
mean-pose floor and the pipeline report."""

import json

import cv2
import numpy as np
import pytest
from helpers import corrupt_jpeg_in_shard, scramble_jpeg, truncate_shard

from distpose.commands import main
from distpose.config import load_config
from distpose.data.coco import annotation_path
from distpose.data.shards import shard_ground_truth, write_shards
from distpose.eval.bootstrap import instance_pck, paired_difference, pck_interval
from distpose.eval.inference import Predictions
from distpose.eval.mean_pose import fit_mean_pose, predict_mean_pose
from distpose.eval.report import RunResult, compare, write_report
from distpose.models.model_file import save_model_file
from distpose.train.modes import run_model


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory):
    cfg = load_config(None, ["data.input_size=[64,48]", "data.heatmap_size=[16,12]", "data.loader_workers=0"])
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_model_file(path, run_model(cfg).state_dict(), cfg)
    return path


def test_shard_ground_truth_is_the_annotation_file(coco_mini, tmp_path):
    write_shards(coco_mini, "val2017", tmp_path, samples_per_shard=3, role="eval", progress=False)
    rebuilt = shard_ground_truth(tmp_path, "val2017")
    original = json.loads(annotation_path(coco_mini, "val2017").read_text())
    assert sorted(i["id"] for i in rebuilt["images"]) == sorted(i["id"] for i in original["images"])
    by_id = {a["id"]: a for a in original["annotations"]}
    assert sorted(by_id) == sorted(a["id"] for a in rebuilt["annotations"])
    for ann in rebuilt["annotations"]:
        source = by_id[ann["id"]]
        assert ann["image_id"] == source["image_id"] and ann["iscrowd"] == source["iscrowd"]
        assert ann["num_keypoints"] == source["num_keypoints"]


def test_eval_cli_on_a_coco_root_writes_metrics_results_and_drawings(coco_mini, untrained_checkpoint, tmp_path,
                                                                      capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(untrained_checkpoint), "--data", str(coco_mini), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    gt = json.loads(annotation_path(coco_mini, "val2017").read_text())
    usable = [a for a in gt["annotations"] if a["num_keypoints"] > 0 and not a["iscrowd"]]
    assert metrics["instances"] == len(usable)
    assert 0.0 <= metrics["visible/pck@0.2"] <= 1.0 and 0.0 <= metrics["AP"] <= 1.0
    assert set(metrics["pck_per_joint"]) == {"visible", "occluded"}
    results = json.loads((out / "results.json").read_text())
    assert len(results) == len(usable) and all(len(r["keypoints"]) == 51 for r in results)
    grid = cv2.imread(str(out / "skeletons.jpg"))
    assert grid is not None and grid.shape[0] > 100
    assert len(list((out / "images").glob("*.jpg"))) == len({a["image_id"] for a in usable})
    # The photo under the skeletons keeps its colours (its blue and red were once swapped): the drawing differs
    # from the source by JPEG noise and the limbs, 2.2 to 3.4 per pixel and channel here; with blue and red
    # swapped one of these images differed by 26.
    for drawing in (out / "images").glob("*.jpg"):
        source = cv2.imread(str(coco_mini / "val2017" / drawing.name)).astype(int)
        difference = np.abs(cv2.imread(str(drawing)).astype(int) - source).mean()
        assert difference < 10, (drawing.name, difference)
    assert f"{len(usable)} instances: visible/pck@0.05" in capsys.readouterr().out


def test_eval_keeps_each_result_and_overwrites_only_when_asked(coco_mini, untrained_checkpoint, tmp_path, capsys):
    """Ground-truth boxes, then detector boxes, then another split's data: three folders beside the model file.
    The default folder was once the model file's name alone, and each eval replaced the one before without a word."""
    model = tmp_path / "final.pt"
    model.write_bytes(untrained_checkpoint.read_bytes())
    boxes = coco_mini / "annotations" / "person_detections_val2017.json"
    shards = tmp_path / "shards"
    write_shards(coco_mini, "val2017", shards, samples_per_shard=4, role="eval", progress=False)
    (shards / "val2017.manifest.json").rename(shards / "minival.manifest.json")  # the same samples, another name
    runs = [["--data", str(coco_mini)], ["--data", str(coco_mini), "--boxes", str(boxes)],
            ["--data", str(shards), "--split", "minival"]]
    for words in runs:
        assert main(["eval", "--checkpoint", str(model), *words]) == 0
    folders = sorted(p.name for p in tmp_path.glob("eval-*"))
    assert folders == ["eval-final-minival-gt", "eval-final-val2017-gt", "eval-final-val2017-person_detections_val2017"]
    written = {f: (tmp_path / f / "metrics.json").read_bytes() for f in folders}
    assert json.loads(written[folders[1]])["instances"] != json.loads(written[folders[2]])["instances"]  # NMS'd boxes
    capsys.readouterr()

    assert main(["eval", "--checkpoint", str(model), *runs[1]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {tmp_path / folders[2]} holds an earlier result" in err[0], err
    assert "--overwrite" in err[0]
    assert {f: (tmp_path / f / "metrics.json").read_bytes() for f in folders} == written
    assert main(["eval", "--checkpoint", str(model), *runs[1], "--overwrite"]) == 0


def test_eval_cli_skips_a_corrupt_sample_when_scoring_and_drawing(coco_mini, untrained_checkpoint, tmp_path, capsys):
    """One sample's JPEG damaged inside its shard: scored without it, drawn without it, named, exit 0 (the
    drawing once died on it with a traceback)."""
    shards = tmp_path / "shards"
    write_shards(coco_mini, "val2017", shards, samples_per_shard=2, role="eval", progress=False)
    key = corrupt_jpeg_in_shard(shards / "val2017-000000.tar")
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(untrained_checkpoint), "--data", str(shards), "--split", "val2017",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"drawing: skipped sample {key}: JPEG bytes do not match their crc32" in err
    assert "Traceback" not in err
    drawn = {p.stem for p in (out / "images").glob("*.jpg")}
    assert drawn and key not in drawn and (out / "skeletons.jpg").is_file()


def test_eval_cli_scores_the_readable_part_of_a_truncated_shard(coco_mini, untrained_checkpoint, tmp_path, capsys):
    """A shard cut short: the loader and the ground truth both keep the samples before the cut and name the shard
    (the ground truth once died on it with a traceback)."""
    shards = tmp_path / "shards"
    write_shards(coco_mini, "val2017", shards, samples_per_shard=3, role="eval", progress=False)
    shard = shards / "val2017-000000.tar"
    truncate_shard(shard)
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(untrained_checkpoint), "--data", str(shards), "--split", "val2017",
                 "--out", str(out)]) == 0
    out_text, err = capsys.readouterr()
    assert f"ground truth: shard {shard} is unreadable after" in err and f"drawing: shard {shard}" in err, err
    assert "Traceback" not in err
    usable = [a for a in json.loads(annotation_path(coco_mini, "val2017").read_text())["annotations"]
              if a["num_keypoints"] > 0 and not a["iscrowd"]]
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["instances"] < len(usable)
    lost = len(usable) - metrics["instances"]
    assert metrics["lost_instances"] == lost and metrics["unreadable_shards"] == [shard.name]
    assert f"{lost} of the split's instances not scored: unreadable shard(s) {shard.name}" in out_text


def test_eval_cli_fails_in_one_line_when_no_shard_can_be_read(coco_mini, untrained_checkpoint, tmp_path, capsys):
    """Every shard of the split unreadable: each is skipped and counted, then the evaluation stops with one line
    instead of scoring nothing (it once died in the report with an IndexError)."""
    shards = tmp_path / "shards"
    write_shards(coco_mini, "val2017", shards, samples_per_shard=50, role="eval", progress=False)
    for shard in shards.glob("val2017-*.tar"):
        shard.write_bytes(b"not a tar")
    assert main(["eval", "--checkpoint", str(untrained_checkpoint), "--data", str(shards), "--split", "val2017",
                 "--out", str(tmp_path / "eval")]) == 1
    err = capsys.readouterr().err
    assert f"distpose: error: {shards}: no val2017 instance could be evaluated (skipped: " in err, err
    assert "Traceback" not in err


def test_eval_cli_with_detector_boxes(coco_mini, untrained_checkpoint, tmp_path):
    out = tmp_path / "eval"
    boxes = coco_mini / "annotations" / "person_detections_val2017.json"
    assert main(["eval", "--checkpoint", str(untrained_checkpoint), "--data", str(coco_mini), "--boxes", str(boxes),
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["instances"] == len(json.loads(boxes.read_text()))
    assert "visible/pck@0.1" not in metrics and "AP" in metrics  # PCK needs ground-truth boxes


def test_eval_cli_rejects_a_directory_without_data(untrained_checkpoint, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(untrained_checkpoint), "--data", str(tmp_path)]) == 2
    assert "neither shards (*.manifest.json) nor a COCO root" in capsys.readouterr().err


def test_predict_cli_draws_each_image_and_counts_unreadable_ones(coco_mini, untrained_checkpoint, tmp_path, capsys):
    images = sorted((coco_mini / "val2017").glob("*.jpg"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(untrained_checkpoint), *map(str, images), str(broken),
                 "--out", str(out)]) == 0
    assert f"{len(images)} people in {len(images)} images, 1 unreadable image skipped" in capsys.readouterr().out
    for image in images:
        drawing = cv2.imread(str(out / image.name))
        assert drawing.shape == cv2.imread(str(image)).shape
    results = json.loads((out / "results.json").read_text())
    assert sorted(r["image_id"] for r in results) == sorted(int(p.stem) for p in images)


def test_predict_cli_with_boxes_keeps_one_result_per_person_after_nms(coco_mini, untrained_checkpoint, tmp_path,
                                                                       capsys):
    """A directory stands for its images; the count printed is the entries of results.json (after OKS-NMS)."""
    images = sorted((coco_mini / "val2017").glob("*.jpg"))
    boxes = coco_mini / "annotations" / "person_detections_val2017.json"
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(untrained_checkpoint), str(coco_mini / "val2017"),
                 "--boxes", str(boxes), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert 0 < len(results) <= len(json.loads(boxes.read_text()))
    assert {r["image_id"] for r in results} <= {int(p.stem) for p in images}
    assert f"{len(results)} people (" in capsys.readouterr().out
    assert {p.name for p in out.glob("*.jpg")} == {p.name for p in images}


def test_predict_cli_names_missing_and_scrambled_images(coco_mini, untrained_checkpoint, tmp_path, capsys):
    scrambled = tmp_path / "000000040083.jpg"
    scrambled.write_bytes(scramble_jpeg((coco_mini / "val2017" / "000000040083.jpg").read_bytes()))
    assert main(["predict", "--checkpoint", str(untrained_checkpoint), str(tmp_path / "missing.jpg"),
                 str(scrambled), "--out", str(tmp_path / "pred")]) == 1
    captured = capsys.readouterr()
    assert f"skipped {tmp_path / 'missing.jpg'}: no such file" in captured.err
    assert f"skipped {scrambled}: JPEG data corrupt" in captured.err
    assert "0 people in 0 images, 2 unreadable images skipped" in captured.out


def test_mean_pose_by_hand():
    # Two people whose boxes already have the crop's aspect (0.75): windows are the boxes x 1.25.
    gt = {"annotations": [
        {"id": 1, "image_id": 1, "bbox": [0, 0, 75, 100], "area": 7500, "iscrowd": 0, "num_keypoints": 1,
         "keypoints": [37.0, 10.0, 2] + [0] * 48},
        {"id": 2, "image_id": 1, "bbox": [100, 0, 75, 100], "area": 7500, "iscrowd": 0, "num_keypoints": 1,
         "keypoints": [137.0, 30.0, 1] + [0] * 48},
    ]}
    mean = fit_mean_pose(gt, 0.75, 1.25)
    # Nose offsets from the box centres (37, 49.5) and (137, 49.5): (0, -39.5) and (0, -19.5), in
    # window heights of 125 pixels: mean -29.5 / 125. Joints no one labels stay at the centre.
    np.testing.assert_allclose(mean[0], [0.0, -29.5 / 125])
    np.testing.assert_allclose(mean[1:], 0.0)
    preds = predict_mean_pose(mean, gt, 0.75, 1.25)
    np.testing.assert_allclose(preds.keypoints[:, 0], [[37.0, 20.0], [137.0, 20.0]])


def fake_predictions(rng: np.random.Generator, gt: np.ndarray, noise: float) -> Predictions:
    n, k = gt.shape[:2]
    ids = np.arange(n)
    boxes = np.tile([0.0, 0.0, 80.0, 100.0], (n, 1))
    return Predictions(gt[..., :2] + rng.normal(0, noise, (n, k, 2)), np.ones((n, k)), np.ones(n), ids, ids, boxes,
                       np.full(n, 8000.0), gt)


def test_report_has_the_table_intervals_comparisons_and_curves(tmp_path):
    rng = np.random.default_rng(0)
    gt = np.concatenate([rng.uniform(0, 100, (120, 17, 2)), rng.integers(0, 3, (120, 17, 1))], axis=2)
    backbone, crf = fake_predictions(rng, gt, 12.0), fake_predictions(rng, gt, 6.0)
    steps = [{"step": s, "loss": 1.0 / s, "samples_per_s": 100.0} for s in range(1, 11)]
    evals = [{"epoch": e, "val/visible/pck@0.1": 0.3 * e} for e in (1, 2)]
    metrics = {"visible/pck@0.05": 0.2, "visible/pck@0.1": 0.6, "visible/pck@0.2": 0.8, "occluded/pck@0.1": 0.4,
               "AP": 0.1, "AR": 0.2}
    results = [
        RunResult("mean pose", "floor", {"visible/pck@0.1": 0.25}),
        RunResult("cnn", "backbone", metrics, 12.5, 100.0, steps, evals, predictions=backbone),
        RunResult("cnn_crf", "crf", metrics, 8.0, 50.0, steps, evals, predictions=crf),
    ]
    comparison = compare(results[2], results[1])
    report = write_report(tmp_path, results, ["header line"], [comparison], []).read_text()
    visible = pck_interval(instance_pck(backbone, "visible", 0.1))
    occluded = pck_interval(instance_pck(backbone, "occluded", 0.1))
    assert (f"| cnn (backbone) | {visible.format()} | {occluded.format()} | 0.200 | 0.800 | - | - | 0.100 | 0.200 | "
            "100.0 | 12.5 |") in report
    assert "| mean pose (floor) | 0.250 | - |" in report
    gain = paired_difference(instance_pck(crf, "occluded", 0.1), instance_pck(backbone, "occluded", 0.1))
    assert gain.low > 0
    row = next(line for line in report.splitlines() if line.startswith("| cnn_crf | cnn |"))
    assert gain.format(signed=True) in row and row.endswith("| beats | beats |")
    for plot in ("loss.png", "pck.png"):
        image = cv2.imread(str(tmp_path / plot))
        assert image is not None and image.shape[0] >= 300, plot
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"][1]["wall_time"] == 12.5
    assert saved["runs"][1]["intervals"]["visible/pck@0.1"] == [visible.estimate, visible.low, visible.high]
    assert saved["comparisons"][0]["differences"]["occluded/pck@0.1"] == [gain.estimate, gain.low, gain.high]
