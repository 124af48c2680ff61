"""The synthetic COCO dataset: format, determinism, visibility statistics and the left/right cue."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from distpose import keypoints
from distpose.data.synth import generate_synthetic_coco
from distpose.errors import UserError


def _ann_path(root: Path, split: str) -> Path:
    return root / "annotations" / f"person_keypoints_{split}.json"


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def larger(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth40")
    return root, generate_synthetic_coco(root, num_train=40, num_val=0, seed=3, progress=False)


def test_format_loads_with_pycocotools(tmp_path):
    summary = generate_synthetic_coco(tmp_path, num_train=6, num_val=3, seed=0, progress=False)
    image_ids: set[int] = set()
    ann_ids: set[int] = set()
    for split, count in (("train", 6), ("val", 3)):
        coco = COCO(str(_ann_path(tmp_path, split)))
        assert len(coco.imgs) == count
        assert summary[split]["images"] == count
        assert summary[split]["instances"] == len(coco.anns)
        assert not image_ids & coco.imgs.keys() and not ann_ids & coco.anns.keys()
        image_ids |= coco.imgs.keys()
        ann_ids |= coco.anns.keys()

        (cat,) = coco.loadCats(coco.getCatIds())
        assert cat["id"] == 1 and cat["name"] == "person"
        assert cat["keypoints"] == list(keypoints.NAMES)
        assert cat["skeleton"] == [[a + 1, b + 1] for a, b in keypoints.SKELETON]

        flags_seen = []
        for img in coco.imgs.values():
            path = tmp_path / split / img["file_name"]
            assert img["file_name"] == f"{img['id']:012d}.jpg"
            decoded = cv2.imread(str(path))
            assert decoded is not None
            assert decoded.shape[:2] == (img["height"], img["width"])
        for ann in coco.anns.values():
            img = coco.imgs[ann["image_id"]]
            w, h = img["width"], img["height"]
            assert ann["category_id"] == 1 and ann["iscrowd"] == 0 and ann["area"] > 0
            kp = np.array(ann["keypoints"], dtype=float).reshape(keypoints.NUM_JOINTS, 3)
            assert len(ann["keypoints"]) == 51
            x, y, v = kp.T
            assert set(v.tolist()) <= {0, 1, 2}
            assert ann["num_keypoints"] == int(np.count_nonzero(v))
            assert np.all(x[v == 0] == 0) and np.all(y[v == 0] == 0)
            labelled = v > 0
            assert np.all((x[labelled] >= 0) & (x[labelled] <= w) & (y[labelled] >= 0) & (y[labelled] <= h))
            bx, by, bw, bh = ann["bbox"]
            assert bw > 0 and bh > 0
            assert bx >= 0 and by >= 0 and bx + bw <= w and by + bh <= h
            assert ann["area"] <= bw * bh
            flags_seen += v.tolist()
        assert summary[split]["visible"] == flags_seen.count(2)
        assert summary[split]["occluded"] == flags_seen.count(1)
        assert summary[split]["unlabelled"] == flags_seen.count(0)

    # COCOeval runs on the files, and the ground truth scored against itself is perfect.
    coco = COCO(str(_ann_path(tmp_path, "train")))
    results = [{**ann, "score": 1.0} for ann in coco.anns.values()]
    evaluator = COCOeval(coco, coco.loadRes(results), "keypoints")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_deterministic_across_workers_and_seed_sensitive(tmp_path):
    one, two, other = tmp_path / "one", tmp_path / "two", tmp_path / "other"
    generate_synthetic_coco(one, num_train=4, num_val=2, seed=7, workers=1, progress=False)
    generate_synthetic_coco(two, num_train=4, num_val=2, seed=7, workers=2, progress=False)
    generate_synthetic_coco(other, num_train=4, num_val=2, seed=8, workers=1, progress=False)
    files_one, files_two, files_other = _all_files(one), _all_files(two), _all_files(other)
    assert len(files_one) == 4 + 2 + 2
    assert not any(Path(name).name.startswith(".") for name in files_one)  # no temporary files left
    assert files_one == files_two
    assert files_one.keys() == files_other.keys()
    for name, data in files_one.items():
        assert data != files_other[name], name


def test_visibility_and_crowding_statistics(larger):
    root, summary = larger
    coco = COCO(str(_ann_path(root, "train")))
    flags = np.concatenate([np.array(a["keypoints"][2::3]) for a in coco.anns.values()])
    assert np.count_nonzero(flags == 1) > 0
    assert np.count_nonzero(flags == 0) > 0
    assert np.count_nonzero(flags == 2) > np.count_nonzero(flags == 1)
    people_per_image = [len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()]
    assert max(people_per_image) >= 2
    assert summary["train"]["instances"] == sum(people_per_image)


def test_left_and_right_limbs_have_distinct_colours(larger):
    """Front-facing figures: left forearms are warm (red > blue), right ones cool (blue > red)."""
    root, _ = larger
    coco = COCO(str(_ann_path(root, "train")))
    names = keypoints.INDEX
    warm = {"left": [], "right": []}
    for img_id in coco.getImgIds():
        img = cv2.imread(str(root / "train" / coco.imgs[img_id]["file_name"])).astype(float)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
            kp = np.array(ann["keypoints"], dtype=float).reshape(-1, 3)
            ls, rs = kp[names["left_shoulder"]], kp[names["right_shoulder"]]
            # Front-facing: the person's left shoulder is on the image right.
            if ls[2] == 0 or rs[2] == 0 or ls[0] <= rs[0]:
                continue
            for side in ("left", "right"):
                elbow, wrist = kp[names[f"{side}_elbow"]], kp[names[f"{side}_wrist"]]
                if elbow[2] != 2 or wrist[2] != 2 or np.hypot(*(elbow[:2] - wrist[:2])) < 10:
                    continue
                mx, my = np.rint((elbow[:2] + wrist[:2]) / 2).astype(int)
                b, _, r = img[my - 1 : my + 2, mx - 1 : mx + 2].reshape(-1, 3).mean(axis=0)
                warm[side].append(r > b)
    assert len(warm["left"]) >= 10 and len(warm["right"]) >= 10
    assert np.mean(warm["left"]) > 0.8
    assert np.mean(warm["right"]) < 0.2


def test_the_same_set_again_is_kept_and_another_is_refused_without_overwrite(tmp_path):
    first = generate_synthetic_coco(tmp_path, num_train=2, num_val=1, progress=False)
    written = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert generate_synthetic_coco(tmp_path, num_train=2, num_val=1, progress=False) == first
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == written  # nothing rewritten
    for other in ({"num_train": 3}, {"num_val": 2}, {"seed": 1}):
        with pytest.raises(UserError, match="holds another set .*--overwrite"):
            generate_synthetic_coco(tmp_path, **{"num_train": 2, "num_val": 1, **other}, progress=False)
    next(iter((tmp_path / "val").glob("*.jpg"))).unlink()  # an image gone: not the same set any more
    with pytest.raises(UserError, match="--overwrite"):
        generate_synthetic_coco(tmp_path, num_train=2, num_val=1, progress=False)
    summary = generate_synthetic_coco(tmp_path, num_train=1, num_val=1, progress=False, overwrite=True)
    assert summary["train"]["images"] == 1


def test_overwrite_with_fewer_images_removes_the_extra_ones(tmp_path):
    generate_synthetic_coco(tmp_path, num_train=4, num_val=2, progress=False)
    generate_synthetic_coco(tmp_path, num_train=2, num_val=1, progress=False, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["000000000001.jpg", "000000000002.jpg"]
    assert len(list((tmp_path / "val").iterdir())) == 1
