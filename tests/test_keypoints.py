"""COCO-17 metadata against pycocotools and the real annotation file's own tables."""

import json

from pycocotools.cocoeval import Params

from distpose import keypoints as kp
from distpose.data.coco import annotation_path
from distpose.kernels import tree_depths


def _person_category(coco_mini):
    doc = json.loads(annotation_path(coco_mini, "val2017").read_text())
    return next(c for c in doc["categories"] if c["name"] == "person")


def test_names_match_annotation_file(coco_mini):
    assert list(kp.NAMES) == _person_category(coco_mini)["keypoints"]


def test_skeleton_matches_annotation_file(coco_mini):
    file_skeleton = [tuple(limb) for limb in _person_category(coco_mini)["skeleton"]]
    assert len(kp.SKELETON) == 19
    assert [(a + 1, b + 1) for a, b in kp.SKELETON] == file_skeleton


def test_oks_sigmas_match_pycocotools():
    assert list(kp.OKS_SIGMAS) == Params(iouType="keypoints").kpt_oks_sigmas.round(4).tolist()


def test_flip_pairs_swap_left_and_right_names():
    assert len(kp.FLIP_PAIRS) == 8
    for a, b in kp.FLIP_PAIRS:
        assert kp.NAMES[a].replace("left_", "right_") == kp.NAMES[b]
    assert sorted(kp.FLIP_INDEX) == list(range(17))
    assert all(kp.FLIP_INDEX[kp.FLIP_INDEX[k]] == k for k in range(17))
    assert kp.FLIP_INDEX[kp.INDEX["nose"]] == kp.INDEX["nose"]


def test_crf_tree_is_a_spanning_tree_of_limbs():
    parents = kp.CRF_PARENTS
    depths = tree_depths(parents)
    assert parents.count(-1) == 1 and parents[kp.INDEX["nose"]] == -1
    assert max(depths) == 4  # nose -> shoulder -> hip -> knee -> ankle
    edges = {frozenset((k, p)) for k, p in enumerate(parents) if p >= 0}
    assert len(edges) == 16
    limbs = {frozenset(limb) for limb in kp.SKELETON}
    neck_stand_ins = {frozenset((kp.INDEX["nose"], kp.INDEX[s])) for s in ("left_shoulder", "right_shoulder")}
    assert edges - limbs == neck_stand_ins
    # Left/right symmetric: the flip of an edge is an edge.
    for k, p in enumerate(parents):
        if p >= 0:
            assert parents[kp.FLIP_INDEX[k]] == kp.FLIP_INDEX[p]

