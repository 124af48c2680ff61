"""COCO-17 keypoint metadata: names, flip pairs, skeleton, OKS sigmas and the CRF tree.

Every table here is checked in tests against pycocotools or the COCO annotation file itself.
"""

from __future__ import annotations

NAMES: tuple[str, ...] = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)
NUM_JOINTS = len(NAMES)
INDEX = {name: i for i, name in enumerate(NAMES)}

# Left/right pairs swapped by a horizontal flip.
FLIP_PAIRS: tuple[tuple[int, int], ...] = tuple(
    (INDEX[name], INDEX["right_" + name[len("left_"):]]) for name in NAMES if name.startswith("left_")
)


def _flip_permutation() -> tuple[int, ...]:
    perm = list(range(NUM_JOINTS))
    for a, b in FLIP_PAIRS:
        perm[a], perm[b] = b, a
    return tuple(perm)


# FLIP_INDEX[k] is the joint that k becomes after a horizontal flip.
FLIP_INDEX: tuple[int, ...] = _flip_permutation()

# The 19 limbs of the COCO person category, 0-based (the annotation file's `skeleton` is 1-based).
SKELETON: tuple[tuple[int, int], ...] = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
    (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)

# Per-joint OKS falloff constants (COCO keypoint evaluation).
OKS_SIGMAS: tuple[float, ...] = (
    0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062,
    0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
)

LEFT_JOINTS = frozenset(i for i, n in enumerate(NAMES) if n.startswith("left_"))
RIGHT_JOINTS = frozenset(i for i, n in enumerate(NAMES) if n.startswith("right_"))

# Spanning tree for the CRF, as parent indices (-1 at the root). Rooted at the nose:
# nose -> eyes -> ears, nose -> shoulders -> elbows -> wrists, shoulders -> hips -> knees -> ankles.
# Every edge is a COCO limb except nose -> shoulder, which stands in for the neck COCO lacks.
CRF_PARENTS: tuple[int, ...] = (-1, 0, 0, 1, 2, 0, 0, 5, 6, 7, 8, 5, 6, 11, 12, 13, 14)


def person_category() -> dict:
    """COCO's person category entry, as annotation files carry it (skeleton 1-based)."""
    return {"id": 1, "name": "person", "supercategory": "person", "keypoints": list(NAMES),
            "skeleton": [[a + 1, b + 1] for a, b in SKELETON]}
